"""Terminal output: tables and progress go to stderr so stdout carries only paths (pipeline-friendly)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

err = Console(stderr=True)
out = Console()


def notice(msg: str) -> None:
    err.print(f"[yellow]note:[/yellow] {msg}", highlight=False, soft_wrap=True)


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


def families_table(rows: list[dict]) -> Table:
    t = Table(title="supported families (keys under model.layers.{i}.; any MoE family may also be fused: "
              "mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I])", title_justify="left")
    for c in ("family", "kind", "experts (expert j)", "router", "notes"):
        t.add_column(c, overflow="fold")
    for r in rows:
        notes = [f"shared: mlp.{r['shared']}" if r["shared"] else "", f"QK-norm: {r['qk_norm']}" if r["qk_norm"] else "",
                 "latent attention" if r["attention"] == "mla" else "", "sigmoid router" if r["scoring"] == "sigmoid" else ""]
        experts = f"{r['block']}.experts.{{j}}.{{{','.join(r['expert_names'])}}}" if r["moe"] else "-"
        t.add_row(r["name"], "MoE" if r["moe"] else "dense", experts,
                  f"{r['block']}.gate" if r["moe"] else "-", "; ".join(n for n in notes if n) or "-")
    return t


def selection_table(doc: dict) -> Table:
    t = Table(title=f"selection: criterion={doc['criterion']}, {doc['per_layer']} per layer", title_justify="left")
    t.add_column("layer", justify="right")
    t.add_column("experts")
    t.add_column("min freq", justify="right")
    t.add_column("mean freq", justify="right")
    for l in doc["layers"]:
        fr = list(l["freq"].values())
        mins = [min(f[n] for f in fr) for n in range(len(l["experts"]))]
        means = [sum(f[n] for f in fr) / len(fr) for n in range(len(l["experts"]))]
        t.add_row(str(l["layer"]), " ".join(map(str, l["experts"])),
                  f"{sum(mins) / len(mins):.3f}", f"{sum(means) / len(means):.3f}")
    return t


def results_table(doc: dict) -> Table:
    t = Table(title=f"eval: {doc['model']['path']}", title_justify="left")
    for c in ("task", "metric", "value"):
        t.add_column(c)
    for task, res in doc["tasks"].items():
        for k, v in res.items():
            if isinstance(v, dict):
                t.add_row(task, k, "  ".join(f"{m}={x:.4g}" for m, x in v.items() if isinstance(x, float)))
            elif isinstance(v, float):
                t.add_row(task, k, f"{v:.4f}")
    return t
