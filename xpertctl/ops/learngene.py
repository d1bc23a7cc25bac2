"""The learngene baseline: FFNs from a linear expansion of two "gene" matrices across depth (TLEG).

TLEG (Xia et al., "Transformer as Linear Expansion of Learngene", AAAI 2024) observes that a trained
Transformer's weights change roughly linearly with layer position, and initializes a model of any depth
from a learngene (theta_A, theta_B): layer at relative depth x in [0, 1] gets theta_A + x * theta_B.
TLEG *trains* the learngene in an auxiliary network built under that constraint (distillation from the
ancestor). Here it is *fitted*: per FFN matrix, ordinary least squares of each source layer's dense FFN
on its relative depth, so it comes from the same source and the same selection as XPERT with no training.
Neurons of different layers are unrelated until aligned, so each layer's neurons are first permuted to
match the first layer's (the weight matching decompose uses across experts) — without that, the fit
averages unrelated neurons. README "The learngene baseline" lists every departure from TLEG.
"""
from __future__ import annotations

import torch

from ..specs import RESCALE_DEFAULT
from .decompose import align_perms, permute


def depth_positions(n: int) -> torch.Tensor:
    """Relative depth of n layers: first 0, last 1 (one layer: 0)."""
    return torch.zeros(1, dtype=torch.float64) if n == 1 else torch.arange(n, dtype=torch.float64) / (n - 1)


def fit_genes(mats: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) minimizing sum_s ||mats[s] - (A + x_s B)||^2 (closed form; one layer: A = it, B = 0)."""
    w = torch.stack([m.double() for m in mats])
    xc = x - x.mean()
    denom = float((xc ** 2).sum())
    if denom == 0.0:
        return w.mean(0).float(), torch.zeros_like(w[0]).float()
    b = torch.einsum("s,s...->...", xc, w) / denom
    a = w.mean(0) - x.mean() * b
    return a.float(), b.float()


def expand(per_src: dict[int, tuple[torch.Tensor, ...]], n_target: int,
           align: bool = True) -> list[tuple[torch.Tensor, ...]]:
    """The n_target dense FFNs (gate, up, down) of the learngene fitted to every source layer's FFN."""
    layers = sorted(per_src)
    ffns = [per_src[i] for i in layers]
    if align and len(ffns) > 1:
        # reference: the first layer (equal weights -> align_perms keeps the first in its order)
        ffns = [permute(f, p) for f, p in zip(ffns, align_perms(ffns, torch.ones(len(ffns)), sweeps=2))]
    x_src, x_tgt = depth_positions(len(ffns)), depth_positions(n_target)
    genes = [fit_genes([f[k] for f in ffns], x_src) for k in range(3)]
    return [tuple(a + float(x) * b for a, b in genes) for x in x_tgt]


def adapt(per_src: dict[int, tuple[torch.Tensor, ...]], meta: dict, target, *, combine: str = "usage",
          width_select: str = "norm", rescale: str = RESCALE_DEFAULT) -> tuple[dict[str, torch.Tensor], dict]:
    """reshape.adapt for the learngene: every source layer's FFN (at its --rescale scale) -> the expansion's
    n target FFNs -> the target width. The recorded layer map is the nearest source layer by depth (the
    block `fidelity` compares each target layer with); the FFN itself comes from all of them."""
    from . import reshape
    scales = reshape.routing_scale(per_src, meta, rescale)
    scaled = {i: (g, u, dn * scales.get(i, 1.0)) for i, (g, u, dn) in per_src.items()}
    ffns = expand(scaled, target.layers)
    virtual = dict(meta, layers=list(range(target.layers)), routed_mass=None, experts=None)
    out, new = reshape.adapt(dict(enumerate(ffns)), virtual, target, layer_map_how="uniform", combine=combine,
                             width_select=width_select, rescale="none")
    lmap = reshape.layer_map(sorted(per_src), target.layers, "uniform")
    notes = reshape.zero_mass_note(scales, rescale)
    if notes:
        from ..console import notice
        notice(notes[0])
    new.update(layer_map=lmap, layer_map_method="learngene", rescale=rescale, notes=notes,
               routing_scale={str(i): v for i, v in scales.items()} or None,
               unscaled_layers=sorted(i for i in per_src if i not in scales) if rescale != "none" else [],
               experts={str(i): meta["experts"][str(i)] for g in lmap for i in g
                        if str(i) in (meta.get("experts") or {})} or None,
               learngene={"method": "TLEG linear expansion, least-squares fit", "source_layers": sorted(per_src),
                          "aligned": True})
    return out, new
