"""Evaluators: perplexity per domain, multiple choice by log-likelihood (lm-evaluation-harness's acc and
acc_norm), generation scored with Rouge-L (the rouge-score package), and lm-evaluation-harness itself.

Conventions follow lm-evaluation-harness 0.4.13 (HFLM, causal): a choice is scored as the continuation
`target_delimiter + choice` of the context; text is encoded with the tokenizer's default special tokens;
an empty context is replaced by the prefix token (BOS, else EOS); too long inputs lose tokens on the left;
word perplexity and bits per byte come from per-document rolling windows that predict every token."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from . import data, losses
from .console import progress
from .errors import XpertError
from .io import provenance


def parse_task(spec: str) -> tuple[str, str]:
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in ("ppl", "mc", "gen", "lmeval") or not arg:
        raise XpertError(f"--task {spec!r}: expected ppl:PATH, mc:FILE.jsonl, gen:FILE.jsonl or lmeval:TASKS")
    return kind, arg


@torch.no_grad()
def nll_windows(model, ids, seq_len: int, batch_size: int = 8, device: str = "cpu") -> tuple[float, int]:
    """Sum of next-token NLL and the number of predicted tokens over non-overlapping windows of `ids`
    (a tensor or a token memmap, read one batch of windows at a time); log-probabilities chunk by chunk
    from the final hidden states (losses.py)."""
    total, count = 0.0, 0
    starts = [a for a in range(0, len(ids), seq_len) if min(len(ids), a + seq_len) - a > 1]
    for b in range(0, len(starts), batch_size):
        group = [torch.as_tensor(np.asarray(ids[a: a + seq_len], dtype=np.int64)) for a in starts[b: b + batch_size]]
        T = max(c.numel() for c in group)
        x = torch.zeros(len(group), T, dtype=torch.long)
        m = torch.zeros(len(group), T, dtype=torch.long)
        for r, c in enumerate(group):
            x[r, : c.numel()], m[r, : c.numel()] = c, 1
        targets = torch.where(m[:, 1:].bool(), x[:, 1:], -100)  # position i predicts token i + 1
        targets = torch.cat([targets, torch.full((len(group), 1), -100)], 1)
        lp, _ = losses.target_logprobs(model, x.to(device), m.to(device), targets.to(device))
        total += float(-lp.sum())
        count += int((targets != -100).sum())
    return total, count


def check_ppl_path(arg: str) -> Path:
    """ppl:PATH exists and is not the manifest of token data (whose directory is what to pass)."""
    p = Path(arg)
    if not p.exists():
        raise XpertError(f"--task ppl:{arg}: no such file or directory")
    if p.is_file() and p.name == data.MANIFEST:
        raise XpertError(f"--task ppl:{arg}: is the manifest of token data; pass its directory: ppl:{p.parent}")
    return p


def _is_text(p: Path) -> bool:
    """ppl:PATH is text read by documents (not token data, not a `corpus build` dir)."""
    return not (p / data.MANIFEST).is_file() and not (p.is_dir() and all((p / s).is_dir() for s in data.SPLITS))


def perplexity(model, tok, arg: str, seq_len: int, device: str, split: str | None = None,
               max_tokens: int | None = None, ckpt: Path | None = None, text_field: str = "text") -> dict:
    """ppl:PATH — a token DATA dir (every domain, one --split), a corpus dir from `corpus build`
    (train/val/test: every domain file of one --split), or a text file / directory (one domain, all of it;
    `text_field`: the field / column of its .jsonl, .parquet and .arrow records).

    `ppl`/`nll` are token-level: the EOS-joined stream cut into non-overlapping `seq_len` windows, no
    context carried between windows (the first token of each window is not predicted). The
    tokenizer-independent figures of the harness (`word_perplexity`, `bits_per_byte`) score the same
    text per document with rolling windows, so students with different tokenizers can be compared.
    Token data is read in place, a batch of windows / a document at a time."""
    p = check_ppl_path(arg)
    if split is not None and split not in data.SPLITS:
        raise XpertError(f"--split {split!r}: choose one of {', '.join(data.SPLITS)}")
    if (p / data.MANIFEST).is_file():
        td = data.load_token_data(p)
        if ckpt is not None:  # ids past the model's vocabulary would be an IndexError deep in torch
            data.check_tokenizer(td, ckpt, int(model.config.vocab_size))
        split = split or "val"
        for d in td.domains:
            if td.manifest["domains"][d][split]["tokens"] == 0:
                raise XpertError(f"{p}: split {split!r} of domain {d!r} is empty (tokenize put no document "
                                 f"there; re-tokenize with a larger --{split}-pct or more text, or pick another --split)")
        sources = {d: (td.array(d, split), _decoded_documents(td, d, split, tok, max_tokens)) for d in td.domains}
    elif p.is_dir() and all((p / s).is_dir() for s in data.SPLITS):
        files = data.corpus_domains(p)  # a `corpus build` dir: its own split, one domain per file
        split = split or "val"
        sources = {}
        for d, parts in files.items():
            docs = data.read_documents(parts[split])
            ids = data.token_stream(docs, tok)
            sources[d] = (ids, _documents_within(ids, tok, docs, max_tokens))
    else:
        if split is not None:
            raise XpertError(f"--split {split}: ppl:{arg} is plain text without splits (scored whole); --split is for "
                             "a token DATA dir or a corpus dir with train/val/test")
        docs = data.read_documents(p, text_field)
        ids = data.token_stream(docs, tok)
        sources = {p.stem: (ids, _documents_within(ids, tok, docs, max_tokens))}
    out = {}
    for name, (ids, texts) in sources.items():
        ids = ids[:max_tokens] if max_tokens else ids
        if len(ids) < 2:
            raise XpertError(f"--task ppl:{arg}: domain {name!r} has fewer than 2 tokens")
        nll, n = nll_windows(model, ids, seq_len, device=device)
        counted = _Counted(texts)
        ll = rolling_loglikelihood(model, tok, counted, seq_len, device)
        out[name] = {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n,
                     "word_perplexity": math.exp(-ll / counted.words), "bits_per_byte": -ll / counted.bytes / math.log(2),
                     "words": counted.words, "bytes": counted.bytes}
    return out


class _Counted:
    """Texts passed through once, counting the harness's words and the UTF-8 bytes on the way."""

    def __init__(self, texts):
        self.texts, self.words, self.bytes = texts, 0, 0

    def __iter__(self):
        for t in self.texts:
            self.words += len(re.split(r"\s+", t))
            self.bytes += len(t.encode("utf-8"))
            yield t


def _decoded_documents(td, domain: str, split: str, tok, max_tokens: int | None):
    """The documents of a token split that begin within its first `max_tokens`, decoded one at a time
    (token data keeps no text); their ends come from the document index, or from the EOS tokens of
    data made before the index."""
    arr = td.array(domain, split)
    ends = td.document_ends(domain, split)
    if ends is None:
        ends = _eos_ends(arr, tok.eos_token_id)
    start = 0
    for end in ends:
        end = int(end)
        if max_tokens is not None and start >= max_tokens:
            break
        piece = np.asarray(arr[start: end], dtype=np.int64)
        if tok.eos_token_id is not None and len(piece) and piece[-1] == tok.eos_token_id:
            piece = piece[:-1]
        text = tok.decode(piece.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.strip():
            yield text
        start = end


def _eos_ends(arr, eos: int | None, chunk: int = 1 << 24) -> np.ndarray:
    """Token offsets just past each EOS (and the end, if the last document has none)."""
    ends = [np.flatnonzero(np.asarray(arr[a: a + chunk]) == eos) + a + 1 for a in range(0, len(arr), chunk)] \
        if eos is not None else []
    ends = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
    return ends if len(ends) and ends[-1] == len(arr) else np.append(ends, len(arr))


def _documents_within(ids: torch.Tensor, tok, docs: list[str] | None, max_tokens: int | None) -> list[str]:
    """The whole documents that begin within the first `max_tokens` of an EOS-joined stream: their
    text when known, else their tokens decoded (token data keeps no text)."""
    eos = tok.eos_token_id
    pieces, cur = [], []
    for t in ids.tolist():
        if t == eos:
            pieces.append(cur); cur = []
        else:
            cur.append(t)
    if cur:
        pieces.append(cur)
    keep, start = 0, 0
    for piece in pieces:
        if max_tokens is not None and start >= max_tokens:
            break
        keep, start = keep + 1, start + len(piece) + 1
    if docs is not None and len(docs) == len(pieces):
        texts = docs[:keep]
    else:
        texts = [tok.decode(p, skip_special_tokens=True, clean_up_tokenization_spaces=False) for p in pieces[:keep]]
    return [t for t in texts if t.strip()]


def prefix_token_id(tok) -> int | None:
    """The harness's stand-in for an empty context: BOS, else EOS."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def encode(tok, text: str) -> list[int]:
    """Token ids with the tokenizer's default special tokens (as the harness's tok_encode), except that
    a text already starting with BOS does not get a second one."""
    if tok.bos_token and text.startswith(tok.bos_token):
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(text)["input_ids"]


def rolling_loglikelihood(model, tok, texts, max_len: int, device: str, batch_size: int = 8) -> float:
    """Sum over documents of log P(document), every token predicted (the harness's
    loglikelihood_rolling): the first window starts with the prefix token, each later window predicts
    the next `max_len` tokens given the `max_len` tokens before them."""
    total = 0.0
    for group in _batched(_rolling_windows(tok, texts, max_len), batch_size):
        total += sum(ll for ll, _ in losses.continuation_scores(model, group, device))
    return total


def _rolling_windows(tok, texts, max_len: int):
    """(input ids, number of predicted tokens at its end) of each document's rolling windows, lazily."""
    prefix = prefix_token_id(tok)
    for t in texts:
        toks = encode(tok, t)
        full = [prefix] + toks
        done = 0
        while done < len(toks):
            end = min(len(toks), done + max_len)
            yield full[max(0, end - max_len): end + 1], end - done
            done = end


def _batched(it, n: int):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness encodes them: trailing spaces of the context move
    to the continuation, whose ids are the tail of the whole string's encoding; an empty context is
    the prefix token."""
    if context == "":
        cont = tok(continuation, add_special_tokens=False)["input_ids"]
        prefix = prefix_token_id(tok)
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation, context = context[-n_space:] + continuation, context[:-n_space]
    whole = encode(tok, context + continuation)
    ctx = encode(tok, context)
    return ctx, whole[len(ctx):]


def loglikelihoods(model, tok, context: str, continuations: list[str], device: str,
                   max_length: int | None = None) -> list[float]:
    """log P(continuation | context) for each continuation, in one right-padded batch; inputs longer
    than `max_length` lose tokens on the left (the harness's truncation)."""
    seqs = []
    for c in continuations:
        ctx, cont = encode_pair(tok, context, c)
        ids = ctx + cont
        if max_length is not None:
            ids = ids[-(max_length + 1):]
        seqs.append((ids, min(len(cont), len(ids) - 1)))
    return [ll for ll, _ in losses.continuation_scores(model, seqs, device)]


def choice_loglikelihoods(model, tok, context: str, choices: list[str], device: str, delimiter: str = " ",
                          max_length: int | None = None) -> list[float]:
    """log P(delimiter + choice | context) per choice: the harness's multiple-choice requests."""
    return loglikelihoods(model, tok, context, [delimiter + c for c in choices], device, max_length)


def mc_records(path: str) -> list[dict]:
    """The records of an mc: file, each checked (context, a non-empty list of choices, a label among them)."""
    recs = data.read_jsonl(Path(path), {"context": str, "choices": list, "label": int})
    for n, r in enumerate(recs, 1):
        if not r["choices"] or not all(isinstance(c, str) and c for c in r["choices"]):
            raise XpertError(f"{path}:{n}: 'choices' must be a non-empty list of non-empty strings")
        if not 0 <= r["label"] < len(r["choices"]):
            raise XpertError(f"{path}:{n}: label {r['label']} out of range for {len(r['choices'])} choices")
    return recs


def gen_records(path: str) -> list[dict]:
    return data.read_jsonl(Path(path), {"instruction": str, "response": str})


def check_tasks(parsed: list[tuple[str, str]], ckpt: Path, split: str | None) -> None:
    """Every task read and checked before any model work, so that a bad record or path is found in
    seconds, not after the tasks before it ran: mc/gen records, ppl paths with --split (and token data's
    splits and tokenizer), lmeval task files."""
    for kind, arg in parsed:
        if kind == "mc":
            mc_records(arg)
        elif kind == "gen":
            gen_records(arg)
        elif kind == "lmeval":
            from . import lmeval
            lmeval.parse(arg)
        else:
            _check_ppl_task(arg, ckpt, split)


def _check_ppl_task(arg: str, ckpt: Path, split: str | None) -> None:
    """What perplexity() would refuse about ppl:PATH and --split, without a model."""
    p = check_ppl_path(arg)
    if split is not None and split not in data.SPLITS:
        raise XpertError(f"--split {split!r}: choose one of {', '.join(data.SPLITS)}")
    if (p / data.MANIFEST).is_file():
        td = data.load_token_data(p)
        cfg = Path(ckpt) / "config.json"
        vocab = json.loads(cfg.read_text()).get("vocab_size") if cfg.is_file() else None
        if isinstance(vocab, int):
            data.check_tokenizer(td, Path(ckpt), vocab)
        for d in td.domains:
            if td.manifest["domains"][d][split or "val"]["tokens"] == 0:
                raise XpertError(f"{p}: split {split or 'val'!r} of domain {d!r} is empty (tokenize put no document "
                                 f"there; re-tokenize with a larger --{split or 'val'}-pct or more text, or pick another --split)")
    elif _is_text(p) and split is not None:
        raise XpertError(f"--split {split}: ppl:{arg} is plain text without splits (scored whole); --split is for "
                         "a token DATA dir or a corpus dir with train/val/test")


def multiple_choice(model, tok, path: str, device: str, delimiter: str = " ", max_length: int | None = None) -> dict:
    """acc = argmax of the log-likelihoods; acc_norm = argmax of log-likelihood / len(choice) in
    characters, the delimiter not counted (the harness's definitions)."""
    recs = mc_records(path)
    acc = acc_norm = 0
    for r in recs:
        lls = np.array(choice_loglikelihoods(model, tok, r["context"], r["choices"], device, delimiter, max_length))
        lens = np.array([float(len(c)) for c in r["choices"]])
        acc += int(np.argmax(lls) == r["label"])
        acc_norm += int(np.argmax(lls / lens) == r["label"])
    return {"acc": acc / len(recs), "acc_norm": acc_norm / len(recs), "n": len(recs), "target_delimiter": delimiter}


@torch.no_grad()
def generation(model, tok, path: str, device: str, max_new_tokens: int) -> dict:
    from rouge_score import rouge_scorer
    recs = gen_records(path)
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
        max_new_tokens: int = 64, seed: int = 0, split: str | None = None, max_tokens: int | None = None,
        target_delimiter: str = " ", batch_size: int = 8, text_field: str = "text",
        force: bool = False) -> tuple[dict, Path | None]:
    """`xpertctl eval`: results JSON (model and task fingerprints, seed)."""
    from .io.writer import atomic_path, check_output
    from .specs import check_device
    from .train import load_causal_lm
    parsed = [parse_task(t) for t in tasks]
    if not parsed:
        raise XpertError("give at least one --task")
    check_device(device)
    for kind, arg in parsed:  # mc:/gen: files checked before the output rule and before the model loads
        if kind in ("mc", "gen") and not Path(arg).is_file():
            raise XpertError(f"{arg}: {'is a directory, expected a .jsonl file' if Path(arg).is_dir() else 'no such file'}")
    if out is not None:  # the task files are inputs too: never written onto or into
        check_output(out, force, [Path(ckpt), *(Path(a) for k, a in parsed if k != "lmeval"),
                                  *(Path(t) for k, a in parsed if k == "lmeval" for t in a.split(",") if Path(t).exists())])
    ppl = [check_ppl_path(arg) for kind, arg in parsed if kind == "ppl"]  # before the model loads
    if text_field != "text" and not any(_is_text(p) for p in ppl):
        raise XpertError(f"--text-field {text_field}: names the field of ppl:PATH text (.jsonl, .parquet, .arrow); "
                         "no --task reads such text (token data and `corpus build` dirs have none)")
    if any(k == "lmeval" for k, _ in parsed):
        from . import lmeval
        lmeval.require()  # before loading anything: the extra may be missing
    from .io.checkpoint import resolve_source
    ckpt = resolve_source(ckpt)
    check_tasks(parsed, Path(ckpt), split)  # before the model loads
    torch.manual_seed(seed)
    model = load_causal_lm(ckpt).to(device).eval()
    tok = data.load_tokenizer(ckpt)
    max_pos = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
    if seq_len is not None and (seq_len < 2 or (max_pos and seq_len > max_pos)):
        raise XpertError(f"--seq-len {seq_len}: must be 2..{max_pos} (the model's max_position_embeddings)")
    seq_len = seq_len or min(1024, max_pos or 1024)
    results = {}
    with progress() as bar:
        job = bar.add_task("eval", total=len(parsed), info="")
        for kind, arg in parsed:
            bar.update(job, info=f"{kind}:{Path(arg).name}")
            if kind == "ppl":
                res = perplexity(model, tok, arg, seq_len, device, split, max_tokens, ckpt=Path(ckpt),
                                 text_field=text_field)
            elif kind == "mc":
                res = multiple_choice(model, tok, arg, device, target_delimiter, max_pos)
            elif kind == "lmeval":
                from . import lmeval
                res = lmeval.evaluate(model, tok, arg, device=device, batch_size=batch_size, seed=seed,
                                      max_length=max_pos)
            else:
                res = generation(model, tok, arg, device, max_new_tokens)
            res["fingerprint"] = _task_fp(arg) if kind != "lmeval" else res.pop("fingerprint", None)
            results[f"{kind}:{arg}"] = res
            bar.advance(job)
    doc = {"model": {"path": str(Path(ckpt).resolve()), "sha256": _model_fp(Path(ckpt))}, "seed": seed,
           "seq_len": seq_len, "tasks": results,
           "xpertctl": provenance.record("eval", inputs=[], params={"tasks": tasks, "seq_len": seq_len, "split": split, "max_tokens": max_tokens,
                                            "target_delimiter": target_delimiter, "text_field": text_field},
                                            seed=seed)}
    if out is None:
        return doc, None
    with atomic_path(Path(out), force) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return doc, Path(out)


def _task_fp(path: str) -> str | None:
    return provenance.fingerprint(Path(path))["sha256"] if Path(path).exists() else None


def _model_fp(ckpt: Path) -> str:
    return provenance.weights_fingerprint(ckpt)["sha256"]
