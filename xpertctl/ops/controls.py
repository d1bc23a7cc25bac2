"""What makes a control match what it controls for (graft's --scale-like and --out-init).

`--scale-like REF`: every FFN matrix (gate, up, down) of every layer rescaled so its Frobenius norm equals
REF's matrix of the same layer: a control FFN (another selection, norm-matched, scratch) then has the XPERT
FFN's per-layer scale and only its own directions, so a contrast compares which weights, not how large.
REF's norms are taken at up-gain 1 (a grafted REF's own --up-gain undone): the graft's --up-gain is applied
after the match, so arms grafted with the same gain stay matched.

`--out-init`: the residual branches' output projections of the standard strong inits of a model trained
from scratch: `small`, std initializer_range / sqrt(2 x layers) (GPT-2, nanoGPT); `zero`, zeros (each
block starts as the identity). o_proj of every layer, and down_proj when the FFN is fresh (scratch); a
consolidated FFN's down_proj is its content and stays.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import XpertError
from ..io import provenance

MATS = ("gate_proj", "up_proj", "down_proj")
OUT_INIT_SEED = 104729  # the small init's own stream (seed + this): every other weight stays bit-identical


@dataclass
class ScaleRef:
    """The per-layer, per-matrix Frobenius norms of a reference FFN stack, at up-gain 1."""
    path: Path
    kind: str  # "grafted" (a model directory from graft) or "adapted" (from reshape)
    fingerprint: dict
    up_gain: float  # the gain REF was grafted with, undone in `norms`
    layers: int
    hidden: int
    ffn: int
    norms: list[dict[str, float]]  # [layer][matrix]

    def record(self, factors: list[dict[str, float]]) -> dict:
        """For the provenance: what REF was and the factor applied to every matrix."""
        return {"ref": self.fingerprint, "ref_kind": self.kind, "ref_up_gain": self.up_gain,
                "norms": [{m: n[m] for m in MATS} for n in self.norms], "factors": factors}


def load_scale_ref(path: Path) -> ScaleRef:
    """REF's norms: a grafted student directory (model.layers.T.mlp.*) or an adapted.safetensors (layers.T.*)."""
    from ..io.checkpoint import _weight_files
    from ..io.files import open_files
    path = Path(path)
    what = (f"--scale-like {path}: expected a grafted student directory (from `xpertctl graft`) or an "
            "adapted.safetensors (from `xpertctl reshape`)")
    if path.is_file() and provenance.kind_of(path) == "adapted":
        rec = provenance.read(path, "adapted")
        reader, kind, fp, gain = open_files([path]), "adapted", provenance.file_fingerprint(path), 1.0
        key, n = "layers.{t}.{m}", int(rec["target"]["layers"])
    elif path.is_dir():
        files, wm, config, _ = _weight_files(path)
        reader = open_files(files, wm)
        try:
            rec = provenance.read(files[0])
        except XpertError:
            raise XpertError(f"{what}; {files[0]} has no xpertctl record") from None
        if rec.get("kind") != "grafted":
            raise XpertError(f"{what}; it holds {provenance.describe(rec.get('kind'))}")
        kind, fp, gain = "grafted", provenance.weights_fingerprint(path), float((rec.get("params") or {}).get("up_gain", 1.0))
        key, n = "model.layers.{t}.mlp.{m}.weight", int(config.get("num_hidden_layers") or rec["target"]["layers"])
    else:
        raise XpertError(what)
    undo = {"gate_proj": 1.0, "up_proj": 1 / gain, "down_proj": gain}
    norms, shapes = [], set()
    for t in range(n):
        names = [key.format(t=t, m=m) for m in MATS]
        missing = [k for k in names if k not in reader.weight_map]
        if missing:
            raise XpertError(f"--scale-like {path}: no tensor {missing[0]!r} (layer {t} of {n})")
        g, u, d = (reader.shape(k) for k in names)
        if g != u or d != g[::-1]:
            raise XpertError(f"--scale-like {path}: layer {t}'s FFN shapes {g}, {u}, {d} are not a gate/up/down triple")
        shapes.add(tuple(g))
        norms.append({m: float(w.double().norm()) * undo[m] for m, w in zip(MATS, reader.read([(k, None) for k in names]))})
    if len(shapes) != 1:
        raise XpertError(f"--scale-like {path}: its layers have different FFN shapes {sorted(shapes)}")
    (f, h), = shapes
    return ScaleRef(path, kind, fp, gain, n, h, f, norms)


def check_scale_ref(ref: ScaleRef, layers: int, hidden: int, ffn: int) -> None:
    """Refuse a REF of another shape: the norms of one layer would be matched to another's, or to a size
    whose norms mean another std."""
    if (ref.layers, ref.hidden, ref.ffn) != (layers, hidden, ffn):
        raise XpertError(f"--scale-like {ref.path}: {ref.layers} layers, hidden {ref.hidden}, FFN {ref.ffn}; this "
                         f"graft's target has {layers} layers, hidden {hidden}, FFN {ffn} (give a reference of the "
                         "same shape)")


def match_scale(state: dict[str, torch.Tensor], ref: ScaleRef, layers: int) -> list[dict[str, float]]:
    """Rescale state's FFN matrices (in place, float32) to REF's norms; the factors applied, per layer and matrix."""
    factors = []
    for t in range(layers):
        row = {}
        for m in MATS:
            k = f"model.layers.{t}.mlp.{m}.weight"
            w = state[k].float()
            have, want = float(w.double().norm()), ref.norms[t][m]
            if have == 0 and want > 0:
                raise XpertError(f"--scale-like {ref.path}: target layer {t}'s {m} is all zeros here (e.g. its "
                                 "selected experts got a routing mass of 0), so no factor gives it REF's norm; "
                                 "graft with --rescale none (--scale-like sets the scale anyway)")
            row[m] = want / have if have > 0 else 1.0
            state[k] = w * row[m]
        factors.append(row)
    return factors


def out_init_keys(layers: int, fresh_ffn: bool) -> list[str]:
    """The residual branches' output projections --out-init sets, in the order they are drawn."""
    per = ("self_attn.o_proj", "mlp.down_proj") if fresh_ffn else ("self_attn.o_proj",)
    return [f"model.layers.{t}.{p}.weight" for t in range(layers) for p in per]


def out_init(state: dict[str, torch.Tensor], how: str, layers: int, initializer_range: float, fresh_ffn: bool,
             seed: int) -> dict | None:
    """Set the output projections (in place); what was done, for the record (None: `default`)."""
    if how == "default":
        return None
    keys = out_init_keys(layers, fresh_ffn)
    std = initializer_range / math.sqrt(2 * layers) if how == "small" else 0.0
    gen = torch.Generator().manual_seed(seed + OUT_INIT_SEED)
    for k in keys:
        shape = state[k].shape
        state[k] = torch.randn(shape, generator=gen) * std if how == "small" else torch.zeros(shape)
    return {"how": how, "std": std, "tensors": sorted({k.split(".", 3)[3].removesuffix(".weight") for k in keys}),
            "rule": f"{initializer_range:g} / sqrt(2 x {layers} layers)" if how == "small" else "zeros"}


def check_out_init(how: str, ffn_init: str, scale_like, inherit) -> None:
    """Refuse --out-init where it would be undone or would undo another option (nothing silently different)."""
    from ..specs import OUT_INITS
    if how not in OUT_INITS:
        raise XpertError(f"--out-init {how!r}: choose one of {', '.join(OUT_INITS)}")
    if how == "default":
        return
    if "attention" in inherit:
        raise XpertError(f"--out-init {how} re-initializes o_proj, which --inherit attention copies from the source; "
                         "drop one of them")
    if ffn_init == "scratch" and scale_like is not None:
        raise XpertError(f"--out-init {how} sets scratch's fresh down_proj, which --scale-like {scale_like} rescales to "
                         "its reference's norm; drop one of them (--scale-like with --ffn-init scratch is the "
                         "scale-matched scratch)")
