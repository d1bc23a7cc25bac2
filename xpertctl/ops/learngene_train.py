"""`xpertctl learngene`: TLEG's stage 1 — train the Aux-Net by distillation from the teacher -> a learngene.

The Aux-Net is the students' Llama (the teacher's vocabulary, rope and norm settings; by default its hidden
size, one expert's FFN width, its heads and its depth) with every decoder layer parametrized as
theta_A + c_l theta_B (learngene.py). It trains with train.py's own machinery — batches a pure function of
(seed, step), the same optimizer, schedule and KD loss (distill.py) — so its tokens are counted exactly as a
student's are. AUX/ holds learngene.safetensors (theta_A.*, theta_B.*, embeddings, final norm, head; the
record counts the auxiliary training tokens), the Aux-Net's config.json, the tokenizer, metrics.jsonl and a
card. Written to a temp directory and renamed at the end: an interrupted run leaves nothing.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .. import __version__, data, distill, train
from ..console import progress
from ..errors import XpertError
from ..io import open_checkpoint, provenance, write_safetensors
from ..io.checkpoint import resolve_source, tokenizer_files
from ..io.writer import atomic_path, check_output
from . import learngene as lg

KD_ALPHA, KD_TEMPERATURE = 1.0, 1.0  # TLEG trains the Aux-Net with soft distillation alone (alpha 1, tau 1)


def run(src: Path, data_dir: Path, out: Path, cfg: train.TrainConfig, *, layers: int | None = None,
        hidden: int | None = None, ffn: int | None = None, heads: int | None = None, depth_scale: str = "tleg",
        threads: int = 0, force: bool = False) -> Path:
    src, out = Path(src), Path(out)
    cfg = replace(cfg, teacher=str(src), kd_alpha=KD_ALPHA if cfg.kd_alpha is None else cfg.kd_alpha,
                  kd_temperature=KD_TEMPERATURE if cfg.kd_temperature is None else cfg.kd_temperature)
    cfg = train.check_options(cfg, data_dir, None, "no", threads)
    if train.this_rank(cfg).ddp:
        raise XpertError("learngene: runs as one process (torchrun is not supported)")
    check_output(out, force, [src, data_dir], marker=lg.FILE)
    src = resolve_source(src)
    ck = open_checkpoint(src)
    config = aux_config(ck, layers, hidden, ffn, heads)
    model, genes = lg.new_aux(config, depth_scale, seed=cfg.seed)
    teacher = distill.load_teacher(src, model, src, train.load_causal_lm)
    batches = train.lm_batches(cfg, data_dir, src, model)
    total = train.total_steps(cfg, src, model, batches)
    device = torch.device(cfg.device)
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model.to(device).train()
        teacher.to(device)
        opt, sched = train.make_optimizer(model, cfg, total)
        step_fn = train.Stepper(model, teacher, cfg, device, train.this_rank(cfg), compile=False)
        with atomic_path(out, force, marker=lg.FILE) as tmp:
            tmp.mkdir()
            seen, last_val = _loop(step_fn, batches, opt, sched, total, tmp / "metrics.jsonl")
            aux = {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "ffn": config.intermediate_size,
                   "heads": config.num_attention_heads, "depth_scale": depth_scale, "tokens": seen, "steps": total,
                   "tokens_per_step": batches.tokens_per_step, "final_val_loss": last_val}
            rec = provenance.record(
                "learngene", inputs=[ck.fingerprint, provenance.fingerprint(Path(data_dir) / data.MANIFEST)],
                params=asdict(cfg) | {"data": str(data_dir), "layers": layers, "hidden": hidden, "ffn": ffn,
                                      "heads": heads, "depth_scale": depth_scale},
                seed=cfg.seed, source=ck.fingerprint, family=ck.family.name, aux=aux)
            write_safetensors(tmp / lg.FILE, lg.learngene_tensors(model.cpu(), genes), provenance.as_metadata(rec))
            config.architectures = ["LlamaForCausalLM"]
            (tmp / "config.json").write_text(config.to_json_string(use_diff=False))
            for name, f in tokenizer_files(src).items():
                (tmp / name).write_bytes(f.read_bytes())
            (tmp / "README.md").write_text(card(rec))
    finally:
        torch.set_num_threads(prev_threads)
    return out


def aux_config(ck, layers: int | None, hidden: int | None, ffn: int | None, heads: int | None):
    """The Aux-Net's Llama config: the students' (graft.target_config) at the teacher's sizes unless given."""
    from .graft import target_config
    d, f = hidden or ck.hidden, ffn or ck.expert_ffn
    L = layers or ck.num_layers
    if heads is not None and d % heads:
        raise XpertError(f"--heads {heads}: does not divide --hidden {d}")
    config, _ = target_config(ck, d, f, L, heads, "llama", "float32", [])
    return config


def _loop(step_fn, batches, opt, sched, total: int, metrics_path: Path) -> tuple[int, float | None]:
    """train.py's steps and validation, with its metrics rows; (tokens seen, last validation loss)."""
    cfg = step_fn.cfg
    t0, seen, last_val = time.perf_counter(), 0, None
    with open(metrics_path, "w") as metrics, progress(transient=False) as bar:
        task = bar.add_task("learngene", total=total, info="")
        for step in range(total):
            loss, lr_used, kd, got = step_fn.step(batches, step, opt, sched)
            seen += got
            row = {"step": step + 1, "loss": loss, "lr": lr_used, "tokens": seen,
                   "tok_s": seen / max(time.perf_counter() - t0, 1e-9)} | kd
            if batches.has_val and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == total):
                row["val_loss"] = last_val = step_fn.evaluate(batches)
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.update(task, advance=1, info=f"loss {loss:.3f}  {row['tok_s']:,.0f} tok/s"
                       + (f"  val {row['val_loss']:.3f}" if "val_loss" in row else ""))
    return seen, last_val


def card(rec: dict) -> str:
    aux, p = rec["aux"], rec["params"]
    val = "-" if aux["final_val_loss"] is None else f"{aux['final_val_loss']:.4f}"
    lines = [
        "# Learngene (TLEG stage 1)", "",
        f"Written by xpertctl {__version__}: an auxiliary network (Aux-Net) of {aux['layers']} Llama layers (hidden "
        f"{aux['hidden']}, FFN {aux['ffn']}, {aux['heads']} heads) whose every layer l (attention, FFN, norms) is "
        f"theta_A + c_l theta_B, c_l {lg.DEPTH_RULES[aux['depth_scale']]}, trained by distillation from "
        f"`{rec['source']['path']}`. `xpertctl graft TEACHER --target NL --ffn-init learngene --learngene THIS_DIR` "
        "expands it into a descendant of N layers.", "",
        "| | |", "|---|---|",
        f"| auxiliary training tokens | {aux['tokens']:,} ({aux['steps']:,} steps of {aux['tokens_per_step']:,}) |",
        f"| loss | (1 - {p['kd_alpha']}) CE + {p['kd_alpha']} T^2 KL(teacher_T || aux_T), T = {p['kd_temperature']} |",
        f"| final validation loss (CE) | {val} |",
        f"| lr, warmup, seed | {p['lr']}, {p['warmup']}, {rec['seed']} |",
        f"| command | `{rec['command'] or '-'}` |", "",
        "## Provenance", "", "```json", json.dumps(rec, indent=2, sort_keys=True), "```", "",
    ]
    return "\n".join(lines)
