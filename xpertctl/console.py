"""Terminal output: tables and progress go to stderr so stdout carries only paths (pipeline-friendly)."""
from __future__ import annotations

import json

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

err = Console(stderr=True)
out = Console()


def notice(msg: str) -> None:
    err.print(f"[yellow]note:[/yellow] {msg}", highlight=False, soft_wrap=True)


def progress(transient: bool = True) -> Progress:
    # a transient bar on a non-terminal (a log file, a pipe) only leaves a blank line behind: skip it
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err, transient=transient, disable=transient and not err.is_terminal)


def kv_table(title: str, rows: dict) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows.items():
        t.add_row(k, "-" if v is None else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    return t


TITLES = {"errors": "errors: relative reconstruction error ||W - W_hat|| / ||W|| per layer and matrix "
                     "(0 at full ranks; 1 is no better than zero)"}  # a summary's per-layer tables, said in full


def summary_tables(info: dict) -> list[Table]:
    """An inspect/summary dict as tables: its scalar fields, then each per-layer/per-domain mapping."""
    def cell(v):
        if isinstance(v, dict):
            return "; ".join(f"{k}: {cell(x)}" for k, x in v.items())
        if isinstance(v, list):
            return " ".join(map(str, v)) if all(not isinstance(x, (list, dict)) for x in v) else json.dumps(v)
        return v
    scalars = {k: cell(v) for k, v in info.items() if not _nested(v)}
    tables = [kv_table(str(info.get("path", "")), scalars)]
    for key, v in info.items():
        if _nested(v):
            cols = list(dict.fromkeys(c for row in v.values() for c in row))
            t = Table(title=TITLES.get(key, key), title_justify="left")
            for c in ["layer", *cols]:
                t.add_column(c, justify="right")
            for name, row in v.items():
                t.add_row(str(name), *[f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "-"))
                                       for c in cols])
            tables.append(t)
    return tables


def _nested(v) -> bool:
    return isinstance(v, dict) and bool(v) and all(isinstance(x, dict) for x in v.values())


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
    if doc.get("level") == "neuron":
        return _neuron_selection_table(doc)
    t = Table(title=f"selection: criterion={doc['criterion']}, {doc['per_layer']} per layer", title_justify="left")
    t.add_column("layer", justify="right")
    t.add_column("experts")
    t.add_column("min-freq", justify="right")  # every column is explained in `select --help`
    t.add_column("mean-freq", justify="right")
    t.add_column("router-prob", justify="right")
    for l in doc["layers"]:
        fr, pr = list(l["freq"].values()), list(l.get("prob", {}).values())
        n = len(l["experts"])
        mins = [min(f[j] for f in fr) for j in range(n)]
        means = [sum(f[j] for f in fr) / len(fr) for j in range(n)]
        prob = f"{sum(sum(p) for p in pr) / (len(pr) * n):.3f}" if pr else "-"
        t.add_row(str(l["layer"]), " ".join(map(str, l["experts"])),
                  f"{sum(mins) / len(mins):.3f}", f"{sum(means) / len(means):.3f}", prob)
    return t


def _neuron_selection_table(doc: dict) -> Table:
    t = Table(title=f"neuron selection: criterion={doc['criterion']}, {doc['per_layer']} of {doc.get('num_neurons')} "
              f"neurons per layer (active: top {doc.get('neuron_top')} of |act|)", title_justify="left")
    for c, j in (("layer", "right"), ("neurons (best first)", "left"), ("min-score", "right"),
                 ("coverage (min / mean)", "right"), ("mass (min / mean)", "right")):
        t.add_column(c, justify=j)
    for l in doc["layers"]:
        ids = l["neurons"]
        cov, mass = list(l["coverage"].values()), list(l["mass_share"].values())
        t.add_row(str(l["layer"]), " ".join(map(str, ids[:8])) + (f" … ({len(ids)})" if len(ids) > 8 else ""),
                  f"{min(l['scores']):.3f}", f"{min(cov):.3f} / {sum(cov) / len(cov):.3f}",
                  f"{min(mass):.3f} / {sum(mass) / len(mass):.3f}")
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
