"""Recipes (issue 19.4, 19.9, names): every input is fingerprinted whatever it looks like; --only
refuses a selection whose inputs an unselected step has not written; `done:` names only a result this
run wrote; --resolved resolves vars; step ids stay one path component; the command line checks what
a recipe (and so --dry-run) checks."""
import shutil

import pytest
import yaml

from conftest import ROOT, assert_user_error, stats_file
from xpertctl import recipe as rc
from xpertctl.errors import XpertError
from xpertctl.ops_table import BY_NAME as TABLE

MINI = ROOT / "fixtures" / "corpus-mini"
COUNTS = [[[90, 40, 10, 30, 25, 5]], [[5, 45, 80, 30, 35, 5]], [[5, 35, 70, 30, 55, 5]]]


def _write(d, doc, name="r.yaml"):
    p = d / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def test_a_bare_relative_input_name_is_fingerprinted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(MINI, tmp_path / "mini")
    r = _write(tmp_path, {"name": "t", "steps": [
        {"id": "cloze", "op": "corpus cloze", "args": {"corpus": "mini", "per_domain": 2, "out": "cloze-out"}}]})
    rc.run(r, table=TABLE)
    capsys.readouterr()
    rc.run(r, dry_run=True, table=TABLE)
    assert "cloze: skip (done)" in capsys.readouterr().err
    test_file = sorted((tmp_path / "mini" / "test").glob("*.txt"))[0]
    test_file.write_text(test_file.read_text() + "\n\nA new passage with plenty of words " * 3)
    rc.run(r, dry_run=True, table=TABLE)
    err = capsys.readouterr().err
    assert "cloze: run" in err and "skip" not in err


def test_a_report_step_reruns_when_a_result_its_glob_matches_changes(tmp_path):
    cmd = TABLE["report"]
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "xpert-2L-s0.json").write_text("{}")
    args = {"results": [str(tmp_path / "ev" / "*.json")], "out": str(tmp_path / "rep")}
    before = rc._record(cmd, cmd.argv(args), args)
    (tmp_path / "ev" / "xpert-2L-s0.json").write_text('{"changed": 1}')
    assert rc._record(cmd, cmd.argv(args), args) != before
    (tmp_path / "ev" / "scratch-2L-s0.json").write_text("{}")  # a new match too
    assert len(rc._record(cmd, cmd.argv(args), args)["inputs"]) == 2


def _two_steps(tmp_path):
    stats = stats_file(tmp_path, COUNTS, [100, 100, 100])
    return _write(tmp_path, {"name": "t", "result": str(tmp_path / "w" / "b.json"), "steps": [
        {"id": "a", "op": "select", "args": {"stats": str(stats), "out": str(tmp_path / "w" / "a.json")}},
        {"id": "b", "op": "decompose", "args": {"src": str(ROOT / "fixtures" / "teacher"),
                                                "selection": str(tmp_path / "w" / "a.json"),
                                                "out": str(tmp_path / "w" / "b.json")}}]})


def test_only_refuses_a_step_whose_input_an_unselected_step_has_not_written(tmp_path, cli):
    r = _two_steps(tmp_path)
    for extra in ([], ["--dry-run"]):
        code, out, err = cli("run", r, "--only", "b", *extra)
        assert_user_error(code, err, "--only", "'b'", "a.json", "'a'")
        assert not (tmp_path / "w").exists()


def test_only_does_not_announce_a_result_it_did_not_write(tmp_path, cli):
    r = _two_steps(tmp_path)
    code, out, err = cli("run", r, "--only", "a")
    assert code == 0, err
    assert (tmp_path / "w" / "a.json").exists() and not (tmp_path / "w" / "b.json").exists()
    last = err.strip().splitlines()[-1]
    assert "b.json" in last and "not written" in last and not last.startswith(f"done: {tmp_path}")


def test_resolved_resolves_vars_that_refer_to_vars(tmp_path, cli):
    stats = stats_file(tmp_path, COUNTS, [100, 100, 100])
    r = _write(tmp_path, {"name": "t", "vars": {"seeds": [0, 1], "more": "${vars.seeds}", "w": str(tmp_path)},
                          "steps": [{"id": "s-${grid.seed}", "op": "select", "grid": {"seed": "${vars.more}"},
                                     "args": {"stats": str(stats), "seed": "${grid.seed}",
                                              "out": "${vars.w}/s${grid.seed}.json"}}]})
    code, out, err = cli("run", r, "--resolved")
    assert code == 0, err
    doc = yaml.safe_load(out)
    assert doc["vars"]["more"] == [0, 1] and "${" not in out


@pytest.mark.parametrize("sid", ["../../escape", "a/b", ".hidden"])
def test_a_step_id_that_is_not_a_file_name_is_refused(tmp_path, cli, sid):
    stats = stats_file(tmp_path, COUNTS, [100, 100, 100])
    r = _write(tmp_path, {"name": "t", "steps": [
        {"id": sid, "op": "select", "args": {"stats": str(stats), "out": str(tmp_path / "s.json")}}]})
    code, out, err = cli("run", r, "--dry-run")
    assert_user_error(code, err, "r.yaml", "id", sid)


def test_the_command_line_checks_what_a_recipe_checks(tmp_path):
    """One validation for both paths: a value the table's check refuses fails the command line before
    the command runs, as it fails `run --dry-run`."""
    import typer
    from xpertctl.cli import build_app
    from xpertctl.ops_table import Command, opt

    def positive(v):
        if v < 0:
            raise XpertError(f"--n {v}: must be 0 or more")
    ran = []
    cmd = Command("probe", "probe", "xpertctl probe --n 1", (opt("n", 1, "n", check=positive),),
                  lambda n: ran.append(n))
    with pytest.raises(XpertError, match="--n -3"):
        rc.plan_steps(_write(tmp_path, {"name": "t", "steps": [{"id": "p", "op": "probe", "args": {"n": -3}}]}),
                      rc.load(tmp_path / "r.yaml"), {"probe": cmd})
    app = build_app((cmd, TABLE["families"]))
    with pytest.raises(XpertError, match="--n -3"):
        typer.main.get_command(app).main(["probe", "--n", "-3"], standalone_mode=False)
    assert ran == []


@pytest.mark.parametrize("profile", [None, "quick", "power"])
def test_demo_notes_state_no_student_budget_its_profile_does_not_train(profile):
    """The report notes of every profile: a student token count they state is steps x batch x seq."""
    import re
    r = rc.load(ROOT / "recipes" / "paper.yaml", [], profile)
    v = r.vars  # steps, batch and seq are plain numbers in every profile
    notes = next(args["notes"] for sid, op, args in rc.expand(r, ROOT / "recipes" / "paper.yaml") if op == "report")
    tokens = v["steps"] * v["batch"] * v["seq"]
    assert f"{v['steps']} steps of {v['batch']} x {v['seq']} tokens" in notes
    for m in re.finditer(r"about ([\d.]+)M tokens", notes):
        assert abs(float(m.group(1)) * 1e6 - tokens) <= 0.1 * tokens, (m.group(0), tokens)


def test_eval_task_files_are_fingerprinted_and_keys_stay_the_arguments_as_written(tmp_path):
    cmd = TABLE["eval"]
    task = tmp_path / "cloze.jsonl"
    task.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n')
    args = {"ckpt": str(tmp_path), "task": [f"mc:{task}", "lmeval:boolq"], "out": str(tmp_path / "r.json")}
    before = rc._record(cmd, cmd.argv(args), args)
    assert f"mc:{task}" in before["inputs"]  # keyed as written (records of earlier versions stay valid)
    task.write_text('{"context": "a", "choices": ["b", "d"], "label": 1}\n')
    assert rc._record(cmd, cmd.argv(args), args) != before
    st = TABLE["stats"]
    sargs = {"src": str(tmp_path), "domain": [f"a={task}"], "out": str(tmp_path / "s.safetensors")}
    assert list(rc._record(st, st.argv(sargs), sargs)["inputs"]) == [str(tmp_path), f"a={task}"]


def test_a_model_card_edit_does_not_make_a_step_that_reads_the_model_stale(tmp_path):
    # no op reads a model directory's README.md (the card), so editing it must not re-run stats or eval;
    # its weights and config still count
    src = tmp_path / "teacher"
    shutil.copytree(ROOT / "fixtures" / "teacher", src)
    cmd = TABLE["decompose"]
    args = {"src": str(src), "selection": str(tmp_path / "sel.json"), "out": str(tmp_path / "out.json")}
    before = rc._record(cmd, cmd.argv(args), args)
    (src / "README.md").write_text((src / "README.md").read_text() + "\nA note added by hand.\n")
    assert rc._record(cmd, cmd.argv(args), args) == before
    (src / "config.json").write_text((src / "config.json").read_text().replace("{", '{"note": 1,', 1))
    assert rc._record(cmd, cmd.argv(args), args) != before


def test_a_readme_inside_a_corpus_still_counts(tmp_path):
    # a corpus directory is data, not a model: every file in it counts
    corpus = tmp_path / "mini"
    shutil.copytree(MINI, corpus)
    (corpus / "README.md").write_text("about this corpus\n")
    cmd = TABLE["corpus cloze"]
    args = {"corpus": str(corpus), "per_domain": 2, "out": str(tmp_path / "c")}
    before = rc._record(cmd, cmd.argv(args), args)
    (corpus / "README.md").write_text("about this corpus, edited\n")
    assert rc._record(cmd, cmd.argv(args), args) != before


def test_a_null_argument_records_as_not_given(tmp_path, monkeypatch):
    # `null: not given` (a per-arm table of options): the step's record is the one without the key, so adding
    # a column of nulls to a recipe does not make its finished steps stale
    cmd = TABLE["graft"]
    args = {"src": str(ROOT / "fixtures" / "teacher"), "target": "2L", "seed": 0, "out": str(tmp_path / "s")}
    with_null = {**args, "learngene": None, "scale_like": None}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "None").write_text("a file whose name is what str(None) gives")  # not an input either
    assert cmd.argv(with_null) == cmd.argv(args)
    assert rc._record(cmd, cmd.argv(with_null), with_null) == rc._record(cmd, cmd.argv(args), args)
