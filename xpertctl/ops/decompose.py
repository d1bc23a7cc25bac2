"""XPERT step 2: stack each layer's selected experts per matrix and Tucker-decompose the stack."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..console import progress
from ..errors import XpertError
from ..io import open_checkpoint, provenance, write_safetensors
from ..io.checkpoint import Checkpoint
from . import select as sel
from .tucker import parse_ranks, resolve, tucker

MATRICES = ("gate", "up", "down")


def align(experts: list[tuple[torch.Tensor, ...]]) -> tuple[list[tuple[torch.Tensor, ...]], list[torch.Tensor]]:
    """Permute each expert's hidden neurons to best match the first (reference) expert.

    A neuron is (gate row, up row, down column): one permutation per expert is applied to all three,
    chosen by linear_sum_assignment on the dot-product similarity of those concatenated vectors.
    """
    ref = experts[0]
    ref_feat = torch.cat([ref[0], ref[1], ref[2].T], dim=1).double()
    out, perms = [ref], [torch.arange(ref[0].shape[0])]
    for g, u, d in experts[1:]:
        feat = torch.cat([g, u, d.T], dim=1).double()
        sim = (ref_feat @ feat.T).numpy()
        rows, cols = linear_sum_assignment(sim, maximize=True)
        perm = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
        out.append((g[perm], u[perm], d[:, perm]))
        perms.append(perm)
    return out, perms


def stacks(experts: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """(gate, up, down) of n experts -> {'gate': (I, H, n), 'up': (I, H, n), 'down': (H, I, n)}."""
    return {m: torch.stack([e[k].float() for e in experts], dim=-1) for k, m in enumerate(MATRICES)}


def layer_weights(layer_doc: dict) -> torch.Tensor:
    """Each selected expert's weight: its mean activation frequency over domains, normalized."""
    fr = layer_doc.get("freq") or {}
    if fr:
        w = torch.tensor(np.mean([v for v in fr.values()], axis=0), dtype=torch.float32)
    else:
        w = torch.ones(len(layer_doc["experts"]))
    return w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1 / len(w))


def layer_factors(ck: Checkpoint, l: dict, rank_spec: list, ranks: str | None, align_neurons: bool,
                  no_tucker: bool) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Factors of one selected layer: {'layers.{i}.{m}.core|U1|U2|U3|error'} (or '.mean'), its errors."""
    i, ids = l["layer"], l["experts"]
    experts = ck.experts(i, ids)
    for j, e in zip(ids, experts):
        if not all(torch.isfinite(t).all() for t in e):
            raise XpertError(f"{ck.path}: expert {j} of layer {i} has NaN or Inf weights")
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    if align_neurons:
        experts, perms = align(experts)
        tensors[f"layers.{i}.perm"] = torch.stack(perms)
    w = layer_weights(l)
    tensors[f"layers.{i}.experts"] = torch.tensor(ids, dtype=torch.int64)
    tensors[f"layers.{i}.weights"] = w
    for m, x in stacks(experts).items():
        key = f"layers.{i}.{m}"
        if no_tucker:
            tensors[f"{key}.mean"] = torch.tensordot(x, w, dims=([2], [0]))
            errors[key] = 0.0
        else:
            core, (u1, u2, u3), err = tucker(x, resolve(rank_spec, tuple(x.shape), ranks))
            tensors.update({f"{key}.core": core, f"{key}.U1": u1, f"{key}.U2": u2, f"{key}.U3": u3,
                            f"{key}.error": torch.tensor(err)})
            errors[key] = err
    return tensors, errors


def factor_meta(ck: Checkpoint, doc: dict, sel_path: Path | str, ranks: str | None, align_neurons: bool,
                no_tucker: bool, errors: dict[str, float]) -> dict:
    return {
        "method": "mean" if no_tucker else "tucker", "ranks": ranks or "full,full,1", "align": align_neurons,
        "layers": [l["layer"] for l in doc["layers"]], "errors": errors,
        "source": ck.fingerprint, "family": ck.family.name, "hidden": ck.hidden, "expert_ffn": ck.expert_ffn,
        "selection": {"criterion": doc.get("criterion"), "per_layer": doc.get("per_layer"),
                      "path": str(Path(sel_path)), "sha256": provenance.sha256(Path(sel_path).read_bytes())
                      if Path(sel_path).is_file() else None},
    }


def compute(ck: Checkpoint, doc: dict, sel_path: Path | str, *, ranks: str | None = None, align_neurons: bool = False,
            no_tucker: bool = False, only: set[int] | None = None, each=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Factors for every selected layer (or those in `only`). With `each`, every layer's factors are
    handed to each(layer, tensors) instead of being kept (the one-shot graft streams them)."""
    sel.check_source(doc, Path(sel_path), ck)
    rank_spec = parse_ranks(ranks)
    layers = [l for l in doc["layers"] if only is None or l["layer"] in only]
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    with progress() as bar:
        task = bar.add_task("decompose", total=len(layers), info="")
        for l in layers:
            t, e = layer_factors(ck, l, rank_spec, ranks, align_neurons, no_tucker)
            errors.update(e)
            if each is not None:
                each(l["layer"], t)
            else:
                tensors.update(t)
            bar.update(task, advance=1, info=f"layer {l['layer']}")
    return tensors, factor_meta(ck, doc, sel_path, ranks, align_neurons, no_tucker, errors)


def all_experts_doc(ck: Checkpoint) -> dict:
    """A selection of every expert (what one-shot graft uses without stats or a selection)."""
    return {"criterion": "all", "per_layer": ck.num_experts, "source": None, "num_experts": ck.num_experts,
            "layers": [{"layer": i, "experts": list(range(ck.num_experts))} for i in ck.moe_layers]}


def run(src: Path, selection: Path, out: Path, *, ranks: str | None = None, align_neurons: bool = False,
        no_tucker: bool = False, force: bool = False) -> Path:
    """`xpertctl decompose`: factors.safetensors."""
    from ..io import check_output
    ck = open_checkpoint(src).require_moe()
    check_output(out, force, [ck.path, selection])
    parse_ranks(ranks)
    doc = sel.load_selection(selection)
    tensors, meta = compute(ck, doc, selection, ranks=ranks, align_neurons=align_neurons, no_tucker=no_tucker)
    rec = provenance.record("factors", inputs=[ck.fingerprint, provenance.file_fingerprint(selection)],
                            params={"ranks": ranks, "align": align_neurons, "no_tucker": no_tucker}, **meta)
    return write_safetensors(out, tensors, provenance.as_metadata(rec), force=force)
