"""The engine of `xpertctl tokenize` (data.tokenize): corpora -> {domain}.{split}.bin token files and
{domain}.{split}.idx document indexes, in bounded memory, on every core.

Documents stream from the readers in batches of a few MB; worker processes (spawned: a fork of a process
whose libraries have started threads can hang; each worker gets the tokenizer's serialized form, not the
parent's memory) encode a batch with the tokenizers library and hash-split it; the parent writes the
batches' tokens in the order it read them, so the bytes do not depend on the number of workers. At most
two batches per worker are in flight: memory does not grow with the corpus.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from pathlib import Path

import numpy as np

from .errors import XpertError
from .specs import SPLITS

BATCH_BYTES = 2 << 20  # text per job
BATCH_DOCS = 10_000

_TOK = None  # the tokenizer encode_job uses (in a worker: rebuilt by _worker_init)


def split_of(doc: str, val_pct: int = 5, test_pct: int = 5) -> str:
    """Deterministic split of one document, by a hash of its text: stable when the corpus grows."""
    p = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "little") % 100
    return "test" if p < test_pct else "val" if p < test_pct + val_pct else "train"


def encode_job(job: tuple) -> dict:
    """One batch -> {split: (tokens with EOS after each document, tokens per document)} + text bytes."""
    docs, forced, val_pct, test_pct, eos, dtype = job
    ids = _encode(docs)
    flat: dict[str, list[int]] = {s: [] for s in SPLITS}
    lens: dict[str, list[int]] = {s: [] for s in SPLITS}
    for d, t in zip(docs, ids):
        s = forced or split_of(d, val_pct, test_pct)
        flat[s] += t
        if eos is not None:
            flat[s].append(eos)
        lens[s].append(len(t) + (eos is not None))
    out = {s: (np.array(flat[s], dtype=dtype), np.array(lens[s], dtype=np.uint64)) for s in SPLITS}
    out["bytes"] = sum(len(d.encode()) for d in docs)
    return out


def _encode(docs: list[str]) -> list[list[int]]:
    backend = _TOK if _is_backend(_TOK) else getattr(_TOK, "backend_tokenizer", None)
    if backend is not None:  # the same call the fast tokenizer's __call__ makes, without the Python wrapping
        return [e.ids for e in backend.encode_batch_fast(docs, add_special_tokens=False)]
    return [_TOK(d, add_special_tokens=False)["input_ids"] for d in docs]


def _batches(docs, max_bytes: int = BATCH_BYTES, max_docs: int = BATCH_DOCS):
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= max_bytes or len(batch) >= max_docs:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class SplitWriter:
    """{domain}.{split}.bin and .idx, appended batch by batch."""

    def __init__(self, root: Path, name: str):
        self.files = {s: open(root / f"{name}.{s}.bin", "wb") for s in SPLITS}
        self.index = {s: open(root / f"{name}.{s}.idx", "wb") for s in SPLITS}
        self.tokens = {s: 0 for s in SPLITS}
        self.documents = {s: 0 for s in SPLITS}

    def write(self, res: dict) -> None:
        for s in SPLITS:
            toks, lens = res[s]
            # file.write, not ndarray.tofile: a full disk is then an OSError with its errno (tofile's has none)
            self.files[s].write(np.ascontiguousarray(toks).data)
            self.index[s].write((self.tokens[s] + np.cumsum(lens, dtype=np.uint64)).data)
            self.tokens[s] += int(toks.size)
            self.documents[s] += int(lens.size)

    def close(self) -> None:
        for f in (*self.files.values(), *self.index.values()):
            f.close()


class Encoder:
    """Runs encode_job in order: in this process (workers=1) or in a pool of spawned workers."""

    def __init__(self, tok, workers: int):
        global _TOK
        _TOK = tok
        self.pool = None
        if workers > 1:
            import multiprocessing as mp
            import signal
            # a fast tokenizer travels as its JSON (the workers import the tokenizers library, not transformers)
            backend = getattr(tok, "backend_tokenizer", None)
            payload = ("json", backend.to_str()) if backend is not None else ("object", tok)
            # the workers inherit the environment: the tokenizers library neither warns nor threads inside
            # them; and Ctrl-C, which reaches the whole foreground group, is the parent's to handle (set before
            # they start, so none stops with a traceback while it is still importing)
            old = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            on_int = _set_signal(signal.SIGINT, signal.SIG_IGN)
            try:
                self.pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init,
                                                         initargs=(payload, os.getpid()))
            finally:
                os.environ.pop("TOKENIZERS_PARALLELISM") if old is None else os.environ.update(TOKENIZERS_PARALLELISM=old)
                if on_int is not None:
                    signal.signal(signal.SIGINT, on_int)
        self.depth = 2 * workers

    def run(self, jobs, sink) -> None:
        if self.pool is None:
            for job in jobs:
                sink(encode_job(job))
            return
        pending = deque()
        for job in jobs:
            pending.append(self.pool.apply_async(encode_job, (job,)))
            if len(pending) >= self.depth:
                sink(pending.popleft().get())
        while pending:
            sink(pending.popleft().get())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _set_signal(sig, handler):
    """signal.signal where it can be set (the main thread); the previous handler, or None."""
    import signal
    try:
        return signal.signal(sig, handler)
    except ValueError:
        return None


def _is_backend(tok) -> bool:
    return type(tok).__module__.startswith("tokenizers")


def _worker_init(payload: tuple, parent: int) -> None:
    """A spawned worker: the parent's tokenizer, and its signals. Ctrl-C is the parent's to handle (it stops
    the pool and removes the partial output); SIGTERM, which the pool's terminate() sends, ends a worker
    quietly; and a worker ends with its parent (a SIGKILLed parent runs no cleanup, and its workers would
    wait on the pool's queue forever)."""
    import signal
    global _TOK
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
    kind, value = payload
    if kind == "json":
        from tokenizers import Tokenizer
        _TOK = Tokenizer.from_str(value)
    else:
        _TOK = value


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tokenize_domain(tmp: Path, name: str, p: Path, parts: dict, enc: Encoder, meter, eos, dtype,
                     val_pct: int, test_pct: int, text_field: str) -> dict:
    from .documents import file_documents, iter_documents
    writer = SplitWriter(tmp, name)
    try:
        for forced, src in parts.items():
            if forced is None:
                docs = iter_documents(src, text_field, quiet=True)
            else:
                docs = (d for f in src for d in file_documents(f, text_field))
            seen = [0]

            def counted(it):
                for d in it:
                    seen[0] += 1
                    yield d
            jobs = ((b, forced, val_pct, test_pct, eos, dtype) for b in _batches(counted(docs)))
            enc.run(jobs, lambda res: (writer.write(res), meter.add(name, res)))
            files = [src] if forced is None else src
            if not seen[0] and (forced is None or any(f.stat().st_size for f in src)):
                raise XpertError(f"{files[0]}: empty corpus (no text)")
    finally:
        writer.close()
    entry = {"source": str(p)}
    for s in SPLITS:
        entry[s] = {"file": f"{name}.{s}.bin", "tokens": writer.tokens[s], "documents": writer.documents[s],
                    "index": f"{name}.{s}.idx"}
    return entry


def check_splits(name: str, p: Path, entry: dict, presplit: bool, val_pct: int, test_pct: int) -> None:
    if entry["train"]["tokens"] == 0:
        root = p.parent.parent
        if not presplit and p.parent.name in ("val", "test") and all((root / s).is_dir() for s in SPLITS):
            raise XpertError(f"{p}: no training tokens after the split (domain {name!r}): this file is the "
                             f"{p.parent.name!r} part of an already split corpus ({root}), whose documents all hash "
                             f"there; tokenize that corpus with --corpus {root}, or pass --val-pct 0 --test-pct 0 "
                             "to train on this file")
        raise XpertError(f"{p}: no training tokens after the split (domain {name!r})")
    wanted = {"val": presplit or val_pct > 0, "test": presplit or test_pct > 0}
    empty = [s for s in ("val", "test") if wanted[s] and entry[s]["tokens"] == 0]
    if not empty:
        return
    from .console import notice
    what = f"the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty"
    root = p.parent.parent
    if not presplit and p.parent.name in SPLITS and all((root / s).is_dir() for s in SPLITS):
        # a file of an already split corpus: its documents all hash to the split it came from
        notice(f"{p}: domain {name!r}: {what}: this file is the {p.parent.name!r} part of an already split corpus "
               f"({root}); tokenize that corpus with --corpus {root} to keep its splits, or pass --val-pct 0 "
               "--test-pct 0 to use the file for training only")
    else:  # train's validation and eval --split would find nothing: say so now
        notice(f"{p}: domain {name!r}: {what} ({'no document there' if presplit else 'no document hashed there'}; "
               "use more text or larger --val-pct/--test-pct)")


class Meter:
    """Progress: text bytes, tokens and tokens per second."""

    def __init__(self):
        from .console import progress
        self.bar = progress()
        self.task = None
        self.t0, self.bytes, self.tokens = time.perf_counter(), 0, 0

    def add(self, name: str, res: dict) -> None:
        if self.task is None:
            self.task = self.bar.add_task("tokenize", total=None, info="")
        self.bytes += res["bytes"]
        self.tokens += sum(int(res[s][0].size) for s in SPLITS)
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, description=f"tokenize {name}", advance=res["bytes"],
                        info=f"{self.bytes / 1e6:,.1f} MB  {self.tokens:,} tokens  {rate:,.0f} tok/s")
