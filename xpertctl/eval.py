"""Evaluators: perplexity per domain, multiple choice by log-likelihood (lm-evaluation-harness's acc and
acc_norm), generation scored with Rouge-L (the rouge-score package)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from . import data
from .console import progress
from .errors import XpertError
from .io import provenance


def parse_task(spec: str) -> tuple[str, str]:
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in ("ppl", "mc", "gen") or not arg:
        raise XpertError(f"--task {spec!r}: expected ppl:PATH, mc:FILE.jsonl or gen:FILE.jsonl")
    return kind, arg


@torch.no_grad()
def nll_windows(model, ids: torch.Tensor, seq_len: int, batch_size: int = 8, device: str = "cpu") -> tuple[float, int]:
    """Sum of next-token NLL and the number of predicted tokens over non-overlapping windows."""
    total, count = 0.0, 0
    chunks = [c for c in torch.split(ids, seq_len) if c.numel() > 1]
    for b in range(0, len(chunks), batch_size):
        group = chunks[b: b + batch_size]
        T = max(c.numel() for c in group)
        x = torch.zeros(len(group), T, dtype=torch.long)
        m = torch.zeros(len(group), T, dtype=torch.long)
        for r, c in enumerate(group):
            x[r, : c.numel()], m[r, : c.numel()] = c, 1
        logits = model(input_ids=x.to(device), attention_mask=m.to(device)).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None].to(device))[..., 0]
        keep = m[:, 1:].bool().to(device)
        total += float(-(lp * keep).sum())
        count += int(keep.sum())
    return total, count


def perplexity(model, tok, arg: str, seq_len: int, device: str, split: str = "val",
               max_tokens: int | None = None) -> dict:
    """ppl:PATH — a text/jsonl file or directory (one domain), or a token DATA dir (every domain, one split)."""
    p = Path(arg)
    if not p.exists():
        raise XpertError(f"--task ppl:{arg}: no such file or directory")
    if (p / data.MANIFEST).is_file():
        td = data.load_token_data(p)
        if split not in data.SPLITS:
            raise XpertError(f"--split {split!r}: choose one of {', '.join(data.SPLITS)}")
        streams = {d: torch.from_numpy(td.array(d, split).astype(np.int64)) for d in td.domains}
    else:
        streams = {p.stem: data.token_stream(data.read_documents(p), tok)}
    out = {}
    for name, ids in streams.items():
        ids = ids[:max_tokens] if max_tokens else ids
        if ids.numel() < 2:
            raise XpertError(f"--task ppl:{arg}: domain {name!r} has fewer than 2 tokens")
        nll, n = nll_windows(model, ids, seq_len, device=device)
        out[name] = {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n}
    return out


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], int]:
    """(token ids, number of continuation tokens), with lm-evaluation-harness's encoding: trailing
    spaces of the context move to the continuation, whose tokens are the whole string's tail."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation, context = context[-n_space:] + continuation, context[:-n_space]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    n_cont = len(whole) - len(ctx)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return ([bos] if not ctx and bos is not None else []) + whole, n_cont


@torch.no_grad()
def loglikelihoods(model, tok, context: str, continuations: list[str], device: str) -> list[float]:
    """log P(continuation | context) for each continuation, in one right-padded batch."""
    pairs = [encode_pair(tok, context, c) for c in continuations]
    T = max(len(ids) for ids, _ in pairs)
    x = torch.zeros(len(pairs), T, dtype=torch.long)
    m = torch.zeros(len(pairs), T, dtype=torch.long)
    for r, (ids, _) in enumerate(pairs):
        x[r, : len(ids)], m[r, : len(ids)] = torch.tensor(ids), 1
    lp = torch.log_softmax(model(input_ids=x.to(device), attention_mask=m.to(device)).logits.float()[:, :-1], -1)
    out = []
    for r, (ids, n) in enumerate(pairs):
        if n <= 0:
            out.append(0.0)
            continue
        pos = torch.arange(len(ids) - 1 - n, len(ids) - 1)
        out.append(float(lp[r, pos].gather(-1, x[r, pos + 1, None].to(device)).sum()))
    return out


def multiple_choice(model, tok, path: str, device: str) -> dict:
    recs = data.read_jsonl(Path(path), {"context": str, "choices": list, "label": int})
    acc = acc_norm = 0
    for n, r in enumerate(recs, 1):
        if not r["choices"] or not all(isinstance(c, str) for c in r["choices"]):
            raise XpertError(f"{path}:{n}: 'choices' must be a non-empty list of strings")
        if not 0 <= r["label"] < len(r["choices"]):
            raise XpertError(f"{path}:{n}: label {r['label']} out of range for {len(r['choices'])} choices")
    for r in recs:
        lls = np.array(loglikelihoods(model, tok, r["context"], r["choices"], device))
        lens = np.array([float(len(c)) for c in r["choices"]])  # characters, as the harness does
        acc += int(np.argmax(lls) == r["label"])
        acc_norm += int(np.argmax(lls / lens) == r["label"])
    return {"acc": acc / len(recs), "acc_norm": acc_norm / len(recs), "n": len(recs)}


@torch.no_grad()
def generation(model, tok, path: str, device: str, max_new_tokens: int) -> dict:
    from rouge_score import rouge_scorer
    recs = data.read_jsonl(Path(path), {"instruction": str, "response": str})
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = []
    for r in recs:
        ids = tok(data.prompt_of(r), add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        scores.append(scorer.score(r["response"], text)["rougeL"].fmeasure)
    return {"rougeL": 100 * float(np.mean(scores)), "n": len(recs)}


def run(ckpt: Path, tasks: list[str], out: Path | None, *, seq_len: int | None = None, device: str = "cpu",
        max_new_tokens: int = 64, seed: int = 0, split: str = "val", max_tokens: int | None = None,
        force: bool = False) -> tuple[dict, Path | None]:
    """`xpertctl eval`: results JSON (model and task fingerprints, seed)."""
    from .io.writer import atomic_path, check_output
    from .train import load_causal_lm
    parsed = [parse_task(t) for t in tasks]
    if not parsed:
        raise XpertError("give at least one --task")
    if out is not None:
        check_output(out, force, [Path(ckpt)])
    torch.manual_seed(seed)
    model = load_causal_lm(ckpt).to(device).eval()
    tok = data.load_tokenizer(ckpt)
    seq_len = seq_len or min(1024, int(model.config.max_position_embeddings))
    results = {}
    with progress() as bar:
        job = bar.add_task("eval", total=len(parsed), info="")
        for kind, arg in parsed:
            bar.update(job, info=f"{kind}:{Path(arg).name}")
            if kind == "ppl":
                res = perplexity(model, tok, arg, seq_len, device, split, max_tokens)
            elif kind == "mc":
                res = multiple_choice(model, tok, arg, device)
            else:
                res = generation(model, tok, arg, device, max_new_tokens)
            res["fingerprint"] = _task_fp(arg)
            results[f"{kind}:{arg}"] = res
            bar.advance(job)
    doc = {"model": {"path": str(Path(ckpt).resolve()), "sha256": _model_fp(Path(ckpt))}, "seed": seed,
           "seq_len": seq_len, "tasks": results,
           "xpertctl": provenance.record("eval", inputs=[], params={"tasks": tasks, "seq_len": seq_len, "split": split, "max_tokens": max_tokens}, seed=seed)}
    if out is None:
        return doc, None
    with atomic_path(Path(out), force) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return doc, Path(out)


def _task_fp(path: str) -> str | None:
    return provenance.fingerprint(Path(path))["sha256"] if Path(path).exists() else None


def _model_fp(ckpt: Path) -> str:
    return provenance.fingerprint(Path(ckpt), sorted(Path(ckpt).glob("*.safetensors")))["sha256"]
