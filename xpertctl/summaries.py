"""What an xpertctl artifact holds, as a small dict: what `inspect` shows, and the summary stats, select
and decompose print (a table on stderr, or with --json a document on stdout)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import XpertError
from .io import provenance

ARTIFACT_KINDS = ("stats", "factors", "adapted")  # safetensors artifacts; selections are JSON


def stats(path: Path) -> dict:
    from safetensors import safe_open
    rec = provenance.read(path, "stats")
    with safe_open(str(path), framework="pt") as f:
        tokens = f.get_tensor("tokens").tolist()
    if rec.get("level") == "neuron":
        return {"path": str(path), "kind": "stats", "level": "neuron", "source": rec["source"]["path"],
                "family": rec.get("family"), "neurons": rec["num_neurons"], "neuron_top": rec["neuron_top"],
                "neurons_per_token": rec["neurons_per_token"], "layers": rec["layers"],
                "domains": dict(zip(rec["domains"], tokens)), "seq_len": rec["params"].get("seq_len"),
                "version": rec.get("version")}
    return {"path": str(path), "kind": "stats", "source": rec["source"]["path"], "family": rec.get("family"),
            "experts": rec["num_experts"], "top_k": rec["top_k"], "layers": rec["layers"],
            "domains": dict(zip(rec["domains"], tokens)), "seq_len": rec["params"].get("seq_len"),
            "version": rec.get("version")}


def selection(doc: dict, path: Path | None) -> dict:
    if doc.get("level") == "neuron":
        return {"path": str(path) if path is not None else None, "kind": "selection", "level": "neuron",
                "criterion": doc.get("criterion"), "per_layer": doc.get("per_layer"), "seed": doc.get("seed"),
                "domains": doc.get("domains"), "source": (doc.get("source") or {}).get("path"),
                "num_neurons": doc.get("num_neurons"), "neuron_top": doc.get("neuron_top"),
                "layers": {str(l["layer"]): {"neurons": len(l["neurons"]), "coverage_min": min(l["coverage"].values()),
                                             "mass_share_min": min(l["mass_share"].values())}
                           for l in doc["layers"]}}
    return {"path": str(path) if path is not None else None, "kind": "selection", "criterion": doc.get("criterion"),
            "per_layer": doc.get("per_layer"), "seed": doc.get("seed"), "domains": doc.get("domains"),
            "source": (doc.get("source") or {}).get("path"),
            "experts": {str(l["layer"]): l["experts"] for l in doc["layers"]}}


def factors(path: Path) -> dict:
    rec = provenance.read(path, "factors")
    errors: dict[str, dict[str, float]] = {}  # relative reconstruction error per layer and matrix
    order = {"gate": 0, "up": 1, "down": 2}
    for key, err in sorted(rec.get("errors", {}).items(),
                           key=lambda kv: (int(kv[0].split(".")[1]), order.get(kv[0].split(".")[2], 3))):
        _, layer, matrix = key.split(".")
        errors.setdefault(layer, {})[matrix] = err
    return {"path": str(path), "kind": "factors", "method": rec.get("method"), "ranks": rec.get("ranks"),
            "align": rec.get("align"), "source": rec["source"]["path"], "family": rec.get("family"),
            "hidden": rec.get("hidden"), "expert_ffn": rec.get("expert_ffn"),
            "selection": (rec.get("selection") or {}).get("path"), "errors": errors}


def adapted(path: Path) -> dict:
    rec = provenance.read(path, "adapted")
    return {"path": str(path), "kind": "adapted", "target": rec["target"], "layer_map": rec["layer_map"],
            "layer_map_method": rec.get("layer_map_method"), "combine": rec.get("combine"),
            "width_select": rec.get("width_select"), "source": rec["source"]["path"], "family": rec.get("family"),
            "factors": rec.get("factors")}


def describe(path: Path) -> dict:
    """inspect: an xpertctl artifact (stats, selection, factors, adapted) or else a checkpoint."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        from .ops.select import load_selection
        try:
            doc = load_selection(path)
        except XpertError:
            raise XpertError(f"{path}: not an xpertctl selection (and JSON is no checkpoint)") from None
        return selection(doc, path)
    if path.is_file():
        from .io import read_header
        try:
            raw = read_header(path).metadata.get(provenance.KEY)
            kind = json.loads(raw).get("kind") if raw else None
        except (XpertError, json.JSONDecodeError):
            kind = None  # not an artifact: open_checkpoint below says what it is not
        if kind in ARTIFACT_KINDS:
            return {"stats": stats, "factors": factors, "adapted": adapted}[kind](path)
    from .console import notice
    from .io import open_checkpoint
    info = open_checkpoint(path, check_config=False).summary()  # the weights' truth, and where config.json differs
    for line in info.get("config_disagrees", []):
        notice(f"{line} (shown: what the weights have; other commands refuse this checkpoint)")
    return info
