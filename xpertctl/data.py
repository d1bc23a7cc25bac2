"""Corpora: read domain text (.txt / .jsonl / directories), tokenize, pack into fixed windows."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import XpertError
from .specs import SPLITS



def parse_domains(specs: list[str]) -> dict[str, Path]:
    """['legal=corpus/legal.txt', ...] -> {'legal': Path(...)}; names plain and unique, paths exist."""
    from .io.names import check_name
    if not specs:
        raise XpertError("--domain: give at least one NAME=PATH")
    out: dict[str, Path] = {}
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep or not name or not path:
            raise XpertError(f"--domain {s!r}: expected NAME=PATH")
        check_name(name, f"--domain {s!r}: domain name")
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


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    """Every document of one domain as a list (small corpora; see documents.iter_documents for the
    formats, and domain_tokens for a bounded sample of a large one)."""
    from .documents import iter_documents
    docs = list(iter_documents(path, text_field))
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


# ---- a domain's tokens for stats / fidelity / graft --fit / eval ppl -------------------------------------

SMALL_DOMAIN = 32 << 20  # bytes: below this a sample reads every document (and picks exactly as before)


@dataclass
class DomainText:
    """A domain to run a model on: its path, and the seed of the document sample taken when the
    tokens are capped (None: every document in order)."""
    path: Path
    seed: int | None = None
    text_field: str = "text"

    def __post_init__(self):  # unknown file types, empty directories and a wrong text field are refused
        from .documents import check_text_field, corpus_files  # before any model runs
        check_text_field(corpus_files(self.path)[0], self.text_field)


# How a capped, seeded sample reads a domain (recorded in provenance as it is said here).
SAMPLING = {
    "all": "every document, in order",
    "head": "the first documents, in order, up to the cap",
    "order": "documents in seeded random order (a domain of at most {small} is read whole)",
    "offsets": "documents after seeded random byte offsets (plain .txt/.jsonl over {small}; only those documents "
               "are read)",
    "reservoir": "a seeded one-pass reservoir: the documents with the smallest seeded random keys, about 16 "
                 "characters per requested token (compressed or columnar files over {small})",
}


def sampling_method(src, max_tokens: int | None) -> str:
    """Which of SAMPLING domain_tokens / domain_documents use for `src` (a DomainText) and this cap."""
    if max_tokens is None:
        return "all"
    if not isinstance(src, DomainText) or src.seed is None:
        return "head"
    from .documents import SEEKABLE, corpus_files, kind_of
    files, _ = corpus_files(src.path)
    if sum(f.stat().st_size for f in files) <= SMALL_DOMAIN:
        return "order"
    return "offsets" if all(kind_of(f) in SEEKABLE for f in files) else "reservoir"


def sampling(srcs: dict, max_tokens: int | None) -> dict[str, str]:
    """{domain: what was read}, for provenance."""
    small = f"{SMALL_DOMAIN >> 20} MiB" if SMALL_DOMAIN % (1 << 20) == 0 else f"{SMALL_DOMAIN} bytes"
    return {n: SAMPLING[sampling_method(s, max_tokens)].format(small=small) for n, s in srcs.items()}


def domain_tokens(src, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The token stream (documents EOS-joined) of a domain: `src` a DomainText or a list of documents.

    With a token cap and a seed, documents are sampled across the whole domain, reading only what is
    used (SAMPLING): a domain of at most SMALL_DOMAIN bytes is read whole and its documents taken in a
    seeded random order; in a larger one the documents after seeded random byte offsets are read (plain
    .txt and .jsonl files; a document is picked with probability proportional to the bytes before it
    back to the previous document), or, for compressed / columnar files that cannot be entered at an
    offset, one pass keeps a bounded seeded reservoir."""
    if not isinstance(src, DomainText):
        return token_stream(src, tokenizer, max_tokens)
    how = sampling_method(src, max_tokens)
    if how in ("all", "head"):
        from .documents import iter_documents
        docs = iter_documents(src.path, src.text_field)
        return _empty_check(src, token_stream(docs, tokenizer, max_tokens))
    if how == "order":
        return token_stream(sample_documents(read_documents(src.path, src.text_field), src.seed), tokenizer, max_tokens)
    docs = _offset_sample(src) if how == "offsets" else _reservoir_sample(src, budget_chars=16 * max_tokens)
    return _empty_check(src, token_stream(docs, tokenizer, max_tokens))


def domain_documents(src, max_tokens: int | None = None, chars_per_token: int = 16) -> list[str]:
    """The documents of a domain as a list, for callers that split them (a fit's held-out part): every
    document without a cap or a seed; with both, the same seeded sample domain_tokens reads (SAMPLING),
    about `chars_per_token` characters per token of the cap, so memory stays bounded."""
    if not isinstance(src, DomainText):
        return list(src)
    how = sampling_method(src, max_tokens)
    if how in ("all", "head"):
        return read_documents(src.path, src.text_field)
    if how == "order":
        return sample_documents(read_documents(src.path, src.text_field), src.seed)
    budget = chars_per_token * max_tokens
    if how == "reservoir":
        return _reservoir_sample(src, budget_chars=budget)
    docs, size = [], 0
    for d in _offset_sample(src):
        docs.append(d)
        size += len(d)
        if size >= budget:
            break
    return docs


def _empty_check(src: DomainText, ids: torch.Tensor) -> torch.Tensor:
    if ids.numel() == 0:
        raise XpertError(f"{src.path}: empty corpus (no text)")
    return ids


def _offset_sample(src: DomainText, max_misses: int = 1000):
    """Documents after seeded random byte offsets of the domain (files laid end to end), each once."""
    import numpy as np
    from .documents import corpus_files, document_after
    files, _ = corpus_files(src.path)
    sizes = [f.stat().st_size for f in files]
    rng = np.random.default_rng(src.seed)
    ends = np.cumsum(sizes)
    seen, misses = set(), 0
    while misses < max_misses:
        pos = int(rng.integers(0, int(ends[-1])))
        k = int(np.searchsorted(ends, pos, side="right"))
        got = document_after(files[k], pos - (int(ends[k - 1]) if k else 0), src.text_field)
        if got is None or (k, got[0]) in seen:
            misses += 1
            continue
        seen.add((k, got[0]))
        misses = 0
        yield got[1]


def _reservoir_sample(src: DomainText, budget_chars: int) -> list[str]:
    """One pass: every document gets a seeded random key; the smallest keys are kept while their text
    fits in `budget_chars`, so the result is the head of a seeded random permutation of the domain."""
    import heapq
    import numpy as np
    from .documents import iter_documents
    rng = np.random.default_rng(src.seed)
    heap: list[tuple[float, int, str]] = []  # (-key, n, doc): the largest key on top
    size, keys = 0, iter(())
    for n, d in enumerate(iter_documents(src.path, src.text_field)):
        key = next(keys, None)
        if key is None:
            keys = iter(rng.random(4096).tolist())
            key = next(keys)
        if heap and size >= budget_chars and -heap[0][0] < key:
            continue
        heapq.heappush(heap, (-key, n, d))
        size += len(d)
        while size - len(heap[0][2]) >= budget_chars:
            size -= len(heapq.heappop(heap)[2])
    return [d for _, _, d in sorted(heap, reverse=True)]


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


from .tokenizing import split_of  # noqa: E402  (kept here: corpus.py and tests use data.split_of)


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
             corpus: Path | None = None, force: bool = False, workers: int = 0, text_field: str = "text") -> Path:
    """`xpertctl tokenize`: DATA/{domain}.{split}.bin + .idx + manifest.json.

    With `corpus`, its own train/val/test files are kept as they are; otherwise each domain's
    documents are split by a hash of their text."""
    import numpy as np
    from .documents import check_skipped, corpus_files
    from .tokenizing import Encoder, Meter, check_splits, default_workers, tokenize_domain
    from .io import provenance
    from .io.writer import atomic_path, check_output
    presplit = corpus_domains(corpus) if corpus is not None else None
    if presplit is not None and domains:
        raise XpertError("give --corpus or --domain, not both")
    paths = {d: Path(corpus) for d in presplit} if presplit is not None else parse_domains(domains)
    check_output(out, force, list(paths.values()) + [Path(tokenizer_dir)], marker="manifest.json")
    from .documents import check_field_applies
    check_field_applies(paths.values(), text_field)
    if not (0 <= val_pct and 0 <= test_pct and val_pct + test_pct < 100):
        raise XpertError(f"--val-pct/--test-pct: {val_pct}+{test_pct} must leave documents for training")
    if workers < 0:
        raise XpertError(f"--workers {workers}: must be 0 (every core) or positive")
    workers = workers or default_workers()
    sources = {n: ({s: [f] for s, f in presplit[n].items()} if presplit is not None else {None: p})
               for n, p in paths.items()}
    for name, parts in sources.items():  # unreadable types and skipped files are reported before any work
        for s, p in parts.items():
            if s is None:
                check_skipped(p, corpus_files(p)[1])
    tok = load_tokenizer(tokenizer_dir)
    vocab = len(tok)
    dtype = np.uint16 if vocab <= 65535 else np.uint32
    manifest = {"tokenizer": {"path": str(Path(tokenizer_dir).resolve()), "sha256": tokenizer_fingerprint(tokenizer_dir),
                              "vocab_size": vocab, "eos_id": tok.eos_token_id},
                "dtype": np.dtype(dtype).name, "split": {"from": "corpus"} if corpus else {"val_pct": val_pct, "test_pct": test_pct},
                "domains": {}}
    enc = Encoder(tok, workers)
    try:
        with atomic_path(Path(out), force, marker=MANIFEST) as tmp:
            tmp.mkdir()
            meter = Meter()
            with meter.bar:
                for name, parts in sources.items():
                    entry = tokenize_domain(tmp, name, paths[name], parts, enc, meter, tok.eos_token_id, dtype,
                                             val_pct, test_pct, text_field)
                    entry = {"source": entry.pop("source"), "corpus": provenance.fingerprint(paths[name])["sha256"], **entry}
                    check_splits(name, paths[name], entry, presplit is not None, val_pct, test_pct)
                    manifest["domains"][name] = entry
            manifest["xpertctl"] = provenance.record("data", inputs=[], params={
                "domains": {n: str(p) for n, p in paths.items()}, "corpus": str(corpus) if corpus else None,
                "val_pct": None if corpus else val_pct, "test_pct": None if corpus else test_pct,
                "text_field": text_field})
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        enc.close()
    return Path(out)


def identity(data_dir: Path) -> str:
    """What training reads from a data directory, as one sha256: the dtype, the domains in their order
    (it orders the windows) and the bytes of their train and val tokens and document indexes. Not where
    they were read from nor the command that made them (a copied tokenizer, another working directory or
    a re-run of tokenize is the same data); the test split, which training never reads, is left out."""
    import hashlib
    root = Path(data_dir)
    m = json.loads((root / MANIFEST).read_text())
    h = hashlib.sha256(json.dumps({"dtype": m["dtype"], "domains": list(m["domains"])}).encode())
    for name, e in m["domains"].items():
        for split in ("train", "val"):
            for key in ("file", "index"):
                f = (e.get(split) or {}).get(key)
                h.update(f"\0{name}.{split}.{key}\0".encode())
                if f and (root / f).is_file():
                    with open(root / f, "rb") as fh:  # in blocks: a corpus's tokens may be larger than memory
                        while block := fh.read(1 << 22):
                            h.update(block)
    return h.hexdigest()


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

    def document_ends(self, domain: str, split: str):
        """Token offsets of the documents' ends (after their EOS), or None for data made before the index."""
        import numpy as np
        e = self.manifest["domains"][domain][split]
        if "index" not in e:
            return None
        if e["documents"] == 0:
            return np.zeros(0, dtype=np.uint64)
        return np.memmap(self.root / e["index"], dtype=np.uint64, mode="r", shape=(e["documents"],))

    def windows(self, split: str, seq_len: int, weights: dict[str, float] | None = None) -> "Windows":
        """Training windows of one split, read in place from each domain's memmap."""
        return Windows([self.array(d, split) for d in self.domains], seq_len,
                       None if weights is None else [weights[d] for d in self.domains])

    def stream(self, split: str):
        """All domains' tokens of one split concatenated in manifest order: a copy, for small data and
        tests only (training and eval read the memmaps in place)."""
        import numpy as np
        parts = [self.array(d, split) for d in self.domains]
        return np.concatenate(parts) if parts else np.zeros(0)


class Windows:
    """[n, seq_len] windows drawn from domains' token arrays without concatenating them.

    Default (weights None): a start drawn uniformly over the domains laid end to end, so each domain
    is drawn in proportion to its tokens, and the draws are the ones a single concatenated stream
    gives; a window that runs past the end of a domain continues into the next one, as it would in the
    concatenated stream (every document ends with EOS, so a domain boundary is a document boundary).
    With weights: each row picks a domain with probability weight / sum, then a start uniformly
    inside it; such windows never cross domains."""

    def __init__(self, arrays: list, seq_len: int, weights: list[float] | None = None):
        import numpy as np
        self.arrays, self.seq_len = arrays, seq_len
        self.lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        self.ends = np.cumsum(self.lengths)
        self.weights = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            self.weights = w / w.sum()

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def draw(self, rng, n: int):
        import numpy as np
        T = self.seq_len
        if self.weights is None:
            starts = rng.integers(0, len(self) - T, size=n)
            return np.stack([self.read(int(s), int(s) + T) for s in starts])
        doms = rng.choice(len(self.arrays), size=n, p=self.weights)
        starts = rng.integers(0, self.lengths[doms] - T)
        return np.stack([np.asarray(self.arrays[d][s: s + T], dtype=np.int64) for d, s in zip(doms, starts)])

    def read(self, a: int, b: int):
        """Tokens [a, b) of the domains laid end to end, as int64."""
        import numpy as np
        out, k = [], int(np.searchsorted(self.ends, a, side="right"))
        while a < b:
            lo = a - (int(self.ends[k - 1]) if k else 0)
            piece = self.arrays[k][lo: lo + (b - a)]
            out.append(np.asarray(piece, dtype=np.int64))
            a += len(piece)
            k += 1
        return out[0] if len(out) == 1 else np.concatenate(out)


def parse_domain_weights(text: str | None, data: TokenData, seq_len: int) -> dict[str, float] | None:
    """'--domain-weights wiki=3,code=1' -> {domain: weight}, every domain of the data named once."""
    import math
    if text is None:
        return None
    weights: dict[str, float] = {}
    for part in str(text).split(","):
        name, sep, w = part.strip().partition("=")
        try:
            val = float(w)
        except ValueError:
            val = float("nan")
        if not sep or not math.isfinite(val) or val < 0:
            raise XpertError(f"--domain-weights {text!r}: expected NAME=W,... with weights >= 0 (got {part.strip()!r})")
        if name not in data.domains:
            raise XpertError(f"--domain-weights: {data.root} has no domain {name!r} (domains: {', '.join(data.domains)})")
        if name in weights:
            raise XpertError(f"--domain-weights: domain {name!r} given twice")
        weights[name] = val
    missing = [d for d in data.domains if d not in weights]
    if missing:
        raise XpertError(f"--domain-weights: no weight for {', '.join(map(repr, missing))} (give every domain; 0 leaves one out)")
    if not sum(weights.values()) > 0:
        raise XpertError("--domain-weights: at least one weight must be positive")
    for d, w in weights.items():
        n = data.manifest["domains"][d]["train"]["tokens"]
        if w > 0 and n <= seq_len:
            raise XpertError(f"--domain-weights: domain {d!r} has {n} training tokens, fewer than --seq-len {seq_len} + 1")
    return weights


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
                if "index" in e[s]:  # the document index (data made before it has none)
                    f, want = root / e[s]["index"], e[s]["documents"] * 8
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
                has = (f"it is {type(rec[key]).__name__}" if key in rec else
                       f"the record has {', '.join(map(repr, list(rec)[:6])) or 'no fields'}")
                raise XpertError(f"{path}:{n}: field {key!r} missing or not {typ.__name__} ({has}; "
                                 f"needs {', '.join(required)})")
        recs.append(rec)
    if not recs and not allow_empty:
        raise XpertError(f"{path}: no records")
    return recs
