"""The failure contract, table-driven over every subcommand: exit 2, one line on stderr naming the
file/field and the problem, no traceback, no partial output anywhere, inputs byte-for-byte unchanged."""
import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, assert_user_error, stats_file

MINI = ROOT / "fixtures" / "corpus-mini"


class Env:
    """Builds the inputs of one case inside its own directory."""

    def __init__(self, fx: Path, d: Path):
        self.fx, self.d = fx, d
        self.d.mkdir(parents=True, exist_ok=True)

    def copy(self, name: str) -> Path:
        dst = self.d / name.replace("/", "_")
        shutil.copytree(self.fx / name, dst)
        return dst

    def text(self, name: str, content: str | bytes) -> Path:
        p = self.d / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        return p

    def selection(self, ck_dir: Path, experts, name="sel.json", source=None) -> Path:
        from xpertctl.io import open_checkpoint
        ck = open_checkpoint(ck_dir)
        doc = {"criterion": "x", "per_layer": len(experts), "source": source or ck.fingerprint,
               "num_experts": ck.num_experts, "layers": [{"layer": i, "experts": experts} for i in ck.moe_layers]}
        return self.text(name, json.dumps(doc))

    def stats(self) -> Path:
        return stats_file(self.d, [[[9, 4, 1, 3]], [[1, 4, 8, 3]]], [10, 10])


def truncated(e):
    p = e.d / "t.safetensors"
    p.write_bytes((e.fx / "olmoe" / "model.safetensors").read_bytes()[:-64])
    return p


def lying(e):
    raw = (e.fx / "olmoe" / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8:8 + n])
    k = sorted(x for x in hdr if x != "__metadata__")[-1]
    hdr[k]["data_offsets"] = [hdr[k]["data_offsets"][0], hdr[k]["data_offsets"][1] + 4096]
    body = json.dumps(hdr).encode()
    p = e.d / "lie.safetensors"
    p.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    return p


def missing_shard(e):
    d = e.copy("olmoe-sharded")
    sorted(d.glob("model-*.safetensors"))[2].unlink()
    return d


def unknown_family(e):
    d = e.copy("olmoe")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_bigcode"
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def nan_model(e):
    d = e.copy("olmoe")
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.1.mlp.experts.2.down_proj.weight"][3, 3] = float("inf")
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def factors(e):
    from xpertctl.ops import decompose
    from xpertctl.io import open_checkpoint, provenance
    ck = open_checkpoint(e.fx / "olmoe")
    doc = json.loads(e.selection(e.fx / "olmoe", [0, 1], "fsel.json").read_text())
    t, meta = decompose.compute(ck, doc, "x")
    p = e.d / "f.safetensors"
    save_file(t, str(p), metadata={"format": "pt", **provenance.as_metadata(provenance.record("factors", [], {}, **meta))})
    return p


def adapted(e):
    from xpertctl.cli import main  # noqa: F401  (reshape through the library API)
    from xpertctl.ops import reshape
    from xpertctl.specs import Target
    p = e.d / "a.safetensors"
    reshape.run(factors(e), Target(2), p, rescale="none")  # setup: no notice on stderr
    return p


def tokdata(e):
    from xpertctl import data
    text = "\n\n".join(f"the law shall apply to every holder {n}" for n in range(60))
    return data.tokenize(e.fx / "llama", [f"a={e.text('c.txt', text)}"], e.d / "data")


def other_tokenizer_model(e):
    d = e.copy("llama")
    tj = json.loads((d / "tokenizer.json").read_text())
    v = tj["model"]["vocab"]
    v["zzz"] = v.pop(next(k for k in v if k.isalpha()))
    (d / "tokenizer.json").write_text(json.dumps(tj))
    return d


def recipe(e, step):
    return e.text("r.yaml", json.dumps({"name": "r", "steps": [
        {"id": "a", "op": "corpus cloze", "args": {"corpus": str(MINI), "out": str(e.d / "o" / "c.jsonl")}}, step]}))


def enospc(monkeypatch):
    import xpertctl.io.writer as w

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(w, "save_file", full)


# (id, argv maker, needles, optional patch). Outputs go to e.d / "o" / ...: it must not exist afterwards.
CASES = [
    ("inspect-missing", lambda e: ["inspect", e.d / "nope"], ["nope", "no such file"]),
    ("inspect-no-weights", lambda e: ["inspect", e.text("x", "") and e.d], ["no model.safetensors"]),
    ("inspect-truncated", lambda e: ["inspect", truncated(e)], ["t.safetensors", "truncated"]),
    ("inspect-lying-header", lambda e: ["inspect", lying(e)], ["lie.safetensors", "outside the file"]),
    ("inspect-missing-shard", lambda e: ["inspect", missing_shard(e)], ["index.json", "missing"]),
    ("inspect-unknown-family", lambda e: ["inspect", unknown_family(e)], ["unsupported model_type 'gpt_bigcode'"]),
    ("inspect-bin-weights", lambda e: ["inspect", e.text("pytorch_model.bin", "x") and e.d], ["convert to safetensors"]),
    ("stats-dense", lambda e: ["stats", e.fx / "llama", "-d", f"a={e.text('a.txt', 'hello there')}",
                               "-o", e.d / "o.safetensors"], ["dense llama", "needs an MoE"]),
    ("stats-empty-corpus", lambda e: ["stats", e.fx / "olmoe", "-d", f"a={e.text('a.txt', '  ')}",
                                      "-o", e.d / "o.safetensors"], ["a.txt", "empty corpus"]),
    ("stats-binary-corpus", lambda e: ["stats", e.fx / "olmoe", "-d", f"a={e.text('a.txt', bytes(range(256)))}",
                                       "-o", e.d / "o.safetensors"], ["a.txt", "binary"]),
    ("stats-unknown-type", lambda e: ["stats", e.fx / "olmoe", "-d", f"a={e.text('a.docx', 'x')}",
                                      "-o", e.d / "o.safetensors"], ["a.docx", "unknown corpus file type"]),
    ("stats-seq-len", lambda e: ["stats", e.fx / "olmoe", "-d", f"a={e.text('a.txt', 'the law')}", "--seq-len", "9999",
                                 "-o", e.d / "o.safetensors"], ["--seq-len 9999"]),
    ("select-not-stats", lambda e: ["select", e.fx / "olmoe" / "model.safetensors", "-o", e.d / "o.json"],
     ["model.safetensors", "not an xpertctl artifact"]),
    ("select-per-layer", lambda e: ["select", e.stats(), "--per-layer", "5", "-o", e.d / "o.json"], ["--per-layer 5"]),
    ("select-exists", lambda e: ["select", e.stats(), "-o", e.text("o.json", "{}")], ["o.json", "already exists"]),
    ("select-no-space", lambda e: ["select", e.stats(), "-o", e.d / "o.json"], [], "enospc-json"),
    ("decompose-nan", lambda e: ["decompose", nan_model(e), e.selection(e.d / "olmoe", [1, 2]), "-o", e.d / "o.st"],
     ["expert 2 of layer 1 has NaN or Inf"]),
    ("decompose-other-model", lambda e: ["decompose", e.fx / "olmoe", e.selection(e.fx / "qwen3_moe", [0, 1]),
                                         "-o", e.d / "o.st"], ["sel.json", "another model"]),
    ("decompose-out-of-range", lambda e: ["decompose", e.fx / "olmoe", e.selection(e.fx / "olmoe", [0, 8]),
                                          "-o", e.d / "o.st"], ["sel.json", "[8] out of range"]),
    ("decompose-ranks", lambda e: ["decompose", e.fx / "olmoe", e.selection(e.fx / "olmoe", [0, 1]), "--ranks",
                                   "99,full,1", "-o", e.d / "o.st"], ["rank 99 of mode 1 exceeds its size 16"]),
    ("decompose-bad-json", lambda e: ["decompose", e.fx / "olmoe", e.text("s.json", '{"layers": [{"lay'),
                                      "-o", e.d / "o.st"], ["s.json", "not valid JSON"]),
    ("decompose-no-space", lambda e: ["decompose", e.fx / "olmoe", e.selection(e.fx / "olmoe", [0, 1]),
                                      "-o", e.d / "o.st"], ["o.st", "No space left"], "enospc"),
    ("reshape-bad-spec", lambda e: ["reshape", factors(e), "--target", "twelve", "-o", e.d / "o.st"], ["--target 'twelve'"]),
    ("reshape-wider", lambda e: ["reshape", factors(e), "--target", "2L,d64", "-o", e.d / "o.st"], ["hidden 64 is wider"]),
    ("reshape-wrong-kind", lambda e: ["reshape", e.stats(), "--target", "2L", "-o", e.d / "o.st"],
     ["is a 'stats' artifact, expected 'factors'"]),
    ("graft-out-is-input", lambda e: ["graft", e.copy("mixtral"), "-t", "2L", "-o", e.d / "mixtral"],
     ["overwrite the input"]),
    ("graft-bad-inherit", lambda e: ["graft", e.fx / "mixtral", "-t", "2L", "--inherit", "everything",
                                     "-o", e.d / "o"], ["'everything' is not one of"]),
    ("graft-target-mismatch", lambda e: ["graft", adapted(e), "-t", "3L", "-o", e.d / "o"], ["was adapted to"]),
    ("graft-no-space", lambda e: ["graft", e.fx / "mixtral", "-t", "2L", "--selection", e.selection(e.fx / "mixtral", [0, 1]),
                                  "-o", e.d / "o"], ["No space left", "nothing was written"], "enospc"),
    ("fidelity-dense-student-without-provenance", lambda e: ["fidelity", e.fx / "olmoe", e.fx / "llama", "-d",
                                                              f"a={e.text('c.txt', 'the law shall apply')}", "-o", e.d / "f.json"],
     ["llama", "no xpertctl graft provenance"]),
    ("fidelity-moe-student", lambda e: ["fidelity", e.fx / "olmoe", e.fx / "mixtral", "-d",
                                        f"a={e.text('c.txt', 'the law shall apply')}", "-o", e.d / "f.json"],
     ["mixtral", "an MoE checkpoint"]),
    ("families-extra-argument", lambda e: ["families", "olmoe"], ["unexpected extra argument"]),
    ("tokenize-empty", lambda e: ["tokenize", "--tokenizer", e.fx / "llama", "-d", f"a={e.text('a.jsonl', '')}",
                                  "-o", e.d / "o"], ["a.jsonl", "empty corpus"]),
    ("train-other-tokenizer", lambda e: ["train", other_tokenizer_model(e), "--data", tokdata(e), "--steps", "1",
                                         "-o", e.d / "o"], ["another tokenizer"]),
    ("train-not-causal", lambda e: ["train", e.text("config.json", json.dumps(
        {"model_type": "bert", "architectures": ["BertForMaskedLM"]})) and e.d, "--data", tokdata(e), "--steps", "1",
        "-o", e.d / "o"], ["not a causal LM"]),
    ("eval-bad-record", lambda e: ["eval", e.fx / "llama", "--task", f"mc:{e.text('t.jsonl', chr(10).join([json.dumps({'context': 'a', 'choices': ['b'], 'label': 0}), '{broken']))}",
                                   "-o", e.d / "o.json"], ["t.jsonl:2", "not valid JSON"]),
    ("eval-label-range", lambda e: ["eval", e.fx / "llama", "--task", f"mc:{e.text('t.jsonl', json.dumps({'context': 'a', 'choices': ['b', 'c'], 'label': 2}))}",
                                    "-o", e.d / "o.json"], ["t.jsonl:1", "label 2 out of range"]),
    ("eval-bad-task", lambda e: ["eval", e.fx / "llama", "--task", "bleu:x.jsonl", "-o", e.d / "o.json"], ["--task 'bleu:x.jsonl'"]),
    ("run-unknown-op", lambda e: ["run", recipe(e, {"id": "b", "op": "transmogrify", "args": {}})],
     ["r.yaml", "unknown op 'transmogrify'"]),
    ("run-missing-step-ref", lambda e: ["run", recipe(e, {"id": "b", "op": "select", "args": {
        "stats_file": "${steps.zzz.out}", "out": str(e.d / "o" / "s.json")}})], ["r.yaml", "step 'b'", "${steps.zzz.out}"]),
    ("corpus-cloze-not-corpus", lambda e: ["corpus", "cloze", e.d, "-o", e.d / "o.jsonl"], ["no train/*.txt"]),
    ("corpus-order-not-corpus", lambda e: ["corpus", "order", e.d, "-o", e.d / "o.jsonl"], ["no train/*.txt"]),
    ("corpus-sft-not-corpus", lambda e: ["corpus", "sft", e.d, "-o", e.d / "sft"], ["no train/*.txt"]),
    ("corpus-tokenizer-not-corpus", lambda e: ["corpus", "tokenizer", e.d, "-o", e.d / "tok"], ["no train/*.txt"]),
    ("corpus-build-exists", lambda e: ["corpus", "build", "-o", e.d], ["already exists"]),
    ("init-unknown-family", lambda e: ["init", "bert", "--tokenizer", e.fx / "llama", "-o", e.d / "m"],
     ["'bert' is not one of"]),
    ("report-no-results", lambda e: ["report", "--results", str(e.d / "nothing-*.json"), "-o", e.d / "rep"],
     ["--results", "no result files match"]),
]


def _digest(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_contract(fx, tmp_path, cli, monkeypatch, case):
    name, make, needles, *patch = case
    e = Env(fx, tmp_path / "in")
    argv = [str(a) for a in make(e)]
    if patch and patch[0] in ("enospc", "enospc-json"):
        enospc(monkeypatch)
        if patch[0] == "enospc-json":  # JSON outputs: fail their write the same way
            import xpertctl.io.writer as w
            real = w.atomic_path

            def failing(out, force):
                import contextlib

                @contextlib.contextmanager
                def cm():
                    with real(out, force) as tmp:
                        yield tmp
                        raise OSError(28, "No space left on device")
                return cm()
            monkeypatch.setattr(w, "atomic_path", failing)
            needles = ["o.json", "No space left"]
    before_in, before_fx = _digest(e.d), _digest(fx)
    listing = set(p for p in e.d.rglob("*"))
    code, out, err = cli(*argv)
    assert_user_error(code, err, *needles)
    assert out == ""
    # no partial output anywhere: nothing new in the case dir (temp files included)
    assert set(p for p in e.d.rglob("*")) == listing, set(e.d.rglob("*")) - listing
    assert _digest(e.d) == before_in and _digest(fx) == before_fx


def _commands():
    """Every (sub)command of the CLI, as the words that call it: ('inspect',), ('corpus', 'cloze'), ..."""
    import typer
    from xpertctl.cli import app

    def walk(cmd, prefix):
        subs = getattr(cmd, "commands", None)
        if not subs:
            return [prefix]
        return [w for name, sub in subs.items() for w in walk(sub, prefix + (name,))]
    return walk(typer.main.get_command(app), ())


def test_every_command_has_a_case_and_each_case_runs_its_command(fx, tmp_path):
    """The matrix covers every command of the CLI (read from the app, not a list kept by hand), and a
    case named after a command really calls that command."""
    commands = _commands()
    assert len(commands) >= 14
    covered = set()
    for n, (name, make, *_rest) in enumerate(CASES):
        argv = [str(a) for a in make(Env(fx, tmp_path / f"c{n}"))]
        cmd = next((c for c in commands if tuple(argv[: len(c)]) == c), None)
        assert cmd is not None, (name, argv[:2])
        assert name.startswith("-".join(cmd) + "-"), (name, cmd)  # the id names the command it runs
        covered.add(cmd)
    assert set(commands) - covered == set()
