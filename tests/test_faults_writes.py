"""Faults around the writes (issue 29, part A): every writing command killed (SIGKILL) before, during and
after its writes, then run again; full, read-only and refusing disks; a closed stdout; file modes; the
tokenizer pool's start method.

The contract: a killed command leaves nothing that looks finished (its output is absent or complete; only its
hidden temp `.NAME.tmp-PID` may remain, with any cache inside it), and the same command run again completes
(or, when the output is complete, refuses clearly) and clears what the killed run left. A disk's refusal is
one line naming the output, exit 2, no traceback, no temp, inputs untouched.

Killed commands are forks of one "zygote" process that imported torch, transformers and xpertctl once (and
never computed, so a fork is safe): a kill case costs the command's own work, not an interpreter start-up.
A hook (HOOK, set per run) pauses the command at a chosen call and writes a marker file; the test then
sends SIGKILL.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from conftest import assert_user_error as _one_line_error


def assert_user_error(code, err, *needles):
    """conftest's contract (exit 2, one line, no traceback), after the lines of `train`'s progress log: train
    keeps its progress on stderr on purpose (a non-transient bar, the record of a run in a log file), so a
    failure part way through a run follows the progress lines printed so far."""
    import re
    kept = "".join(l + "\n" for l in err.splitlines() if not re.match(r"^train\s.*\d+/\d+", l))
    _one_line_error(code, kept, *needles)


CORPUS = ROOT / "fixtures" / "corpus-mini"

# ---- the zygote -----------------------------------------------------------------------------------------

ZYGOTE = r'''
import json, os, resource, signal, sys, traceback
import torch, transformers, safetensors.torch  # imported once: every command runs in a fork of this process
import xpertctl.cli, xpertctl.ops_table, xpertctl.io.writer, xpertctl.data, xpertctl.train, xpertctl.eval
import xpertctl.corpus, xpertctl.recipe, xpertctl.tokenizing
import xpertctl.ops.stats, xpertctl.ops.select, xpertctl.ops.decompose, xpertctl.ops.reshape, xpertctl.ops.graft
import xpertctl.ops.fit, xpertctl.ops.init
chan = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 1)


def child(req):
    code = 99
    try:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            f = os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        if req.get("stdout_closed"):  # a reader that went away: `xpertctl ... | head -c 10`
            r, w = os.pipe()
            os.close(r)
            os.dup2(w, 1)
        os.dup2(null, 0)
        os.chdir(req["cwd"])
        os.environ.update(req["env"])
        if req.get("fsize"):  # a file size limit: writes beyond it fail with EFBIG (SIGXFSZ ignored)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        exec(req["hook"], {"__name__": "hook"})
        sys.argv = ["xpertctl", *req["argv"]]
        try:
            xpertctl.cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code)


for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "run":
        pid = os.fork()
        if pid == 0:
            child(req)
        reply = {"pid": pid}
    else:
        got, status = os.waitpid(req["pid"], 0 if req["op"] == "wait" else os.WNOHANG)
        reply = {"code": os.waitstatus_to_exitcode(status) if got else None}
    chan.write(json.dumps(reply) + "\n")
    chan.flush()
'''

# Pause at the nth call of MODULE:ATTR (whose arguments match FAULT_MATCH), before or after it runs:
# the marker file FAULT_READY says the command is there.
HOOK = r'''
import importlib, os, re, time
spec = os.environ.get("FAULT_AT")
if spec:
    target, attr, when = spec.split(":")
    nth, match, ready = int(os.environ.get("FAULT_NTH", "1")), os.environ.get("FAULT_MATCH"), os.environ["FAULT_READY"]
    obj = importlib.import_module(target)
    *owners, name = attr.split(".")
    for o in owners:
        obj = getattr(obj, o)
    real, calls = getattr(obj, name), [0]

    def pause():
        open(ready, "w").close()
        time.sleep(3600)

    def hooked(*a, **k):
        hit = match is None or re.search(match, " ".join(map(str, a))) is not None
        calls[0] += hit
        hit = hit and calls[0] == nth
        if hit and when == "before":
            pause()
        r = real(*a, **k)
        if hit and when == "after":
            pause()
        return r
    setattr(obj, name, hooked)
'''

BEFORE = "xpertctl.io.writer:_check_place:after"  # the output rule checked, nothing written yet
AFTER = "xpertctl.cli:_finished:before"  # the output renamed into place, the process not yet ended


def rename_of(name: str) -> dict:
    """The moment the complete temp is about to be renamed to NAME."""
    return {"FAULT_AT": "os:replace:before", "FAULT_MATCH": rf"\.tmp-\d+(/\S*)? \S*/{name}$"}


class Run:
    def __init__(self, zyg, pid, out, err, ready):
        self.zyg, self.pid, self.out, self.err, self.ready = zyg, pid, out, err, ready

    def wait_ready(self, timeout=300):
        deadline = time.time() + timeout
        while not self.ready.exists():
            if self.zyg.ask({"op": "poll", "pid": self.pid})["code"] is not None:
                pytest.fail(f"the command ended before the moment: {self.err.read_text()[-3000:]}")
            if time.time() > deadline:
                self.kill()
                pytest.fail("the command never reached the moment")
            time.sleep(0.05)

    def kill(self, sig=signal.SIGKILL):
        os.kill(self.pid, sig)
        return self.wait()

    def wait(self):
        return self.zyg.ask({"op": "wait", "pid": self.pid})["code"]

    def result(self):
        code = self.wait()
        return code, self.out.read_text(), self.err.read_text()


class Zygote:
    def __init__(self, logdir: Path):
        import xpertctl
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join([str(Path(xpertctl.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
        self.logdir, self.n = logdir, 0
        self.p = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, env=env)

    def ask(self, req):
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("the zygote died")
        return json.loads(line)

    def start(self, argv, cwd: Path, fault: dict | None = None, **opts) -> Run:
        self.n += 1
        out, err, ready = (self.logdir / f"{self.n}.{x}" for x in ("out", "err", "ready"))
        env = {"FAULT_READY": str(ready), **(fault or {})}
        pid = self.ask({"op": "run", "argv": [str(a) for a in argv], "cwd": str(cwd), "env": env, "hook": HOOK,
                        "stdout": str(out), "stderr": str(err), **opts})["pid"]
        return Run(self, pid, out, err, ready)

    def run(self, argv, cwd: Path, **opts):
        return self.start(argv, cwd, **opts).result()

    def close(self):
        self.p.stdin.close()
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # its exit (torch's) may be slow on a busy machine: nothing to keep
            self.p.kill()
            self.p.wait()


@pytest.fixture(scope="module")
def zyg(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote-logs"))
    yield z
    z.close()


# ---- inputs, built once -----------------------------------------------------------------------------------

TEXTS = {
    "law": "\n\n".join(f"the law shall apply to every licence holder number {n} . the holder shall pay the fee"
                       for n in range(60)),
    "code": "\n\n".join(f"def main ( ) : return {n} . a noun is a word that names a thing {n}" for n in range(60)),
}


def _main(*args):
    """The CLI in this process (for inputs): exit code."""
    from xpertctl.cli import main
    old = sys.argv
    sys.argv = ["xpertctl", *map(str, args)]
    try:
        main()
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = old
    return 0


@pytest.fixture(scope="module")
def work(fx, tmp_path_factory):
    w = tmp_path_factory.mktemp("fault-inputs")
    for name, text in TEXTS.items():
        (w / f"{name}.txt").write_text(text)
    steps = [
        ["stats", fx / "olmoe", "-d", f"law={w / 'law.txt'}", "-d", f"code={w / 'code.txt'}", "-o", w / "s.safetensors"],
        ["select", w / "s.safetensors", "-o", w / "sel.json"],
        ["decompose", fx / "olmoe", w / "sel.json", "-o", w / "f.safetensors"],
        ["tokenize", "--tokenizer", fx / "llama", "-d", f"law={w / 'law.txt'}", "-d", f"code={w / 'code.txt'}",
         "--val-pct", "20", "--test-pct", "10", "--workers", "1", "-o", w / "td"],
    ]
    for s in steps:
        assert _main(*s) == 0, s
    (w / "r.yaml").write_text(yaml.safe_dump({"name": "faults", "vars": {"work": "unset"}, "steps": [
        {"id": "select", "op": "select", "args": {"stats": str(w / "s.safetensors"), "out": "${vars.work}/sel.json"}},
        {"id": "decompose", "op": "decompose", "args": {"src": str(fx / "olmoe"), "selection": "${steps.select.out}",
                                                        "out": "${vars.work}/f.safetensors"}},
    ]}, sort_keys=False))
    return w


def digest(*roots: Path) -> str:
    h = hashlib.sha256()
    for root in roots:
        for p in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            h.update(str(p).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def inputs_digest(work, fx):
    return lambda: digest(work, fx / "olmoe", fx / "llama", CORPUS)


# ---- the commands: argv for an output directory o, the output's name, how a complete one looks --------------

def commands(fx, w):
    law, code = f"law={w / 'law.txt'}", f"code={w / 'code.txt'}"
    cal = ["--calibration", law, "--calibration", code, "--calibration-tokens", "200", "--seq-len", "32"]
    train = ["train", fx / "llama", "--data", w / "td", "--steps", "6", "--batch-size", "2", "--seq-len", "16",
             "--save-every", "2", "--eval-every", "0", "--warmup", "2"]
    return {
        "stats": (lambda o: ["stats", fx / "olmoe", "-d", law, "-d", code, "-o", o / "s.safetensors"], "s.safetensors"),
        "select": (lambda o: ["select", w / "s.safetensors", "-o", o / "sel.json"], "sel.json"),
        "decompose": (lambda o: ["decompose", fx / "olmoe", w / "sel.json", "-o", o / "f.safetensors"], "f.safetensors"),
        "reshape": (lambda o: ["reshape", w / "f.safetensors", "-t", "2L", "-o", o / "a.safetensors"], "a.safetensors"),
        "graft": (lambda o: ["graft", fx / "olmoe", "-t", "2L", "--selection", w / "sel.json", "--shard-size", "30KB",
                             "-o", o / "g"], "g"),
        "graft-fit-down": (lambda o: ["graft", fx / "olmoe", "-t", "2L", "--selection", w / "sel.json", "--fit", "down",
                                      *cal, "-o", o / "g"], "g"),
        "graft-fit-ffn": (lambda o: ["graft", fx / "olmoe", "-t", "2L", "--selection", w / "sel.json", "--fit", "ffn",
                                     "--fit-steps", "30", *cal, "-o", o / "g"], "g"),
        "tokenize": (lambda o: ["tokenize", "--tokenizer", fx / "llama", "-d", law, "-d", code, "--workers", "1",
                                "-o", o / "td"], "td"),
        "tokenize-2": (lambda o: ["tokenize", "--tokenizer", fx / "llama", "-d", law, "-d", code, "--workers", "2",
                                  "-o", o / "td"], "td"),
        "train": (lambda o: [*train, "-o", o / "run"], "run"),
        "eval": (lambda o: ["eval", fx / "llama", "--task", f"ppl:{w / 'td'}", "--seq-len", "16", "--max-tokens", "200",
                            "-o", o / "r.json"], "r.json"),
        "corpus-tokenizer": (lambda o: ["corpus", "tokenizer", CORPUS, "--vocab-size", "300", "-o", o / "tok"], "tok"),
        "corpus-cloze": (lambda o: ["corpus", "cloze", CORPUS, "--per-domain", "3", "-o", o / "cloze.jsonl"], "cloze.jsonl"),
        "corpus-order": (lambda o: ["corpus", "order", CORPUS, "--per-domain", "3", "-o", o / "order.jsonl"], "order.jsonl"),
        "corpus-sft": (lambda o: ["corpus", "sft", CORPUS, "--max-train", "5", "--max-test", "2", "-o", o / "sft"], "sft"),
        "init": (lambda o: ["init", "olmoe", "--tokenizer", fx / "llama", "--layers", "2", "--hidden", "32", "--ffn", "16",
                            "--experts", "4", "-o", o / "m"], "m"),
        "run": (lambda o: ["run", w / "r.yaml", "--set", f"vars.work={o}"], "f.safetensors"),
    }


def complete(p: Path) -> bool:
    """What a finished output of each kind holds, read back (not by the code under test)."""
    from safetensors import safe_open
    if p.suffix == ".safetensors":
        with safe_open(str(p), "pt") as f:
            return bool(list(f.keys()))
    if p.suffix == ".json":
        return bool(json.loads(p.read_text()))
    if p.suffix == ".jsonl":
        return all(json.loads(line) for line in p.read_text().splitlines()) and p.stat().st_size > 0
    if (p / "config.json").is_file():
        import transformers
        transformers.AutoModelForCausalLM.from_pretrained(p)
        return True
    if (p / "manifest.json").is_file():
        m = json.loads((p / "manifest.json").read_text())
        return all((p / e["train"]["file"]).stat().st_size == 2 * e["train"]["tokens"] for e in m["domains"].values())
    if (p / "tokenizer.json").is_file():
        return bool(json.loads((p / "tokenizer.json").read_text()))
    if (p / "train.jsonl").is_file():
        return all(json.loads(line) for q in ("train.jsonl", "test.jsonl") for line in (p / q).read_text().splitlines())
    return False


def leftovers(d: Path) -> list[str]:
    """Temps (ours: .NAME.tmp-PID; libraries': .tmpXXXX), set-aside outputs and caches anywhere under d:
    any hidden name but a recipe step's record."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")
                  if (p.name.startswith(".") and not p.name.endswith(".step.json")) or p.name.startswith("xpertctl-fit-"))


# ---- SIGKILL at a moment, then the same command again -----------------------------------------------------

STEP_SAVE = {"FAULT_AT": "torch:save:before"}  # a step checkpoint's weights written, its trainer state not yet
CASES = [  # (command, moment name, hook)
    *[(c, "before", {"FAULT_AT": BEFORE}) for c in ("stats", "graft-fit-ffn", "tokenize", "train", "init", "run")],
    ("graft", "mid-write", {"FAULT_AT": "xpertctl.io.writer:_save:after"}),  # one shard of several written
    ("graft-fit-down", "mid-fit", {"FAULT_AT": "xpertctl.ops.fit:solve_down:before"}),
    ("graft-fit-ffn", "mid-cache", {"FAULT_AT": "xpertctl.ops.fit:DiskCache.__call__:after", "FAULT_NTH": "3"}),
    ("graft-fit-ffn", "mid-optimize", {"FAULT_AT": "xpertctl.ops.fit:optimize_ffn:before"}),
    ("tokenize", "mid-write", {"FAULT_AT": "xpertctl.tokenizing:SplitWriter.write:after"}),
    ("tokenize-2", "mid-write", {"FAULT_AT": "xpertctl.tokenizing:SplitWriter.write:after"}),
    ("train", "mid-step-save", STEP_SAVE),
    ("train", "second-step-save", {**STEP_SAVE, "FAULT_NTH": "2"}),
    *[(c, "rename", rename_of(n)) for c, n in [
        ("stats", "s.safetensors"), ("select", "sel.json"), ("decompose", "f.safetensors"), ("reshape", "a.safetensors"),
        ("graft", "g"), ("graft-fit-ffn", "g"), ("tokenize", "td"), ("train", "final"), ("eval", "r.json"),
        ("corpus-tokenizer", "tok"), ("corpus-cloze", "cloze.jsonl"), ("corpus-order", "order.jsonl"),
        ("corpus-sft", "sft"), ("init", "m"), ("run", "f.safetensors")]],
    *[(c, "after", {"FAULT_AT": AFTER}) for c in ("stats", "select", "graft", "tokenize", "train", "eval", "init",
                                                   "corpus-sft")],
]
SLOW = {"graft-fit-ffn", "graft-fit-down", "train", "run", "tokenize-2", "corpus-tokenizer"}


def _case(c):
    mark = [pytest.mark.slow] if c[0] in SLOW else []
    return pytest.param(*c, id=f"{c[0]}-{c[1]}", marks=mark)


@pytest.mark.parametrize("cmd,moment,fault", [_case(c) for c in CASES])
def test_sigkill_then_again(fx, work, zyg, tmp_path, cli, inputs_digest, cmd, moment, fault):
    before_inputs = inputs_digest()
    argv_of, name = commands(fx, work)[cmd]
    o = tmp_path / "o"
    o.mkdir()
    argv = argv_of(o)
    out = o / name
    run = zyg.start(argv, tmp_path, fault=fault)
    run.wait_ready()
    children = _children(run.pid)
    assert run.kill() == -signal.SIGKILL
    _gone(children)  # a killed tokenize's workers end with it
    # what the kill left: the output is absent or complete; nothing else but the hidden temp of that process
    if cmd == "train":
        assert not (out / "final").exists() or moment == "after"
        steps = sorted(out.glob("step-*")) if out.exists() else []
        assert all((s / "trainer_state.pt").is_file() and complete(s) for s in steps), steps
    elif out.exists():
        assert moment == "after" and complete(out)
    stray = [p for p in leftovers(tmp_path) if str(run.pid) not in p and not _lock_of(tmp_path / p, run.pid)]
    assert not stray, stray
    assert not [p for p in o.iterdir() if not p.name.startswith(".") and p.name != out.name and cmd != "run"]
    # the same command again
    left = out.exists()  # (train: a run directory the killed run had made is resumed, not started over)
    code, so, err = cli(*argv)
    if moment == "after" or (cmd == "train" and left):
        assert_user_error(code, err, "already exists")  # refused clearly: the output is complete, or resumable
        if cmd == "train":
            code, so, err = cli(*argv, "--resume", "auto")
            assert code == 0, err
    else:
        assert code == 0, err
    assert complete(out / "final" if cmd == "train" else out)
    assert leftovers(tmp_path) == [], "a later run clears what the killed one left"
    assert inputs_digest() == before_inputs


def _lock_of(p: Path, pid: int) -> bool:
    """A recipe lock the killed process held: a dead holder's lock stays (the next run takes it over)."""
    return p.name == ".xpertctl-run.lock" and p.is_file() and json.loads(p.read_text()).get("pid") == pid


def _children(pid: int) -> list[int]:
    """The processes a command started (its tokenizer workers)."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(d.name))
    return kids


def _gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.time() + timeout
    for pid in pids:
        while time.time() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                break
            if state in ("Z", "X"):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"process {pid} of the killed command is still running")


@pytest.mark.slow
def test_sigkilled_tokenize_workers_end_with_it(fx, work, zyg, tmp_path):
    """SIGKILL runs no cleanup: the encoder pool's workers must not wait on its queue forever."""
    argv_of, name = commands(fx, work)["tokenize-2"]
    run = zyg.start(argv_of(tmp_path), tmp_path, fault={"FAULT_AT": "xpertctl.tokenizing:SplitWriter.write:after"})
    run.wait_ready()
    workers = _children(run.pid)
    assert len(workers) >= 2, workers
    run.kill()
    _gone(workers)


def test_graft_fit_cache_lives_in_the_output_temp(fx, work, zyg, tmp_path, cli):
    """Issue 29.1: a SIGKILLed `graft --fit ffn` left xpertctl-fit-XXXX/ (not hidden) beside the output, and
    the next run left it there. Its cache now lives in the output's hidden temp, which the next run clears."""
    argv_of, name = commands(fx, work)["graft-fit-ffn"]
    argv = argv_of(tmp_path)
    run = zyg.start(argv, tmp_path, fault={"FAULT_AT": "xpertctl.ops.fit:DiskCache.__call__:after", "FAULT_NTH": "3"})
    run.wait_ready()
    run.kill()
    temp = tmp_path / f".g.tmp-{run.pid}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [temp.name]
    cached = sorted(p.name for p in (temp / "fit-cache").iterdir())
    assert cached and all(p.endswith(".bin") for p in cached)
    code, _, err = cli(*argv)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_fit_down_makes_no_cache(fx, work, cli, tmp_path, monkeypatch):
    """`--fit down` needs no block I/O on disk: it made an empty cache dir (leaked on SIGKILL)."""
    made = []
    import tempfile
    real = tempfile.TemporaryDirectory
    monkeypatch.setattr(tempfile, "TemporaryDirectory", lambda *a, **k: made.append(k) or real(*a, **k))
    argv_of, _ = commands(fx, work)["graft-fit-down"]
    code, _, err = cli(*argv_of(tmp_path))
    assert code == 0, err
    assert not made and sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_train_resume_clears_a_killed_runs_step_temp(fx, work, zyg, tmp_path, cli):
    """A SIGKILL while step 4 was being saved left run/.step-000004.tmp-PID/; resuming from step 2 saves
    step 4 again and from then on, but the dead process's temp stayed."""
    argv_of, _ = commands(fx, work)["train"]
    argv = argv_of(tmp_path)
    run = zyg.start(argv, tmp_path, fault={**STEP_SAVE, "FAULT_NTH": "2"})
    run.wait_ready()
    run.kill()
    assert (tmp_path / "run" / f".step-000004.tmp-{run.pid}").is_dir()
    code, _, err = cli(*argv, "--resume", "auto")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "final", "metrics.jsonl", "step-000002", "step-000004", "train_config.json"]


def test_force_replacing_a_directory_swaps_it_in_one_step(fx, work, zyg, tmp_path, cli):
    """--force over an earlier model directory: killed at the swap, the directory is the old one or the new
    one, never missing; the next run clears the other."""
    argv_of, _ = commands(fx, work)["graft"]
    argv = argv_of(tmp_path)
    assert cli(*argv)[0] == 0
    old = digest(tmp_path / "g")
    run = zyg.start([*argv, "--force", "--seed", "3"], tmp_path, fault={"FAULT_AT": "xpertctl.io.writer:_exchange:after"})
    run.wait_ready()
    run.kill()
    assert complete(tmp_path / "g") and digest(tmp_path / "g") != old  # the new one, complete
    code, _, err = cli(*argv, "--force", "--seed", "3")
    assert code == 0, err
    assert leftovers(tmp_path) == []


# ---- disks that refuse: full, read-only, a file size limit, no permission ------------------------------------

def _root_mount(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the RLIMIT_FSIZE and injected-error cases cover this unprivileged)")
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs; fill(n) leaves n bytes free; read_only() remounts it read-only."""
    d = tmp_path / "small"
    _root_mount(d, "3m")

    class Disk:
        path = d

        def fill(self, free: int) -> None:
            st = os.statvfs(d)
            avail = st.f_bavail * st.f_frsize
            with open(d / "filler", "wb") as f:
                f.write(b"\0" * max(0, avail - free))

        def read_only(self) -> None:
            subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)

        def listing(self) -> list[str]:
            return sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    yield Disk()
    subprocess.run(["umount", "-l", str(d)], check=False)


FULL = [  # (command, bytes left free): each fails part way through its writes
    ("stats", 2000), ("select", 1000), ("decompose", 4000), ("reshape", 4000), ("graft", 40_000),
    ("graft-fit-ffn", 40_000), ("tokenize", 4000), ("train", 100_000), ("eval", 200), ("init", 40_000),
    ("corpus-tokenizer", 4000), ("corpus-sft", 400), ("corpus-cloze", 400),
]


@pytest.mark.parametrize("cmd,free", [pytest.param(*c, id=c[0], marks=[pytest.mark.slow] if c[0] in SLOW else [])
                                      for c in FULL])
def test_full_disk_is_one_line(fx, work, small_disk, cli, inputs_digest, cmd, free):
    before = inputs_digest()
    argv_of, name = commands(fx, work)[cmd]
    small_disk.fill(free)
    code, so, err = cli(*argv_of(small_disk.path))
    assert_user_error(code, err, small_disk.path / name, "No space left on device")
    assert so == ""
    if cmd == "train":  # the run directory (metrics, config, complete step checkpoints) is kept to resume
        assert not (small_disk.path / name / "final").exists() and not leftovers(small_disk.path)
    else:
        assert small_disk.listing() == ["filler"]
    assert inputs_digest() == before


def test_full_disk_keeps_the_earlier_output_on_force(fx, work, small_disk, cli):
    argv_of, name = commands(fx, work)["graft"]
    argv = argv_of(small_disk.path)
    assert cli(*argv)[0] == 0
    old = digest(small_disk.path / name)
    small_disk.fill(20_000)
    code, _, err = cli(*argv, "--force", "--dtype", "float32")
    assert_user_error(code, err, small_disk.path / name, "No space left on device")
    assert digest(small_disk.path / name) == old and small_disk.listing() == sorted(
        ["filler", name, *(f"{name}/{p.name}" for p in (small_disk.path / name).iterdir())])


READ_ONLY = ["stats", "select", "graft", "graft-fit-ffn", "tokenize", "train", "eval", "init", "corpus-sft", "run"]


@pytest.mark.parametrize("cmd", READ_ONLY)
def test_read_only_disk_is_refused_before_any_work(fx, work, small_disk, cli, cmd, monkeypatch):
    argv_of, name = commands(fx, work)[cmd]
    small_disk.read_only()
    from xpertctl.ops import capture
    monkeypatch.setattr(capture, "run", lambda *a, **k: pytest.fail("the model ran before the refusal"))
    code, so, err = cli(*argv_of(small_disk.path))
    assert_user_error(code, err, "Read-only file system")
    assert so == "" and small_disk.listing() == []


FSIZE = [("stats", 1000), ("graft", 30_000), ("train", 60_000), ("tokenize", 3000), ("init", 30_000)]


@pytest.mark.parametrize("cmd,limit", [pytest.param(*c, id=c[0], marks=[pytest.mark.slow] if c[0] in SLOW else [])
                                       for c in FSIZE])
def test_file_size_limit_is_one_line(fx, work, zyg, tmp_path, cmd, limit):
    """Unprivileged stand-in for a full disk: RLIMIT_FSIZE makes a write past the limit fail (EFBIG)."""
    argv_of, name = commands(fx, work)[cmd]
    code, so, err = zyg.run(argv_of(tmp_path), tmp_path, fsize=limit)
    assert_user_error(code, err, tmp_path / name, "File too large")
    if cmd != "train":
        assert [p.name for p in tmp_path.iterdir()] == []
    assert leftovers(tmp_path) == []


def test_permission_denied_in_safetensors_is_one_line(fx, work, cli, tmp_path, monkeypatch):
    """safetensors reports an OS error in its own exception type, with the code in the message."""
    from safetensors import SafetensorError
    import xpertctl.io.writer as w

    def refuse(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")
    monkeypatch.setattr(w, "save_file", refuse)
    argv_of, name = commands(fx, work)["stats"]
    code, so, err = cli(*argv_of(tmp_path))
    assert_user_error(code, err, tmp_path / name, "Permission denied")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_quota_in_torch_save_is_one_line(fx, work, cli, tmp_path, monkeypatch):
    """torch.save reports a failed write as "unexpected pos" (a RuntimeError); the OSError behind it is the cause."""
    import torch
    real = torch.save

    def over_quota(obj, f, *a, **k):
        try:
            f.write(b"x" * 100) if hasattr(f, "write") else Path(f).write_bytes(b"x" * 100)
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(torch, "save", over_quota)
    argv_of, name = commands(fx, work)["train"]
    code, so, err = cli(*argv_of(tmp_path))
    monkeypatch.setattr(torch, "save", real)
    assert_user_error(code, err, tmp_path / name / "step-000002", "quota")
    assert leftovers(tmp_path) == [] and not (tmp_path / name / "step-000002").exists()


def test_full_disk_while_caching_the_fit_is_one_line(fx, work, cli, tmp_path, monkeypatch):
    from xpertctl.ops import fit
    real = fit.DiskCache.__call__

    def full(self, *a, **k):
        real(self, *a, **k)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(fit.DiskCache, "__call__", full)
    argv_of, name = commands(fx, work)["graft-fit-ffn"]
    code, so, err = cli(*argv_of(tmp_path))
    assert_user_error(code, err, tmp_path / name, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_full_disk_while_appending_metrics_is_one_line(fx, work, cli, tmp_path, monkeypatch):
    """A write no output's own writer reports (train's metrics log) is still one line naming a path."""
    import builtins
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, s):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, k):
            return getattr(self.f, k)

    def fake_open(p, mode="r", *a, **k):
        f = real_open(p, mode, *a, **k)
        return Full(f) if str(p).endswith("metrics.jsonl") and "a" in mode else f
    monkeypatch.setattr(builtins, "open", fake_open)
    argv_of, name = commands(fx, work)["train"]
    code, so, err = cli(*argv_of(tmp_path))
    assert_user_error(code, err, tmp_path / name, "No space left on device")


# ---- file modes: the umask's, for train's checkpoints too (issue 29.8) -------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mask,fmode,dmode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_train_checkpoints_follow_the_umask(fx, work, cli, tmp_path, mask, fmode, dmode):
    argv_of, name = commands(fx, work)["train"]
    old = os.umask(mask)
    try:
        code, _, err = cli(*argv_of(tmp_path))
    finally:
        os.umask(old)
    assert code == 0, err
    files = [p for p in (tmp_path / name).rglob("*") if p.parent != tmp_path / name or p.is_dir()]
    assert {p.name for p in files} >= {"model.safetensors", "trainer_state.pt", "config.json", "final"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == (dmode if p.is_dir() else fmode), p


def test_every_output_kind_follows_the_umask(fx, work, cli, tmp_path):
    old = os.umask(0o027)
    try:
        for cmd in ("graft", "init", "corpus-tokenizer"):
            argv_of, name = commands(fx, work)[cmd]
            code, _, err = cli(*argv_of(tmp_path))
            assert code == 0, err
    finally:
        os.umask(old)
    for p in tmp_path.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (0o750 if p.is_dir() else 0o640), p


# ---- a closed stdout (issue 29.9) ----------------------------------------------------------------------------

@pytest.mark.parametrize("cmd,extra", [("select", ["--json"]), ("select", []), ("eval", [])])
def test_closed_stdout_ends_like_git(fx, work, zyg, tmp_path, cmd, extra):
    """`xpertctl ... | head -c 10`: the work and the output complete, nothing on stderr, and the process ends
    killed by SIGPIPE as git and coreutils do (a shell shows 141), not with a silent exit 1."""
    argv_of, name = commands(fx, work)[cmd]
    argv = argv_of(tmp_path) + extra
    if cmd == "eval":
        argv = argv[:-2]  # no -o: the results are the output, on stdout
    code, so, err = zyg.run(argv, tmp_path, stdout_closed=True)
    assert code == -signal.SIGPIPE, err
    assert "Traceback" not in err and "Broken" not in err and "rror" not in err
    if cmd == "select":
        assert err == ""
    if "-o" in argv:
        assert complete(tmp_path / name)


@pytest.mark.slow
def test_closed_stdout_in_a_shell_pipeline_is_141(work, tmp_path):
    import xpertctl
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(xpertctl.__file__).parents[1])}
    script = (f"{sys.executable} -m xpertctl select {work / 's.safetensors'} -o {tmp_path / 'x.json'} | true; "
              "echo ${PIPESTATUS[0]}")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert r.stdout.strip() == "141" and r.stderr == ""
    assert complete(tmp_path / "x.json")


# ---- the tokenizer pool (issue 29.10) ------------------------------------------------------------------------

# sha256 of the .bin and .idx files (name + bytes, sorted) for TOKENIZE_INPUT, made by the code before the
# change (commit 9cf464d, fork pool), with --workers 1 and 2 alike
TODAY = "951d45151dc7204658be779e33789e6327416c0ef8b0c99a4d4361a0a2b606b9"


@pytest.mark.parametrize("workers", [1, 2])
def test_tokenize_bytes_do_not_change(tmp_path, monkeypatch, workers):
    from xpertctl import data, tokenizing
    monkeypatch.setattr(tokenizing, "BATCH_DOCS", 40)  # many batches: the order workers finish in must not show
    for name in ("code", "legal"):
        shutil.copy(CORPUS / "train" / f"{name}.txt", tmp_path / f"{name}.txt")
    out = data.tokenize(ROOT / "fixtures" / "teacher", [f"{n}={tmp_path / n}.txt" for n in ("code", "legal")],
                        tmp_path / "td", val_pct=10, test_pct=10, workers=workers)
    h = hashlib.sha256()
    for p in sorted(out.glob("*.bin")) + sorted(out.glob("*.idx")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    assert h.hexdigest() == TODAY


def test_tokenize_pool_does_not_fork(fx, tmp_path, monkeypatch):
    """A fork of a process whose libraries started threads can hang (seen once under load): the pool is
    spawned (or forkserver), never forked."""
    import multiprocessing
    from xpertctl import data
    asked = []
    real = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: asked.append(method) or real(method))
    (tmp_path / "a.txt").write_text(TEXTS["law"])
    data.tokenize(fx / "llama", [f"a={tmp_path / 'a.txt'}"], tmp_path / "td", workers=2)
    assert asked and all(m in ("spawn", "forkserver") for m in asked), asked
