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
          force: bool = ForceOpt):
    """Count top-k router selections per (domain, layer, expert) -> stats.safetensors."""
    from .ops import stats as op
    print(op.run(src, domain, out, tokenizer=tokenizer, max_tokens=max_tokens, seq_len=seq_len,
                 batch_size=batch_size, device=device, dtype=dtype, force=force))


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
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
