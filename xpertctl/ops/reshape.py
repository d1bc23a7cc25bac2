"""XPERT step 3: parameter-scale adaptation of factors to a target depth and width.

Each target layer gets one dense FFN (gate [f, d], up [f, d], down [d, f]):
  1. per source layer, the factors become one matrix per weight: W = G x1 U1 x2 U2 x3 (c^T U3), with
     c the expert-mode combination (`--combine`: `usage`, the selection frequencies, and `uniform`,
     1/n each, both rescaled so the weights on the experts sum to 1; `literal`, 1/n not rescaled;
     `first`, only the first expert-mode component; see combine_layer);
  2. depth: target layer t takes source layer(s) by `uniform` (evenly spaced, first and last kept),
     `first` (the first L), or `merge` (mean of contiguous groups);
  3. width: the same residual indices in every layer (scored over all mapped layers), and within a
     layer the same neuron indices for gate rows, up rows and down columns, by `norm` (largest
     weight energy) or `first`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import XpertError
from ..io import provenance, write_safetensors
from ..specs import Target
from .decompose import MATRICES, mode3_sum
from .ranking import top_indices
from .tucker import _is_identity, reconstruct

from ..specs import COMBINES, LAYER_MAPS, RESCALE_DEFAULT, RESCALES, SHARED, WIDTH_SELECTS


def _choice(value: str, options: tuple[str, ...], flag: str) -> str:
    if value not in options:
        raise XpertError(f"{flag} {value!r}: choose one of {', '.join(options)}")
    return value


def combine_layer(t: dict[str, torch.Tensor], i: int, how: str = "usage", weighting: str = "joint") -> tuple[torch.Tensor, ...]:
    """One (gate [I,H], up [I,H], down [H,I]) from the factors of source layer i.

    `usage`/`uniform`: W = sum_j a_j X~_j, the rank-reduced experts X~ = G x1 U1 x2 U2 x3 U3 combined
    with weights a = U3 U3^T c (c: usage frequencies or 1/n), rescaled so sum_j |a_j| = 1 with
    sum_j a_j > 0: W is never larger than the largest X~_j, and when U3 keeps every expert (a = c) or
    puts no negative weight on one, it is their weighted average. At expert rank 1, a is U3's one
    column up to its sign, whatever c: `usage` and `uniform` then give the same FFN.
    `literal`: c = 1/n without that rescaling (the paper read literally: mean(u3) * sum_j u3_j X_j at
    rank 1). `first`: only the first principal component of the expert mode, c = 1/n
    (mean(v) * sum_j v_j X~_j, v the leading eigenvector of the experts' Gram; joint over gate, up and
    down unless the factors were made `--weighting per-matrix`). Factors made with --no-tucker hold
    the usage- and the uniform-weighted mean."""
    out = []
    w = t[f"layers.{i}.weights"].float()
    pc = principal_component(t, i) if how == "first" and weighting == "joint" else None
    for m in MATRICES:
        key = f"layers.{i}.{m}"
        if f"{key}.mean" in t:  # --no-tucker factors: already one matrix per weighting
            k = f"{key}.uniform" if how == "uniform" else f"{key}.mean"
            if k not in t:
                raise XpertError(f"--combine {how}: these --no-tucker factors hold only the usage-weighted mean "
                                 "(made by an older xpertctl); run decompose again")
            out.append(t[k].float())
            continue
        core, u1, u2, u3 = (t[f"{key}.{s}"].float() for s in ("core", "U1", "U2", "U3"))
        if how == "first":
            v = pc if pc is not None else principal_component(t, i, (m,))
            core, u3 = _first_component(core, u3, v)
        mix = expert_mix(w, u3, how)
        if _is_identity(u1) and _is_identity(u2):  # full row/column ranks: a weighted sum of the core's slices
            out.append(mode3_sum((core[:, :, r].contiguous() for r in range(core.shape[2])), mix.tolist()))
        else:
            out.append(reconstruct(core, [u1, u2, mix[None]])[:, :, 0])
    return tuple(out)


def principal_component(t: dict[str, torch.Tensor], i: int, mats=MATRICES) -> torch.Tensor | None:
    """The leading eigenvector [r3] of the cores' expert-mode Gram over `mats` (None: U3 is not the
    identity, so its first column already is the leading component HOSVD found)."""
    if not all(_is_identity(t[f"layers.{i}.{m}.U3"].float()) for m in mats):
        return None
    gram = None
    for m in mats:
        c = t[f"layers.{i}.{m}.core"].double().reshape(-1, t[f"layers.{i}.{m}.core"].shape[-1])
        gram = c.T @ c if gram is None else gram + c.T @ c
    return torch.linalg.eigh(gram).eigenvectors[:, -1].float()


def _first_component(core: torch.Tensor, u3: torch.Tensor, v: torch.Tensor | None):
    """The core and expert factor restricted to the first expert-mode component (v: rotate first)."""
    if v is None:
        return core[:, :, :1], u3[:, :1]
    return (core @ v)[:, :, None], (u3 @ v)[:, None]


def expert_mix(w: torch.Tensor, u3: torch.Tensor, how: str = "usage") -> torch.Tensor:
    """The expert-mode combination [r3] that combine_layer applies to the core (see there): c^T U3,
    rescaled for `usage`/`uniform` so the implied weights on the experts have sum_j |a_j| = 1 and a
    positive sum. With a full expert mode (U3 = I) these are the weights on the experts themselves."""
    n = w.numel()
    c = w if how == "usage" else torch.full((n,), 1.0 / n)
    if how == "first":
        u3 = u3[:, :1]
    mix = (c @ u3)[None]  # (1, r3): the expert mode collapsed by the combination
    if how in ("usage", "uniform"):
        a = u3 @ mix[0]  # the weights this puts on each (rank-reduced) expert
        total, spread = float(a.sum()), float(a.abs().sum())
        if spread > 0:
            mix = mix / (spread if total >= 0 else -spread)
    return mix[0]


def layer_map(src_layers: list[int], n_target: int, how: str = "uniform") -> list[list[int]]:
    """For each target layer, the source layers it is made from."""
    n_src = len(src_layers)
    if how == "uniform":
        if n_target == 1:
            pos = [0]
        else:
            pos = [int(round(t * (n_src - 1) / (n_target - 1))) for t in range(n_target)]
        return [[src_layers[p]] for p in pos]
    if n_target > n_src:
        raise XpertError(f"--layer-map {how}: target has {n_target} layers but the factors cover {n_src} "
                         "(use uniform, which repeats layers)")
    if how == "first":
        return [[src_layers[t]] for t in range(n_target)]
    return [[src_layers[p] for p in g] for g in np.array_split(np.arange(n_src), n_target)]


def residual_index(ffns: list[tuple[torch.Tensor, ...]], d: int, how: str = "norm") -> torch.Tensor:
    """The same d residual dimensions for every layer, in ascending order."""
    H = ffns[0][0].shape[1]
    if how == "first" or d == H:
        return torch.arange(d)
    score = torch.zeros(H, dtype=torch.float64)
    for g, u, dn in ffns:
        score += (g.double() ** 2).sum(0) + (u.double() ** 2).sum(0) + (dn.double() ** 2).sum(1)
    return _top(score, d)


def neuron_index(g: torch.Tensor, u: torch.Tensor, dn: torch.Tensor, f: int, how: str = "norm") -> torch.Tensor:
    """The same f neurons for gate rows, up rows and down columns, in ascending order."""
    if how == "first" or f == g.shape[0]:
        return torch.arange(f)
    score = (g.double() ** 2).sum(1) + (u.double() ** 2).sum(1) + (dn.double() ** 2).sum(0)
    return _top(score, f)


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.as_tensor(np.sort(top_indices(score.numpy(), k)), dtype=torch.long)


def check_choices(layer_map_how: str, combine: str, width_select: str, rescale: str) -> None:
    _choice(layer_map_how, LAYER_MAPS, "--layer-map")
    _choice(combine, COMBINES, "--combine")
    _choice(width_select, WIDTH_SELECTS, "--width-select")
    _choice(rescale, RESCALES, "--rescale")


def check(meta: dict, target: Target, layer_map_how: str, combine: str, width_select: str,
          rescale: str = RESCALE_DEFAULT, shared: str = "none") -> list[list[int]]:
    """Validate options against the factors' metadata; the depth map."""
    check_choices(layer_map_how, combine, width_select, rescale)
    _choice(shared, SHARED, "--shared")
    if combine not in ("usage", "uniform") and meta.get("method") == "mean":
        raise XpertError(f"--combine {combine}: factors made with --no-tucker have no expert mode to combine")
    if shared == "concat" and not meta.get("shared_ffn"):
        raise XpertError(f"--shared concat: the source ({meta.get('family')}) has no shared experts")
    target.check_fits(int(meta["hidden"]), ffn_width(meta, shared))
    return layer_map(list(meta["layers"]), target.layers, layer_map_how)


def ffn_width(meta: dict, shared: str) -> int:
    """The consolidated FFN's width: one expert's, plus the shared experts' with --shared concat."""
    return int(meta["expert_ffn"]) + (int(meta["shared_ffn"]) if shared == "concat" else 0)


# Qwen2-MoE scales its shared expert by sigmoid(x . w) per token, which no dense FFN can carry; concat folds
# it in as a constant: 0.5, the sigmoid's mean over inputs symmetric about 0 (data-free; on real text the mean
# gate differs per layer, and `graft --fit` is the data-aware way to absorb it).
SHARED_GATE_FOLD = 0.5


def with_shared(ffn: tuple[torch.Tensor, ...], shared_mlp: tuple[torch.Tensor, ...], meta: dict) -> tuple[torch.Tensor, ...]:
    """The shared expert's neurons appended to a consolidated FFN: [g; gs], [u; us], [d, c * ds] (c: 1, or
    SHARED_GATE_FOLD for a sigmoid-gated shared expert). The sum of both FFNs, as the block sums them."""
    c = SHARED_GATE_FOLD if meta.get("shared_gate") == "sigmoid" else 1.0
    (g, u, d), (gs, us, ds) = ffn, shared_mlp
    return torch.cat([g, gs.float()]), torch.cat([u, us.float()]), torch.cat([d, ds.float() * c], dim=1)


def shared_of(t: dict[str, torch.Tensor], layers) -> dict[int, tuple[torch.Tensor, ...]]:
    return {i: tuple(t[f"layers.{i}.shared.{m}"] for m in MATRICES) for i in layers if f"layers.{i}.shared.gate" in t}


def compute(t: dict[str, torch.Tensor], meta: dict, target: Target, *, layer_map_how: str = "uniform",
            combine: str = "usage", width_select: str = "norm", rescale: str = RESCALE_DEFAULT,
            shared: str = "none") -> tuple[dict[str, torch.Tensor], dict]:
    lmap = check(meta, target, layer_map_how, combine, width_select, rescale, shared)
    used = sorted({i for g in lmap for i in g})
    per_src = {i: combine_layer(t, i, combine, meta.get("weighting") or "joint") for i in used}
    return adapt(per_src, meta, target, layer_map_how=layer_map_how, combine=combine, width_select=width_select,
                 rescale=rescale, shared=shared, shared_ffns=shared_of(t, used) if shared == "concat" else None,
                 single={i for i in used if one_component(t, i)})


def routing_scale(per_src: dict[int, tuple[torch.Tensor, ...]], meta: dict, rescale: str) -> dict[int, float]:
    """Each source layer's down-projection factor, from the stats behind the selection.

    The MoE block outputs sum_k w_k E_k(x). `selected` (default): the mean routing weight per token the
    selected experts receive (0 on tokens routed elsewhere), the share of the block they make: every layer
    of the committed teacher below the zero FFN's error on our held-out text. `routed`: the block's whole
    mean top-k weight per token (OLMoE's top-k softmax weights sum to less than one), as if the FFN stood
    for every expert; it overshoots where the consolidated FFN agrees poorly with the block (four
    layer-domain pairs worse than the zero FFN). Students train better from `routed` at --up-gain 1 only
    (README, "Where the scale sits"). The factor is the mass itself, continuous at 0: selected experts that
    no token was routed to give x0 (a zero down projection), as a mass of 1e-6 gives x1e-6 (see zero_mass_note).
    A layer with no mass recorded (a selection without stats, or stats whose router gave no weights) is left
    out: its FFN stays at the experts' scale (unscaled_notice)."""
    if rescale == "none":
        return {}
    masses = meta.get("selected_mass" if rescale == "selected" else "routed_mass") or {}
    return {i: float(masses[str(i)]) for i in per_src if str(i) in masses}


def zero_mass_note(scales: dict[int, float], rescale: str) -> list[str]:
    """The note (stderr and the model card) naming the source layers --rescale scaled to zero."""
    zero = sorted(i for i, v in scales.items() if v == 0)
    if not zero:
        return []
    return [f"--rescale {rescale}: the selected experts of source layers {zero} got no routing weight in the stats "
            "(mass 0), so those FFNs are scaled to zero (x0, continuous with x1e-6 for a mass of 1e-6); "
            "--rescale none keeps the experts' scale"]


def adapt(per_src: dict[int, tuple[torch.Tensor, ...]], meta: dict, target: Target, *, layer_map_how: str = "uniform",
          combine: str = "usage", width_select: str = "norm", rescale: str = RESCALE_DEFAULT, shared: str = "none",
          shared_ffns: dict[int, tuple[torch.Tensor, ...]] | None = None,
          single: set[int] = frozenset()) -> tuple[dict[str, torch.Tensor], dict]:
    """Dense (gate, up, down) per source layer -> the target's FFNs (depth map, consistent width); with
    --shared concat each source layer's shared experts (shared_ffns) are appended after the rescale."""
    lmap = check(meta, target, layer_map_how, combine, width_select, rescale, shared)
    scales = routing_scale(per_src, meta, rescale)
    per_src = {i: (g, u, dn * scales[i]) if i in scales else (g, u, dn) for i, (g, u, dn) in per_src.items()}
    if shared == "concat":
        missing = sorted(i for i in per_src if i not in (shared_ffns or {}))
        if missing:
            raise XpertError(f"--shared concat: no shared experts stored for source layers {missing} "
                             "(factors made by an older xpertctl); run decompose again")
        per_src = {i: with_shared(f, shared_ffns[i], meta) for i, f in per_src.items()}
    H, I = int(meta["hidden"]), ffn_width(meta, shared)
    d, f = target.hidden or H, target.ffn or I
    dense = []
    for group in lmap:
        mats = [per_src[i] for i in group]
        dense.append(tuple(torch.stack([m[k] for m in mats]).mean(0) for k in range(3)))
    ri = residual_index(dense, d, width_select)
    out: dict[str, torch.Tensor] = {"residual_index": ri}
    for n, (g, u, dn) in enumerate(dense):
        g, u, dn = g[:, ri], u[:, ri], dn[ri, :]
        ni = neuron_index(g, u, dn, f, width_select)
        out[f"layers.{n}.gate_proj"] = g[ni].contiguous()
        out[f"layers.{n}.up_proj"] = u[ni].contiguous()
        out[f"layers.{n}.down_proj"] = dn[:, ni].contiguous()
        out[f"layers.{n}.neuron_index"] = ni
    notes = (depth_notes(lmap, len(meta["layers"])) + combine_notes(meta, combine, single, set(per_src))
             + zero_mass_note(scales, rescale))
    if shared == "none" and meta.get("shared_ffn"):
        notes.append(f"the source's shared experts (FFN width {meta['shared_ffn']}), which every token uses, are not "
                     "carried (--shared none keeps the FFN one routed expert wide); --shared concat appends them")
    if notes:
        from ..console import notice
        for n in notes:
            notice(n)
    new_meta = {"target": {"layers": target.layers, "hidden": d, "ffn": f}, "layer_map": lmap, "notes": notes,
                "layer_map_method": layer_map_how, "combine": combine, "width_select": width_select,
                "rescale": rescale, "shared": shared,
                "shared_gate_fold": SHARED_GATE_FOLD if shared == "concat" and meta.get("shared_gate") else None,
                "routing_scale": {str(i): v for i, v in scales.items()} or None,
                "unscaled_layers": sorted(i for i in per_src if i not in scales) if rescale != "none" else [],
                "routing_note": meta.get("routing_note"),
                "source": meta["source"], "family": meta["family"], "hidden_source": H, "expert_ffn": I,
                "factors": {**{k: meta.get(k) for k in ("method", "ranks", "align", "weighting", "selection")},
                            "align_sweeps": (meta.get("params") or {}).get("align_sweeps")},  # decompose's record
                # what `fidelity` needs to compare against the source: kept residual dims, selected experts
                "residual_index": ri.tolist() if d < H else None,
                "experts": {str(i): meta["experts"][str(i)] for g in lmap for i in g
                            if str(i) in (meta.get("experts") or {})} or None}
    return out, new_meta


def one_component(t: dict[str, torch.Tensor], i: int) -> bool:
    """Whether layer i's factors keep a single expert-mode component (rank 1, or an energy fraction met by one)."""
    keys = [f"layers.{i}.{m}.U3" for m in MATRICES]
    return all(k in t and t[k].shape[1] == 1 for k in keys)


def combine_notes(meta: dict, combine: str, single: set[int] = frozenset(), used: set[int] = frozenset()) -> list[str]:
    """Say when the chosen combination cannot matter (combine_layer: with one expert-mode component, c drops
    out): at `--ranks ...,1`, or in the `used` source layers whose energy fraction kept one (`single`)."""
    from .tucker import parse_ranks
    if meta.get("method") == "mean" or combine not in ("usage", "uniform"):
        return []
    what = "--combine {} {}: the FFN is U3's single component (the combination only fixes its sign), so usage and " \
           "uniform give the same FFN"
    if parse_ranks(meta.get("ranks"))[2] == 1:
        return [what.format(combine, "at expert rank 1")]
    hit = sorted(set(single) & set(used))
    if hit:
        where = "" if hit == sorted(used) else f" in source layers {hit}"
        return [what.format(combine, f"with --ranks {meta.get('ranks')}, which keeps one expert component{where}")]
    return []


def depth_notes(lmap: list[list[int]], n_src: int) -> list[str]:
    """A target deeper than the source repeats source layers: say so (stderr and the model card), since
    repeated layers start from identical FFNs."""
    used = [i for g in lmap for i in g]
    rep = sorted({i for i in used if used.count(i) > 1})
    if not rep:
        return []
    return [f"the target has {len(lmap)} layers but the source has {n_src}: source layer(s) "
            f"{', '.join(map(str, rep))} repeat, so those target layers start from identical FFNs"]


def load_factors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    rec = provenance.read(Path(path), kind="factors")
    try:
        return load_file(str(path)), rec
    except Exception as e:
        raise XpertError(f"{path}: cannot read factors ({e})") from None


def run(factors: Path, target: Target, out: Path, *, layer_map_how: str = "uniform", combine: str = "usage",
        width_select: str = "norm", rescale: str = RESCALE_DEFAULT, shared: str = "none", force: bool = False) -> Path:
    """`xpertctl reshape`: adapted.safetensors."""
    from ..io import check_output
    check_output(out, force, [factors])
    t, meta = load_factors(factors)
    tensors, new_meta = compute(t, meta, target, layer_map_how=layer_map_how, combine=combine, width_select=width_select,
                                rescale=rescale, shared=shared)
    rec = provenance.record("adapted", inputs=[provenance.file_fingerprint(factors)],
                            params={"target": str(target), "layer_map": layer_map_how, "combine": combine,
                                    "width_select": width_select, "rescale": rescale, "shared": shared}, **new_meta)
    path = write_safetensors(out, tensors, provenance.as_metadata(rec), force=force)
    unscaled_notice(new_meta)
    return path


def unscaled_notice(meta: dict) -> None:
    """After a successful write: say which FFNs --rescale routed/selected could not scale (no weights behind them)."""
    if meta.get("unscaled_layers"):
        from ..console import notice
        why = meta.get("routing_note") or "selection made without stats"
        notice(f"--rescale {meta.get('rescale')}: no routing weights for source layers {meta['unscaled_layers']} "
               f"({why}); those FFNs stay at the experts' scale")
