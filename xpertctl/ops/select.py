"""Cross-domain expert selection from routing statistics (XPERT step 1), with controls.

Stats of a dense source count FFN neurons instead of experts (`level` "neuron", ops/neurons.py): the same
criteria rank neurons, and the selection lists `neurons` per layer instead of `experts`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from ..errors import XpertError
from ..io import provenance
from .ranking import top_indices

from ..specs import CRITERIA


@dataclass
class Stats:
    counts: np.ndarray  # [D, L, E] int64
    mass: np.ndarray  # [D, L, E]
    tokens: np.ndarray  # [D]
    layers: list[int]
    domains: list[str]
    top_k: int
    num_experts: int
    source: dict  # fingerprint of the model the stats came from
    fingerprint: dict  # of the stats file
    routed: np.ndarray | None = None  # [D, L, E] summed top-k routing weight (absent in older stats)
    level: str = "expert"  # "neuron": a dense source's FFN neurons (num_experts: neurons per layer, top_k: per token)
    neuron_top: float | None = None  # neuron stats: the top fraction of |activation| that counts as active

    @property
    def unit(self) -> str:
        return "neurons" if self.level == "neuron" else "experts"

    @property
    def freq(self) -> np.ndarray:
        """Per-domain activation frequency: share of a domain's tokens routed to each expert."""
        return self.counts / np.maximum(self.tokens, 1)[:, None, None]

    @property
    def prob(self) -> np.ndarray:
        """Per-domain mean router probability of each expert (the stats' `mass` per token)."""
        return self.mass / np.maximum(self.tokens, 1)[:, None, None]


def load_stats(path: Path) -> Stats:
    path = Path(path)
    rec = provenance.read(path, kind="stats")
    try:
        t = load_file(str(path))
    except Exception as e:
        raise XpertError(f"{path}: cannot read stats ({e})") from None
    missing = {"counts", "mass", "tokens", "layers"} - set(t)
    if missing:
        raise XpertError(f"{path}: stats file lacks {', '.join(sorted(missing))}")
    counts = t["counts"].numpy()
    if counts.ndim != 3 or counts.shape[0] != len(rec["domains"]) or counts.shape[1] != len(rec["layers"]):
        raise XpertError(f"{path}: counts shape {list(counts.shape)} disagrees with its metadata")
    if (t["tokens"] <= 0).any():
        raise XpertError(f"{path}: a domain has no tokens")
    for k in ("mass", "routed"):  # an older stats run over non-finite weights: scores would be NaN
        if k in t and not bool(t[k].isfinite().all()):
            raise XpertError(f"{path}: its router {k} holds NaN or Inf (a model with non-finite weights); "
                             "fix the model and run stats again")
    if rec.get("level") == "neuron":
        return Stats(counts, t["mass"].numpy(), t["tokens"].numpy(), list(rec["layers"]), list(rec["domains"]),
                     int(rec["neurons_per_token"]), int(rec["num_neurons"]), rec["source"],
                     provenance.file_fingerprint(path), None, "neuron", float(rec["neuron_top"]))
    return Stats(counts, t["mass"].numpy(), t["tokens"].numpy(), list(rec["layers"]), list(rec["domains"]),
                 int(rec["top_k"]), int(rec["num_experts"]), rec["source"], provenance.file_fingerprint(path),
                 t["routed"].numpy() if "routed" in t else None)


def default_per_layer(stats: Stats) -> int:
    """Experts: the model's top-k (the experts one token uses). Neurons: half the FFN, the width of a student
    that halves it (graft cuts a larger selection to the target's FFN, best-scored first)."""
    return max(1, stats.num_experts // 2) if stats.level == "neuron" else stats.top_k


def choose(stats: Stats, criterion: str = "min", per_layer: int | None = None, seed: int = 0) -> list[dict]:
    """Per MoE layer: chosen expert ids (best first), their scores and per-domain frequencies."""
    if criterion not in CRITERIA:
        raise XpertError(f"--criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")
    E = stats.num_experts
    n = E if criterion == "all" else (per_layer if per_layer is not None else default_per_layer(stats))
    if not 1 <= n <= E:
        raise XpertError(f"--per-layer {n}: must be 1..{E} ({stats.unit} per layer)")
    freq, prob = stats.freq, stats.prob  # [D, L, E]
    rng = np.random.default_rng(seed)
    layers = []
    for li, layer in enumerate(stats.layers):
        f = freq[:, li, :]
        if criterion == "min":
            score = f.min(0)
        elif criterion == "mean":
            score = f.mean(0)
        elif criterion == "vote":
            # number of domains in whose top-n the expert is; ties broken by mean frequency
            votes = np.zeros(E)
            for d in range(f.shape[0]):
                votes[top_indices(f[d], n)] += 1
            score = votes + f.mean(0) / (f.mean(0).max() + 1e-12) * 0.5
        elif criterion == "random":
            score = rng.permutation(E).astype(float)
        elif criterion == "low":
            score = -f.mean(0)
        else:  # all
            score = f.mean(0)
        ids = top_indices(score, n)
        if stats.level == "neuron":
            layers.append(_neuron_layer(stats, li, layer, ids, score))
            continue
        layers.append({
            "layer": int(layer),
            "experts": [int(j) for j in ids],
            "scores": [float(score[j]) for j in ids],
            "freq": {d: [float(f[k, j]) for j in ids] for k, d in enumerate(stats.domains)},
            "prob": {d: [round(float(prob[k, li, j]), 6) for j in ids] for k, d in enumerate(stats.domains)},
        })
        if stats.routed is not None and stats.routed[:, li, :].sum() > 0:  # all zeros: a router that gave no weights
            per_expert = (stats.routed[:, li, :] / np.maximum(stats.tokens, 1)[:, None]).mean(0)
            layers[-1]["routed_mass"] = float(per_expert.sum())  # mean total top-k weight per token: the block's scale
            layers[-1]["routed"] = [float(per_expert[j]) for j in ids]  # the share each chosen expert receives
        elif stats.routed is not None:
            layers[-1]["routed_mass"] = 0.0  # stats with no weight: the rescale must say why, not 'no stats'
    return layers


def _neuron_layer(stats: Stats, li: int, layer: int, ids: np.ndarray, score: np.ndarray) -> dict:
    """A neuron layer's entry: the kept neurons best first and their scores, and per domain the share of its
    activations (`coverage`) and of its |activation| mass (`mass_share`) they carry; no per-neuron lists
    per domain (thousands of neurons per layer)."""
    c, m = stats.counts[:, li, :], stats.mass[:, li, :]
    share = lambda x: {d: round(float(x[k, ids].sum() / max(x[k].sum(), 1e-30)), 6) for k, d in enumerate(stats.domains)}
    return {"layer": int(layer), "neurons": [int(j) for j in ids], "scores": [float(score[j]) for j in ids],
            "coverage": share(c), "mass_share": share(m)}


def selection_doc(stats: Stats, layers: list[dict], criterion: str, per_layer: int | None, seed: int) -> dict:
    rec = provenance.record("selection", inputs=[stats.fingerprint],
                            params={"criterion": criterion, "per_layer": per_layer, "seed": seed}, seed=seed)
    if stats.level == "neuron":
        return {"xpertctl": rec, "level": "neuron", "criterion": criterion,
                "per_layer": len(layers[0]["neurons"]) if layers else 0, "seed": seed, "source": stats.source,
                "stats": stats.fingerprint, "domains": stats.domains, "num_neurons": stats.num_experts,
                "neuron_top": stats.neuron_top, "neurons_per_token": stats.top_k, "layers": layers}
    return {
        "xpertctl": rec,
        "criterion": criterion, "per_layer": len(layers[0]["experts"]) if layers else 0, "seed": seed,
        "source": stats.source, "stats": stats.fingerprint, "domains": stats.domains,
        "num_experts": stats.num_experts, "top_k": stats.top_k, "layers": layers,
    }


def write_selection(out: Path, doc: dict, force: bool = False) -> Path:
    from ..io.writer import atomic_path
    if doc.get("level") == "neuron":  # one line per layer: thousands of neuron ids stay readable
        head = json.dumps({k: v for k, v in doc.items() if k != "layers"}, indent=2)[:-2]
        text = head + ',\n  "layers": [\n' + ",\n".join("    " + json.dumps(l) for l in doc["layers"]) + "\n  ]\n}\n"
    else:
        text = json.dumps(doc, indent=2) + "\n"
    with atomic_path(Path(out), force) as tmp:
        tmp.write_text(text)
    return Path(out)


def load_selection(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise XpertError(f"{path}: no such file")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        provenance.refuse_other_kind(path, "selection")  # a stats or factors file given by mistake: say which
        raise XpertError(f"{path}: not valid JSON ({e.__class__.__name__})") from None
    if isinstance(doc, dict) and not isinstance(doc.get("layers"), list):
        provenance.refuse_other_kind(path, "selection")
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list) or not doc["layers"]:
        raise XpertError(f"{path}: not a selection (no 'layers' list)")
    unit = "neurons" if doc.get("level") == "neuron" else "experts"
    for n, l in enumerate(doc["layers"]):
        if not isinstance(l, dict) or not isinstance(l.get("layer"), int) or not isinstance(l.get(unit), list) \
                or not l[unit] or not all(isinstance(j, int) for j in l[unit]):
            raise XpertError(f"{path}: layers[{n}] needs an int 'layer' and a non-empty int list '{unit}'")
    return doc


def check_level(doc: dict, path, ck) -> None:
    """Neuron selections belong to dense sources, expert selections to MoEs: say which when they meet the other."""
    neuron = doc.get("level") == "neuron"
    if neuron and not ck.dense:
        raise XpertError(f"{path}: a neuron-level selection (from a dense model's stats); {ck.path} is an MoE, "
                         "which needs an expert selection (stats of the MoE itself)")
    if ck.dense and not neuron:
        raise XpertError(f"{path}: an expert selection; {ck.path} is a dense {ck.family.name} model, whose "
                         "selection comes from its own neuron stats (xpertctl stats on it)")


def check_source(doc: dict, path: Path, ck) -> None:
    """Refuse a selection made from another model's stats (moving or renaming the model is fine)."""
    check_level(doc, path, ck)
    src = doc.get("source") or {}
    if src and (src.get("sha256"), src.get("size")) != (ck.fingerprint["sha256"], ck.fingerprint["size"]):
        raise XpertError(f"{path}: made from stats of another model ({src.get('path')}), not {ck.path}")
    if ck.dense:
        n = doc.get("num_neurons")
        if n is not None and n != ck.expert_ffn:
            raise XpertError(f"{path}: selection is for {n} neurons per layer, {ck.path} has {ck.expert_ffn}")
        for l in doc["layers"]:
            if l["layer"] not in ck.dense_layers:
                raise XpertError(f"{path}: layer {l['layer']} is not an FFN layer of {ck.path}")
            bad = [j for j in l["neurons"] if not 0 <= j < ck.expert_ffn]
            if bad or len(set(l["neurons"])) != len(l["neurons"]):
                raise XpertError(f"{path}: layer {l['layer']}: neuron ids {bad or 'repeated'} "
                                 f"(must be distinct, 0..{ck.expert_ffn - 1})")
        return
    n = doc.get("num_experts")
    if n is not None and n != ck.num_experts:
        raise XpertError(f"{path}: selection is for {n} experts per layer, {ck.path} has {ck.num_experts}")
    for l in doc["layers"]:
        if l["layer"] not in ck.moe_layers:
            raise XpertError(f"{path}: layer {l['layer']} is not an MoE layer of {ck.path}")
        bad = [j for j in l["experts"] if not 0 <= j < ck.num_experts]
        if bad:
            raise XpertError(f"{path}: layer {l['layer']}: expert ids {bad} out of range 0..{ck.num_experts - 1}")


def figure(stats: Stats, layers: list[dict], only: list[int] | None = None):
    """Per-domain activation frequency of every expert, one panel per layer, chosen experts marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    idx = [n for n, l in enumerate(stats.layers) if only is None or l in only]
    if only is not None:
        missing = sorted(set(only) - set(stats.layers))
        if missing:
            raise XpertError(f"--plot-layers: {missing} are not {'FFN' if stats.level == 'neuron' else 'MoE'} layers "
                             f"in the stats ({stats.layers})")
    if stats.level == "neuron":
        return _neuron_figure(plt, stats, layers, idx)
    chosen = {l["layer"]: set(l["experts"]) for l in layers}
    cols = min(4, len(idx))
    rows = (len(idx) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    freq, E, D = stats.freq, stats.num_experts, len(stats.domains)
    width = 0.8 / D
    for ax in axes.flat[len(idx):]:
        ax.remove()
    for ax, li in zip(axes.flat, idx):
        layer = stats.layers[li]
        for j in chosen.get(layer, ()):
            ax.axvspan(j - 0.45, j + 0.45, color="gold", alpha=0.35, lw=0)
        for d in range(D):
            ax.bar(np.arange(E) - 0.4 + width * (d + 0.5), freq[d, li], width, label=stats.domains[d])
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlim(-0.6, E - 0.4)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.supxlabel("expert (gold: selected)", fontsize=9)
    fig.supylabel("activation frequency", fontsize=9)
    fig.tight_layout()
    return fig


def _neuron_figure(plt, stats: Stats, layers: list[dict], idx: list[int]):
    """Thousands of neurons do not fit as bars: per layer, each domain's frequency over the neurons in
    selection order (the kept ones first, then the rest by mean frequency), the cut marked."""
    kept = {l["layer"]: l["neurons"] for l in layers}
    cols = min(4, len(idx))
    rows = (len(idx) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(idx):]:
        ax.remove()
    freq = stats.freq
    for ax, li in zip(axes.flat, idx):
        layer, f = stats.layers[li], freq[:, li, :]
        first = kept.get(layer, [])
        rest = [int(j) for j in top_indices(f.mean(0), f.shape[1]) if int(j) not in set(first)]
        order = list(first) + rest
        for d, name in enumerate(stats.domains):
            ax.plot(np.arange(len(order)), f[d, order], lw=0.8, label=name)
        ax.axvline(len(first) - 0.5, color="k", lw=0.8, ls="--")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.supxlabel("neuron, in selection order (left of the dashed line: selected)", fontsize=9)
    fig.supylabel(f"active frequency (top {stats.neuron_top:g} of |act|)", fontsize=9)
    fig.tight_layout()
    return fig


PLOT_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}


def plot_format(path: Path) -> str:
    """The image format `path`'s suffix names (the bytes written are that format, never PNG under .jpg)."""
    fmt = PLOT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise XpertError(f"--plot {path}: give a file ending in {', '.join(PLOT_FORMATS)}")
    return fmt


def plot(stats: Stats, layers: list[dict], out: Path, only: list[int] | None = None, force: bool = False) -> Path:
    import matplotlib.pyplot as plt
    from ..io.writer import atomic_path
    fig = figure(stats, layers, only)
    try:
        with atomic_path(Path(out), force) as tmp:
            fig.savefig(tmp, dpi=110, format=plot_format(out))
    finally:
        plt.close(fig)
    return Path(out)


def run(stats_path: Path, out: Path | None, *, criterion: str = "min", per_layer: int | None = None, seed: int = 0,
        plot_path: Path | None = None, plot_layers: list[int] | None = None, force: bool = False) -> tuple[dict, Path | None]:
    """`xpertctl select`: the selection document, written to `out` when given (and the plot to `plot_path`).
    Both outputs follow the one output rule, checked before either is written."""
    from ..io import check_output
    if out is not None:
        check_output(out, force, [stats_path])
    if plot_path is not None:
        if out is not None and Path(plot_path).resolve() == Path(out).resolve():
            raise XpertError(f"--plot {plot_path}: the same file as -o {out}")
        check_output(plot_path, force, [stats_path])
        plot_format(plot_path)
    stats = load_stats(stats_path)
    layers = choose(stats, criterion, per_layer, seed)
    doc = selection_doc(stats, layers, criterion, per_layer, seed)
    if plot_path is not None:
        plot(stats, layers, plot_path, plot_layers, force)
    return doc, (write_selection(out, doc, force) if out is not None else None)
