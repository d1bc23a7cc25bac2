import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_fixture_builder():
    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "fixtures" / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_fixtures = _load_fixture_builder()
MOE_FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
DENSE_FAMILIES = list(make_fixtures.DENSE)


@pytest.fixture(scope="session")
def fx(tmp_path_factory) -> Path:
    """Tiny checkpoints of every family, built once per test session with transformers' classes."""
    return make_fixtures.build(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from xpertctl.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["xpertctl", *map(str, args)])
        handler = signal.getsignal(signal.SIGINT)  # a finished command takes over Ctrl-C until its exit
        with pytest.raises(SystemExit) as e:
            try:
                main()
            finally:
                signal.signal(signal.SIGINT, handler)
        cap = capsys.readouterr()
        return e.value.code, cap.out, cap.err
    return run


def assert_user_error(code, err, *needles):
    """The failure contract: exit 2, exactly one line on stderr, no traceback, naming what is wrong."""
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


def stats_file(tmp_path, counts, tokens, top_k=2, name="s.safetensors"):
    import torch
    from safetensors.torch import save_file
    from xpertctl.io import provenance
    counts = torch.tensor(counts, dtype=torch.int64)
    D, L, E = counts.shape
    rec = provenance.record("stats", [], {}, source={"path": "/m", "size": 1, "sha256": "x"}, family="olmoe",
                            top_k=top_k, num_experts=E, layers=list(range(L)), domains=[f"d{i}" for i in range(D)])
    p = tmp_path / name
    save_file({"counts": counts, "mass": counts.float(), "tokens": torch.tensor(tokens),
               "layers": torch.arange(L)}, str(p), metadata={"format": "pt", **provenance.as_metadata(rec)})
    return p




def token_data(fx, tmp_path_factory, name, texts: dict[str, str]):
    """Token data of {domain: text} with the llama fixture's tokenizer (20% val, 10% test by hash)."""
    from xpertctl import data
    d = tmp_path_factory.mktemp(name)
    for dom, text in texts.items():
        (d / f"{dom}.txt").write_text(text)
    return data.tokenize(fx / "llama", [f"{dom}={d / (dom + '.txt')}" for dom in texts], d / "data",
                         val_pct=20, test_pct=10)


def torchrun(args: list[str], out: Path, env: dict) -> subprocess.Popen:
    """Start `xpertctl ARGS -o OUT` on 2 processes. --standalone rendezvous on a free port: a fixed
    --master-port made two test runs on one machine (CI beside `make test`) fail or hang on each other."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "xpertctl.cli", *args, "-o", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(p, timeout: int = 300) -> str:
    """Wait for a torchrun() process and assert it succeeded (the assertion shows its stderr's tail)."""
    _, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-2000:]
    return err
