"""Terminal output: tables and progress go to stderr so stdout carries only paths (pipeline-friendly)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

err = Console(stderr=True)
out = Console()


def notice(msg: str) -> None:
    err.print(f"[yellow]note:[/yellow] {msg}", highlight=False)


def progress(transient: bool = True) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err, transient=transient)


def kv_table(title: str, rows: dict) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows.items():
        t.add_row(k, "-" if v is None else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    return t
