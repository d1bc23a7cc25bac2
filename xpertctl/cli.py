"""The xpertctl command line: parse, call one function, print the output path. No logic here."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import XpertError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="XPERT model surgery: find cross-domain experts in an MoE LLM and graft them into a dense LM.")

OutOpt = typer.Option(..., "-o", "--out", help="Output path.")
ForceOpt = typer.Option(False, "--force", help="Replace an existing output.")


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    if version:
        from . import __version__
        print(__version__)
        raise typer.Exit()


@app.command()
def inspect(src: Path = typer.Argument(..., help="Model directory or .safetensors file."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """Describe a checkpoint: family, layout, layers, experts, sizes."""
    from .console import kv_table, out
    from .io import open_checkpoint
    info = open_checkpoint(src).summary()
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        out.print(kv_table(str(src), info))


@app.command()
def stats(src: Path = typer.Argument(..., help="MoE model directory or .safetensors file."),
          domain: List[str] = typer.Option(..., "--domain", "-d", help="NAME=PATH (.txt, .jsonl or a directory); repeat."),
          out: Path = OutOpt,
          tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory (default: the checkpoint's)."),
          max_tokens: Optional[int] = typer.Option(None, help="Tokens per domain (default: all)."),
          seq_len: Optional[int] = typer.Option(None, help="Window length (default: min(1024, max positions))."),
          batch_size: int = typer.Option(8, help="Windows per forward pass."),
          device: str = typer.Option("cpu", help="torch device, e.g. cuda:0."),
          dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
          stream_layers: bool = typer.Option(False, "--stream-layers", help="Load one decoder layer at a time (models larger than RAM)."),
          stream_tokens: int = typer.Option(65536, help="With --stream-layers: tokens per pass over the layers."),
          force: bool = ForceOpt):
    """Count top-k router selections per (domain, layer, expert) -> stats.safetensors."""
    from .ops import stats as op
    print(op.run(src, domain, out, tokenizer=tokenizer, max_tokens=max_tokens, seq_len=seq_len,
                 batch_size=batch_size, device=device, dtype=dtype, stream_layers=stream_layers,
                 stream_tokens=stream_tokens, force=force))


@app.command()
def select(stats_file: Path = typer.Argument(..., metavar="STATS", help="stats.safetensors from `xpertctl stats`."),
           out: Optional[Path] = typer.Option(None, "-o", "--out", help="selection.json to write."),
           criterion: str = typer.Option("min", help="min (used in every domain), mean, vote; controls: random, low, all."),
           per_layer: Optional[int] = typer.Option(None, help="Experts per layer (default: the model's top-k)."),
           seed: int = typer.Option(0, help="Seed for --criterion random."),
           plot: Optional[Path] = typer.Option(None, help="PNG: per-domain frequency per expert, selection marked."),
           plot_layers: Optional[str] = typer.Option(None, help="Comma-separated layers to plot (default: all)."),
           show: bool = typer.Option(False, "--show", help="Print the selection as a table."),
           force: bool = ForceOpt):
    """Choose the experts used across all domains -> selection.json."""
    from .ops import select as op
    from .specs import int_list
    if out is None and not show and plot is None:
        raise XpertError("select: give -o FILE, --plot FILE or --show")
    doc, path = op.run(stats_file, out, criterion=criterion, per_layer=per_layer, seed=seed, plot_path=plot,
                       plot_layers=int_list(plot_layers, "--plot-layers"), force=force)
    if show:
        from .console import err, selection_table
        err.print(selection_table(doc))
    for p in (path, plot):
        if p is not None:
            print(p)


RanksOpt = typer.Option(None, help="Tucker ranks per mode (rows, cols, experts): 'full' or an int; default full,full,1.")
TargetOpt = typer.Option(None, "--target", "-t", help="Target shape: 12L, or 12L,d2048,f1024[,h16].")


def _target(spec, layers, hidden, ffn, heads, required=True):
    from .specs import parse_target
    if spec is None and layers is None and not required:
        return None
    return parse_target(spec, layers, hidden, ffn, heads)


@app.command()
def decompose(src: Path = typer.Argument(..., help="MoE model directory or .safetensors file."),
              selection: Path = typer.Argument(..., help="selection.json from `xpertctl select`."),
              out: Path = OutOpt, ranks: Optional[str] = RanksOpt,
              align: bool = typer.Option(False, "--align", help="Match experts' neurons to the first before stacking."),
              no_tucker: bool = typer.Option(False, "--no-tucker", help="Frequency-weighted mean instead (ablation)."),
              force: bool = ForceOpt):
    """Stack each layer's selected experts and Tucker-decompose them -> factors.safetensors."""
    from .ops import decompose as op
    print(op.run(src, selection, out, ranks=ranks, align_neurons=align, no_tucker=no_tucker, force=force))


@app.command()
def reshape(factors: Path = typer.Argument(..., help="factors.safetensors from `xpertctl decompose`."),
            target: Optional[str] = TargetOpt, out: Path = OutOpt,
            layers: Optional[int] = typer.Option(None, help="Target layers (overrides --target)."),
            hidden: Optional[int] = typer.Option(None, help="Target hidden size."),
            ffn: Optional[int] = typer.Option(None, help="Target FFN width."),
            layer_map: str = typer.Option("uniform", help="Depth map: uniform, first or merge."),
            combine: str = typer.Option("mean", help="Expert-mode combination: mean, freq or first."),
            width_select: str = typer.Option("norm", help="Width indices: norm (largest energy) or first."),
            force: bool = ForceOpt):
    """Adapt factors to the target depth and width -> adapted.safetensors (one dense FFN per layer)."""
    from .ops import reshape as op
    print(op.run(factors, _target(target, layers, hidden, ffn, None), out, layer_map_how=layer_map,
                 combine=combine, width_select=width_select, force=force))


@app.command()
def graft(src: Path = typer.Argument(..., help="adapted.safetensors, or an MoE checkpoint for the one-shot path."),
          out: Path = OutOpt, target: Optional[str] = TargetOpt,
          layers: Optional[int] = typer.Option(None, help="Target layers."),
          hidden: Optional[int] = typer.Option(None, help="Target hidden size."),
          ffn: Optional[int] = typer.Option(None, help="Target FFN width."),
          heads: Optional[int] = typer.Option(None, help="Target attention heads (default: from the source)."),
          like: Optional[Path] = typer.Option(None, help="Source MoE for config/tokenizer (adapted input)."),
          stats_file: Optional[Path] = typer.Option(None, "--stats", help="One-shot: select from these stats."),
          selection: Optional[Path] = typer.Option(None, help="One-shot: use this selection.json."),
          criterion: str = typer.Option("min", help="One-shot with --stats: selection criterion."),
          per_layer: Optional[int] = typer.Option(None, help="One-shot with --stats: experts per layer."),
          ranks: Optional[str] = RanksOpt,
          align: bool = typer.Option(False, "--align", help="One-shot: align experts' neurons."),
          no_tucker: bool = typer.Option(False, "--no-tucker", help="One-shot: mean instead of Tucker."),
          layer_map: str = typer.Option("uniform", help="uniform, first or merge."),
          combine: str = typer.Option("mean", help="mean, freq or first."),
          width_select: str = typer.Option("norm", help="norm or first."),
          arch: str = typer.Option("llama", help="Target class: llama, or qwen3 (per-head QK-norm)."),
          inherit: Optional[str] = typer.Option(None, help="Copy from the source: embeddings,norms,attention."),
          ffn_init: str = typer.Option("xpert", help="xpert, or scratch (same model, fresh FFNs)."),
          dtype: Optional[str] = typer.Option(None, help="Output dtype (default: the source's)."),
          seed: int = typer.Option(0, help="Seed of the fresh weights."),
          shard_size: str = typer.Option("5GB", help="Max bytes per safetensors shard."),
          force: bool = ForceOpt):
    """Write a dense causal LM (HF directory) with XPERT FFNs."""
    from .io import parse_size
    from .ops import graft as op
    print(op.run(src, out, target=_target(target, layers, hidden, ffn, heads, required=False), like=like,
                 stats=stats_file, selection=selection, criterion=criterion, per_layer=per_layer, ranks=ranks,
                 align_neurons=align, no_tucker=no_tucker, layer_map_how=layer_map, combine=combine,
                 width_select=width_select, heads=heads, arch=arch, dtype=dtype, inherit=inherit,
                 ffn_init=ffn_init, seed=seed, shard_size=parse_size(shard_size), force=force))


@app.command()
def tokenize(tokenizer: Path = typer.Option(..., help="Tokenizer directory (a model dir works)."),
             domain: Optional[List[str]] = typer.Option(None, "--domain", "-d", help="NAME=PATH; repeat."),
             corpus: Optional[Path] = typer.Option(None, help="A corpus from `corpus build` (keeps its splits)."),
             out: Path = OutOpt,
             val_pct: int = typer.Option(5, help="Percent of documents (by hash) for validation."),
             test_pct: int = typer.Option(5, help="Percent of documents (by hash) for test."),
             force: bool = ForceOpt):
    """Tokenize domain corpora into DATA/{domain}.{train,val,test}.bin memmaps + manifest.json."""
    from . import data
    print(data.tokenize(tokenizer, domain or [], out, val_pct=val_pct, test_pct=test_pct, corpus=corpus, force=force))


@app.command()
def train(ckpt: Path = typer.Argument(..., help="HF model directory (e.g. from graft)."),
          out: Path = OutOpt,
          data_dir: Optional[Path] = typer.Option(None, "--data", help="Token data from `xpertctl tokenize`."),
          sft: Optional[Path] = typer.Option(None, help="Instruction JSONL (instruction, context, response)."),
          steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
          tokens: Optional[int] = typer.Option(None, help="Training tokens (instead of --steps)."),
          batch_size: int = typer.Option(8, help="Sequences per micro-step (global, across ranks)."),
          grad_accum: int = typer.Option(1, help="Micro-steps per optimizer step."),
          seq_len: int = typer.Option(256), lr: float = typer.Option(3e-4), warmup: int = typer.Option(20),
          min_lr_ratio: float = typer.Option(0.1, help="Final LR as a fraction of --lr (cosine)."),
          weight_decay: float = typer.Option(0.1), grad_clip: float = typer.Option(1.0),
          seed: int = typer.Option(0, help="Seed: data order and init-independent batches."),
          eval_every: int = typer.Option(50), eval_batches: int = typer.Option(8),
          save_every: int = typer.Option(0, help="Save a resumable checkpoint every N steps (0: final only)."),
          keep: int = typer.Option(2, help="Step checkpoints kept."),
          device: str = typer.Option("cpu"),
          save_dtype: Optional[str] = typer.Option(None, help="dtype of the final checkpoint (e.g. bfloat16)."),
          teacher: Optional[Path] = typer.Option(None, help="Distill from this HF causal LM (same tokenizer)."),
          kd_alpha: Optional[float] = typer.Option(None, help="KD: loss = (1-A)*CE + A*T^2*KL (default 0.5)."),
          kd_temperature: Optional[float] = typer.Option(None, help="KD: softmax temperature T (default 1.0)."),
          threads: int = typer.Option(0, help="CPU threads (0: torch's default); 1 on a shared machine."),
          compile: bool = typer.Option(False, "--compile", help="torch.compile the model (pays off on long runs)."),
          resume: str = typer.Option("no", help="auto: continue from the last checkpoint in OUT."),
          force: bool = ForceOpt):
    """Pretrain (or SFT) a causal LM with AdamW + warmup/cosine; checkpoints, metrics, resume, DDP."""
    from .train import TrainConfig, train as op
    cfg = TrainConfig(steps=steps, tokens=tokens, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len,
                      lr=lr, min_lr_ratio=min_lr_ratio, warmup=warmup, weight_decay=weight_decay,
                      grad_clip=grad_clip, seed=seed, eval_every=eval_every, eval_batches=eval_batches,
                      save_every=save_every, keep=keep, device=device, save_dtype=save_dtype,
                      teacher=str(teacher) if teacher else None, kd_alpha=kd_alpha, kd_temperature=kd_temperature)
    path = op(ckpt, out, cfg, data_dir=data_dir, sft=sft, resume=resume, force=force, threads=threads,
              compile=compile)
    if path is not None:  # under torchrun only rank 0 reports
        print(path)


@app.command(name="eval")
def evaluate(ckpt: Path = typer.Argument(..., help="HF model directory."),
             task: List[str] = typer.Option(..., "--task", help="ppl:PATH, mc:FILE.jsonl or gen:FILE.jsonl; repeat."),
             out: Optional[Path] = typer.Option(None, "-o", "--out", help="results.json to write."),
             split: str = typer.Option("val", help="Split of a token DATA dir for ppl."),
             max_tokens: Optional[int] = typer.Option(None, help="ppl: tokens per domain at most (default: all)."),
             seq_len: Optional[int] = typer.Option(None), max_new_tokens: int = typer.Option(64),
             device: str = typer.Option("cpu"), seed: int = typer.Option(0), force: bool = ForceOpt):
    """Perplexity per domain, multiple choice (acc, acc_norm), generation (Rouge-L) -> results.json."""
    from .eval import run as op
    doc, path = op(ckpt, task, out, seq_len=seq_len, device=device, max_new_tokens=max_new_tokens, seed=seed,
                   split=split, max_tokens=max_tokens, force=force)
    from .console import err, results_table
    err.print(results_table(doc))
    if path is not None:
        print(path)
    else:
        print(json.dumps(doc["tasks"], indent=2))


corpus_app = typer.Typer(help="Build the multi-domain demo corpus and its tokenizer.", no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")


@corpus_app.command("build")
def corpus_build(out: Path = OutOpt,
                 max_bytes: int = typer.Option(2_000_000, help="Bytes of text per domain at most."),
                 force: bool = ForceOpt):
    """Extract >= 5 knowledge domains from text Debian packages ship -> corpus/{train,val,test}/."""
    from .corpus import build
    print(build(out, max_bytes=max_bytes, force=force))


@corpus_app.command("tokenizer")
def corpus_tokenizer(corpus: Path = typer.Argument(..., help="Corpus directory from `corpus build`."),
                     out: Path = OutOpt, vocab_size: int = typer.Option(4096), force: bool = ForceOpt):
    """Train a byte-level BPE tokenizer on the corpus train split -> HF tokenizer directory."""
    from .corpus import train_tokenizer
    print(train_tokenizer(corpus, out, vocab_size=vocab_size, force=force))


@corpus_app.command("cloze")
def corpus_cloze(corpus: Path = typer.Argument(..., help="Corpus directory from `corpus build`."),
                 out: Path = OutOpt, per_domain: int = typer.Option(50), choices: int = typer.Option(4),
                 seed: int = typer.Option(0), force: bool = ForceOpt):
    """A multiple-choice cloze task (real continuation vs distractors) from the test split -> JSONL."""
    from .corpus import cloze
    print(cloze(corpus, out, per_domain=per_domain, choices=choices, seed=seed, force=force))


@app.command()
def init(family: str = typer.Argument(..., help="Family from the architecture table, e.g. olmoe or llama."),
         out: Path = OutOpt, tokenizer: Path = typer.Option(..., help="Tokenizer directory."),
         layers: int = typer.Option(6), hidden: int = typer.Option(128), ffn: int = typer.Option(128),
         heads: int = typer.Option(4), kv_heads: Optional[int] = typer.Option(None),
         experts: int = typer.Option(16), top_k: int = typer.Option(2),
         max_positions: int = typer.Option(1024), seed: int = typer.Option(0), force: bool = ForceOpt):
    """Write a fresh, seeded model of a family (e.g. a teacher MoE to train)."""
    from .ops import init as op
    print(op.run(family, out, tokenizer=tokenizer, layers=layers, hidden=hidden, ffn=ffn, heads=heads,
                 kv_heads=kv_heads, experts=experts, top_k=top_k, max_positions=max_positions, seed=seed, force=force))


@app.command()
def report(results: List[str] = typer.Option(..., "--results", help="Glob(s) of eval JSONs named ARM-<d>L-s<seed>.json."),
           out: Path = OutOpt, baseline: str = typer.Option("scratch", help="Arm the others are compared with."),
           teacher: Optional[Path] = typer.Option(None, help="The teacher's eval JSON (reference numbers)."),
           stats_file: Optional[Path] = typer.Option(None, "--stats", help="Teacher stats for the heatmap."),
           selection: Optional[Path] = typer.Option(None, help="Selection to mark on the heatmap."),
           title: str = typer.Option("XPERT demo"), force: bool = ForceOpt):
    """Summarize training runs: REPORT.md (mean ± std per arm and depth) + loss-curve and heatmap PNGs."""
    from .report import build
    print(build(results, out, baseline=baseline, teacher=teacher, stats=stats_file, selection=selection,
                title=title, force=force))


@app.command()
def run(recipe: Path = typer.Argument(..., help="Recipe YAML."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="Override: vars.x=1 or steps.ID.args.y=2."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (run/skip per step) only."),
        only: Optional[List[str]] = typer.Option(None, "--only", help="Run only steps whose id matches (glob *)."),
        profile: Optional[str] = typer.Option(None, help="A named set of var overrides from the recipe (e.g. quick).")):
    """Run a YAML recipe: every step is an xpertctl command; finished steps are skipped."""
    from .recipe import run as op
    for out in op(recipe, set_ or [], dry_run=dry_run, only=only, profile=profile):
        print(out)


def main() -> None:
    """Entry point: every user error becomes one line on stderr and exit code 2, never a traceback."""
    # typer may vendor click: take its exception classes from what it exports
    mro = {c.__name__: c for c in typer.BadParameter.__mro__}
    usage_error, click_exception = mro["UsageError"], mro["ClickException"]
    try:
        rv = app(prog_name="xpertctl", standalone_mode=False)
    except XpertError as e:
        print(f"xpertctl: error: {e}", file=sys.stderr)
        sys.exit(2)
    except usage_error as e:
        if not e.format_message():  # bare `xpertctl`: help was printed
            sys.exit(0)
        hint = f" (see 'xpertctl {e.ctx.info_name} --help')" if e.ctx and e.ctx.parent else " (see 'xpertctl --help')"
        print(f"xpertctl: error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except click_exception as e:
        print(f"xpertctl: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("xpertctl: interrupted; no partial output was kept", file=sys.stderr)
        sys.exit(130)
    if rv == 130:  # Ctrl-C inside a command (typer reports it as this exit code)
        print("xpertctl: interrupted; no partial output was kept", file=sys.stderr)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
