"""Corpora: read domain text (.txt / .jsonl / directories), tokenize, pack into fixed windows."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import XpertError

TEXT_SUFFIXES = (".txt", ".jsonl")


def parse_domains(specs: list[str]) -> dict[str, Path]:
    """['legal=corpus/legal.txt', ...] -> {'legal': Path(...)}; names unique, paths exist."""
    if not specs:
        raise XpertError("--domain: give at least one NAME=PATH")
    out: dict[str, Path] = {}
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise XpertError(f"--domain {s!r}: expected NAME=PATH")
        if name in out:
            raise XpertError(f"--domain {s!r}: domain {name!r} given twice")
        if not Path(path).exists():
            raise XpertError(f"{path}: no such file or directory (domain {name!r})")
        out[name] = Path(path)
    return out


def _read_text(p: Path) -> str:
    data = p.read_bytes()
    if b"\x00" in data[:8192]:
        raise XpertError(f"{p}: binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise XpertError(f"{p}: not UTF-8 text (byte {e.start})") from None


def read_documents(path: Path) -> list[str]:
    """Documents of one domain: blank-line separated paragraphs of .txt, the `text` field of .jsonl,
    or every such file under a directory (sorted, so the order is deterministic)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise XpertError(f"{path}: no .txt or .jsonl files in the directory")
    else:
        files = [path]
    docs: list[str] = []
    for f in files:
        if f.suffix == ".txt":
            docs += [d.strip() for d in _read_text(f).split("\n\n") if d.strip()]
        elif f.suffix == ".jsonl":
            for n, line in enumerate(_read_text(f).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise XpertError(f"{f}:{n}: not valid JSON") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise XpertError(f"{f}:{n}: record has no string field 'text'")
                if rec["text"].strip():
                    docs.append(rec["text"].strip())
        else:
            raise XpertError(f"{f}: unknown corpus file type {f.suffix or '(none)'!r} (use .txt or .jsonl)")
    if not docs:
        raise XpertError(f"{path}: empty corpus (no text)")
    return docs


def load_tokenizer(path: Path):
    """A Hugging Face tokenizer from a directory (the checkpoint's own or --tokenizer)."""
    from transformers import AutoTokenizer
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise XpertError(f"{path}: no tokenizer files (tokenizer.json); pass --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types for a broken tokenizer dir
        raise XpertError(f"{path}: cannot load tokenizer ({e.__class__.__name__}: {str(e).splitlines()[0][:120]})") from None


def token_stream(docs: list[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """All documents' token ids, each document followed by EOS, cut at max_tokens."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 0 on padding


def windows(stream: torch.Tensor, seq_len: int, batch_size: int, pad_id: int) -> list[Batch]:
    """Pack a token stream into [batch, seq_len] windows; only the last window is right-padded."""
    chunks = list(torch.split(stream, seq_len))
    batches = []
    for b in range(0, len(chunks), batch_size):
        group = chunks[b: b + batch_size]
        ids = torch.full((len(group), seq_len), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), seq_len), dtype=torch.long)
        for r, c in enumerate(group):
            ids[r, : len(c)] = c
            mask[r, : len(c)] = 1
        batches.append(Batch(ids, mask))
    return batches
