"""The learngene baseline: TLEG, "Transformer as Linear Expansion of Learngene" (Xia et al., AAAI 2024).

Stage 1 (`xpertctl learngene`, learngene_train.py) trains an auxiliary network (Aux-Net) whose every decoder
layer l of L — attention, FFN and both norms — is a linear function of depth, theta_l = theta_A + c_l theta_B,
by distillation from the teacher; embeddings, the final norm and the head are ordinary shared tensors.
Stage 2 (`graft --ffn-init learngene --learngene AUX`) expands the learngene (theta_A, theta_B) into a
descendant of any depth n with the same rule, c_l computed for n, and those shared tensors inherited.

c_l for layer l = 0 .. n-1 (DEPTH_SCALES): `tleg` l / n, what TLEG's released code computes (AlphaXia/TLEG:
TLEG_vit.py sets `_ilayer = repeated_id / repeated_times`, utils.gene_tranfer uses `i / num_layers`);
`unit` l / (n - 1), the first layer theta_A and the last theta_A + theta_B. docs/notes/learngene.md lists
every departure from TLEG.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from .. import __version__
from ..errors import XpertError
from ..io import provenance
from ..specs import DEPTH_SCALES

GENES = ("theta_A", "theta_B")
SHARED = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")  # inherited whole by descendants
FILE = "learngene.safetensors"  # the marker of a learngene directory


def coefficients(n: int, scale: str) -> list[float]:
    """c_l of layers 0 .. n-1 (python floats: the Aux-Net and an expansion compute a + c * b alike)."""
    if scale not in DEPTH_SCALES:
        raise XpertError(f"--depth-scale {scale!r}: choose one of {', '.join(DEPTH_SCALES)}")
    if scale == "tleg":
        return [l / n for l in range(n)]
    return [l / (n - 1) if n > 1 else 0.0 for l in range(n)]


class Line(nn.Module):
    """The parametrization of one layer tensor: theta_A + c * theta_B (theta_A, theta_B shared by all layers)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + self.c * b

    def right_inverse(self, w: torch.Tensor):  # used once, at registration; the genes replace both at once
        return w, torch.zeros_like(w)


class Learngene(nn.Module):
    """theta_A and theta_B: each one decoder layer's worth of tensors, with the layer's own names."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b


def new_aux(config, scale: str, seed: int = 0):
    """(Aux-Net, learngene): a fresh, seeded Llama of config.num_hidden_layers layers whose layer tensors are
    computed from the learngene. theta_A and theta_B start as two freshly initialized layers (TLEG draws both
    from the same truncated normal), theta_B's norm weights at 0: every layer starts with unit norms."""
    import transformers
    coefficients(config.num_hidden_layers, scale)  # the scale checked before any work
    if config.num_hidden_layers < 2:
        raise XpertError(f"--layers {config.num_hidden_layers}: the Aux-Net needs at least 2 layers (with one, "
                         "theta_B is never trained)")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.float32)
    layer_cls = type(model.model.layers[0])
    a, b = layer_cls(config, 0), layer_cls(config, 1)
    genes = Learngene(a, b)
    _fresh(model, genes)
    attach(model, genes, scale)
    return model, genes


def _fresh(model, genes: Learngene) -> None:
    """theta_A and theta_B from the model's own fresh layers 0 and 1 (transformers' init of this config)."""
    with torch.no_grad():
        for n, p in genes.a.named_parameters():
            p.copy_(model.model.layers[0].get_parameter(n))
        for n, p in genes.b.named_parameters():
            p.copy_(torch.zeros_like(p) if "norm" in n else model.model.layers[1].get_parameter(n))


def attach(model, genes: Learngene, scale: str) -> None:
    """Make every decoder layer tensor of `model` theta_A + c_l theta_B (torch parametrizations whose two
    originals are the genes themselves): gradients flow to the genes, the layers hold no tensors of their own."""
    layers = model.model.layers
    for layer, c in zip(layers, coefficients(len(layers), scale)):
        for name, _ in genes.a.named_parameters():
            owner, leaf = name.rsplit(".", 1)
            mod = layer.get_submodule(owner)
            parametrize.register_parametrization(mod, leaf, Line(c), unsafe=True)
            originals = mod.parametrizations[leaf]
            originals.original0 = genes.a.get_parameter(name)
            originals.original1 = genes.b.get_parameter(name)


def learngene_tensors(model, genes: Learngene) -> dict[str, torch.Tensor]:
    """What a learngene file holds: theta_A.NAME and theta_B.NAME per layer tensor, and the shared tensors."""
    out = {f"{g}.{n}": p.detach().clone() for g, mod in zip(GENES, (genes.a, genes.b))
           for n, p in mod.named_parameters()}
    for k in SHARED:
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        out[k] = model.get_parameter(k).detach().clone()
    return out


def expand(tensors: dict[str, torch.Tensor], n: int, scale: str) -> dict[str, torch.Tensor]:
    """The state dict of an n-layer descendant: layer l = theta_A + c_l theta_B, the shared tensors as they are."""
    names = [k.removeprefix("theta_A.") for k in tensors if k.startswith("theta_A.")]
    state = {k: v for k, v in tensors.items() if not k.startswith(tuple(f"{g}." for g in GENES))}
    for l, c in enumerate(coefficients(n, scale)):
        for name in names:
            state[f"model.layers.{l}.{name}"] = tensors[f"theta_A.{name}"] + c * tensors[f"theta_B.{name}"]
    return state


# ---- the learngene directory ----------------------------------------------------------------------------

def load(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, provenance record, Aux-Net config dict) of a directory `xpertctl learngene` wrote."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.exists():
        raise XpertError(f"--learngene {path}: does not exist")
    f = path / FILE
    if not path.is_dir() or not f.is_file() or not (path / "config.json").is_file():
        raise XpertError(f"--learngene {path}: not a learngene directory (no {FILE} and config.json; make one with "
                         "`xpertctl learngene`)")
    rec = provenance.read(f, "learngene")
    tensors = load_file(str(f))
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in tensors]
    if missing or not any(k.startswith("theta_A.") for k in tensors):
        raise XpertError(f"{f}: incomplete learngene (missing {missing[0] if missing else 'theta_A'})")
    return tensors, rec, json.loads((path / "config.json").read_text())


def descendant(ck, learngene: Path, layers: int, *, hidden: int | None = None, ffn: int | None = None,
               heads: int | None = None, dtype: str | None = None, up_gain: float = 1.0):
    """(state dict, config, record fields) of the `layers`-layer descendant of `learngene`, whose teacher must
    be the checkpoint `ck` (the source graft was given)."""
    import transformers
    from ..specs import parse_dtype
    tensors, rec, cfg = load(learngene)
    made = rec.get("source") or {}
    if (made.get("sha256"), made.get("size")) != (ck.fingerprint["sha256"], ck.fingerprint["size"]):
        raise XpertError(f"--learngene {learngene}: distilled from {made.get('path')}, not from {ck.path}; give its "
                         "teacher as the source")
    aux = rec["aux"]
    for what, want in (("hidden", hidden), ("ffn", ffn), ("heads", heads)):
        if want is not None and want != aux[what]:
            raise XpertError(f"--target: {what} {want}, but the learngene {learngene} has {what} {aux[what]} "
                             "(a descendant keeps the Aux-Net's widths)")
    dtype = dtype or "float32"
    cast = parse_dtype(dtype)
    config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    config.num_hidden_layers = layers
    config.dtype = dtype
    config.architectures = ["LlamaForCausalLM"]
    state = expand(tensors, layers, aux["depth_scale"])
    if up_gain != 1:  # the same function with the scale moved from down to up (graft --up-gain)
        for l in range(layers):
            state[f"model.layers.{l}.mlp.up_proj.weight"] = state[f"model.layers.{l}.mlp.up_proj.weight"] * up_gain
            state[f"model.layers.{l}.mlp.down_proj.weight"] = state[f"model.layers.{l}.mlp.down_proj.weight"] / up_gain
    state = {k: v.to(cast) for k, v in state.items()}
    if up_gain != 1:
        for k, v in state.items():
            if ("up_proj" in k or "down_proj" in k) and (not torch.isfinite(v).all() or not v.any()):
                raise XpertError(f"--up-gain {up_gain:g}: {k} overflows or vanishes in {dtype}; use a gain nearer 1 "
                                 "or a wider --dtype")
    fields = {"learngene": {"path": str(Path(learngene).resolve()), "tokens": aux["tokens"], "aux_layers": aux["layers"],
                            "depth_scale": aux["depth_scale"], "coefficients": coefficients(layers, aux["depth_scale"]),
                            "teacher": made.get("path")},
              "input": provenance.fingerprint(Path(learngene) / FILE),
              "target": {"layers": layers, "hidden": aux["hidden"], "ffn": aux["ffn"]}}
    return state, config, fields


def descendant_card(rec: dict, config) -> str:
    lg, tgt = rec["learngene"], rec["target"]
    c = ", ".join(f"{x:.3g}" for x in lg["coefficients"])
    lines = [
        "---", "library_name: transformers", "tags: [xpertctl, learngene, tleg]", "---", "",
        f"# Learngene (TLEG) descendant ({tgt['layers']} layers, hidden {tgt['hidden']}, FFN {tgt['ffn']})", "",
        f"Written by xpertctl {__version__}. Architecture: `{config.architectures[0]}`.", "",
        "The learngene baseline (TLEG, Xia et al., AAAI 2024): every decoder layer l (attention, FFN and both "
        "norms) is theta_A + c_l theta_B of the learngene, the embeddings, final norm and head are the "
        "auxiliary network's. Nothing is fresh: no seed enters these weights.", "",
        "| | |", "|---|---|",
        f"| learngene | `{lg['path']}` |",
        f"| teacher (distilled into the auxiliary network) | `{lg['teacher']}` |",
        f"| auxiliary training tokens | {lg['tokens']:,} (a cost of this init, beside the descendant's own training) |",
        f"| auxiliary network depth | {lg['aux_layers']} layers |",
        f"| c_l | {c} (`{lg['depth_scale']}`: {DEPTH_RULES[lg['depth_scale']]}) |",
        f"| command | `{rec['command'] or '-'}` |", "",
        "## Provenance", "", "```json", json.dumps(rec, indent=2, sort_keys=True), "```", "",
    ]
    return "\n".join(lines)


DEPTH_RULES = {"tleg": "l / n for layer l = 0..n-1, as in TLEG's released code",
               "unit": "l / (n - 1): first layer theta_A, last theta_A + theta_B"}
