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
     weight energy) or `first`. An FFN wider than one expert holds the selected experts side by side
     instead of their one combination (widen; `--width-rule` between one expert and all of them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import XpertError
from ..io import provenance, write_safetensors
from ..specs import Target
from .decompose import MATRICES, joint_gram, mode3_sum
from .ranking import top_indices
from .tucker import _is_identity, reconstruct

from ..specs import (COMBINES, LAYER_MAPS, RESCALE_DEFAULT, RESCALES, SHARED, WIDTH_RULE_DEFAULT, WIDTH_RULES,
                     WIDTH_SELECTS)


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


def check_choices(layer_map_how: str, combine: str, width_select: str, rescale: str,
                  width_rule: str = WIDTH_RULE_DEFAULT) -> None:
    _choice(layer_map_how, LAYER_MAPS, "--layer-map")
    _choice(combine, COMBINES, "--combine")
    _choice(width_select, WIDTH_SELECTS, "--width-select")
    _choice(rescale, RESCALES, "--rescale")
    _choice(width_rule, WIDTH_RULES, "--width-rule")


def check(meta: dict, target: Target, layer_map_how: str, combine: str, width_select: str,
          rescale: str = RESCALE_DEFAULT, shared: str = "none", width_rule: str = WIDTH_RULE_DEFAULT) -> list[list[int]]:
    """Validate options against the factors' metadata; the depth map."""
    check_choices(layer_map_how, combine, width_select, rescale, width_rule)
    _choice(shared, SHARED, "--shared")
    if combine not in ("usage", "uniform") and meta.get("method") == "mean":
        raise XpertError(f"--combine {combine}: factors made with --no-tucker have no expert mode to combine")
    if shared == "concat" and not meta.get("shared_ffn"):
        raise XpertError(f"--shared concat: the source ({meta.get('family')}) has no shared experts")
    lmap = layer_map(list(meta["layers"]), target.layers, layer_map_how)
    target.check_fits(int(meta["hidden"]), ffn_width(meta, shared), *max_ffn(meta, shared, {i for g in lmap for i in g}))
    if is_wide(meta, target, shared):
        one = ffn_width(meta, shared)
        if combine not in ("usage", "uniform"):
            raise XpertError(f"--combine {combine}: makes one FFN of the experts; an FFN wider than one expert "
                             f"({target.ffn} > {one}) holds them side by side: use --combine usage or uniform")
        if meta.get("method") == "mean":
            raise XpertError(f"--no-tucker: those factors hold only the experts' mean; an FFN wider than one expert "
                             f"({target.ffn} > {one}) needs the experts themselves (decompose without --no-tucker)")
    return lmap


def ffn_width(meta: dict, shared: str) -> int:
    """The consolidated FFN's width: one expert's, plus the shared experts' with --shared concat."""
    return int(meta["expert_ffn"]) + (int(meta["shared_ffn"]) if shared == "concat" else 0)


def max_ffn(meta: dict, shared: str, layers=None) -> tuple[int, str | None]:
    """The widest FFN the selection fills, and how to name it in a refusal: the selected experts side by side
    (the fewest any of `layers` has; all of meta's by default), plus the shared experts with --shared concat.
    Without a record of the experts (a learngene's virtual layers): one expert's width (default wording)."""
    one, I = ffn_width(meta, shared), int(meta["expert_ffn"])
    experts = meta.get("experts") or {}
    counts = [len(experts[str(i)]) for i in (meta["layers"] if layers is None else layers) if str(i) in experts]
    m = min(counts) if counts else 1
    if m <= 1:
        return one, None
    plus = f" + shared {one - I}" if one > I else ""
    return m * I + one - I, f"the selected experts' total {m * I + one - I} ({m} experts of {I}{plus})"


def is_wide(meta: dict, target: Target, shared: str) -> bool:
    """Whether the target FFN exceeds one consolidated expert (plus shared): the experts go side by side."""
    return target.ffn is not None and target.ffn > ffn_width(meta, shared)


def expert_shares(meta: dict, i: int, w: torch.Tensor, combine: str = "usage") -> torch.Tensor:
    """Each selected expert's share (summing to 1) of source layer i's wide FFN: its part of the routing weight
    the selected experts receive (from the stats behind the selection), or without those its usage frequency
    (the weights of the one-expert average); equal with --combine uniform. routing_scale then scales their sum
    as it scales a one-expert FFN, so under --rescale selected expert j's down columns carry its own mean
    routing weight per token."""
    n = w.numel()
    r = (meta.get("routed_shares") or {}).get(str(i))
    s = torch.full((n,), 1.0 / n, dtype=torch.float64) if combine == "uniform" else \
        torch.tensor(r, dtype=torch.float64) if r and len(r) == n and sum(r) > 0 else w.double()
    return s / s.sum() if float(s.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)


def expert_matrices(t: dict[str, torch.Tensor], i: int) -> list[tuple[torch.Tensor, ...]]:
    """Each selected expert's (rank-reduced, aligned) gate, up and down from the factors of source layer i:
    X~_j = G x1 U1 x2 U2 x3 U3[j] (at full ranks: the aligned expert itself)."""
    n = t[f"layers.{i}.weights"].numel()
    out: list[list[torch.Tensor]] = [[] for _ in range(n)]
    for m in MATRICES:
        core, u1, u2, u3 = (t[f"layers.{i}.{m}.{s}"].float() for s in ("core", "U1", "U2", "U3"))
        for j in range(n):
            x = core[:, :, j] if _is_identity(u3) else \
                mode3_sum((core[:, :, r].contiguous() for r in range(core.shape[2])), u3[j].tolist())
            out[j].append(reconstruct(x[:, :, None].contiguous(), [u1, u2, torch.ones(1, 1)])[:, :, 0].contiguous())
    return [tuple(e) for e in out]


def widen(experts: list[tuple[torch.Tensor, ...]], shares: torch.Tensor, f: int, rule: str = WIDTH_RULE_DEFAULT,
          width_select: str = "norm") -> tuple[tuple[torch.Tensor, ...], list[dict]]:
    """An FFN f neurons wide from m aligned experts I wide (I < f <= m I) with shares a (sum 1), and its groups.

    A group of experts becomes I neurons: gate and up rows the a-weighted mean of its members' aligned rows,
    down columns the a-weighted sum (one member: the expert with its down columns times a_j; at f = I, one
    group of all: the one-expert consolidation). At f = m I every expert is its own group: the FFN computes
    sum_j a_j E_j(x) exactly. Between, the rule:
      groups:  ceil(f/I) groups by weighted Ward merging (merge the pair whose share-weighted means are
               nearest, cost a_A a_B / (a_A + a_B) |mu_A - mu_B|^2 over gate, up and down): a heavily used,
               distinct expert stays whole, alike and little-used ones share neurons;
      experts: the ceil(f/I) - 1 experts with the largest shares whole, the rest one group;
      norm:    every expert's neurons side by side, the f with the largest a_j |gate| |up| |down| kept.
    Groups go largest total share first; when f is not a multiple of I the last (smallest) keeps the
    neurons --width-select picks. Records: members (indices into experts), their shares, width."""
    m, I = len(experts), experts[0][0].shape[0]
    a = shares.double()
    order = sorted(range(m), key=lambda j: (-float(a[j]), j))
    if rule == "norm" and f < m * I:
        return _widest_neurons(experts, a, order, f)
    n = min(m, -(-f // I))
    if n == m:
        groups = [[j] for j in order]
    elif rule == "experts":
        groups = [[j] for j in order[:n - 1]] + [order[n - 1:]]
    else:
        groups = _ward(experts, a, n)
        groups = [sorted(g, key=order.index) for g in groups]
        groups.sort(key=lambda g: (-float(a[g].sum()), order.index(g[0])))
    parts, record = [], []
    for k, g in enumerate(groups):
        ffn = _merge(experts, a, g)
        width = I if k < len(groups) - 1 else f - I * (len(groups) - 1)
        if width < I:
            ni = neuron_index(*ffn, width, width_select)
            ffn = (ffn[0][ni], ffn[1][ni], ffn[2][:, ni])
        parts.append(ffn)
        record.append({"members": g, "shares": [round(float(a[j]), 6) for j in g], "width": width})
    return _side_by_side(parts), record


def _merge(experts, a: torch.Tensor, members: list[int]) -> tuple[torch.Tensor, ...]:
    """One group's I neurons: gate/up the a-weighted mean of the members', down their a-weighted sum."""
    w = [float(a[j]) for j in members]
    tot = sum(w)
    if len(members) == 1:
        g, u, d = experts[members[0]]
        return g.float(), u.float(), d.float() * w[0]
    mean = [w_ / tot for w_ in w] if tot > 0 else [1.0 / len(w)] * len(w)
    g = mode3_sum((experts[j][0].float() for j in members), mean)
    u = mode3_sum((experts[j][1].float() for j in members), mean)
    d = mode3_sum((experts[j][2].float() for j in members), w)
    return g, u, d


def _side_by_side(parts) -> tuple[torch.Tensor, ...]:
    return (torch.cat([p[0] for p in parts]).contiguous(), torch.cat([p[1] for p in parts]).contiguous(),
            torch.cat([p[2] for p in parts], dim=1).contiguous())


def _ward(experts, a: torch.Tensor, n: int) -> list[list[int]]:
    """n groups of the experts by weighted Ward merging on their joint (gate, up, down) Gram.

    scipy's ward linkage has no observation weights, and the shares are what keep a heavily used expert
    whole, so the few (m <= 64) merges are done here: each merges the pair of groups with the least
    a_A a_B / (a_A + a_B) |mu_A - mu_B|^2 (mu: the share-weighted mean; ties: the earliest pair)."""
    gram = joint_gram(experts).double()
    w = a.double().clamp_min(1e-12)
    groups = [[j] for j in range(len(experts))]
    while len(groups) > n:
        best = None
        for x in range(len(groups)):
            for y in range(x + 1, len(groups)):
                A, B = groups[x], groups[y]
                wa, wb = float(w[A].sum()), float(w[B].sum())
                c = torch.zeros(len(experts), dtype=torch.float64)
                c[A], c[B] = w[A] / wa, -w[B] / wb
                cost = wa * wb / (wa + wb) * float(c @ gram @ c)
                if best is None or cost < best[0]:
                    best = (cost, x, y)
        _, x, y = best
        groups[x] = groups[x] + groups[y]
        del groups[y]
    return groups


def _widest_neurons(experts, a: torch.Tensor, order: list[int], f: int):
    """The `norm` rule: all experts' neurons side by side (largest share first), the f with the largest output
    scale a_j |gate row| |up row| |down column| kept in their order."""
    parts = [_merge(experts, a, [j]) for j in order]
    score = torch.cat([float(a[j]) * experts[j][0].double().norm(dim=1) * experts[j][1].double().norm(dim=1)
                       * experts[j][2].double().norm(dim=0) for j in order])
    keep = _top(score, f)
    g, u, d = _side_by_side(parts)
    I = experts[0][0].shape[0]
    record = [{"members": [j], "shares": [round(float(a[j]), 6)], "width": int(((keep // I) == k).sum())}
              for k, j in enumerate(order)]
    return (g[keep].contiguous(), u[keep].contiguous(), d[:, keep].contiguous()), [r for r in record if r["width"]]


def wide_layer(t: dict[str, torch.Tensor], i: int, meta: dict, f: int, rule: str = WIDTH_RULE_DEFAULT,
               combine: str = "usage", width_select: str = "norm") -> tuple[tuple[torch.Tensor, ...], list[dict]]:
    """Source layer i's FFN f neurons wide (before the routing scale) from its factors, and its groups with
    the expert ids they hold."""
    ids = t[f"layers.{i}.experts"].tolist()
    shares = expert_shares(meta, i, t[f"layers.{i}.weights"].float(), combine)
    ffn, groups = widen(expert_matrices(t, i), shares, f, rule, width_select)
    return ffn, [{"experts": [ids[j] for j in g["members"]], "shares": g["shares"], "width": g["width"]}
                 for g in groups]


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
            shared: str = "none", width_rule: str = WIDTH_RULE_DEFAULT) -> tuple[dict[str, torch.Tensor], dict]:
    lmap = check(meta, target, layer_map_how, combine, width_select, rescale, shared, width_rule)
    used = sorted({i for g in lmap for i in g})
    groups = None
    if is_wide(meta, target, shared):
        routed_f = target.ffn - (ffn_width(meta, shared) - int(meta["expert_ffn"]))  # the shared part is appended
        wide = {i: wide_layer(t, i, meta, routed_f, width_rule, combine, width_select) for i in used}
        per_src, groups = {i: w[0] for i, w in wide.items()}, {i: w[1] for i, w in wide.items()}
    else:
        per_src = {i: combine_layer(t, i, combine, meta.get("weighting") or "joint") for i in used}
    return adapt(per_src, meta, target, layer_map_how=layer_map_how, combine=combine, width_select=width_select,
                 rescale=rescale, shared=shared, shared_ffns=shared_of(t, used) if shared == "concat" else None,
                 single={i for i in used if one_component(t, i)}, width_rule=width_rule, width_groups=groups)


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
          single: set[int] = frozenset(), width_rule: str = WIDTH_RULE_DEFAULT,
          width_groups: dict[int, list[dict]] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Dense (gate, up, down) per source layer -> the target's FFNs (depth map, consistent width); with
    --shared concat each source layer's shared experts (shared_ffns) are appended after the rescale. For a
    target wider than one expert, per_src holds each layer's wide FFN (wide_layer: already target.ffn wide
    but for the shared part) and width_groups its groups."""
    lmap = check(meta, target, layer_map_how, combine, width_select, rescale, shared, width_rule)
    wide = is_wide(meta, target, shared)
    if wide and width_groups is None:
        raise ValueError("adapt: a target wider than one expert needs the wide FFNs and their width_groups")
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
    notes = (depth_notes(lmap, len(meta["layers"])) + ([] if wide else combine_notes(meta, combine, single, set(per_src)))
             + zero_mass_note(scales, rescale))
    if shared == "none" and meta.get("shared_ffn"):
        notes.append(f"the source's shared experts (FFN width {meta['shared_ffn']}), which every token uses, are not "
                     "carried (--shared none keeps routed experts only); --shared concat appends them")
    if notes:
        from ..console import notice
        for n in notes:
            notice(n)
    new_meta = {"target": {"layers": target.layers, "hidden": d, "ffn": f}, "layer_map": lmap, "notes": notes,
                "layer_map_method": layer_map_how, "combine": combine, "width_select": width_select,
                "rescale": rescale, "shared": shared,
                "width_rule": width_rule if wide else None, "max_ffn": max_ffn(meta, shared, set(per_src))[0],
                "width_groups": {str(i): width_groups[i] for i in sorted(width_groups)} if wide else None,
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
        width_select: str = "norm", rescale: str = RESCALE_DEFAULT, shared: str = "none",
        width_rule: str = WIDTH_RULE_DEFAULT, force: bool = False) -> Path:
    """`xpertctl reshape`: adapted.safetensors."""
    from ..io import check_output
    check_output(out, force, [factors])
    t, meta = load_factors(factors)
    tensors, new_meta = compute(t, meta, target, layer_map_how=layer_map_how, combine=combine, width_select=width_select,
                                rescale=rescale, shared=shared, width_rule=width_rule)
    rec = provenance.record("adapted", inputs=[provenance.file_fingerprint(factors)],
                            params={"target": str(target), "layer_map": layer_map_how, "combine": combine,
                                    "width_select": width_select, "rescale": rescale, "shared": shared,
                                    "width_rule": new_meta["width_rule"]}, **new_meta)
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
