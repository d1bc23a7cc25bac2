"""`xpertctl run --jobs N`: steps side by side wait for what they read, write what one-at-a-time writes,
and a failure is one line naming its step, after which nothing new starts."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, assert_user_error, stats_file
from xpertctl import recipe as rc
from xpertctl.ops_table import BY_NAME as TABLE

MINI = ROOT / "fixtures" / "corpus-mini"


def _step(n, **args):
    return (n, f"s{n}", None, None, args)


def test_dependencies_follow_what_a_step_reads():
    todo = [
        _step(1, src="m/", out="w/stats.safetensors"),
        _step(2, stats_file="w/stats.safetensors", out="w/sel.json", plot="w/sel.json.png"),  # reads 1
        _step(3, corpus="c/", out="w/data"),
        _step(4, domain=["legal=w/data/legal.txt"], out="w/fid.json"),  # NAME=PATH inside 3's out
        _step(5, task=["ppl:w/data", "mc:w/cloze.jsonl"], out="w/eval/a-1L-s0.json"),  # KIND:PATH = 3's out
        _step(6, results="w/eval/*L-s*.json", out="w/report"),  # a glob matching 5's out
        _step(7, stats_file="w/stats.safetensorsx", selection="w/sel.json.png", out="w/other"),  # look-alikes
        _step(8, stats_file="./w//stats.safetensors", out="w/x.json"),  # the same path, spelled otherwise
        _step(9, src="m2/", out="c/extra"),  # writes inside what step 3 reads: must not overtake it
        _step(10, ckpt="w"),  # no out: a barrier
        _step(11, corpus="c/", out="w/late"),
    ]
    deps = rc.dependencies(todo)
    assert deps[1] == set() and deps[3] == set()
    assert deps[2] == {1}
    assert deps[4] == {3} and deps[5] == {3}
    assert deps[6] == {5}
    assert deps[7] == set()
    assert deps[8] == {1} and deps[9] == {3}
    assert deps[10] == set(range(1, 10))
    assert deps[11] == {9, 10}  # it reads c/, which step 9 writes into


@pytest.fixture
def chain(tmp_path, fx):
    """stats -> select (reads the stats) -> graft (reads the selection), and an independent cloze step
    (no training: trained weights depend on the thread count, which --jobs lowers, by float noise)."""
    doms = [f"{d}={MINI / 'train' / f'{d}.txt'}" for d in ("legal", "code")]
    doc = {"name": "chain", "vars": {"w": str(tmp_path / "w")}, "steps": [
        {"id": "stats", "op": "stats", "args": {"src": str(fx / "olmoe"), "domain": doms, "max_tokens": 200,
                                                 "seq_len": 32, "out": "${vars.w}/stats.safetensors"}},
        {"id": "sel", "op": "select", "args": {"stats": "${steps.stats.out}", "criterion": "min",
                                               "out": "${vars.w}/sel.json"}},
        {"id": "cloze", "op": "corpus cloze", "args": {"corpus": str(MINI), "per_domain": 2,
                                                        "out": "${vars.w}/cloze.jsonl"}},
        {"id": "graft", "op": "graft", "args": {"src": str(fx / "olmoe"), "target": "1L", "selection": "${steps.sel.out}",
                                                "dtype": "float32", "out": "${vars.w}/student"}},
    ]}
    p = tmp_path / "chain.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def test_jobs_wait_for_inputs_and_write_what_one_at_a_time_writes(chain, tmp_path, capsys):
    one = rc.run(chain, ["vars.w=" + str(tmp_path / "one")], table=TABLE)
    capsys.readouterr()
    two = rc.run(chain, ["vars.w=" + str(tmp_path / "two")], jobs=2, table=TABLE)
    err = capsys.readouterr().err
    # select and graft would fail with "no such file" had they started before their inputs were written
    assert [o.replace("/two/", "/one/") for o in two] == one
    assert "[2/4] sel: done" in err and "[4/4] graft: done" in err
    a, b = tmp_path / "one", tmp_path / "two"
    sa, sb = load_file(a / "stats.safetensors"), load_file(b / "stats.safetensors")
    assert sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)
    assert json.loads((a / "sel.json").read_text())["layers"] == json.loads((b / "sel.json").read_text())["layers"]
    assert (a / "cloze.jsonl").read_bytes() == (b / "cloze.jsonl").read_bytes()
    ga, gb = load_file(a / "student" / "model.safetensors"), load_file(b / "student" / "model.safetensors")
    assert ga.keys() == gb.keys() and all((ga[k] == gb[k]).all() for k in ga)
    # each step records its own command line (not `python -m ...`), and keeps its log beside its record
    rec = json.loads((b / "sel.json").read_text())["xpertctl"]
    assert rec["command"].startswith("xpertctl select ") and str(b / "stats.safetensors") in rec["command"]
    assert (b / ".stats.safetensors.step.log").is_file() and (b / ".sel.json.step.json").is_file()
    # a second run finds every step done, whichever way it ran
    capsys.readouterr()
    rc.run(chain, ["vars.w=" + str(b)], jobs=2, table=TABLE)
    assert capsys.readouterr().err.count("skip (done)") == 4
    # a changed first step reruns what reads it (as one at a time does), not only itself
    rc.run(chain, ["vars.w=" + str(b), "steps.stats.args.max_tokens=150"], jobs=2, table=TABLE)
    err = capsys.readouterr().err
    assert "stats: run" in err and "sel: run" in err and "graft: run" in err and "cloze: skip (done)" in err


def test_a_failing_step_is_one_line_and_nothing_new_starts(tmp_path, cli):
    stats = stats_file(tmp_path, [[[90, 40, 10, 30]], [[5, 45, 80, 30]]], [100, 100])
    w = tmp_path / "w"
    doc = {"name": "f", "steps": [
        {"id": f"sel-{c}", "op": "select", "args": {"stats": str(stats), "criterion": c, "per_layer": 99,
                                                    "out": str(w / f"sel-{c}.json")}} for c in ("min", "low")] + [
        {"id": "cloze", "op": "corpus cloze", "args": {"corpus": str(MINI), "per_domain": 1, "out": str(w / "c.jsonl")}}]}
    r = tmp_path / "f.yaml"
    r.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, _, err = cli("run", r, "--jobs", "2")
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("xpertctl: error:") and "step 'sel-" in last and "--per-layer 99" in last, last
    assert not (w / "c.jsonl").exists() and "cloze: run" not in err
    assert not (w / "sel-min.json").exists() and not (w / "sel-low.json").exists()


def test_jobs_must_be_positive(tmp_path, cli):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"name": "r", "steps": []}))
    code, _, err = cli("run", r, "--jobs", "0")
    assert_user_error(code, err, "--jobs 0: must be >= 1")


def test_stopping_the_runner_stops_its_steps(tmp_path):
    """SIGTERM to `xpertctl run --jobs 2` reaches the steps it started (they run in their own sessions):
    none is left running on its own, and the runner ends as interrupted."""
    w = tmp_path / "w"
    doc = {"name": "long", "steps": [
        {"id": "data", "op": "tokenize", "args": {"tokenizer": str(ROOT / "fixtures/teacher"), "corpus": str(MINI),
                                                   "out": str(w / "data")}},
        {"id": "init", "op": "graft", "args": {"src": str(ROOT / "fixtures/teacher"), "target": "1L",
                                               "dtype": "float32", "out": str(w / "init")}}] + [
        {"id": f"train-{s}", "op": "train", "args": {"ckpt": str(w / "init"), "data": str(w / "data"),
                                                      "steps": 100000, "batch_size": 1, "seq_len": 16,
                                                      "seed": s, "out": str(w / f"run-{s}")}} for s in (0, 1)]}
    r = tmp_path / "long.yaml"
    r.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "xpertctl", "run", str(r), "--jobs", "2"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids = []
    try:
        metrics = [w / f"run-{s}" / "metrics.jsonl" for s in (0, 1)]
        deadline = time.time() + 240
        while not all(m.is_file() and m.stat().st_size for m in metrics):  # both are training
            assert p.poll() is None and time.time() < deadline, p.stderr.read() if p.poll() is not None else "slow"
            time.sleep(0.2)
        kids = [int(x) for x in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                               text=True).stdout.split()]
        assert len(kids) == 2
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 130
        time.sleep(0.5)
        for k in kids:
            with pytest.raises(ProcessLookupError):
                os.kill(k, 0)
    finally:  # never leave a 100,000-step training behind
        for pid in [p.pid, *kids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_worker_killed_while_idle_is_replaced(tmp_path, cli, monkeypatch):
    """An idle worker can die between steps (the OOM killer picks the largest process): the next step
    gets a new worker instead of a broken pipe."""
    real_popen, real_done, made = subprocess.Popen, rc._done, []

    def tracked(*a, **k):
        made.append(real_popen(*a, **k))
        return made[-1]

    def kill_idle_worker(out, rec):  # runs as the evaluation starts, after the cloze step's worker went idle
        if str(out).endswith("e.json") and len(made) == 1:
            os.kill(made[0].pid, signal.SIGKILL)
            made[0].wait()
        return real_done(out, rec)
    monkeypatch.setattr(subprocess, "Popen", tracked)
    monkeypatch.setattr(rc, "_done", kill_idle_worker)
    w = tmp_path / "w"
    doc = {"name": "d", "steps": [
        {"id": "cloze", "op": "corpus cloze", "args": {"corpus": str(MINI), "per_domain": 1, "out": str(w / "c.jsonl")}},
        {"id": "eval", "op": "eval", "args": {"ckpt": str(ROOT / "fixtures/teacher"), "task": [f"mc:{w / 'c.jsonl'}"],
                                              "out": str(w / "e.json")}}]}
    r = tmp_path / "d.yaml"
    r.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, _, err = cli("run", r, "--jobs", "2")
    assert code == 0, err
    assert len(made) == 2 and made[0].returncode == -signal.SIGKILL
    assert json.loads((w / "e.json").read_text())["tasks"]
