"""Dense sources: XPERT's cross-domain idea at the granularity of FFN neurons.

A dense model's layer is one always-on SwiGLU FFN, out = W_down a with a = silu(W_gate x) * (W_up x).
Neuron j of a layer is gate row j, up row j and down column j; its activation on a token is a_j, the
input of down_proj.

Activated: neuron j is active on a token when |a_j| is among the k = max(1, round(q * N)) largest
|a| of that layer's N neurons on that token (q = --neuron-top, default 1/8). A fraction, not a
threshold: SwiGLU has no exact zeros and the scale of |a| differs between layers and models, while a
per-token top fraction is scale-free and makes each token activate exactly k neurons, as an MoE routes
each token to exactly top-k experts. 1/8 is the share OLMoE-1B-7B (XPERT's source, 8 of 64 experts)
routes, so "used" is as selective for a neuron as for an expert.

stats counts, per (domain, layer, neuron), the tokens on which the neuron is active, and sums |a_j|
(its usage mass); select ranks neurons by the same criteria as experts (min over domains of the
normalized frequency by default); graft copies the kept neurons' gate/up rows and down columns (the
student FFN computes exactly the part of the source FFN those neurons carry), shortening by the layer
map; fidelity compares each student FFN with the FFN it came from.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import XpertError
from ..io import arch
from ..io.checkpoint import Checkpoint, _ranges
from ..specs import Target
from .capture import Tap, drive

NEURON_TOP = 1 / 8  # default --neuron-top: the share of experts OLMoE-1B-7B routes (8 of 64)


def per_token(n: int, q: float) -> int:
    """How many of a layer's n neurons are active on each token at --neuron-top q."""
    if not 0 < q <= 1:
        raise XpertError(f"--neuron-top {q:g}: must be in (0, 1] (the share of a layer's neurons active per token)")
    return max(1, min(n, round(q * n)))


class NeuronCounter(Tap):
    """Forward pre-hooks on every dense layer's down_proj: its input is the activation a [tokens, N]."""

    def __init__(self, model, ck: Checkpoint, k: int):
        self.layers, self.N, self.k = ck.dense_layers, ck.expert_ffn, k
        L = len(self.layers)
        self.counts = torch.zeros(L, self.N, dtype=torch.int64)
        self.mass = torch.zeros(L, self.N, dtype=torch.float64)
        self.per_domain: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = []
        for n, i in enumerate(self.layers):
            try:
                down = model.get_submodule(arch.MLP.format(i=i) + ".down_proj")
            except AttributeError:
                raise XpertError(f"{ck.path}: cannot find layer {i}'s mlp.down_proj in {type(model).__name__}") from None
            self.handles.append(down.register_forward_pre_hook(self._hook(n)))

    def start_domain(self, name: str) -> None:
        super().start_domain(name)
        self.counts.zero_(); self.mass.zero_()

    def end_domain(self, name: str, tokens: int) -> None:
        self.per_domain.append((self.counts.clone(), self.mass.float().clone()))

    def _hook(self, n: int):
        def hook(_mod, args):
            a = args[0].reshape(-1, self.N)
            if self.mask is not None:
                a = a[self.mask]
            a = a.float().abs()
            idx = a.topk(self.k, dim=-1).indices
            self.counts[n] += torch.bincount(idx.reshape(-1).cpu(), minlength=self.N)
            self.mass[n] += a.sum(0).double().cpu()
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def collect(ck: Checkpoint, model, tokenizer, docs_by_domain: dict, *, neuron_top: float, seq_len: int,
            batch_size: int, max_tokens: int | None, device: str, stream_tokens: int | None = None):
    """Count active neurons per (domain, layer, neuron) and sum their |activation|; padding never counted.
    (counts [D, L, N], mass [D, L, N], tokens [D], layers, domains, tokens per second)."""
    counter = NeuronCounter(model, ck, per_token(ck.expert_ffn, neuron_top))
    t0 = time.perf_counter()
    try:
        tokens = drive(ck, model, tokenizer, docs_by_domain, counter, seq_len=seq_len, batch_size=batch_size,
                       max_tokens=max_tokens, device=device, stream_tokens=stream_tokens, label="", rate=True)
    finally:
        counter.remove()
    counts, mass = zip(*counter.per_domain)
    total = sum(tokens.values())
    return (torch.stack(counts), torch.stack(mass), torch.tensor(list(tokens.values()), dtype=torch.int64),
            list(ck.dense_layers), list(docs_by_domain), total / max(time.perf_counter() - t0, 1e-9))


# ---- graft ------------------------------------------------------------------------------------------

# graft options that act on experts (selection weights, consolidation, routing) and mean nothing for neurons
MOE_ONLY = {"ranks": "--ranks", "align_neurons": "--align/--no-align", "align_sweeps": "--align-sweeps",
            "weighting": "--weighting", "no_tucker": "--no-tucker", "combine": "--combine", "rescale": "--rescale",
            "shared": "--shared", "fit": "--fit"}


def refuse_moe_options(ck: Checkpoint, given: dict, defaults: dict) -> None:
    """A dense source has no experts to align, decompose, combine or rescale: such options are refused,
    never silently ignored."""
    changed = [MOE_ONLY[k] for k, v in given.items() if k in MOE_ONLY and v != defaults[k]]
    if changed:
        raise XpertError(f"{', '.join(changed)}: for MoE sources; {ck.path} is a dense {ck.family.name} model, whose "
                         "FFN neurons are copied as they are (drop the option)")
    if given.get("ffn_init") == "learngene":
        raise XpertError(f"--ffn-init learngene: fits MoE consolidations across depth; {ck.path} is a dense "
                         f"{ck.family.name} model (use xpert, scratch or norm-matched)")
    if given.get("layer_map_how") == "merge":
        raise XpertError(f"--layer-map merge: averages the FFNs of several source layers, but the neurons of two "
                         f"layers of the dense {ck.path} do not correspond; use uniform or first")


def selection_for(ck: Checkpoint, target: Target, *, stats: Path | None, selection: Path | None, criterion: str,
                  per_layer: int | None, seed: int) -> tuple[dict | None, str]:
    """The neuron selection doc (or None: every neuron, chosen by weight when narrower) and where it came from."""
    from . import select as sel
    if selection is not None:
        doc = sel.load_selection(selection)
        sel.check_source(doc, Path(selection), ck)
        return doc, str(selection)
    if stats is not None:
        st = sel.load_stats(stats)
        if st.level != "neuron":
            raise XpertError(f"{stats}: expert stats of an MoE; {ck.path} is a dense {ck.family.name} model (run "
                             "xpertctl stats on it for neuron stats)")
        n = per_layer if per_layer is not None else min(target.ffn or ck.expert_ffn, ck.expert_ffn)
        doc = sel.selection_doc(st, sel.choose(st, criterion, n, seed), criterion, n, seed)
        sel.check_source(doc, Path(stats), ck)
        return doc, str(stats)
    return None, "(every neuron)"


def plan(ck: Checkpoint, target: Target, doc: dict | None, layer_map_how: str) -> tuple[list[list[int]], dict]:
    """(depth map, target shape): the student's FFN width is the target's f, or else the selection's (the
    smallest over the mapped layers), never wider than what the selection (or the source FFN) holds."""
    from .reshape import layer_map
    lmap = layer_map(list(ck.dense_layers), target.layers, layer_map_how)
    kept_of = {l["layer"]: l["neurons"] for l in doc["layers"]} if doc is not None else {}
    used = [g[0] for g in lmap]
    missing = sorted({i for i in used if doc is not None and i not in kept_of})
    if missing:
        raise XpertError(f"the selection has no neurons for source layer(s) {missing}, which --target "
                         f"{target} maps from")
    avail = min(len(kept_of[i]) for i in used) if doc is not None else ck.expert_ffn
    where = f"the {avail} neurons per layer the selection keeps" if doc is not None and avail < ck.expert_ffn \
        else f"the source's FFN {ck.expert_ffn}"
    target.check_fits(ck.hidden, avail, what=where)
    return lmap, {"layers": target.layers, "hidden": target.hidden or ck.hidden, "ffn": target.ffn or avail}


def adapt(ck: Checkpoint, target: Target, doc: dict | None, *, layer_map_how: str = "uniform",
          width_select: str = "norm") -> tuple[dict[str, torch.Tensor], dict]:
    """The student's FFNs: per target layer the kept neurons of its source layer (best-scored first f of the
    selection, or with no selection the f of largest weight energy), in source order; the same residual
    dimensions in every layer when narrower. (adapted tensors, metadata) as reshape.adapt gives them."""
    from .reshape import depth_notes, neuron_index, residual_index
    lmap, shape = plan(ck, target, doc, layer_map_how)
    kept_of = {l["layer"]: l["neurons"] for l in doc["layers"]} if doc is not None else {}
    H, d, f = ck.hidden, shape["hidden"], shape["ffn"]
    cache: dict[int, tuple[torch.Tensor, ...]] = {}
    ffns, kept = [], []
    for t, group in enumerate(lmap):
        i = group[0]
        if i not in cache:
            cache[i] = tuple(m.float() for m in ck.mlp(i))
        g, u, dn = cache[i]
        if doc is not None:
            ids = torch.tensor(sorted(kept_of[i][:f]), dtype=torch.long)
        else:
            ids = neuron_index(g, u, dn, f, width_select)
        ffns.append((g[ids], u[ids], dn[:, ids]))
        kept.append({"target": t, "source": i, "kept": int(ids.numel()), "of": ck.expert_ffn,
                     "ids": _ranges(ids.tolist())})
    ri = residual_index(ffns, d, width_select)
    out: dict[str, torch.Tensor] = {"residual_index": ri}
    for t, (g, u, dn) in enumerate(ffns):
        out[f"layers.{t}.gate_proj"] = g[:, ri].contiguous()
        out[f"layers.{t}.up_proj"] = u[:, ri].contiguous()
        out[f"layers.{t}.down_proj"] = dn[ri, :].contiguous()
    notes = depth_notes(lmap, len(ck.dense_layers))
    if doc is None and f < ck.expert_ffn:
        notes.append(f"no --stats or --selection: each layer keeps the {f} of its {ck.expert_ffn} neurons with the "
                     f"largest weight energy (--width-select {width_select}), not the ones used across domains")
    meta = {"target": shape, "layer_map": lmap, "layer_map_method": layer_map_how,
            "notes": notes, "residual_index": ri.tolist() if d < H else None, "experts": None, "neurons": kept,
            "width_select": width_select}
    return out, meta


def applied(meta: dict, doc: dict | None) -> dict:
    """The card's record of the options that made the FFNs (graft.applied_options' keys): the expert options
    did not apply."""
    return {"ranks": None, "align": None, "no_tucker": None, "weighting": None, "layer_map": meta["layer_map_method"],
            "combine": None, "rescale": None, "width_select": meta["width_select"], "shared": None,
            "shared_gate_fold": None, "criterion": doc.get("criterion") if doc else None,
            "per_layer": doc.get("per_layer") if doc else None}


def summary(doc: dict | None, source: str) -> str:
    if doc is None:
        return "every neuron (no --stats or --selection)"
    return (f"neurons used in every domain: {doc.get('criterion')}, {doc.get('per_layer')} of {doc.get('num_neurons')} "
            f"per layer (active: top {doc.get('neuron_top')} of |activation| per token) from {source}")


def card_lines(rec: dict, ffn_init: str = "xpert") -> list[str]:
    """What the student kept of each source layer's FFN, for the model card."""
    kept = rec.get("neurons")
    if not kept:
        return []
    how = "copied unchanged" if ffn_init == "xpert" else "whose row norms the fresh FFN weights take (--ffn-init " \
        f"{ffn_init})"
    lines = ["## FFN neurons kept (target <- source layer)", "",
             f"Each target FFN is the listed neurons of its source layer's FFN (gate rows, up rows, down columns), {how}"
             + (", restricted to the kept residual dimensions." if rec.get("residual_index") else "."),
             "", "| target | source | kept | neuron ids |", "|---|---|---|---|"]
    lines += [f"| {k['target']} | {k['source']} | {k['kept']} of {k['of']} | {k['ids']} |" for k in kept]
    return lines + [""]


# ---- fidelity ---------------------------------------------------------------------------------------

def random_neurons(ck: Checkpoint, layer: int, f: int, ri: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """The reference a neuron selection must beat: f neurons of the source layer drawn at random (seeded per
    layer), restricted to the residual dimensions ri."""
    g, u, dn = (m.float() for m in ck.mlp(layer))
    gen = torch.Generator().manual_seed(seed * 100003 + layer)
    ids = torch.randperm(g.shape[0], generator=gen)[:f].sort().values
    return g[ids][:, ri], u[ids][:, ri], dn[ri][:, ids]
