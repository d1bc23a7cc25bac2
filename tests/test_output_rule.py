"""The one output rule (issue 19.1, 19.2, 19.12): an output never equals, contains or lies inside an
input; a directory is never replaced by a file; --force replaces only an earlier output of the same
kind; the current directory is never an output; side outputs (select --plot) follow the same rule;
safetensors files follow the umask; names from user text stay one path component."""
import hashlib
import os
import stat

import pytest
import torch

from conftest import assert_user_error, stats_file
from xpertctl.errors import XpertError


def _tree(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def st(tmp_path):
    return stats_file(tmp_path, [[[9, 4, 1, 3]], [[1, 4, 8, 3]]], [10, 10])


def test_plot_onto_its_input_is_refused(st, cli, tmp_path):
    before = st.read_bytes()
    code, out, err = cli("select", st, "-o", tmp_path / "s.json", "--plot", st)
    assert_user_error(code, err, str(st), "input")
    assert st.read_bytes() == before and not (tmp_path / "s.json").exists() and out == ""


def test_plot_onto_an_existing_file_needs_force(st, cli, tmp_path):
    old = tmp_path / "old.png"
    old.write_bytes(b"keep me")
    code, _, err = cli("select", st, "-o", tmp_path / "s.json", "--plot", old)
    assert_user_error(code, err, "old.png", "already exists")
    assert old.read_bytes() == b"keep me" and not (tmp_path / "s.json").exists()
    code, _, err = cli("select", st, "-o", tmp_path / "s.json", "--plot", old, "--force")
    assert code == 0, err
    assert old.read_bytes()[:4] == b"\x89PNG"


def test_plot_and_selection_on_one_path_is_refused(st, cli, tmp_path):
    code, _, err = cli("select", st, "-o", tmp_path / "x.png", "--plot", tmp_path / "x.png")
    assert_user_error(code, err, "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("suffix,magic", [(".jpg", b"\xff\xd8\xff"), (".jpeg", b"\xff\xd8\xff"), (".png", b"\x89PNG"),
                                          (".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_plot_bytes_are_the_format_its_name_says(st, cli, tmp_path, suffix, magic):
    p = tmp_path / f"p{suffix}"
    code, _, err = cli("select", st, "--plot", p)
    assert code == 0, err
    assert p.read_bytes()[: len(magic)] == magic


def test_plot_of_an_unknown_format_is_refused(st, cli, tmp_path):
    code, _, err = cli("select", st, "--plot", tmp_path / "p.txt")
    assert_user_error(code, err, "p.txt", ".png")
    assert not (tmp_path / "p.txt").exists()


def test_a_file_output_never_replaces_a_directory_even_with_force(st, cli, tmp_path):
    d = tmp_path / "outdir"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    (d / "sub").mkdir()
    (d / "sub" / "more.txt").write_text("also mine")
    before = _tree(d)
    code, out, err = cli("select", st, "-o", d, "--force")
    assert_user_error(code, err, "outdir", "directory")
    assert _tree(d) == before and out == ""
    code, _, err = cli("select", st, "-o", f"{d}/", "--force")
    assert_user_error(code, err, "directory")
    assert _tree(d) == before


def test_output_on_the_current_directory_is_a_one_line_error(st, cli, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for target in ("./", ".", str(work), str(tmp_path)):
        code, out, err = cli("select", st, "-o", target, "--force")
        assert_user_error(code, err, "current directory")
        assert (work / "keep.txt").read_text() == "x" and out == ""


def test_directory_output_with_force_replaces_only_its_own_kind(fx, cli, tmp_path):
    # init writes a model directory: --force replaces an earlier model directory, never a directory of
    # other files, an empty directory is fine, and a file is never replaced by a directory
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    before = _tree(other)
    code, _, err = cli("init", "llama", "--tokenizer", fx / "llama", "--layers", "1", "--hidden", "16", "--ffn", "16",
                       "--heads", "2", "-o", other, "--force")
    assert_user_error(code, err, "other", "not an earlier output")
    assert _tree(other) == before
    f = tmp_path / "file"
    f.write_text("a file")
    code, _, err = cli("init", "llama", "--tokenizer", fx / "llama", "--layers", "1", "--hidden", "16", "--ffn", "16",
                       "--heads", "2", "-o", f, "--force")
    assert_user_error(code, err, "is a file")
    assert f.read_text() == "a file"
    m = tmp_path / "m"
    m.mkdir()  # empty: nothing to lose
    for seed in ("0", "1"):
        code, _, err = cli("init", "llama", "--tokenizer", fx / "llama", "--layers", "1", "--hidden", "16",
                           "--ffn", "16", "--heads", "2", "--seed", seed, "-o", m, "--force")
        assert code == 0, err
        assert (m / "config.json").is_file()


def test_train_force_never_removes_a_directory_of_other_files(fx, cli, tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "results.csv").write_text("precious")
    code, _, err = cli("train", fx / "llama", "--data", tmp_path / "nodata", "--steps", "1", "-o", d, "--force")
    assert_user_error(code, err, "run", "not an earlier output")
    assert (d / "results.csv").read_text() == "precious"


def test_output_holding_or_inside_an_input_is_refused(st, cli, tmp_path):
    code, _, err = cli("select", st, "-o", tmp_path, "--force")  # the directory that holds the stats
    assert_user_error(code, err, "input")
    assert st.exists()
    code, _, err = cli("select", st, "-o", st / "x.json")
    assert code == 2


def test_safetensors_outputs_follow_the_umask(tmp_path):
    from xpertctl.io.writer import write_safetensors
    old = os.umask(0o022)
    try:
        p = write_safetensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)}, {})
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.umask(0o027)
        q = write_safetensors(tmp_path / "b.safetensors", {"x": torch.zeros(2)}, {})
        assert stat.S_IMODE(q.stat().st_mode) == 0o640
    finally:
        os.umask(old)
    j = tmp_path / "ref.json"  # every other output: what open() gives under the same umask
    j.write_text("{}")
    assert stat.S_IMODE(j.stat().st_mode) == 0o644


def test_artifact_kind_message_uses_an_before_a_vowel(tmp_path):
    from xpertctl.io import provenance
    p = stats_file(tmp_path, [[[1, 2]]], [3])
    with pytest.raises(XpertError, match=r"is a stats file, expected a factors file"):
        provenance.read(p, "factors")
    rec = provenance.record("adapted", [], {})
    from safetensors.torch import save_file
    q = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(1)}, str(q), metadata={"format": "pt", **provenance.as_metadata(rec)})
    with pytest.raises(XpertError, match=r"is an adapted file, expected a factors file"):
        provenance.read(q, "factors")


@pytest.mark.parametrize("bad", ["../x", "a/b", "/abs", ".hidden", "-flag", "", "a b", "x\0y", "..", "a\\b"])
def test_check_name_refuses_what_is_not_one_path_component(bad):
    from xpertctl.io.names import check_name
    with pytest.raises(XpertError, match="step id"):
        check_name(bad, "step id")


@pytest.mark.parametrize("good", ["train-xpert-3L-s0", "selection_min", "eval-norm-matched-2L-s12", "a.b", "x=1"])
def test_check_name_keeps_ordinary_names(good):
    from xpertctl.io.names import check_name
    assert check_name(good, "step id") == good


def test_fidelity_json_records_resolved_paths_under_the_xpertctl_key(fx, cli, tmp_path, monkeypatch):
    import json
    import shutil
    from xpertctl.io import open_checkpoint
    shutil.copytree(fx / "olmoe", tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    ck = open_checkpoint(tmp_path / "src")
    (tmp_path / "sel.json").write_text(json.dumps({"criterion": "x", "source": ck.fingerprint, "num_experts": 8,
                                                   "layers": [{"layer": i, "experts": [0, 1]} for i in ck.moe_layers]}))
    (tmp_path / "t.txt").write_text("the law shall apply to every holder\n\nin the beginning was the word")
    assert cli("graft", "src", "-t", "2L", "--selection", "sel.json", "-o", "student")[0] == 0
    code, out, err = cli("fidelity", "src", "student", "-d", "a=t.txt", "-o", "fid.json")
    assert code == 0, err
    doc = json.loads((tmp_path / "fid.json").read_text())
    assert "provenance" not in doc and doc["xpertctl"]["kind"] == "fidelity"
    assert doc["source"] == str(tmp_path / "src") and doc["student"] == str(tmp_path / "student")


def test_unknown_key_names_message_is_grammatical(tmp_path, cli):
    from safetensors.torch import save_file
    p = tmp_path / "w.safetensors"
    save_file({"model.layers.0.foo.weight": torch.zeros(2)}, str(p))
    code, out, err = cli("inspect", p)
    assert_user_error(code, err, "w.safetensors", "key names match no supported family")


@pytest.mark.parametrize("task,where", [("ppl", "file"), ("ppl", "inside"), ("mc", "file"), ("gen", "file"),
                                        ("lmeval", "file")])
def test_eval_never_writes_onto_or_into_its_task_files(fx, cli, tmp_path, task, where):
    """eval's task paths are inputs like its checkpoint: -o onto a ppl:/mc:/gen: file (even with --force) or
    inside a ppl: directory is refused, and the task files keep their bytes (eval overwrote them)."""
    d = tmp_path / "tasks"
    d.mkdir()
    files = {"ppl": d / "a.txt", "mc": d / "mc.jsonl", "gen": d / "gen.jsonl", "lmeval": d / "task.yaml"}
    files["lmeval"].write_text("task: mine\n")
    files["ppl"].write_text("the cat sat on the mat.\n\nthe dog lay on the rug.\n")
    files["mc"].write_text('{"context": "the cat sat on the", "choices": ["mat", "sky"], "label": 0}\n')
    files["gen"].write_text('{"instruction": "say mat", "response": "mat"}\n')
    spec = f"ppl:{d}" if where == "inside" else f"{task}:{files[task]}" + (",boolq" if task == "lmeval" else "")
    out = d / "r.json" if where == "inside" else files[task]
    before = _tree(d)
    code, so, err = cli("eval", fx / "llama", "--task", spec, "--max-new-tokens", "2", "-o", out, "--force")
    assert_user_error(code, err, str(out), "input")
    assert so == "" and _tree(d) == before
