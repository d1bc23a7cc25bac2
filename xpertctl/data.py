"""Corpora: read domain text (.txt / .jsonl / directories), tokenize, pack into fixed windows."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import XpertError
from .specs import SPLITS

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
            docs += [r["text"].strip() for r in read_jsonl(f, {"text": str}, allow_empty=True) if r["text"].strip()]
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


def sample_documents(docs: list[str], seed: int) -> list[str]:
    """The domain's documents in a seeded random order, so that --max-tokens takes documents from the
    whole domain (every file of a directory), not its first ones."""
    import numpy as np
    order = np.random.default_rng(seed).permutation(len(docs))
    return [docs[i] for i in order]


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


# ---- token data: memmaps per domain and split ------------------------------------------------------

MANIFEST = "manifest.json"


def split_of(doc: str, val_pct: int = 5, test_pct: int = 5) -> str:
    """Deterministic split of one document, by a hash of its text: stable when the corpus grows."""
    import hashlib
    p = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "little") % 100
    return "test" if p < test_pct else "val" if p < test_pct + val_pct else "train"


def tokenizer_fingerprint(tok_dir: Path) -> str:
    import hashlib
    tok_dir = Path(tok_dir)
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        if (tok_dir / name).is_file():
            h.update((tok_dir / name).read_bytes())
    return h.hexdigest()


def corpus_domains(corpus: Path) -> dict[str, dict[str, Path]]:
    """A pre-split corpus (`xpertctl corpus build`): {domain: {split: file}}."""
    corpus = Path(corpus)
    files = {f.stem: {s: corpus / s / f.name for s in SPLITS} for f in sorted((corpus / "train").glob("*.txt"))}
    if not files:
        raise XpertError(f"{corpus}: no train/*.txt (not a corpus from `xpertctl corpus build`)")
    for d, parts in files.items():
        for s, p in parts.items():
            if not p.is_file():
                raise XpertError(f"{p}: missing (domain {d!r}, split {s!r})")
    return files


def tokenize(tokenizer_dir: Path, domains: list[str], out: Path, *, val_pct: int = 5, test_pct: int = 5,
             corpus: Path | None = None, force: bool = False) -> Path:
    """`xpertctl tokenize`: DATA/{domain}.{split}.bin token memmaps + manifest.json.

    With `corpus`, its own train/val/test files are kept as they are; otherwise each domain's
    documents are split by a hash of their text."""
    import numpy as np
    from .io.writer import atomic_path, check_output
    from .io import provenance
    presplit = corpus_domains(corpus) if corpus is not None else None
    if presplit is not None and domains:
        raise XpertError("give --corpus or --domain, not both")
    paths = {d: Path(corpus) for d in presplit} if presplit is not None else parse_domains(domains)
    check_output(out, force, list(paths.values()) + [Path(tokenizer_dir)], marker="manifest.json")
    if not (0 <= val_pct and 0 <= test_pct and val_pct + test_pct < 100):
        raise XpertError(f"--val-pct/--test-pct: {val_pct}+{test_pct} must leave documents for training")
    tok = load_tokenizer(tokenizer_dir)
    vocab = len(tok)
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    manifest = {"tokenizer": {"path": str(Path(tokenizer_dir).resolve()), "sha256": tokenizer_fingerprint(tokenizer_dir),
                              "vocab_size": vocab, "eos_id": tok.eos_token_id},
                "dtype": np.dtype(dtype).name, "split": {"val_pct": val_pct, "test_pct": test_pct}, "domains": {}}
    with atomic_path(Path(out), force, marker="manifest.json") as tmp:
        tmp.mkdir()
        for name, p in paths.items():
            if presplit is not None:
                parts = {s: read_documents(f) if f.stat().st_size else [] for s, f in presplit[name].items()}
            else:
                docs = read_documents(p)
                parts = {s: [d for d in docs if split_of(d, val_pct, test_pct) == s] for s in SPLITS}
            entry = {"source": str(p), "corpus": provenance.fingerprint(p)["sha256"]}
            for s, ds in parts.items():
                ids = token_stream(ds, tok) if ds else None
                arr = ids.numpy().astype(dtype) if ids is not None else np.zeros(0, dtype)
                arr.tofile(tmp / f"{name}.{s}.bin")
                entry[s] = {"file": f"{name}.{s}.bin", "tokens": int(arr.size), "documents": len(ds)}
            if entry["train"]["tokens"] == 0:
                raise XpertError(f"{p}: no training tokens after the split (domain {name!r})")
            wanted = {"val": presplit is not None or val_pct > 0, "test": presplit is not None or test_pct > 0}
            empty = [s for s in ("val", "test") if wanted[s] and entry[s]["tokens"] == 0]
            if empty:  # train's validation and eval --split would find nothing: say so now
                from .console import notice
                notice(f"{p}: domain {name!r}: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} "
                       f"empty ({'no document there' if presplit is not None else 'no document hashed there'}; "
                       "use more text or larger --val-pct/--test-pct)")
            manifest["domains"][name] = entry
        manifest["xpertctl"] = provenance.record("data", inputs=[], params={
            "domains": {n: str(p) for n, p in paths.items()}, "corpus": str(corpus) if corpus else None,
            "val_pct": None if corpus else val_pct, "test_pct": None if corpus else test_pct})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out)


@dataclass
class TokenData:
    root: Path
    manifest: dict

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["domains"])

    def array(self, domain: str, split: str):
        import numpy as np
        e = self.manifest["domains"][domain][split]
        if e["tokens"] == 0:
            return np.zeros(0, dtype=self.manifest["dtype"])
        return np.memmap(self.root / e["file"], dtype=self.manifest["dtype"], mode="r", shape=(e["tokens"],))

    def stream(self, split: str):
        """All domains' tokens of one split, concatenated in manifest order (a view per domain)."""
        import numpy as np
        parts = [self.array(d, split) for d in self.domains]
        return np.concatenate(parts) if parts else np.zeros(0)


def load_token_data(root: Path) -> TokenData:
    root = Path(root)
    m = root / MANIFEST
    if root.is_file():  # e.g. DATA/manifest.json: the data is the directory around it
        raise XpertError(f"{root}: is a file, expected a token data directory (from `xpertctl tokenize`)"
                         + (f"; pass {root.parent}" if root.name == MANIFEST else ""))
    if not m.is_file():
        raise XpertError(f"{root}: no {MANIFEST} (make it with `xpertctl tokenize`)")
    try:
        manifest = json.loads(m.read_text())
        for d, e in manifest["domains"].items():
            for s in SPLITS:
                f = root / e[s]["file"]
                want = e[s]["tokens"] * (2 if manifest["dtype"] == "uint16" else 4)
                if not f.is_file() or f.stat().st_size != want:
                    raise XpertError(f"{f}: missing or truncated (expected {want} bytes)")
    except (KeyError, TypeError, json.JSONDecodeError):
        raise XpertError(f"{m}: not a valid token-data manifest") from None
    return TokenData(root, manifest)


def check_tokenizer(data: TokenData, model_dir: Path, vocab_size: int) -> None:
    """Refuse token data made by another tokenizer than the model's."""
    t = data.manifest["tokenizer"]
    if t["vocab_size"] > vocab_size:
        raise XpertError(f"{data.root}: tokenized with a {t['vocab_size']}-token vocabulary; the model has {vocab_size}")
    fp = tokenizer_fingerprint(model_dir)
    if (Path(model_dir) / "tokenizer.json").is_file() and fp != t["sha256"]:
        raise XpertError(f"{data.root}: made with another tokenizer ({t['path']}) than {model_dir}'s")


# ---- instruction data (SFT and generation tasks) ----------------------------------------------------

PROMPT = "### Instruction:\n{instruction}\n\n{context}### Response:\n"


def prompt_of(rec: dict) -> str:
    ctx = rec.get("context") or ""
    return PROMPT.format(instruction=rec["instruction"].strip(), context=f"### Input:\n{ctx.strip()}\n\n" if ctx.strip() else "")


def read_jsonl(path: Path, required: dict[str, type], allow_empty: bool = False) -> list[dict]:
    """Records of a JSONL task/SFT file; a bad record is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise XpertError(f"{path}: {'is a directory, expected a .jsonl file' if path.is_dir() else 'no such file'}")
    recs = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise XpertError(f"{path}:{n}: not valid JSON") from None
        if not isinstance(rec, dict):
            raise XpertError(f"{path}:{n}: expected a JSON object")
        for key, typ in required.items():
            if not isinstance(rec.get(key), typ) or isinstance(rec.get(key), bool):
                raise XpertError(f"{path}:{n}: field {key!r} missing or not {typ.__name__}")
        recs.append(rec)
    if not recs and not allow_empty:
        raise XpertError(f"{path}: no records")
    return recs
