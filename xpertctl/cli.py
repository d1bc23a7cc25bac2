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
