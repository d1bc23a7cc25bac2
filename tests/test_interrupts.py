"""Killing a command mid-write (SIGINT, SIGKILL) leaves nothing that looks complete; re-running works;
the same inputs and seeds give byte-identical artifacts."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

# The child runs the real CLI with one change: after a weights file is written it pauses, so the
# test can kill it in the middle of writing a multi-file output.
CHILD = """
import sys, time
import xpertctl.io.writer as w
real = w.save_file
def slow(*a, **k):
    real(*a, **k)
    time.sleep(60)
w.save_file = slow
from xpertctl.cli import main
sys.argv = ["xpertctl"] + sys.argv[1:]
main()
"""


def _kill_when_temp_appears(args, out: Path, sig) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT back to its default in the child: a shell starts background jobs with it ignored, and
    # Python then installs no KeyboardInterrupt handler, which would hide what this test checks
    p = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline:
        temps = list(out.parent.glob(f".{out.name}.tmp-*"))
        if temps and any(t.is_file() or any(t.iterdir()) for t in temps):
            break
        if p.poll() is not None:
            pytest.fail(f"child ended early: {p.stderr.read()}")
        time.sleep(0.05)
    p.send_signal(sig)
    p.wait(timeout=60)
    return p.returncode


@pytest.fixture
def selection(fx, tmp_path):
    from xpertctl.io import open_checkpoint
    ck = open_checkpoint(fx / "olmoe")
    p = tmp_path / "sel.json"
    p.write_text(json.dumps({"criterion": "x", "source": ck.fingerprint, "num_experts": 8,
                             "layers": [{"layer": i, "experts": [0, 1]} for i in ck.moe_layers]}))
    return p


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("cmd", ["graft", "decompose", "stats"])
def test_killed_mid_write_leaves_no_complete_looking_output(fx, tmp_path, selection, cli, cmd, sig):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the law shall apply\n\nin the beginning")
    out = tmp_path / {"graft": "model", "decompose": "f.safetensors", "stats": "s.safetensors"}[cmd]
    args = {"graft": ["graft", fx / "olmoe", "-t", "2L", "--selection", selection, "--shard-size", "30KB", "-o", out],
            "decompose": ["decompose", fx / "olmoe", selection, "-o", out],
            "stats": ["stats", fx / "olmoe", "-d", f"a={corpus}", "-o", out]}[cmd]
    rc = _kill_when_temp_appears(args, out, sig)
    assert rc != 0
    assert not out.exists()  # only ".NAME.tmp-PID" can remain (after SIGKILL), never NAME itself
    if sig == signal.SIGINT:
        assert not list(tmp_path.glob(f".{out.name}.tmp-*"))
    code, so, err = cli(*args)  # re-running succeeds and clears what the killed run left
    assert code == 0, err
    assert out.exists() and not list(tmp_path.glob(f".{out.name}.tmp-*"))


def test_killed_training_resumes(fx, tmp_path):
    from xpertctl import data
    text = "\n\n".join(f"the law shall apply to every licence holder number {n} in the beginning" for n in range(300))
    (tmp_path / "a.txt").write_text(text)
    d = data.tokenize(fx / "llama", [f"a={tmp_path / 'a.txt'}"], tmp_path / "data")
    run = tmp_path / "run"
    args = [sys.executable, "-m", "xpertctl.cli", "train", str(fx / "llama"), "--data", str(d), "--steps", "1000",
            "--batch-size", "2", "--seq-len", "16", "--save-every", "5", "--eval-every", "0", "-o", str(run)]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    # any saved step from 10 on: with --keep 2 a given step directory lives only ~10 steps, which a
    # poll on a quiet machine can miss
    while time.time() < deadline and not any(int(s.parent.name.split("-")[1]) >= 10
                                             for s in run.glob("step-*/trainer_state.pt")):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert not (run / "final").exists()
    r = subprocess.run(args[:-2] + ["--resume", "auto", "-o", str(run)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 1001)) and (run / "final" / "model.safetensors").exists()
    assert "resuming" in r.stderr


def test_same_inputs_and_seed_give_identical_bytes(fx, tmp_path, cli):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"the law shall apply {n}\n\nin the beginning god created {n}" for n in range(5)))
    w = tmp_path / "w"
    w.mkdir()
    steps = [
        ["stats", fx / "qwen2_moe", "-d", f"a={corpus}", "-d", f"b={corpus}", "-o", w / "stats.safetensors"],
        ["select", w / "stats.safetensors", "--criterion", "random", "--seed", "3", "-o", w / "sel.json"],
        ["decompose", fx / "qwen2_moe", w / "sel.json", "--ranks", "8,full,1", "--align", "-o", w / "f.safetensors"],
        ["reshape", w / "f.safetensors", "--target", "3L,d24,f12", "-o", w / "a.safetensors"],
        ["graft", w / "a.safetensors", "--seed", "5", "--inherit", "embeddings", "-o", w / "g"],
    ]
    first = {}
    for rnd in range(2):
        for s in steps:
            code, _, err = cli(*s, "--force")
            assert code == 0, err
        files = sorted(p for p in w.rglob("*") if p.is_file())
        snap = {str(p.relative_to(w)): p.read_bytes() for p in files}
        if rnd == 0:
            first = snap
    assert snap.keys() == first.keys() and len(snap) >= 8
    for k in snap:
        assert snap[k] == first[k], k


# ---- what a Ctrl-C says it left (issue 19.10) ----------------------------------------------------------

def test_ctrl_c_on_train_says_the_step_checkpoints_are_kept_and_resumable(fx, tmp_path, cli, monkeypatch):
    from xpertctl import data, train as tr
    text = "\n\n".join(f"the law shall apply to every licence holder number {n} in the beginning" for n in range(80))
    (tmp_path / "a.txt").write_text(text)
    d = data.tokenize(fx / "llama", [f"a={tmp_path / 'a.txt'}"], tmp_path / "data")
    real = tr.save_checkpoint

    def save_then_interrupt(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(tr, "save_checkpoint", save_then_interrupt)
    run = tmp_path / "run"
    args = ["train", fx / "llama", "--data", d, "--steps", "6", "--batch-size", "2", "--seq-len", "16",
            "--save-every", "2", "--eval-every", "0", "-o", run]
    code, out, err = cli(*args)
    assert code == 130 and out == ""
    assert "no partial output" not in err
    assert "step-000002" in err and "--resume auto" in err and str(run) in err
    assert (run / "step-000002" / "trainer_state.pt").is_file()
    monkeypatch.setattr(tr, "save_checkpoint", real)
    code, out, err = cli(*args, "--resume", "auto")
    assert code == 0, err
    assert "resuming" in err and (run / "final" / "model.safetensors").is_file()


def test_ctrl_c_after_graft_renamed_its_output_says_it_is_complete(fx, tmp_path, selection, cli, monkeypatch):
    from xpertctl.ops import reshape

    def interrupt(*a, **k):  # runs after the output directory is in place
        raise KeyboardInterrupt
    monkeypatch.setattr(reshape, "unscaled_notice", interrupt)
    out = tmp_path / "model"
    code, so, err = cli("graft", fx / "olmoe", "-t", "2L", "--selection", selection, "-o", out)
    assert code == 130 and so == ""
    assert "no partial output" not in err and "completely written" in err and str(out) in err
    import transformers
    transformers.AutoModelForCausalLM.from_pretrained(out)  # it is whole


LATE = """
import os, signal, sys, time
import xpertctl.cli as c
real = c._emit
def emit(result):
    real(result)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C once the path is printed
    time.sleep(5)
c._emit = emit
sys.argv = ["xpertctl"] + sys.argv[1:]
c.main()
"""


def test_ctrl_c_after_the_path_is_printed_is_not_a_silent_exit(tmp_path):
    from conftest import stats_file
    st = stats_file(tmp_path, [[[9, 4, 1, 3]], [[1, 4, 8, 3]]], [10, 10])
    out = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-c", LATE, "select", str(st), "-o", str(out)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert r.returncode == 130
    assert "no partial output" not in r.stderr and "complete" in r.stderr and str(out) in r.stderr
    assert json.loads(out.read_text())["layers"]


# tokenize with each batch's write followed by a pause: the test stops it with its output half written
SLOW_TOKENIZE = """
import sys, time
import xpertctl.tokenizing as t
real = t.SplitWriter.write
def slow(self, res):
    real(self, res)
    time.sleep(60)
t.SplitWriter.write = slow
from xpertctl.cli import main
sys.argv = ["xpertctl"] + sys.argv[1:]
main()
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_tokenize_cleans_up_like_ctrl_c(fx, tmp_path, workers):
    """SIGTERM (a scheduler's or `kill`'s stop) removes the hidden temp output as Ctrl-C does: one line,
    exit 143, no `.OUT.tmp-PID` left, no output; the worker processes stop without a traceback."""
    (tmp_path / "a.txt").write_text("\n\n".join(f"the law shall apply to every holder {n}" for n in range(400)))
    out = tmp_path / "td"
    p = subprocess.Popen([sys.executable, "-c", SLOW_TOKENIZE, "tokenize", "--tokenizer", str(fx / "llama"),
                          "-d", f"a={tmp_path / 'a.txt'}", "--workers", str(workers), "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not any(f.stat().st_size for t in tmp_path.glob(".td.tmp-*") for f in t.glob("*.bin")):
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            pytest.fail(f"tokenize ended or stalled before writing: {p.communicate()[1]}")
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    so, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "terminated" in lines[0] and "no partial output" in lines[0]
    assert so == "" and not out.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]
