"""XPERT step 4: write a dense causal LM whose FFNs are the adapted expert knowledge.

The model is built fresh (seeded) with transformers' own dense class; its FFN weights are replaced by
the adapted tensors; embeddings, norms and attention are copied from the mapped source layers only
when asked (`--inherit`), sliced to the residual indices the FFNs were cut to. `--ffn-init scratch`
writes the identical model with its fresh FFNs: the baseline that differs only in FFN weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from ..console import notice
from ..errors import XpertError
from ..io import check_output, open_checkpoint, provenance, write_model_dir
from ..io.checkpoint import Checkpoint, has_tokenizer, tokenizer_files
from ..io.writer import DEFAULT_SHARD_SIZE
from ..specs import DTYPES, FFN_INITS, RESCALE_DEFAULT, SHARED, WIDTH_RULE_DEFAULT, Target, parse_dtype
from . import controls, decompose, reshape
from .tucker import parse_ranks
from . import select as sel

TARGET_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
INHERITABLE = ("embeddings", "norms", "attention")


def parse_inherit(text: str | None) -> list[str]:
    parts = [p for p in (text or "").replace(" ", "").split(",") if p]
    for p in parts:
        if p not in INHERITABLE:
            raise XpertError(f"--inherit {text!r}: {p!r} is not one of {', '.join(INHERITABLE)}")
    return parts


def _src_heads(ck: Checkpoint, heads_flag: int | None) -> tuple[int, int, int]:
    """(heads, kv heads, head_dim) of the source attention."""
    known = ck.attention_heads()
    if known is not None:
        return known
    if not heads_flag:
        raise XpertError(f"{ck.path}: neither a config.json nor the shapes tell the attention heads; "
                         "pass --heads or h in --target (e.g. 12L,h16)")
    return heads_flag, heads_flag, ck.hidden // heads_flag


def target_config(ck: Checkpoint, d: int, f: int, layers: int, heads_flag: int | None, arch: str,
                  dtype: str, inherit: list[str]):
    import transformers
    if arch not in TARGET_CLASSES:
        raise XpertError(f"--arch {arch!r}: choose one of {', '.join(TARGET_CLASSES)}")
    s_heads, s_kv, hd = _src_heads(ck, heads_flag)
    if heads_flag and (d, heads_flag) != (ck.hidden, s_heads):
        heads, hd = heads_flag, d // heads_flag  # the target's own head size (Target.check_fits: it divides)
    elif heads_flag:
        heads = heads_flag
    elif d == ck.hidden:
        heads = s_heads
    elif d % hd == 0:
        heads = d // hd
    else:
        raise XpertError(f"--target: hidden {d} is not a multiple of the source head size {hd}; pass --heads")
    if heads * s_kv % s_heads == 0 and heads % (heads * s_kv // s_heads) == 0:
        kv = heads * s_kv // s_heads
    else:
        kv = heads
    cfg = ck.config
    vocab = ck.vocab
    attn_bias = "attention" in inherit and ck.has(f"model.layers.{ck.ffn_layers[0]}.self_attn.q_proj.bias")
    kwargs = dict(
        vocab_size=int(vocab), hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), hidden_act="silu",
        rope_parameters=cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))},
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), attention_bias=attn_bias,
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"),
        dtype=dtype,
    )
    config = getattr(transformers, TARGET_CLASSES[arch][0])(**kwargs)
    return config, (s_heads, s_kv, hd)


def _check_inherit(ck: Checkpoint, inherit: list[str], arch: str, config, src_heads) -> None:
    fam = ck.family
    if "norms" in inherit and fam.norms != "pre":
        where = "after attention and FFN (post-norm)" if fam.norms == "post" else "as LayerNorms without weights"
        raise XpertError(f"{ck.path}: {fam.name} normalizes {where}; a {arch} target's RMSNorms before them cannot "
                         "inherit its norms; drop 'norms' from --inherit")
    if "attention" not in inherit:
        return
    if fam.attention != "standard":
        raise XpertError(f"{ck.path}: {fam.name} uses multi-head latent attention, which a {arch} target cannot "
                         "inherit; drop 'attention' from --inherit")
    if fam.qk_norm == "full":
        raise XpertError(f"{ck.path}: {fam.name} attention has full-width QK-norm, which no dense target class here "
                         "has; drop 'attention' from --inherit")
    if fam.qk_norm == "head" and arch != "qwen3":
        raise XpertError(f"{ck.path}: {fam.name} attention has per-head QK-norm; use --arch qwen3 to inherit it")
    if fam.qk_norm is None and arch == "qwen3":
        raise XpertError(f"{ck.path}: {fam.name} attention has no QK-norm for a qwen3 target; use --arch llama")
    if ck.config.get("clip_qkv"):
        raise XpertError(f"{ck.path}: {fam.name} clips q, k and v at {ck.config['clip_qkv']}, which a {arch} target "
                         "does not; drop 'attention' from --inherit")
    if (config.num_attention_heads, config.num_key_value_heads, config.head_dim) != src_heads:
        raise XpertError(f"--inherit attention needs the source's heads {src_heads} (heads, kv heads, head_dim); "
                         f"target has {(config.num_attention_heads, config.num_key_value_heads, config.head_dim)}")


def build(adapted: dict[str, torch.Tensor], meta: dict, ck: Checkpoint, *, heads: int | None = None,
          arch: str = "llama", dtype: str | None = None, inherit: list[str] = (), ffn_init: str = "xpert",
          seed: int = 0, up_gain: float = 1.0, scale_like: controls.ScaleRef | None = None,
          out_init: str = "default", applied: dict | None = None):
    """(state dict, config) of the grafted dense model. In order: the FFNs of `ffn_init`; with scale_like, each
    FFN matrix rescaled to REF's norm; out_init's output projections; then up_gain: every FFN's up rows times it
    and down columns divided by it, the same function (silu(g x) * (k u x) / k) with the scale moved from down
    to up. `applied` (a dict) receives what scale_like and out_init did, for the record."""
    import transformers
    dtype = dtype or _source_dtype(ck)
    _check_options(dtype, ffn_init)
    tgt = meta["target"]
    config, src_heads = target_config(ck, tgt["hidden"], tgt["ffn"], tgt["layers"], heads, arch, dtype, inherit)
    _check_inherit(ck, inherit, arch, config, src_heads)
    cast = parse_dtype(dtype)
    torch.manual_seed(seed)
    # fresh, seeded init built directly in the output dtype: no float32 copy of a large model
    model = getattr(transformers, TARGET_CLASSES[arch][1])._from_config(config, dtype=cast)
    state = dict(model.state_dict())
    del model
    ri = adapted["residual_index"]
    gain = {"up_proj": up_gain, "down_proj": 1 / up_gain}
    if ffn_init in ("xpert", "norm-matched"):
        gen = torch.Generator().manual_seed(seed + 7919)  # its own stream: the rest of the init stays identical
        for t in range(tgt["layers"]):
            for m in ("gate_proj", "up_proj", "down_proj"):
                w = adapted[f"layers.{t}.{m}"]
                state[f"model.layers.{t}.mlp.{m}.weight"] = norm_matched(w, gen) if ffn_init == "norm-matched" else w
    done = {"scale_like": None, "out_init": None}
    if scale_like is not None:
        controls.check_scale_ref(scale_like, tgt["layers"], tgt["hidden"], tgt["ffn"])
        done["scale_like"] = scale_like.record(controls.match_scale(state, scale_like, tgt["layers"]))
    done["out_init"] = controls.out_init(state, out_init, tgt["layers"], config.initializer_range,
                                         ffn_init == "scratch", seed)
    if up_gain != 1:  # every init, scratch included: the same function, the scale moved from down to up
        for t in range(tgt["layers"]):
            for m, f in gain.items():
                state[f"model.layers.{t}.mlp.{m}.weight"] = state[f"model.layers.{t}.mlp.{m}.weight"] * f
    if applied is not None:
        applied.update(done)
    lmap = meta["layer_map"]
    # everything copied from the source is refused when it holds NaN or Inf (ck.finite_tensor), as experts are
    if "embeddings" in inherit:
        state["model.embed_tokens.weight"] = ck.finite_tensor("model.embed_tokens.weight")[:, ri].float()
        if "lm_head.weight" in state and ck.has("lm_head.weight"):
            state["lm_head.weight"] = ck.finite_tensor("lm_head.weight")[:, ri].float()
    if "norms" in inherit:
        state["model.norm.weight"] = ck.finite_tensor("model.norm.weight")[ri].float()
        for t, group in enumerate(lmap):
            for n in ("input_layernorm", "post_attention_layernorm"):
                state[f"model.layers.{t}.{n}.weight"] = ck.finite_tensor(f"model.layers.{group[0]}.{n}.weight")[ri].float()
    if "attention" in inherit:
        for t, group in enumerate(lmap):
            src = f"model.layers.{group[0]}.self_attn"
            for p in ("q_proj", "k_proj", "v_proj"):
                state[f"model.layers.{t}.self_attn.{p}.weight"] = ck.finite_tensor(f"{src}.{p}.weight")[:, ri].float()
                if config.attention_bias:
                    state[f"model.layers.{t}.self_attn.{p}.bias"] = ck.finite_tensor(f"{src}.{p}.bias").float()
            state[f"model.layers.{t}.self_attn.o_proj.weight"] = ck.finite_tensor(f"{src}.o_proj.weight")[ri, :].float()
            if arch == "qwen3":
                for p in ("q_norm", "k_norm"):
                    state[f"model.layers.{t}.self_attn.{p}.weight"] = ck.finite_tensor(f"{src}.{p}.weight").float()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: transformers restores it from the embeddings
    gained = [f"model.layers.{t}.mlp.{m}.weight" for t in range(tgt["layers"]) for m in gain] if up_gain != 1 else []
    nonzero = {k for k in gained if state[k].any()}  # a zero matrix (mass 0, --out-init zero) is not one that vanished
    state = {k: v.to(cast) for k, v in state.items()}
    if up_gain != 1:
        for k in gained:
            if not torch.isfinite(state[k]).all() or (k in nonzero and not state[k].any()):
                raise XpertError(f"--up-gain {up_gain:g}: {k} overflows or vanishes in {dtype}; use a gain nearer 1 "
                                 "or a wider --dtype")
    return state, config


def norm_matched(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fresh Gaussian weights with each row's norm equal to w's: the XPERT FFN's scale without its
    content (the control that separates "knowledge" from "a different init scale")."""
    r = torch.randn(w.shape, generator=gen, dtype=torch.float32)
    return r * (w.float().norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True).clamp_min(1e-30))


def _source_dtype(ck: Checkpoint) -> str:
    d = ck.config.get("dtype") or ck.config.get("torch_dtype") or ck.dtype
    return d if d in DTYPES else "float32"


CARD_TITLES = {"xpert": "XPERT-initialized", "scratch": "Scratch baseline", "norm-matched": "Norm-matched random control"}
CARD_FFN = {"xpert": "consolidated experts of the source MoE (select -> align -> usage-weighted combination, a Tucker decomposition only at truncated --ranks -> reshape).",
            "scratch": "fresh random initialization (scratch baseline).",
            "norm-matched": "fresh random weights with the per-row norms of the XPERT FFN (control)."}


DENSE_FFN = "neurons of the source's own FFNs, copied unchanged (stats -> select neurons used in every domain)."


def card(rec: dict, config, ffn_init: str) -> str:
    from . import neurons
    tgt = rec["target"]
    dense = bool(rec.get("neurons"))
    lines = [
        "---", "library_name: transformers", "tags: [xpertctl, xpert]", "---", "",
        f"# {CARD_TITLES[ffn_init]} dense LM "
        f"({tgt['layers']} layers, hidden {tgt['hidden']}, FFN {tgt['ffn']})", "",
        f"Written by xpertctl {__version__}. Architecture: `{config.architectures[0] if config.architectures else type(config).__name__}`.",
        "",
        "FFN weights: " + (DENSE_FFN if dense and ffn_init == "xpert" else CARD_FFN[ffn_init]) + _scale_like_sentence(rec),
        f"Other weights: fresh (seed {rec['seed']}) except inherited: {', '.join(rec['inherit']) or 'none'}."
        + _out_init_sentence(rec, ffn_init), "",
        "| | |", "|---|---|",
        f"| source | `{rec['source']['path']}` ({rec['family']}) |",
        f"| selection | {rec.get('selection_summary', '-')} |",
        *([] if dense else [f"| shared experts | {_shared_summary(rec)} |"]),
        *([f"| FFN width | {_width_summary(rec)} |"] if rec.get("width_groups") else []),
        f"| layer map (target <- source) | {', '.join(f'{t}<-{g}' for t, g in enumerate(rec['layer_map']))} |",
        f"| command | `{rec['command'] or '-'}` |", "",
        *[f"> **Note:** {n}\n" for n in rec.get("notes") or []],
        *_fit_card(rec), *neurons.card_lines(rec, ffn_init), *_final_norm_card(rec),
        *_scale_like_card(rec),
        "## Provenance", "", "```json", json.dumps(rec, indent=2, sort_keys=True), "```", "",
    ]
    return "\n".join(lines)


def _scale_like_sentence(rec: dict) -> str:
    s = (rec.get("params") or {}).get("scale_like")
    if not s:
        return ""
    gain = rec["params"].get("up_gain", 1)
    return (f" Each FFN matrix of every layer then scaled to the Frobenius norm of the same matrix of `{s['ref']['path']}` "
            f"(`--scale-like`, its norms at up-gain 1; factors below){f', then --up-gain {gain:g}' if gain != 1 else ''}.")


def _out_init_sentence(rec: dict, ffn_init: str) -> str:
    o = (rec.get("params") or {}).get("out_init")
    if not o or o == "default":
        return ""
    what = " and ".join(f"`{t}`" for t in o["tensors"])
    how = f"normal with std {o['std']:.3g} ({o['rule']}, GPT-2)" if o["how"] == "small" else "zeros"
    keep = "" if ffn_init == "scratch" else " (the FFN's down_proj is its content and stays)"
    return f" Output projections (`--out-init {o['how']}`): {what} of every layer are {how}{keep}."


def _scale_like_card(rec: dict) -> list[str]:
    s = (rec.get("params") or {}).get("scale_like")
    if not s:
        return []
    lines = ["## Scale match (`--scale-like`): factor applied to each FFN matrix", "",
             f"Reference: `{s['ref']['path']}` ({s['ref_kind']}, sha256 {s['ref']['sha256'][:16]}..., its up-gain "
             f"{s['ref_up_gain']:g} undone).", "", "| layer | gate | up | down |", "|---|---|---|---|"]
    lines += [f"| {t} | {f['gate_proj']:.4g} | {f['up_proj']:.4g} | {f['down_proj']:.4g} |" for t, f in enumerate(s["factors"])]
    return lines + [""]


def _shared_summary(rec: dict) -> str:
    p = rec.get("params") or {}
    if p.get("shared") != "concat":
        return "not carried (`--shared none`)"
    fold = p.get("shared_gate_fold")
    return "appended to the FFN (`--shared concat`)" + (f"; the per-token sigmoid gate folded in as {fold}" if fold else "")


def _width_summary(rec: dict) -> str:
    """A wide student's FFN: the width rule and, per source layer, its groups of experts and their widths."""
    rule = (rec.get("params") or {}).get("width_rule")
    layers = "; ".join(f"layer {i}: " + ", ".join(f"[{'+'.join(map(str, g['experts']))}] {g['width']}" for g in gs)
                       for i, gs in rec["width_groups"].items())
    return (f"{rec['target']['ffn']} neurons: the selected experts side by side, each group's down columns scaled by "
            f"its routing share (width rule `{rule}`; groups of experts and their widths per source layer: {layers})")


def _fit_card(rec: dict) -> list[str]:
    """The data-aware fit's per-layer rel_error on its calibration and held-out documents."""
    fit = (rec.get("params") or {}).get("fit") or {}
    if not fit.get("layers"):
        return []
    ffn = fit["method"] == "ffn"
    lines = [f"## Fit (`--fit {fit['method']}`): rel_error of each FFN against its source block(s)", "",
             "Held out: whole calibration documents never fitted (share " f"{fit['holdout']}).", "",
             "| target | ridge | kept | calibration: consolidation / fit | held out: consolidation / fit |"
             + (" held out: ffn |" if ffn else ""),
             "|---|---|---|---|---|" + ("---|" if ffn else "")]
    for r in fit["layers"]:
        lines.append(f"| {r['target']} | {'-' if r['ridge'] is None else r['ridge']} | {r['kept']} | "
                     f"{r['calibration']['consolidation']:.3f} / {r['calibration']['fit']:.3f} | "
                     f"{r['held_out']['consolidation']:.3f} / {r['held_out']['fit']:.3f} |"
                     + (f" {r['ffn']['held_out']:.3f} |" if ffn else ""))
    return lines + [""]


def _final_norm_card(rec: dict) -> list[str]:
    """What --final-norm refit did, and the start NLL it measured with each gain."""
    r = (rec.get("params") or {}).get("final_norm")
    if not r:
        return []
    nll = r["held_out_nll"]
    return [f"## Final norm (`--final-norm refit`): gain refitted to this student's residual stream", "",
            f"The inherited final-norm gain was replaced by a fit on {r['calibration_tokens']:,} calibration tokens "
            f"({r['method']}); every other inherited weight is the source's.", "",
            f"Start NLL on {r['held_out_tokens']:,} held-out tokens (whole documents, share {r['holdout']}): "
            f"{nll['inherited']:.3f} with the source's gain, {nll['refitted']:.3f} refitted "
            f"(uniform over the vocabulary: ln V = {r['ln_vocab']:.3f}).", ""]


def run(src: Path, out: Path, *, target: Target | None = None, like: Path | None = None,
        tokenizer: Path | None = None, stats: Path | None = None,
        selection: Path | None = None, criterion: str = "min", per_layer: int | None = None, ranks: str | None = None,
        align_neurons: bool = True, align_sweeps: int = 0, no_tucker: bool = False, weighting: str = "joint", layer_map_how: str = "uniform",
        combine: str = "usage", rescale: str = RESCALE_DEFAULT, shared: str = "none", fit: str = "none", calibration: list[str] | None = None,
        calibration_tokens: int | None = 65536, ridge: float | None = None, holdout: float = 0.1, ridge_select: str = "domains", fit_weighting: str = "tokens", fit_steps: int = 500,
        text_field: str = "text",
        stream_layers: bool = False, seq_len: int | None = None, device: str = "cpu",
        width_select: str = "norm", width_rule: str = WIDTH_RULE_DEFAULT, heads: int | None = None,
        arch: str = "llama", dtype: str | None = None,
        inherit: str | None = None, ffn_init: str = "xpert", learngene: Path | None = None, up_gain: float = 1.0, seed: int = 0,
        final_norm: str = "source", scale_like: Path | None = None, out_init: str = "default",
        shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False) -> Path:
    """`xpertctl graft`: from adapted.safetensors (with --like), or one-shot from an MoE checkpoint, or from a
    dense checkpoint (its selected FFN neurons, ops/neurons.py)."""
    if ffn_init == "learngene" or learngene is not None:  # TLEG: the whole model from a learngene (ops/learngene.py)
        return _descendant(**locals())
    inherit_l = parse_inherit(inherit)
    norm_paths = _check_final_norm(final_norm, inherit_l, calibration, fit, text_field)
    src = Path(src)
    inputs = [src] + [p for p in (like, stats, selection, tokenizer, scale_like) if p is not None]
    controls.check_out_init(out_init, ffn_init, scale_like, inherit_l)
    dense = _dense_source(src)  # a dense checkpoint: its FFN neurons are selected and copied (ops/neurons.py)
    if dense is not None:
        from . import neurons
        import inspect
        neurons.refuse_moe_options(dense, dict(
            ranks=ranks, align_neurons=align_neurons, align_sweeps=align_sweeps, weighting=weighting,
            no_tucker=no_tucker, combine=combine, rescale=rescale, shared=shared, fit=fit, ffn_init=ffn_init,
            layer_map_how=layer_map_how), {k: p.default for k, p in inspect.signature(run).parameters.items()})
    if fit != "none" and ffn_init == "scratch":
        raise XpertError(f"--fit {fit} with --ffn-init scratch: the scratch baseline has fresh FFNs, so the fit would "
                         "be computed and thrown away; drop one of them")
    cal_paths = _check_fit(fit, calibration if fit != "none" or final_norm == "source" else None, ridge,
                           calibration_tokens, holdout, fit_steps, ridge_select, fit_weighting,
                           text_field if fit != "none" or final_norm == "source" else "text")
    parse_ranks(ranks)
    decompose.check_weighting(weighting)
    decompose.check_sweeps(align_sweeps, align_neurons)
    reshape.check_choices(layer_map_how, combine, width_select, rescale, width_rule)
    reshape._choice(shared, SHARED, "--shared")
    check_output(out, force, inputs + list(cal_paths.values()) + list(norm_paths.values()), marker="config.json")
    ref = controls.load_scale_ref(scale_like) if scale_like is not None else None
    if tokenizer is not None and not has_tokenizer(tokenizer_files(tokenizer)):
        raise XpertError(f"--tokenizer {tokenizer}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    is_adapted = src.is_file() and src.suffix == ".safetensors" and _kind(src) == "adapted"
    if src.is_file() and provenance.kind_of(src) not in (None, "adapted", "weights"):
        provenance.refuse_other_kind(src, "adapted", " (from `xpertctl reshape`) or an MoE checkpoint")
    if is_adapted:
        _refuse_one_shot_options(src, stats=stats, selection=selection, criterion=criterion, per_layer=per_layer,
                                 ranks=ranks, align_neurons=align_neurons, no_tucker=no_tucker, weighting=weighting,
                                 layer_map_how=layer_map_how, combine=combine, rescale=rescale,
                                 width_select=width_select, shared=shared, align_sweeps=align_sweeps,
                                 width_rule=width_rule)
        rec_in = provenance.read(src, "adapted")
        like = Path(like) if like else Path(rec_in["source"]["path"])
        if not like.exists():
            raise XpertError(f"{src}: its source {like} is gone; pass --like SRC")
        ck = open_checkpoint(like).require_moe()
        widths = {"expert_ffn": ck.expert_ffn, "shared_ffn": ck.shared_ffn, "experts": rec_in.get("experts"),
                  "layers": sorted({i for g in rec_in["layer_map"] for i in g})}
        _validate_early(ck, rec_in["target"], heads, arch, dtype, ffn_init, inherit_l,
                        reshape.ffn_width(widths, rec_in.get("shared") or "none"),
                        reshape.max_ffn(widths, rec_in.get("shared") or "none"))
        if ref is not None:
            controls.check_scale_ref(ref, *(rec_in["target"][k] for k in ("layers", "hidden", "ffn")))
        _check_tokenizer_fits(tokenizer, ck, inherit_l)
        if (rec_in["source"]["sha256"], rec_in["source"]["size"]) != (ck.fingerprint["sha256"], ck.fingerprint["size"]):
            raise XpertError(f"{src}: adapted from {rec_in['source']['path']}, not from --like {like}")
        if target is not None:
            have = rec_in["target"]
            want = {"layers": target.layers, "hidden": target.hidden, "ffn": target.ffn}
            if any(v is not None and v != have[k] for k, v in want.items()):
                raise XpertError(f"--target {target}: {src} was adapted to {have}; run reshape again for another size")
        from safetensors.torch import load_file
        adapted, meta = load_file(str(src)), rec_in
        bad = next((k for k, t in adapted.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if bad is not None:
            raise XpertError(f"{src}: {bad} has NaN or Inf weights")
        s = rec_in.get("factors", {}).get("selection") or {}
        sel_summary = _selection_summary(s.get("criterion"), s.get("per_layer"), s.get("path"))
        in_fps = [provenance.file_fingerprint(src), ck.fingerprint]
        applied = applied_options(rec_in, s)
        align_sweeps = applied.pop("align_sweeps")
    elif dense is not None:
        if like is not None:
            raise XpertError("--like is for an adapted.safetensors source; a dense source is its own reference")
        if target is None:
            raise XpertError("--target is required (e.g. 12L or 12L,d2048,f1024)")
        ck = dense
        doc, sel_from = neurons.selection_for(ck, target, stats=stats, selection=selection, criterion=criterion,
                                              per_layer=per_layer, seed=seed)
        _, shape = neurons.plan(ck, target, doc, layer_map_how)  # widths checked before a weight is read
        _validate_early(ck, shape, heads, arch, dtype, ffn_init, inherit_l, shape["ffn"])
        _check_tokenizer_fits(tokenizer, ck, inherit_l)
        adapted, meta = neurons.adapt(ck, target, doc, layer_map_how=layer_map_how, width_select=width_select)
        sel_summary, applied, align_sweeps = neurons.summary(doc, sel_from), neurons.applied(meta, doc), None
        in_fps = [ck.fingerprint] + [provenance.file_fingerprint(p) for p in (stats, selection) if p is not None]
    else:
        if like is not None:
            raise XpertError("--like is for an adapted.safetensors source; an MoE source is its own reference")
        if target is None:
            raise XpertError("--target is required (e.g. 12L or 12L,d2048,f1024)")
        ck = open_checkpoint(src).require_moe()
        if shared == "concat" and not ck.shared_ffn:
            raise XpertError(f"--shared concat: {ck.path} ({ck.family.name}) has no shared experts")
        full_ffn = ck.expert_ffn + (ck.shared_ffn if shared == "concat" else 0)
        if selection is not None and stats is not None:
            raise XpertError("give --stats or --selection, not both")
        if selection is not None:
            doc, sel_path = sel.load_selection(selection), selection
        elif stats is not None:
            st = sel.load_stats(stats)
            doc = sel.selection_doc(st, sel.choose(st, criterion, per_layer, seed), criterion, per_layer, seed)
            sel_path = stats
        else:
            doc, sel_path = decompose.all_experts_doc(ck), "(all experts)"
        sel.check_level(doc, sel_path, ck)
        fmeta0 = decompose.factor_meta(ck, doc, sel_path, ranks, align_neurons, no_tucker, {}, weighting)
        # the depth map and the widths the selection allows, then the rest of the options, before any work
        lmap = reshape.check(fmeta0, target, layer_map_how, combine, width_select, rescale, shared, width_rule)
        _validate_early(ck, {"layers": target.layers, "hidden": target.hidden or ck.hidden,
                             "ffn": target.ffn or full_ffn}, heads, arch, dtype, ffn_init, inherit_l, full_ffn,
                        reshape.max_ffn(fmeta0, shared, {i for g in lmap for i in g}))
        _check_tokenizer_fits(tokenizer, ck, inherit_l)
        if ref is not None:
            controls.check_scale_ref(ref, target.layers, target.hidden or ck.hidden, target.ffn or full_ffn)
        if ref is not None and ffn_init != "scratch":  # before the note adapt prints: one line, and early
            used = {i: None for g in lmap for i in g}
            zero = sorted(i for i, v in reshape.routing_scale(used, fmeta0, rescale).items() if v == 0)
            if zero:
                raise XpertError(f"--scale-like {scale_like}: the selected experts of source layers {zero} got a routing "
                                 f"mass of 0, so --rescale {rescale} makes those FFNs zero and no factor gives them "
                                 "REF's norm; graft with --rescale none (--scale-like sets the scale anyway)")
        # stream: decompose only the layers the depth map uses, collapse each to its dense FFN at once
        per_src: dict[int, tuple] = {}
        single: set[int] = set()  # source layers whose factors keep one expert component (c drops out)
        wide = reshape.is_wide(fmeta0, target, shared)
        groups: dict[int, list[dict]] = {}
        fresh = ffn_init == "scratch" and (target.hidden or ck.hidden) == ck.hidden
        if fresh:  # fresh FFNs over every residual dim: nothing of a consolidation would reach the model
            sel.check_source(doc, Path(sel_path), ck)
            if not no_tucker:  # the options must still hold for the selection, as for the XPERT arm beside it
                decompose.check_ranks(ck, doc, ranks, {i for g in lmap for i in g})
            adapted, meta = _fresh_layout(fmeta0, target, lmap, layer_map_how, shared)
        elif wide:  # the experts side by side: each mapped layer's (aligned, rank-reduced) experts from its factors
            routed_f = target.ffn - (full_ffn - ck.expert_ffn)

            def each(i, t):
                per_src[i], groups[i] = reshape.wide_layer(t, i, fmeta0, routed_f, width_rule, combine, width_select)
            _, fmeta = decompose.compute(ck, doc, sel_path, ranks=ranks, align_neurons=align_neurons,
                                         no_tucker=no_tucker, weighting=weighting, only={i for g in lmap for i in g},
                                         sweeps=align_sweeps, each=each)
        elif decompose.collapsible(parse_ranks(ranks), no_tucker, combine):
            # full ranks: each layer's FFN straight from its aligned experts, no stacks or factors in memory
            _, fmeta = decompose.compute(ck, doc, sel_path, ranks=ranks, align_neurons=align_neurons,
                                         weighting=weighting, only={i for g in lmap for i in g},
                                         each=per_src.__setitem__, sweeps=align_sweeps,
                                         mix=lambda w: reshape.expert_mix(w, torch.eye(w.numel()), combine))
        else:
            def each(i, t):  # one layer's factors at a time, combined at once
                per_src[i] = reshape.combine_layer(t, i, combine, weighting)
                if reshape.one_component(t, i):
                    single.add(i)
            _, fmeta = decompose.compute(ck, doc, sel_path, ranks=ranks, align_neurons=align_neurons,
                                         no_tucker=no_tucker, weighting=weighting, only={i for g in lmap for i in g},
                                         sweeps=align_sweeps, each=each)
        if not fresh:
            shared_ffns = ({i: decompose.shared_ffn(ck, i) for i in {i for g in lmap for i in g}}
                           if shared == "concat" else None)
            adapted, meta = reshape.adapt(per_src, fmeta, target, layer_map_how=layer_map_how, combine=combine,
                                          width_select=width_select, rescale=rescale, shared=shared,
                                          shared_ffns=shared_ffns, single=single, width_rule=width_rule,
                                          width_groups=groups if wide else None)
        sel_summary = _selection_summary(doc.get("criterion"), doc.get("per_layer"), sel_path)
        applied = applied_options(meta, {"criterion": doc.get("criterion"), "per_layer": doc.get("per_layer")})
        applied.pop("align_sweeps")  # the one-shot graft aligns itself: graft's own option (below)
        in_fps = [ck.fingerprint] + [provenance.file_fingerprint(p) for p in (stats, selection) if p is not None]
    if ffn_init == "scratch":  # fresh FFNs: no selection, consolidation or rescale was applied (layer_map still
        # decides where an --inherit'ed weight comes from)
        applied = {k: (v if k == "layer_map" else None) for k, v in applied.items()}
        sel_summary, align_sweeps = "not used (fresh FFNs)", None
        meta = dict(meta, notes=[])
    fit_rec = None
    if fit != "none":
        adapted, fit_rec = _fit(ck, adapted, meta, fit, calibration, cal_paths, calibration_tokens=calibration_tokens,
                                ridge=ridge, holdout=holdout, select=ridge_select, weighting=fit_weighting, steps=fit_steps, stream_layers=stream_layers,
                                seq_len=seq_len, device=device, text_field=text_field,
                                cache_for=Path(out))
        in_fps += fit_rec["inputs"]
        meta = dict(meta, notes=list(meta.get("notes") or []) + fit_rec["notes"])
    done: dict = {}
    state, config = build(adapted, meta, ck, heads=heads, arch=arch, dtype=dtype, inherit=inherit_l,
                          ffn_init=ffn_init, seed=seed, up_gain=up_gain, scale_like=ref, out_init=out_init, applied=done)
    config.architectures = [TARGET_CLASSES[arch][1]]
    norm_rec = None
    if final_norm == "refit":
        state, norm_rec = _refit_final_norm(ck, state, config, arch, calibration, norm_paths, adapted["residual_index"],
                                            tokens=calibration_tokens,
                                            holdout=holdout, seq_len=seq_len, device=device,
                                            stream_layers=stream_layers, text_field=text_field)
        in_fps += norm_rec.pop("inputs")
    if ref is not None:
        in_fps = in_fps + [ref.fingerprint]
    rec = provenance.record("grafted", inputs=in_fps, params={
        "target": meta["target"], "arch": arch, "inherit": inherit_l, "ffn_init": ffn_init,
        "dtype": str(config.dtype).removeprefix("torch."), "up_gain": up_gain,
        "scale_like": done["scale_like"], "out_init": done["out_init"] or "default",
        **applied, "align_sweeps": align_sweeps, "fit": fit_rec and fit_rec["params"],
        **({"final_norm": norm_rec} if norm_rec else {})},
        seed=seed, source=ck.fingerprint, family=ck.family.name, target=meta["target"], layer_map=meta["layer_map"],
        inherit=inherit_l, ffn_init=ffn_init, selection_summary=sel_summary, notes=meta.get("notes") or [],
        residual_index=meta.get("residual_index"), experts=meta.get("experts"),
        width_groups=meta.get("width_groups") if ffn_init != "scratch" else None,
        **({"neurons": meta["neurons"]} if dense is not None and ffn_init != "scratch" else {}))
    files: dict[str, bytes | Path] = {"config.json": config.to_json_string(use_diff=False).encode(),
                                      "README.md": card(rec, config, ffn_init).encode()}
    tok_dir = Path(tokenizer) if tokenizer is not None else (ck.path if ck.path.is_dir() else ck.path.parent)
    files.update(tokenizer_files(tok_dir))
    if not has_tokenizer(files):
        notice(f"{out} gets no tokenizer (none beside {ck.path}); pass --tokenizer DIR to include one")
    path = write_model_dir(out, state, provenance.as_metadata(rec), files, shard_size=shard_size, force=force)
    if dense is not None:  # after the write, so that an error stays the only line
        for n in meta.get("notes") or []:
            notice(n)
    elif not is_adapted and ffn_init != "scratch":  # after the write, so that an error stays the only line
        if stats is None and selection is None:
            notice("no --stats or --selection: every expert of each layer was used (recorded in the model card)")
        reshape.unscaled_notice(meta)
    return path


def _descendant(src: Path, out: Path, target: Target | None, learngene: Path | None, ffn_init: str, heads: int | None,
                dtype: str | None, up_gain: float, seed: int, shard_size: int, force: bool, **others) -> Path:
    """--ffn-init learngene: the TLEG descendant of --learngene at --target's depth, written as graft writes."""
    from . import learngene as lg
    if learngene is None or ffn_init != "learngene":
        raise XpertError("--ffn-init learngene and --learngene AUX go together (the learngene `xpertctl learngene` trains)")
    names = _changed_flags(others)
    if names:
        raise XpertError(f"{names}: not for --ffn-init learngene, whose every weight comes from the learngene; drop "
                         f"{'them' if ',' in names else 'it'}")
    if target is None:
        raise XpertError("--target is required (e.g. 4L: the descendant's depth)")
    if dtype is not None:
        _check_options(dtype, ffn_init)
    check_output(out, force, [src, learngene], marker="config.json")
    ck = open_checkpoint(src)
    state, config, fields = lg.descendant(ck, Path(learngene), target.layers, hidden=target.hidden, ffn=target.ffn,
                                          heads=target.heads or heads, dtype=dtype, up_gain=up_gain)
    rec = provenance.record("grafted", inputs=[ck.fingerprint, fields.pop("input")], params={
        "target": fields["target"], "arch": "llama", "inherit": [], "ffn_init": ffn_init,
        "dtype": str(config.dtype).removeprefix("torch."), "up_gain": up_gain, "learngene": fields["learngene"]},
        seed=seed, source=ck.fingerprint, family=ck.family.name, ffn_init=ffn_init, inherit=[],
        layer_map=reshape.layer_map(ck.moe_layers, target.layers, "uniform"), residual_index=None, experts=None,
        selection_summary="not used (every weight from the learngene)", notes=[], **fields)
    files: dict[str, bytes | Path] = {"config.json": config.to_json_string(use_diff=False).encode(),
                                      "README.md": lg.descendant_card(rec, config).encode()}
    files.update(tokenizer_files(Path(learngene)))
    return write_model_dir(out, state, provenance.as_metadata(rec), files, shard_size=shard_size, force=force)


def _dense_source(src: Path) -> Checkpoint | None:
    """The checkpoint when `src` is a dense model (checked to be a usable source), else None (an MoE, an
    adapted file, or a path the MoE branch reports on as before)."""
    if src.is_file() and (src.suffix != ".safetensors" or provenance.kind_of(src) not in (None, "weights")):
        return None
    try:
        ck = open_checkpoint(src)
    except XpertError:
        return None
    return ck.require_ffn_source() if ck.dense else None


def _fresh_layout(fmeta: dict, target: Target, lmap: list[list[int]], layer_map_how: str,
                  shared: str) -> tuple[dict, dict]:
    """What build() and the record need of reshape.adapt for fresh FFNs at the source's width: the depth map
    and the sizes (every residual dim kept), without computing a single FFN."""
    H = int(fmeta["hidden"])
    meta = {"target": {"layers": target.layers, "hidden": H, "ffn": target.ffn or reshape.ffn_width(fmeta, shared)},
            "layer_map": lmap, "layer_map_method": layer_map_how, "notes": [], "residual_index": None,
            "experts": {str(i): fmeta["experts"][str(i)] for g in lmap for i in g if str(i) in fmeta["experts"]} or None}
    return {"residual_index": torch.arange(H)}, meta


def applied_options(adapted_meta: dict, selection: dict) -> dict:
    """The consolidation options that made the FFNs, as applied (for the card): from the adapted metadata
    (an adapted file's own record, or the one-shot path's), not graft's defaults. A rescale that found
    no routing weights is recorded as none."""
    f = adapted_meta.get("factors") or {}
    mean = f.get("method") == "mean"
    return {"ranks": None if mean else f.get("ranks"), "align": f.get("align"), "no_tucker": mean,
            "weighting": f.get("weighting"), "layer_map": adapted_meta.get("layer_map_method"),
            "combine": adapted_meta.get("combine"),
            "rescale": adapted_meta.get("rescale") if adapted_meta.get("routing_scale") else "none",
            "width_select": adapted_meta.get("width_select"), "shared": adapted_meta.get("shared") or "none",
            "width_rule": adapted_meta.get("width_rule"),
            "shared_gate_fold": adapted_meta.get("shared_gate_fold"),
            "criterion": selection.get("criterion"), "per_layer": selection.get("per_layer"),
            "align_sweeps": f.get("align_sweeps")}


def _refuse_one_shot_options(src: Path, **given) -> None:
    """An adapted file was already selected, decomposed and reshaped: options of those steps cannot apply."""
    names = _changed_flags(given)
    if names:
        raise XpertError(f"{src}: an adapted file is already consolidated; {names} apply to the one-shot graft from "
                         "an MoE (run decompose/reshape again to change them)")


def _check_final_norm(final_norm: str, inherit: list[str], calibration: list[str] | None, fit: str,
                      text_field: str) -> dict:
    """--final-norm refit needs the inherited head it serves and calibration text; the calibration paths."""
    from .. import data
    from ..specs import FINAL_NORMS
    if final_norm not in FINAL_NORMS:
        raise XpertError(f"--final-norm {final_norm!r}: choose one of {', '.join(FINAL_NORMS)}")
    if final_norm == "source":
        return {}
    if "embeddings" not in inherit:
        raise XpertError("--final-norm refit fits the final norm to the source's inherited head; add embeddings to "
                         "--inherit (e.g. --inherit embeddings,norms,attention)")
    if not calibration:
        raise XpertError("--final-norm refit needs calibration text: --calibration NAME=PATH (repeat for several domains)")
    paths = data.parse_domains(calibration)
    if fit == "none":  # else _check_fit checks the text field
        from ..documents import check_field_applies
        check_field_applies(paths.values(), text_field)
    return paths


def _refit_final_norm(ck: Checkpoint, state: dict, config, arch: str, calibration: list[str], paths: dict,
                      residual_index, *,
                      tokens: int | None, holdout: float, seq_len: int | None, device: str, stream_layers: bool,
                      text_field: str) -> tuple[dict, dict]:
    """The student as built, its final-norm gain refitted on the calibration text (ops/final_norm.py)."""
    import transformers
    from .. import data
    from . import capture, final_norm
    runner = capture.prepare(ck, calibration, seq_len=seq_len, device=device, stream_layers=stream_layers,
                             sample_seed=0 if tokens is not None else None, text_field=text_field)
    student = getattr(transformers, TARGET_CLASSES[arch][1])._from_config(config, dtype=torch.float32)
    missing, unexpected = student.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise XpertError(f"--final-norm refit: the built student does not load ({sorted(unexpected or missing)[:3]})")
    student.tie_weights()
    student.to(device).eval()
    docs = {n: data.domain_documents(d, tokens) for n, d in runner.docs.items()}
    gain, rec = final_norm.refit(runner.model, student, runner.tokenizer, docs, seq_len=runner.seq_len,
                                 max_tokens=tokens, holdout=holdout, device=device,
                                 residual_index=torch.as_tensor(residual_index))
    state = dict(state, **{"model.norm.weight": gain.to(state["model.norm.weight"].dtype)})
    rec.update(calibration={n: str(p) for n, p in paths.items()}, calibration_token_cap=tokens,
               sample=data.sampling(runner.docs, tokens) if tokens is not None else None,
               inputs=[provenance.fingerprint(p) for p in paths.values()])
    return state, rec


def _changed_flags(given: dict) -> str:
    """The flags of the options of run() in `given` that are not at their defaults ('' when none)."""
    import inspect
    defaults = inspect.signature(run).parameters
    flags = {"stats": "--stats", "align_neurons": "--align/--no-align", "layer_map_how": "--layer-map"}
    return ", ".join(flags.get(k, "--" + k.replace("_", "-")) for k, v in given.items() if v != defaults[k].default)


def _check_fit(fit: str, calibration: list[str] | None, ridge: float | None, tokens: int | None,
               holdout: float = 0.1, steps: int = 500, select: str = "domains", weighting: str = "tokens",
               text_field: str = "text") -> dict:
    """Validate the data-aware fit options up front; the calibration paths."""
    from .. import data
    from ..specs import FITS
    if fit not in FITS:
        raise XpertError(f"--fit {fit!r}: choose one of {', '.join(FITS)}")
    if fit == "none":
        if calibration:
            raise XpertError("--calibration is for --fit down|ffn; add --fit down or drop --calibration")
        if text_field != "text":
            raise XpertError(f"--text-field {text_field}: names the field of the --calibration text of --fit down|ffn; "
                             "add --fit and --calibration or drop --text-field")
        return {}
    if not calibration:
        raise XpertError(f"--fit {fit} needs calibration text: --calibration NAME=PATH (repeat for several domains)")
    if ridge is not None and ridge < 0:
        raise XpertError(f"--ridge {ridge}: must be >= 0")
    if tokens is not None and tokens <= 0:
        raise XpertError(f"--calibration-tokens: must be positive, got {tokens}")
    if not 0 < holdout < 1:
        raise XpertError(f"--holdout {holdout}: must be between 0 and 1 (the share of documents held out)")
    if steps <= 0:
        raise XpertError(f"--fit-steps: must be positive, got {steps}")
    from .fit import SELECTS
    if select not in SELECTS:
        raise XpertError(f"--ridge-select {select!r}: choose one of {', '.join(SELECTS)}")
    from .fit import WEIGHTINGS
    if weighting not in WEIGHTINGS:
        raise XpertError(f"--fit-weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    paths = data.parse_domains(calibration)
    from ..documents import check_field_applies
    check_field_applies(paths.values(), text_field)
    from .fit import split_documents
    split_documents({n: data.domain_documents(data.DomainText(p, 0, text_field), tokens) for n, p in paths.items()},
                    holdout)  # before the long work
    return paths


def _fit(ck: Checkpoint, adapted: dict, meta: dict, method: str, calibration: list[str], cal_paths: dict, *,
         calibration_tokens: int | None, ridge: float | None, holdout: float, select: str, weighting: str, steps: int,
         stream_layers: bool, seq_len: int | None, device: str, cache_for: Path | None,
         text_field: str = "text"):
    """Fit each target layer's FFN to the source blocks, validated on held-out documents (ops/fit.py).
    The fitted FFN depends on the calibration text only, not on --seed (which seeds the fresh weights)."""
    from .. import data
    from . import capture, fit as fit_op
    select = fit_op.select_for(select, len(cal_paths), ridge)  # before the long work
    runner = capture.prepare(ck, calibration, seq_len=seq_len, device=device, stream_layers=stream_layers,
                             sample_seed=0 if calibration_tokens is not None else None, text_field=text_field)
    adapted, rows = fit_op.fit(ck, runner.model, runner.tokenizer, runner.docs, adapted, meta, method=method,
                               ridge=ridge, holdout=holdout, seq_len=runner.seq_len, max_tokens=calibration_tokens,
                               device=device, stream_tokens=65536 if stream_layers else None, steps=steps,
                               select=select, weighting=weighting, cache_for=cache_for)
    notes = [f"--fit {method}: target layer {r['target']} keeps the consolidation (held-out rel_error "
             f"{r['score']['held_out']['consolidation']:.3f}; the fit's {r['score']['held_out']['fit']:.3f} does not beat it"
             f"{', domains weighted equally' if r['score']['weighting'] == 'domains' else ''})"
             for r in rows if r["kept"] == "consolidation"]
    rec = {"inputs": [provenance.fingerprint(p) for p in cal_paths.values()], "notes": notes,
           "params": {"method": method, "ridge": ridge if ridge is not None else fit_op.RIDGE_CHOICE[select],
                      "ridge_grid": list(fit_op.RIDGES) if ridge is None else None, "holdout": holdout,
                      "ridge_select": select if ridge is None else None, "fit_weighting": weighting, "steps": steps if method == "ffn" else None,
                      "calibration": {n: str(p) for n, p in cal_paths.items()},
                      "calibration_tokens": calibration_tokens, "text_field": text_field,
                      "sample": {"seed": 0, "how": data.sampling(runner.docs, calibration_tokens)}
                      if calibration_tokens is not None else None,
                      "seq_len": runner.seq_len, "layers": rows}}
    return adapted, rec


def _selection_summary(criterion, per_layer, path) -> str:
    """One readable line for the model card (plain text, not JSON inside JSON)."""
    return f"{criterion}, {per_layer} per layer from {path}"


def _check_options(dtype: str, ffn_init: str) -> None:
    parse_dtype(dtype)
    if ffn_init not in FFN_INITS:
        raise XpertError(f"--ffn-init {ffn_init!r}: choose one of {', '.join(FFN_INITS)}")


def _validate_early(ck: Checkpoint, target: dict, heads: int | None, arch: str, dtype: str | None, ffn_init: str,
                    inherit: list[str], full_ffn: int | None = None,
                    widest: tuple[int, str | None] = (None, None)) -> None:
    """Fail on bad options before the (possibly long) select/decompose/reshape work. widest: reshape.max_ffn."""
    _check_options(dtype or "float32", ffn_init)
    Target(target["layers"], target["hidden"], target["ffn"], heads).check_fits(ck.hidden, full_ffn or ck.expert_ffn,
                                                                               *widest)
    config, src_heads = target_config(ck, target["hidden"], target["ffn"], target["layers"], heads, arch,
                                      dtype or "float32", inherit)
    _check_inherit(ck, inherit, arch, config, src_heads)


def _check_tokenizer_fits(tokenizer: Path | None, ck: Checkpoint, inherit: list[str]) -> None:
    """A --tokenizer must index the model's embedding rows: no id past them, and with inherited embeddings
    the very ids the source's own tokenizer gave them (another vocabulary would read the wrong rows)."""
    if tokenizer is None:
        return
    from .. import data
    tok = data.load_tokenizer(tokenizer)
    if ck.vocab is not None and len(tok) > ck.vocab:
        raise XpertError(f"--tokenizer {tokenizer}: {len(tok)} tokens, more than the {ck.vocab} embedding rows "
                         f"of {ck.path}")
    if "embeddings" not in inherit:
        return
    src_dir = ck.path if ck.path.is_dir() else ck.path.parent
    if not has_tokenizer(tokenizer_files(src_dir)):
        notice(f"--tokenizer {tokenizer}: cannot check it against the inherited embeddings (no tokenizer beside "
               f"{ck.path}); make sure it is the source's")
        return
    src_tok = data.load_tokenizer(src_dir)
    if tok.get_vocab() != src_tok.get_vocab():
        raise XpertError(f"--tokenizer {tokenizer}: its vocabulary ({len(tok)} tokens) is not that of {src_dir}'s "
                         f"tokenizer ({len(src_tok)} tokens), which the inherited embeddings belong to; drop "
                         "--tokenizer, or 'embeddings' from --inherit")


def _kind(path: Path) -> str | None:
    from ..io.files import read_header
    raw = read_header(path).metadata.get(provenance.KEY)
    try:
        return json.loads(raw).get("kind") if raw else None
    except json.JSONDecodeError:
        return None
