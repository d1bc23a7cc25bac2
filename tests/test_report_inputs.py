"""report (issue 19.5): each eval JSON is paired with its run only while the run's model is the one it
evaluated; perplexities carry their split's name; options naming nothing are one-line errors; every
input left out is named."""
import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_user_error


def _header_sha(path):
    """Independent of xpertctl: eval's model fingerprint of a one-file model directory, for a small file:
    sha256 of the header bytes, the data section's length and the data itself (a large file's data is
    sampled; these are far below the sample size)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    data = raw[8 + n:]
    assert len(data) <= 9 * 65536
    return hashlib.sha256(raw[8:8 + n] + f"\0{len(data)}\0".encode() + data).hexdigest()


def _run(root, arm, seed, loss, split="test"):
    run = root / "runs" / f"{arm}-2L-s{seed}"
    (run / "final").mkdir(parents=True)
    save_file({"w": torch.full((2,), float(seed) + loss)}, str(run / "final" / "model.safetensors"),
              metadata={"format": "pt", "xpertctl": json.dumps({"kind": "train", "params": {"lr": 0.002}})})
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": loss + 1, "val_loss": loss + 1 / s})
                                               + "\n" for s in (1, 2)))
    ev = root / "eval" / f"{arm}-2L-s{seed}.json"
    ev.parent.mkdir(exist_ok=True)
    ev.write_text(json.dumps({"model": {"path": str(run / "final"), "sha256": _header_sha(run / "final" / "model.safetensors")},
                              "tasks": {"ppl:data": {"legal": {"nll": loss}, "code": {"nll": loss + 0.5}},
                                        "mc:c.jsonl": {"acc": 0.5, "acc_norm": 0.5}},
                              "xpertctl": {"kind": "eval", "params": {"split": split}}}))
    return run, ev


@pytest.fixture
def runs(tmp_path):
    for seed in (0, 1, 2):
        _run(tmp_path, "xpert", seed, 3.0 + seed / 10)
        _run(tmp_path, "scratch", seed, 3.5 + seed / 10)
    return tmp_path


def _report(cli, root, *extra):
    return cli("report", "--results", str(root / "eval" / "*.json"), "-o", root / "rep", *extra)


def test_an_eval_of_a_model_since_retrained_is_left_out_and_named(runs, cli):
    final = runs / "runs" / "xpert-2L-s2" / "final" / "model.safetensors"
    # train --force with another option: a new model (its provenance differs), the old eval stays
    save_file({"w": torch.full((2,), 99.0)}, str(final),
              metadata={"format": "pt", "xpertctl": json.dumps({"kind": "train", "params": {"lr": 0.001}})})
    code, out, err = _report(cli, runs)
    assert code == 0, err
    assert "xpert-2L-s2.json" in err and "ignored" in err
    text = (runs / "rep" / "REPORT.md").read_text()
    assert "| 2 | xpert | 2 |" in text and "| 2 | scratch | 3 |" in text  # seed 2 of xpert left out
    ignored = text.split("## Inputs ignored")[1]
    assert "xpert-2L-s2.json" in ignored


def test_perplexity_is_labelled_with_its_split(tmp_path, cli):
    for seed in (0, 1):
        _run(tmp_path, "xpert", seed, 3.0, split="val")
        _run(tmp_path, "scratch", seed, 3.2, split="val")
    code, out, err = _report(cli, tmp_path)
    assert code == 0, err
    text = (tmp_path / "rep" / "REPORT.md").read_text()
    assert "| val ppl |" in text and "test ppl" not in text and "Test perplexity" not in text
    assert "Val perplexity per domain" in text


def test_results_of_mixed_splits_are_refused(tmp_path, cli):
    _run(tmp_path, "xpert", 0, 3.0, split="val")
    _run(tmp_path, "scratch", 0, 3.2, split="test")
    code, out, err = _report(cli, tmp_path)
    assert_user_error(code, err, "val", "test")
    assert not (tmp_path / "rep").exists()


def _selection(root):
    p = root / "selection.json"
    p.write_text(json.dumps({"criterion": "min", "layers": [{"layer": 0, "experts": [1, 2]}]}))
    return p


@pytest.mark.parametrize("extra,needles", [
    (lambda r: ["--baseline", "scrach"], ["--baseline 'scrach'", "scratch", "xpert"]),
    (lambda r: ["--teacher", r / "nonexist.json"], ["--teacher", "nonexist.json", "no such file"]),
    (lambda r: ["--teacher", _selection(r)], ["--teacher", "selection.json", "not an `xpertctl eval`"]),
    (lambda r: ["--fidelity", str(r / "nomatch*")], ["--fidelity", "nomatch*", "no files match"]),
    (lambda r: ["--contrast", "xpert:foo"], ["--contrast 'xpert:foo'", "'foo'"]),
])
def test_options_naming_nothing_are_one_line_errors(runs, cli, extra, needles):
    code, out, err = _report(cli, runs, *extra(runs))
    assert_user_error(code, err, *needles)
    assert not (runs / "rep").exists() and out == ""


def test_a_fidelity_file_of_no_run_is_named_as_ignored(runs, cli):
    fid = runs / "fid"
    fid.mkdir()
    rows = {"layers": [{"rel_error": 0.5}, {"rel_error": 0.7}]}
    (fid / "xpert-2L-s0.json").write_text(json.dumps(rows))
    (fid / "xpert-4L-s0.json").write_text(json.dumps(rows))  # no 4-layer run
    code, out, err = _report(cli, runs, "--fidelity", str(fid / "*.json"))
    assert code == 0, err
    assert "xpert-4L-s0.json" in err
    text = (runs / "rep" / "REPORT.md").read_text()
    assert "0.600" in text and "xpert-4L-s0.json" in text.split("## Inputs ignored")[1]


def test_report_force_replaces_only_a_report(runs, cli):
    (runs / "rep").mkdir()
    (runs / "rep" / "draft.md").write_text("mine")
    code, out, err = _report(cli, runs, "--force")
    assert_user_error(code, err, "rep", "not an earlier output")
    assert (runs / "rep" / "draft.md").read_text() == "mine"
    code, out, err = cli("report", "--results", str(runs / "eval" / "*.json"), "-o", runs / "eval", "--force")
    assert_user_error(code, err, "input")


def test_an_eval_whose_run_is_gone_is_left_out_and_named(runs, cli):
    import shutil
    shutil.rmtree(runs / "runs" / "scratch-2L-s1")
    code, out, err = _report(cli, runs)
    assert code == 0, err
    assert "scratch-2L-s1.json" in err
    text = (runs / "rep" / "REPORT.md").read_text()
    assert "| 2 | scratch | 2 |" in text and "scratch-2L-s1.json" in text.split("## Inputs ignored")[1]


def test_no_usable_result_is_a_one_line_error(tmp_path, cli):
    import shutil
    _run(tmp_path, "scratch", 0, 3.0)
    shutil.rmtree(tmp_path / "runs")
    code, out, err = _report(cli, tmp_path)
    assert_user_error(code, err, "--results", "no usable result", "scratch-2L-s0.json")
    assert not (tmp_path / "rep").exists()
