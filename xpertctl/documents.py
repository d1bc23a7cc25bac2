"""Documents of a corpus as a stream, never a whole file in memory.

Formats: .txt (blank-line separated paragraphs), .jsonl / .jsonl.gz / .jsonl.zst (one JSON object a line,
its `text_field`), .parquet (row group by row group, the `text_field` column), .arrow (Arrow IPC stream
files, as `datasets`' save_to_disk writes them, batch by batch) and directories of those (files in sorted
order, so the order is deterministic). Every document is stripped; empty ones are dropped.
"""
from __future__ import annotations

import codecs
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from .errors import XpertError

KINDS = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".txt", ".parquet", ".arrow")
SEEKABLE = (".txt", ".jsonl")  # plain files whose documents can be found from a byte offset
# Files a `datasets` save_to_disk directory holds beside its .arrow files.
DATASETS_META = ("dataset_info.json", "state.json", "dataset_dict.json")
CHUNK = 1 << 20


def kind_of(p: Path) -> str | None:
    name = p.name.lower()
    return next((k for k in KINDS if name.endswith(k)), None)


def corpus_files(path: Path) -> tuple[list[Path], list[Path]]:
    """(files to read, files of other types skipped) of a corpus file or directory."""
    path = Path(path)
    if not path.is_dir():
        if kind_of(path) is None:
            raise XpertError(f"{path}: unknown corpus file type {path.suffix or '(none)'!r} (use {', '.join(KINDS)})")
        return [path], []
    if (path / "dataset_dict.json").is_file():  # one directory per split: never merge them silently
        try:
            splits = [str(s) for s in json.loads((path / "dataset_dict.json").read_text())["splits"]]
        except (ValueError, KeyError, TypeError):
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise XpertError(f"{path}: a datasets DatasetDict (splits: {', '.join(sorted(splits)) or 'none'}); pass one "
                         f"split's directory, e.g. {path / (splits[0] if splits else 'train')}")
    found = sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts))
    files = [p for p in found if kind_of(p) is not None]
    skipped = [p for p in found if kind_of(p) is None and p.name not in DATASETS_META]
    if not files:
        held = ", ".join(str(p.relative_to(path)) for p in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        raise XpertError(f"{path}: no corpus files in the directory ({', '.join(KINDS)})"
                         + (f"; it holds: {held}" if held else ""))
    return files, skipped


def check_skipped(path: Path, skipped: list[Path]) -> None:
    """A directory corpus names the files it does not read (a notice, so nothing is silently left out)."""
    if skipped:
        from .console import notice
        names = ", ".join(str(p.relative_to(path)) for p in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        notice(f"{path}: skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} of other types: {names}")


def check_text_field(files: list[Path], text_field: str) -> None:
    """Each record file has `text_field`, read from its first record (.jsonl*) or its schema (.parquet,
    .arrow) only: a wrong --text-field is refused before a model is loaded, not hours into a pass."""
    for f in files:
        kind = kind_of(f)
        if kind in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
            next(_jsonl(f, kind, text_field), None)
        elif kind == ".parquet":
            next(_parquet(f, text_field, schema_only=True), None)
        elif kind == ".arrow":
            next(_arrow(f, text_field, schema_only=True), None)


def check_field_applies(paths, text_field: str) -> None:
    """A --text-field other than the default must name a field some input has: with plain text only (.txt
    has no fields) it would change nothing, silently. Paths that do not exist yet are left to their own check."""
    if text_field == "text":
        return
    paths = [Path(p) for p in paths if Path(p).exists()]
    if paths and not any(kind_of(f) != ".txt" for p in paths for f in corpus_files(p)[0]):
        raise XpertError(f"--text-field {text_field}: names the field of .jsonl/.parquet/.arrow records; "
                         f"{', '.join(map(str, paths))}: plain .txt only (no fields): drop --text-field")


def iter_documents(path: Path, text_field: str = "text", *, quiet: bool = False) -> Iterator[str]:
    """Every document of a corpus file or directory, in order."""
    path = Path(path)
    files, skipped = corpus_files(path)
    if not quiet:
        check_skipped(path, skipped)
    for f in files:
        yield from file_documents(f, text_field)


def file_documents(f: Path, text_field: str = "text") -> Iterator[str]:
    kind = kind_of(f)
    if kind == ".txt":
        yield from _txt(f)
    elif kind in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        yield from _jsonl(f, kind, text_field)
    elif kind == ".parquet":
        yield from _parquet(f, text_field)
    elif kind == ".arrow":
        yield from _arrow(f, text_field)
    else:
        raise XpertError(f"{f}: unknown corpus file type {f.suffix or '(none)'!r} (use {', '.join(KINDS)})")


def _check_binary(f: Path, head: bytes) -> None:
    if b"\x00" in head[:8192]:
        raise XpertError(f"{f}: binary file, not text")


def _txt(f: Path) -> Iterator[str]:
    """Paragraphs split on blank lines exactly as str.split('\\n\\n') over the whole text would: the
    unfinished tail of each chunk is carried into the next."""
    dec = codecs.getincrementaldecoder("utf-8")()
    carry, done = "", 0
    with open(f, "rb") as fh:
        first = True
        while True:
            raw = fh.read(CHUNK)
            if first:
                _check_binary(f, raw)
                first = False
            try:
                text = dec.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise XpertError(f"{f}: not UTF-8 text (byte {done + e.start})") from None
            done += len(raw)
            parts = (carry + text).split("\n\n")
            carry = parts.pop()
            for d in parts:
                if d.strip():
                    yield d.strip()
            if not raw:
                break
    if carry.strip():
        yield carry.strip()


def _open_jsonl(f: Path, kind: str):
    raw = open(f, "rb")
    if kind == ".jsonl.gz":
        return gzip.open(raw)
    if kind == ".jsonl.zst":
        import zstandard
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw


def _jsonl(f: Path, kind: str, text_field: str) -> Iterator[str]:
    import zstandard
    n = 0
    try:
        with _open_jsonl(f, kind) as fh:
            lines = io.BufferedReader(fh, CHUNK) if kind == ".jsonl.zst" else fh
            for n, line in enumerate(lines, 1):
                if n == 1:
                    _check_binary(f, line)
                doc = _json_text(f, n, line, text_field)
                if doc:
                    yield doc
    except (gzip.BadGzipFile, EOFError, zlib.error, zstandard.ZstdError) as e:
        what = "gzip" if kind == ".jsonl.gz" else "zstd"
        raise XpertError(f"{f}: corrupt {what} data after line {n} ({str(e).splitlines()[0][:80] or type(e).__name__})") from None


def _json_text(f: Path, n: int, line: bytes, text_field: str) -> str:
    """The stripped text field of one JSONL line ('' for a blank line)."""
    if not line.strip():
        return ""
    try:
        rec = json.loads(line)
    except UnicodeDecodeError:
        raise XpertError(f"{f}:{n}: not UTF-8 text") from None
    except json.JSONDecodeError:
        raise XpertError(f"{f}:{n}: not valid JSON") from None
    if not isinstance(rec, dict):
        raise XpertError(f"{f}:{n}: expected a JSON object")
    value = rec.get(text_field)
    if not isinstance(value, str):
        keys = ", ".join(list(rec)[:8])
        raise XpertError(f"{f}:{n}: field {text_field!r} missing or not str (fields: {keys}); pass --text-field")
    return value.strip()


def _column_texts(f: Path, table, text_field: str, where: str) -> Iterator[str]:
    import pyarrow as pa
    if text_field not in table.schema.names:
        raise XpertError(f"{f}: no column {text_field!r} (columns: {', '.join(table.schema.names[:8])}); "
                         "pass --text-field")
    col = table.column(text_field)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise XpertError(f"{f}: column {text_field!r} is {col.type}, not text")
    if col.null_count:
        raise XpertError(f"{f}: column {text_field!r} has null values ({where})")
    for v in col.to_pylist():
        if v.strip():
            yield v.strip()


def _parquet(f: Path, text_field: str, schema_only: bool = False) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        raise XpertError(f"{f}: not a readable parquet file ({str(e).splitlines()[0][:80]})") from None
    if text_field not in pf.schema_arrow.names:
        raise XpertError(f"{f}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names[:8])}); "
                         "pass --text-field")
    if schema_only:
        return
    for g in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(g, columns=[text_field])
        except (pa.ArrowException, OSError) as e:
            raise XpertError(f"{f}: row group {g} unreadable ({str(e).splitlines()[0][:80]})") from None
        yield from _column_texts(f, table, text_field, f"row group {g}")


def _arrow(f: Path, text_field: str, schema_only: bool = False) -> Iterator[str]:
    """An Arrow IPC stream file (datasets' save_to_disk format), memory-mapped, batch by batch."""
    import pyarrow as pa
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(f)))
    except (pa.ArrowException, OSError):
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(f)))
        except (pa.ArrowException, OSError) as e:
            raise XpertError(f"{f}: not an Arrow IPC file ({str(e).splitlines()[0][:80]})") from None
    if schema_only:
        yield from _column_texts(f, reader.schema.empty_table(), text_field, "schema")
        return
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if hasattr(reader, "num_record_batches") \
        else reader
    try:
        for i, batch in enumerate(batches):
            yield from _column_texts(f, pa.Table.from_batches([batch]), text_field, f"batch {i}")
    except pa.ArrowException as e:
        raise XpertError(f"{f}: unreadable Arrow data ({str(e).splitlines()[0][:80]})") from None


def document_after(f: Path, pos: int, text_field: str = "text") -> tuple[int, str] | None:
    """(start, document) of the first document that starts after byte `pos` of a plain .txt or .jsonl
    file, reading only around it; None at the end of the file."""
    kind = kind_of(f)
    with open(f, "rb") as fh:
        if kind == ".jsonl":
            if pos > 0:
                fh.seek(pos - 1)
                fh.readline()  # the rest of the line holding byte pos-1
            while True:
                start, line = fh.tell(), fh.readline()
                if not line:
                    return None
                n = None  # the line number is unknown here: name the byte offset instead
                try:
                    doc = _json_text(f, n, line, text_field)
                except XpertError as e:
                    raise XpertError(str(e).replace(f"{f}:None:", f"{f}: at byte {start}:")) from None
                if doc:
                    return start, doc
        fh.seek(pos)
        buf, base = b"", pos
        if pos > 0:  # skip to the end of the paragraph holding pos
            while (i := buf.find(b"\n\n")) < 0:
                more = fh.read(1 << 16)
                if not more:
                    return None
                buf += more
            base, buf = base + i + 2, buf[i + 2:]
        while True:
            j = buf.find(b"\n\n")
            if j < 0:
                more = fh.read(1 << 16)
                if more:
                    buf += more
                    continue
                j = len(buf)
            try:
                doc = buf[:j].decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise XpertError(f"{f}: not UTF-8 text (byte {base + e.start})") from None
            if doc:
                return base, doc
            if j == len(buf):
                return None
            base, buf = base + j + 2, buf[j + 2:]
