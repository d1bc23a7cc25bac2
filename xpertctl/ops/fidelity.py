"""Function fidelity: does a student FFN compute what the MoE layer(s) it was made from compute?

For every target layer, the source MoE runs on real text; each mapped source layer's block input x
(after the post-attention norm) goes through the student FFN, and its output is compared with the
block's own output y on the same tokens (restricted to the residual dimensions the student kept):

  rel_error = ||s - y|| / ||y||,  cosine = <s, y> / (||s|| ||y||),  scale = <s, y> / ||s||^2
  (the least-squares scale of s; at it the error is sqrt(1 - cosine^2)),  norm_ratio = ||s|| / ||y||

over all tokens at once. References on the same tokens: the selected experts' own routed mixture
(the block with only the selected experts kept, routing weights as the router gave them, plus the
shared experts where the family has them, gated per token as the block gates them), a fresh
scratch FFN of the student's shape and init, and the zero FFN (rel_error 1: the floor to beat).

A dense source's block is its FFN; its student's references are, instead of the selected mixture, the
same number of the source layer's neurons drawn at random (`random_neurons`, seeded: what a neuron
selection must beat), plus scratch and zero.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..console import err, notice
from ..documents import check_field_applies
from ..errors import XpertError
from ..io import open_checkpoint, provenance
from ..io.checkpoint import Checkpoint
from . import capture

MATS = ("gate_proj", "up_proj", "down_proj")


def ffn(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The SwiGLU FFN every supported family's experts and the dense targets use."""
    return (F.silu(x @ g.T) * (x @ u.T)) @ d.T


@dataclass
class Student:
    """The FFNs of a grafted model (or an adapted.safetensors) and how they map onto the source."""
    label: str
    ffns: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per target layer: gate [f,d], up [f,d], down [d,f]
    layer_map: list[list[int]]  # target t <- source layers
    residual_index: torch.Tensor  # the d source residual dimensions the student kept
    experts: dict[int, list[int]] | None  # selected experts per source layer, when recorded
    init_std: float  # the scratch reference's init
    source: dict | None  # the source fingerprint it was made from


def load_student(path: Path, hidden_source: int, source: Checkpoint | None = None) -> Student:
    """A grafted HF model directory or an adapted.safetensors, with its recorded layer map (checked to
    come from `source` when given)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        rec = provenance.read(path, "adapted")
        _check_made_from(path, rec, source)
        from safetensors.torch import load_file
        t = load_file(str(path))
        n = rec["target"]["layers"]
        ffns = [tuple(t[f"layers.{k}.{m}"].float() for m in MATS) for k in range(n)]
        bad = next((f"layers.{k}.{m}" for k in range(n) for m, w in zip(MATS, ffns[k]) if not torch.isfinite(w).all()), None)
        if bad is not None:
            raise XpertError(f"{path}: {bad} has NaN or Inf weights")
        ri = t["residual_index"].long()
        std = 0.02
    else:
        ck = open_checkpoint(path)
        if ck.family.moe:
            raise XpertError(f"{path}: an MoE checkpoint; the student is a dense model written by `xpertctl graft`")
        rec = provenance.read(ck.files[0], "grafted") if _has_provenance(ck.files[0]) else None
        if rec is None:
            raise XpertError(f"{path}: no xpertctl graft provenance (no layer map to compare against); "
                             "measure the model `xpertctl graft` wrote, before training")
        _check_made_from(path, rec, source)
        n = rec["target"]["layers"]
        ffns = [tuple(ck.finite_tensor(f"model.layers.{k}.mlp.{m}.weight").float() for m in MATS) for k in range(n)]
        ri_list = rec.get("residual_index")
        if ri_list is None:
            if rec["target"]["hidden"] != hidden_source:
                raise XpertError(f"{path}: narrower than its source but grafted by an xpertctl that did not record "
                                 "its residual indices; graft it again")
            ri_list = list(range(hidden_source))
        ri = torch.tensor(ri_list, dtype=torch.long)
        std = float(ck.config.get("initializer_range", 0.02))
    experts = rec.get("experts")
    return Student(label=str(path), ffns=ffns, layer_map=[list(g) for g in rec["layer_map"]], residual_index=ri,
                   experts={int(k): list(v) for k, v in experts.items()} if experts else None,
                   init_std=std, source=rec.get("source"))


def _check_made_from(path: Path, rec: dict, source: Checkpoint | None) -> None:
    """A student made from another model maps onto that model's layers and hidden states, not these."""
    made = rec.get("source") or {}
    if source is not None and made and (made.get("sha256"), made.get("size")) != \
            (source.fingerprint["sha256"], source.fingerprint["size"]):
        raise XpertError(f"{path}: made from {made.get('path')}, not from {source.path}; measure it against the "
                         "model it was grafted from")


def _has_provenance(f: Path) -> bool:
    from ..io.files import read_header
    return provenance.KEY in read_header(f).metadata


@dataclass
class Agreement:
    """Running sums for one (prediction, reference) pair over tokens."""
    yy: float = 0.0
    pp: float = 0.0
    py: float = 0.0
    dd: float = 0.0
    tokens: int = 0

    def add(self, p: torch.Tensor, y: torch.Tensor) -> None:
        p, y = p.double(), y.double()
        self.yy += float((y * y).sum())
        self.pp += float((p * p).sum())
        self.py += float((p * y).sum())
        self.dd += float(((p - y) ** 2).sum())
        self.tokens += y.shape[0]

    def result(self) -> dict:
        ny, np_ = self.yy ** 0.5, self.pp ** 0.5
        cos = self.py / (ny * np_) if ny > 0 and np_ > 0 else 0.0
        return {"rel_error": (self.dd ** 0.5) / ny if ny > 0 else float("nan"), "cosine": cos,
                "scale": self.py / self.pp if self.pp > 0 else 0.0,
                "rel_error_at_scale": max(0.0, 1 - cos * cos) ** 0.5 if ny > 0 else float("nan"),
                "norm_ratio": np_ / ny if ny > 0 else float("nan")}


@dataclass
class LayerMeter:
    """Everything measured for one target layer of one student."""
    student: Agreement = field(default_factory=Agreement)
    selected: Agreement | None = None
    scratch: Agreement = field(default_factory=Agreement)
    random_neurons: Agreement | None = None  # dense sources: as many random neurons of the source layer


def scratch_ffn(shape_gate: torch.Size, d: int, std: float, seed: int) -> tuple[torch.Tensor, ...]:
    """A fresh FFN as transformers initializes a Llama MLP: N(0, initializer_range) weights."""
    g = torch.Generator().manual_seed(seed)
    f = shape_gate[0]
    return (torch.randn(f, d, generator=g) * std, torch.randn(f, d, generator=g) * std,
            torch.randn(d, f, generator=g) * std)


def selected_mixture(io: capture.BlockIO, experts: dict[int, tuple[torch.Tensor, ...]],
                     shared: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor | None:
    """The block's output with only the selected experts kept: their routing weights as given, plus the
    shared experts every token uses (shared = (gate, up, down, sigmoid gate weight or None))."""
    if io.index is None:
        return None
    out = torch.zeros_like(io.y)
    for j, (g, u, d) in experts.items():
        w = (io.weight * (io.index == j)).sum(-1)
        rows = w.nonzero().squeeze(-1)
        if rows.numel():
            out[rows] += w[rows, None] * ffn(io.x[rows], g, u, d)
    if shared is not None:
        g, u, d, gate = shared
        s = ffn(io.x, g, u, d)
        out += s if gate is None else torch.sigmoid(io.x @ gate.T) * s
    return out


def shared_block(ck: Checkpoint, i: int) -> tuple[torch.Tensor, ...] | None:
    """(gate, up, down, sigmoid gate weight [1, H] or None) of layer i's shared experts, or None."""
    if ck.family.shared is None:
        return None
    from ..io import arch
    key = arch.shared_gate_key(ck.family)
    return (*(m.float() for m in ck.shared(i)), ck.finite_tensor(key.format(i=i)).float() if key else None)


class Meter:
    """Per-block callback that accumulates every student's agreement with the block."""

    def __init__(self, ck: Checkpoint, students: list[Student], seed: int = 0):
        self.students = students
        self.meters = [[LayerMeter() for _ in s.layer_map] for s in students]
        self.scratch = [[scratch_ffn(f[0].shape, f[0].shape[1], s.init_std, seed + t) for t, f in enumerate(s.ffns)]
                        for s in students]
        self.sel_experts: dict[tuple[int, tuple[int, ...]], dict[int, tuple]] = {}
        self.shared: dict[int, tuple | None] = {}
        self.random: list[list[tuple | None]] = [[None] * len(s.layer_map) for s in students]
        if ck.dense:
            from .neurons import random_neurons
            for s, ms, rs in zip(students, self.meters, self.random):
                for t, group in enumerate(s.layer_map):
                    ms[t].random_neurons = Agreement()
                    rs[t] = random_neurons(ck, group[0], s.ffns[t][0].shape[0], s.residual_index, seed)
        for s, ms in zip(students, self.meters):
            if s.experts is None:
                continue
            for t, group in enumerate(s.layer_map):
                ms[t].selected = Agreement()
                for i in group:
                    key = (i, tuple(s.experts.get(i, [])))
                    if key not in self.sel_experts:
                        ids = list(key[1])
                        self.sel_experts[key] = {j: tuple(m.float() for m in e)
                                                 for j, e in zip(ids, ck.finite_experts(i, ids))}
                    if i not in self.shared:
                        self.shared[i] = shared_block(ck, i)

    def __call__(self, io: capture.BlockIO) -> None:
        mix_cache: dict[tuple, torch.Tensor | None] = {}
        for s, ms, scr, rnd in zip(self.students, self.meters, self.scratch, self.random):
            ri = s.residual_index
            x, y = io.x[:, ri], io.y[:, ri]
            for t, group in enumerate(s.layer_map):
                if io.layer not in group:
                    continue
                ms[t].student.add(ffn(x, *s.ffns[t]), y)
                ms[t].scratch.add(ffn(x, *scr[t]), y)
                if rnd[t] is not None:
                    ms[t].random_neurons.add(ffn(x, *rnd[t]), y)
                if ms[t].selected is not None:
                    key = (io.layer, tuple(s.experts.get(io.layer, [])))
                    if key not in mix_cache:
                        mix_cache[key] = selected_mixture(io, self.sel_experts[key], self.shared.get(io.layer))
                    if mix_cache[key] is not None:
                        ms[t].selected.add(mix_cache[key][:, ri], y)

    def results(self) -> list[list[dict]]:
        out = []
        for s, ms in zip(self.students, self.meters):
            rows = []
            for t, (group, m) in enumerate(zip(s.layer_map, ms)):
                row = {"target": t, "sources": group, "tokens": m.student.tokens, **m.student.result(),
                       "references": {"selected_mixture": m.selected.result() if m.selected and m.selected.tokens else None,
                                      "scratch": m.scratch.result(),
                                      "zero": {"rel_error": 1.0, "cosine": 0.0, "scale": 0.0,
                                               "rel_error_at_scale": 1.0, "norm_ratio": 0.0}}}
                if m.random_neurons is not None:
                    row["references"]["random_neurons"] = m.random_neurons.result()
                rows.append(row)
            out.append(rows)
        return out


def layer_notes(rows: list[dict]) -> list[str]:
    """What the per-layer rows and their means stand for when the map is not one source layer per target."""
    notes, seen = [], {}
    for r in rows:
        key = tuple(r["sources"])
        if key in seen:
            seen[key].append(r["target"])
        else:
            seen[key] = [r["target"]]
        if len(key) > 1 and len(seen[key]) == 1:
            notes.append(f"target layer {r['target']} pools source layers {', '.join(map(str, key))} "
                         "(--layer-map merge): its row is measured over the tokens of all of them")
    for key, ts in seen.items():
        if len(ts) > 1:
            notes.append(f"target layers {', '.join(map(str, ts))} repeat source layer(s) {', '.join(map(str, key))} "
                         "(a target deeper than the source): the summary counts them once")
    return notes


def summary(rows: list[dict]) -> dict:
    """Mean of each measure over the distinct source-layer groups (target layers that repeat the same
    source layers count once), for the student and each reference."""
    firsts = {}
    for r in rows:
        firsts.setdefault(tuple(r["sources"]), r)
    rows = list(firsts.values())

    def mean(key, ref=None):
        vals = [(r if ref is None else r["references"][ref] or {}).get(key) for r in rows]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None
    keys = ("rel_error", "cosine", "scale", "rel_error_at_scale", "norm_ratio")
    out = {"student": {k: mean(k) for k in keys}}
    for ref in ("selected_mixture", "scratch"):
        out[ref] = {k: mean(k, ref) for k in keys} if any(r["references"][ref] for r in rows) else None
    if any(r["references"].get("random_neurons") for r in rows):  # dense sources
        out["random_neurons"] = {k: mean(k, "random_neurons") for k in keys}
    return out


def measure(ck: Checkpoint, students: list[Student], domains: list[str], *, tokenizer: Path | None = None,
            max_tokens: int | None = None, seq_len: int | None = None, batch_size: int = 8, device: str = "cpu",
            dtype: str = "float32", stream_layers: bool = False, stream_tokens: int = 65536,
            seed: int = 0, text_field: str = "text") -> tuple[list[list[dict]], dict[str, int]]:
    """Run the source once over the text and measure every student; (rows per student, tokens per domain)."""
    for s in students:
        bad = sorted({i for g in s.layer_map for i in g} - set(ck.ffn_layers))
        if bad:
            raise XpertError(f"{s.label}: maps onto source layers {bad}, which are not "
                             f"{'FFN' if ck.dense else 'MoE'} layers of {ck.path}")
        if int(s.residual_index.max()) >= ck.hidden:
            raise XpertError(f"{s.label}: residual indices beyond the source's hidden size {ck.hidden}")
    runner = capture.prepare(ck, domains, tokenizer=tokenizer, seq_len=seq_len, device=device, dtype=dtype,
                             stream_layers=stream_layers, sample_seed=seed if max_tokens is not None else None,
                             text_field=text_field)
    meter = Meter(ck, students, seed)
    tokens = capture.run(ck, runner.model, runner.tokenizer, runner.docs, meter, seq_len=runner.seq_len,
                         batch_size=batch_size, max_tokens=max_tokens, device=device,
                         stream_tokens=stream_tokens if stream_layers else None, label="fidelity")
    return meter.results(), tokens


def table(rows: list[dict], title: str):
    from rich.table import Table
    t = Table(title=title, title_justify="left", caption="the columns: `xpertctl fidelity --help`",
              caption_justify="left")
    dense = any(r["references"].get("random_neurons") for r in rows)
    for c in ("target", "source", "rel_error", "cosine", "scale", "rand-neuron rel/cos" if dense else "sel-mix rel/cos",
              "scratch rel/cos"):
        t.add_column(c, justify="right")
    for r in rows:
        sm, sc = r["references"]["random_neurons" if dense else "selected_mixture"], r["references"]["scratch"]
        t.add_row(str(r["target"]), ",".join(map(str, r["sources"])), f"{r['rel_error']:.3f}", f"{r['cosine']:+.3f}",
                  f"{r['scale']:.3f}", f"{sm['rel_error']:.3f}/{sm['cosine']:+.3f}" if sm else "-",
                  f"{sc['rel_error']:.3f}/{sc['cosine']:+.3f}")  # no space: an 80-column terminal keeps it whole
    return t


def run(src: Path, student: Path, domains: list[str], out: Path, *, tokenizer: Path | None = None,
        max_tokens: int | None = None, seq_len: int | None = None, batch_size: int = 8, device: str = "cpu",
        dtype: str = "float32", stream_layers: bool = False, stream_tokens: int = 65536, seed: int = 0,
        text_field: str = "text", force: bool = False) -> Path:
    """`xpertctl fidelity`: fidelity.json (per target layer: rel_error, cosine, scale; references)."""
    from .. import data
    from ..io.writer import atomic_path, check_output
    ck = open_checkpoint(src).require_ffn_source()
    paths = data.parse_domains(domains)
    check_output(out, force, [ck.path, Path(student), *paths.values()])
    check_field_applies(paths.values(), text_field)
    st = load_student(student, ck.hidden, ck)
    rows_per, tokens = measure(ck, [st], domains, tokenizer=tokenizer, max_tokens=max_tokens, seq_len=seq_len,
                               batch_size=batch_size, device=device, dtype=dtype, stream_layers=stream_layers,
                               stream_tokens=stream_tokens, seed=seed, text_field=text_field)
    how = data.sampling({n: data.DomainText(p, seed, text_field) for n, p in paths.items()}, max_tokens)
    rows = rows_per[0]
    _refuse_non_finite(rows, student)
    rec = provenance.record("fidelity", inputs=[ck.fingerprint, _fingerprint(Path(student))]
                            + [provenance.fingerprint(p) for p in paths.values()],
                            params={"domains": {n: str(p) for n, p in paths.items()}, "max_tokens": max_tokens,
                                    "seq_len": seq_len, "batch_size": batch_size, "dtype": dtype,
                                    "stream_layers": stream_layers, "text_field": text_field,
                                    "sample": {"seed": seed, "how": how} if max_tokens else None}, seed=seed)
    notes = layer_notes(rows)
    doc = {"kind": "fidelity", "source": str(Path(src).resolve()), "student": str(Path(student).resolve()),
           "tokens": tokens, "layers": rows, "summary": summary(rows), "notes": notes,
           "xpertctl": rec}  # the key every artifact uses
    err.print(table(rows, f"fidelity of {student} against {src}"))
    for n in notes:
        notice(n)
    with atomic_path(Path(out), force) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return Path(out)


def _refuse_non_finite(rows: list[dict], student: Path) -> None:
    """No NaN figure is written as if it were a measurement (the inputs were checked finite; what is left is
    a block whose output is zero on every token, or a student FFN that overflows in float32)."""
    for r in rows:
        for name, m in [("", r), *((f"{k} ", v) for k, v in r["references"].items() if k != "zero" and v)]:
            bad = next((k for k, x in m.items() if isinstance(x, float) and not math.isfinite(x)), None)
            if bad is not None:
                raise XpertError(f"{student}: target layer {r['target']}: {name}{bad} is {m[bad]} (the source block's "
                                 "output is zero there, or the FFN overflows in float32); nothing written")


def _fingerprint(p: Path) -> dict:
    if p.is_dir():
        ck = open_checkpoint(p)
        return ck.fingerprint
    return provenance.file_fingerprint(p)
