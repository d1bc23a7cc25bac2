"""Recipes: references, grids, --set, profiles, skip-if-done after an interrupted run, dry-run, errors."""
import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, assert_user_error, stats_file
from xpertctl import recipe as rc
from xpertctl.errors import XpertError
from xpertctl.ops_table import BY_NAME as TABLE

COUNTS = [[[90, 40, 10, 30, 25, 5]], [[5, 45, 80, 30, 35, 5]], [[5, 35, 70, 30, 55, 5]]]


def _run(*args, **kw):
    return rc.run(*args, table=TABLE, **kw)


def _write(tmp_path, doc, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


@pytest.fixture
def recipe(tmp_path):
    stats = stats_file(tmp_path, COUNTS, [100, 100, 100])
    return _write(tmp_path, {
        "name": "t",
        "vars": {"work": str(tmp_path / "w"), "crits": ["min", "low"], "n": 2},
        "profiles": {"small": {"vars": {"n": 1}}},
        "steps": [
            {"id": "sel-${grid.crit}", "op": "select", "grid": {"crit": "${vars.crits}"},
             "args": {"stats": str(stats), "criterion": "${grid.crit}", "per_layer": "${vars.n}",
                      "out": "${vars.work}/sel-${grid.crit}.json"}},
            {"id": "cloze", "op": "corpus cloze",
             "args": {"corpus": str(ROOT / "fixtures" / "corpus-mini"), "per_domain": 2, "out": "${vars.work}/cloze.jsonl"}},
            {"id": "copy-min", "op": "select",
             "args": {"stats": str(stats), "criterion": "min", "per_layer": "${vars.n}",
                      "out": "${vars.work}/min2.json", "plot": "${steps.sel-min.out}.png"}},
        ]})


def test_grid_references_and_outputs(recipe, tmp_path):
    outs = _run(recipe)
    w = tmp_path / "w"
    assert outs == [str(w / "sel-min.json"), str(w / "sel-low.json"), str(w / "cloze.jsonl"), str(w / "min2.json")]
    assert json.loads((w / "sel-min.json").read_text())["layers"][0]["experts"] == [1, 3]
    assert json.loads((w / "sel-low.json").read_text())["criterion"] == "low"
    assert len((w / "cloze.jsonl").read_text().splitlines()) == 12  # 6 domains x 2


def test_set_and_profile_override_vars(recipe, tmp_path):
    _run(recipe, ["vars.crits=[min, mean]", "vars.n=3"])
    assert json.loads((tmp_path / "w" / "sel-mean.json").read_text())["per_layer"] == 3
    assert not (tmp_path / "w" / "sel-low.json").exists()
    plan = rc.expand(rc.load(recipe, [], profile="small"), recipe)
    assert plan[0][2]["per_layer"] == 1
    plan = rc.expand(rc.load(recipe, ["vars.n=4"], profile="small"), recipe)
    assert plan[0][2]["per_layer"] == 4  # --set wins over the profile
    with pytest.raises(XpertError, match=r"--profile 'smal': .* has no profile of that name \(did you mean 'small'\? "
                                         r"profiles: small\)"):
        rc.load(recipe, [], profile="smal")
    doc = yaml.safe_load(recipe.read_text())
    doc.pop("profiles")
    with pytest.raises(XpertError, match=r"--profile 'small': .* has no profile of that name \(it has none\)"):
        rc.load(_write(tmp_path, doc, "bare.yaml"), [], profile="small")


def test_skip_if_done_after_interrupt(recipe, tmp_path, monkeypatch, capsys):
    import xpertctl.corpus as corpus_mod
    real = corpus_mod.cloze

    def dies(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(corpus_mod, "cloze", dies)
    with pytest.raises(KeyboardInterrupt):
        _run(recipe)
    assert (tmp_path / "w" / "sel-low.json").exists() and not (tmp_path / "w" / "cloze.jsonl").exists()
    monkeypatch.setattr(corpus_mod, "cloze", real)
    before = (tmp_path / "w" / "sel-min.json").stat().st_mtime_ns
    capsys.readouterr()
    _run(recipe)
    err = capsys.readouterr().err
    assert "sel-min: skip (done)" in err and "sel-low: skip (done)" in err and "cloze: run" in err
    assert (tmp_path / "w" / "sel-min.json").stat().st_mtime_ns == before
    # a changed argument makes the step run again (and replaces its stale output)
    capsys.readouterr()
    _run(recipe, ["vars.n=3"])
    err = capsys.readouterr().err
    assert "sel-min: run" in err and json.loads((tmp_path / "w" / "sel-min.json").read_text())["per_layer"] == 3


def test_dry_run_prints_the_plan_and_writes_nothing(recipe, tmp_path, cli):
    code, out, err = cli("run", recipe, "--dry-run")
    assert code == 0, err
    assert "[1/4] sel-min: run  xpertctl select" in err and "--criterion min" in err
    assert not (tmp_path / "w").exists()
    # stdout names what a run wrote; a plan writes nothing, so it prints nothing there (issue 31: a newcomer
    # read the listed paths as written)
    assert out == ""


def test_shipped_recipes_use_the_names_help_shows(capsys):
    """Our own recipes give no deprecation notice (paper.yaml still said learngene's src/data_dir)."""
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        for profile in [None, *rc.load(path).profiles]:
            rc.plan_steps(path, rc.load(path, [], profile), TABLE, check_inputs=False)
            assert "is now" not in capsys.readouterr().err, (path.name, profile)


def test_shipped_recipes_expand(tmp_path):
    for name in ("paper.yaml", "teacher.yaml", "olmoe-1b-7b-to-12L.yaml"):
        r = rc.load(ROOT / "recipes" / name)
        plan = rc.expand(r, ROOT / "recipes" / name)
        for sid, op, args in plan:
            rc.argv_for(op, args, sid, TABLE)  # every op and argument exists
    demo = rc.expand(rc.load(ROOT / "recipes" / "paper.yaml"), Path("paper.yaml"))
    assert sum(op == "train" for _, op, _ in demo) == 9 * 1 * 8  # 9 arms (KD and learngene included), 1 depth, 8 seeds
    power = rc.expand(rc.load(ROOT / "recipes" / "paper.yaml", profile="power"), Path("paper.yaml"))
    trains = [a["out"] for _, op, a in power if op == "train"]
    assert len(trains) == 5 * 40 + 4 * 8  # xpert, fit, random, low, scratch x 40 seeds; literal, norm-matched, kd, learngene x 8
    # power only adds seeds: every step of the default demo but its report is in it with the same args (skipped)
    same = {sid: a for sid, _, a in power}
    assert all(same.get(sid) == a for sid, op, a in demo if op != "report")


def test_each_profiles_report_reads_what_that_profile_evaluated(tmp_path):
    """The report's results and fidelity are the outs of this profile's own eval and fidelity steps: a glob
    over the shared eval/ directory also took other profiles' runs (the default report showed the depth
    profile's 4- and 6-layer students, the ffn and diversity arms, made with an older release's defaults)."""
    path = ROOT / "recipes" / "paper.yaml"
    for profile, arms, depths in ((None, 9, [3]), ("depth", 9 + 5 * 2, [3, 4, 6]), ("ffn", 10, [3]),
                                  ("diversity", 15, [3])):
        plan = rc.expand(rc.load(path, profile=profile), path)
        report = next(a for sid, op, a in plan if op == "report")
        evals = [a["out"] for sid, op, a in plan if op == "eval" and sid.startswith("eval-") and sid != "eval-teacher"]
        assert report["results"] == evals and len(evals) == arms * 8, profile
        assert sorted({int(Path(o).name.split("L-s")[0].rsplit("-", 1)[1]) for o in evals}) == depths
        fids = [a["out"] for sid, op, a in plan if op == "fidelity"]
        assert report["fidelity"] == fids, profile
        for o in evals:  # nothing from the budget's or SFT's own directories
            assert Path(o).parent == Path(plan[0][2]["out"]).parent / "eval", o
    (tmp_path / "e").mkdir()
    doc = {"name": "t", "steps": [
        *[{"id": f"a-{i}", "op": "corpus order", "args": {"corpus": str(tmp_path / "e"), "out": str(tmp_path / f"{i}.jsonl")}}
          for i in (1, 2)],
        {"id": "b-1", "op": "corpus order", "args": {"corpus": str(tmp_path / "e"), "out": str(tmp_path / "b.jsonl")}},
        {"id": "r", "op": "report", "args": {"results": "${steps.a-*.out}", "out": str(tmp_path / "rep")}}]}
    plan = rc.expand(rc.load(_write(tmp_path, doc)), tmp_path / "r.yaml")
    assert plan[-1][2]["results"] == [str(tmp_path / "1.jsonl"), str(tmp_path / "2.jsonl")]
    for bad, needle in (("${steps.z-*.out}", "matches no earlier step"), ("x ${steps.a-*.out}", "a list of outs")):
        doc["steps"][-1]["args"]["results"] = bad
        with pytest.raises(XpertError, match=needle):
            rc.expand(rc.load(_write(tmp_path, doc)), tmp_path / "r.yaml")


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["steps"][0].update(op="frobnicate"), "unknown op 'frobnicate'"),
    (lambda d: d["steps"][1]["args"].update(colour="red"), "step 'cloze': corpus cloze has no argument 'colour'"),
    (lambda d: d["steps"][2]["args"].update(stats="${steps.nope.out}"), "${steps.nope.out} names no earlier step"),
    (lambda d: d["steps"][2]["args"].update(stats="${vars.missing}"), "${vars.missing} is not defined"),
    (lambda d: d["steps"][1].pop("op"), "step 'cloze': op: Field required"),
    (lambda d: d.update(extra_key=1), "unknown key 'extra_key' (keys: name, description, estimate, result, vars, "
                                      "profiles, steps)"),
    # a newcomer's typos (issue 31): the likely key is suggested, and the message names the recipe's keys
    (lambda d: d.update(stpes=d.pop("steps")), "unknown key 'stpes' (did you mean 'steps'?"),
    (lambda d: d["steps"][0].update(gird=d["steps"][0].pop("grid")),
     "step 'sel-${grid.crit}': unknown key 'gird' (did you mean 'grid'?"),
    (lambda d: d["steps"][1].update(arg=d["steps"][1].pop("args")), "step 'cloze': unknown key 'arg' (did you mean 'args'?"),
    (lambda d: d["steps"][1]["args"].update(per_domian=d["steps"][1]["args"].pop("per_domain")),
     "corpus cloze has no argument 'per_domian' (did you mean 'per_domain'?"),
    (lambda d: d["steps"][1]["args"].update(per_domain="ten"), "step 'cloze': per_domain expects int, got 'ten'"),
    (lambda d: d["steps"][0].update(id="same"), "id 'same' is used twice"),
])
def test_bad_recipes_are_one_line_errors(recipe, cli, mutate, needle):
    doc = yaml.safe_load(recipe.read_text())
    mutate(doc)
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, _, err = cli("run", recipe)
    assert_user_error(code, err, str(recipe), needle)


def test_failing_step_names_recipe_and_step(recipe, cli):
    code, _, err = cli("run", recipe, "--set", "vars.n=99")
    # run logs its plan on stderr; the failure itself is its last line, one line, no traceback
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("xpertctl: error:") and "step 'sel-min'" in last and "--per-layer 99" in last


def test_invalid_yaml_and_bad_set(tmp_path, cli):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nsteps: [\n")
    code, _, err = cli("run", p)
    assert_user_error(code, err, "bad.yaml", "not valid YAML")
    p.write_text("name: x\nsteps: []\n")
    code, _, err = cli("run", p, "--set", "novalue")
    assert_user_error(code, err, "--set 'novalue'")


def test_a_changed_large_input_reruns_its_step(tmp_path, capsys):
    """Skip-if-done fingerprints inputs with the one provenance scheme: a large file that changes
    without changing size still changes the fingerprint (it used to be hashed by size only)."""
    import shutil
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "fixtures" / "corpus-mini", corpus)
    big = corpus / "notes.txt"
    big.write_bytes(b"a" * (2 << 20))
    r = _write(tmp_path, {"name": "t", "steps": [{"id": "cloze", "op": "corpus cloze", "args": {
        "corpus": str(corpus), "per_domain": 2, "out": str(tmp_path / "w" / "cloze.jsonl")}}]})
    _run(r)
    capsys.readouterr()
    big.write_bytes(b"b" * (2 << 20))
    _run(r)
    assert "cloze: run" in capsys.readouterr().err


# ---- issue 14: typos are errors, globs, dry-run checks, the resolved recipe, one path per output -----

def test_set_of_an_undefined_var_is_an_error(recipe, cli):
    code, _, err = cli("run", recipe, "--set", "vars.typo=3")
    assert_user_error(code, err, "--set vars.typo=3", "no var 'typo'", "crits")


def test_only_matching_no_step_is_an_error(recipe, cli, tmp_path):
    code, _, err = cli("run", recipe, "--only", "sel-*", "--only", "trian-*")
    assert_user_error(code, err, "--only 'trian-*'", "matches no step")
    assert not (tmp_path / "w").exists()


def test_set_on_grid_steps_by_glob(recipe, tmp_path):
    plan = rc.expand(rc.load(recipe, ["steps.sel-*.args.per_layer=3"]), recipe)
    assert [a["per_layer"] for sid, _, a in plan if sid.startswith("sel-")] == [3, 3]
    assert {sid: a.get("per_layer") for sid, _, a in plan}["copy-min"] == 2  # not matched: unchanged
    plan = rc.expand(rc.load(recipe, ["steps.sel-low.args.per_layer=1"]), recipe)  # one expanded step
    assert [a["per_layer"] for _, _, a in plan[:2]] == [2, 1]
    with pytest.raises(XpertError, match="no step matching 'sle-\\*'"):
        rc.expand(rc.load(recipe, ["steps.sle-*.args.per_layer=3"]), recipe)


def test_dry_run_checks_values_and_existing_inputs(recipe, cli, tmp_path):
    doc = yaml.safe_load(recipe.read_text())
    doc["steps"][2]["args"]["criterion"] = "best"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, _, err = cli("run", recipe, "--dry-run")
    assert_user_error(code, err, "step 'copy-min'", "criterion 'best'")
    doc["steps"][2]["args"]["criterion"] = "min"
    doc["steps"][0]["args"]["stats"] = str(tmp_path / "missing.safetensors")
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, _, err = cli("run", recipe, "--dry-run")
    assert_user_error(code, err, "step 'sel-min'", "missing.safetensors", "no earlier step writes it")


def test_dry_run_prints_shell_quoted_commands(tmp_path, cli):
    import shlex
    import subprocess
    stats = stats_file(tmp_path, COUNTS, [100, 100, 100], name="my stats.safetensors")
    r = _write(tmp_path, {"name": "t", "steps": [{"id": "s", "op": "select", "args": {
        "stats": str(stats), "out": str(tmp_path / "it's here.json")}}]})
    code, _, err = cli("run", r, "--dry-run")
    assert code == 0, err
    line = next(l for l in err.splitlines() if "xpertctl select" in l)
    cmd = line[line.index("xpertctl select"):]
    assert shlex.split(cmd)[2] == str(stats)
    # it pastes into a shell
    out = subprocess.run(["bash", "-c", f"printf '%s\\n' {cmd[len('xpertctl '):]}"], capture_output=True, text=True).stdout
    assert out.splitlines() == ["select", str(stats), "--out", str(tmp_path / "it's here.json")]


def test_resolved_recipe_is_printed(recipe, cli, tmp_path):
    code, out, err = cli("run", recipe, "--resolved", "--set", "vars.n=1")
    assert code == 0, err
    doc = yaml.safe_load(out)
    assert [s["id"] for s in doc["steps"]] == ["sel-min", "sel-low", "cloze", "copy-min"]
    assert doc["steps"][0]["args"]["per_layer"] == 1 and doc["steps"][3]["args"]["plot"] == f"{tmp_path}/w/sel-min.json.png"
    assert doc["steps"][0]["command"].startswith("xpertctl select ")
    assert not (tmp_path / "w").exists()


def test_a_fresh_run_prints_each_output_once(recipe, cli, tmp_path):
    code, out, err = cli("run", recipe)
    assert code == 0, err
    w = tmp_path / "w"
    assert out.splitlines() == [str(w / "sel-min.json"), str(w / "sel-low.json"), str(w / "cloze.jsonl"),
                                str(w / "min2.json")]


def test_recipe_result_is_announced(tmp_path, cli):
    r = _write(tmp_path, {"name": "t", "vars": {"w": str(tmp_path / "w")}, "result": "${vars.w}/cloze.jsonl",
                          "steps": [{"id": "c", "op": "corpus cloze", "args": {
                              "corpus": str(ROOT / "fixtures" / "corpus-mini"), "per_domain": 1, "out": "${vars.w}/cloze.jsonl"}}]})
    code, out, err = cli("run", r)
    assert code == 0, err
    assert err.strip().splitlines()[-1] == f"done: {tmp_path}/w/cloze.jsonl"


def test_a_step_records_its_own_command(recipe, tmp_path):
    """Steps run through the table, not sys.argv: each artifact still records the step's command line."""
    import sys
    before = list(sys.argv)
    _run(recipe)
    assert sys.argv == before
    rec = json.loads((tmp_path / "w" / "sel-low.json").read_text())["xpertctl"]
    assert rec["command"].startswith("xpertctl select ") and "--criterion low" in rec["command"]


def test_a_changed_default_reruns_the_steps_that_use_it(tmp_path, capsys):
    """A step that leaves an option at its default depends on that default: when a new release changes
    it (as --rescale's did), the finished step is not current any more and runs again; a step that
    gives the option itself stays done."""
    from dataclasses import replace
    stats = stats_file(tmp_path, COUNTS, [100, 100, 100])
    r = _write(tmp_path, {"name": "t", "steps": [
        {"id": "by-default", "op": "select", "args": {"stats": str(stats), "out": str(tmp_path / "d.json")}},
        {"id": "given", "op": "select", "args": {"stats": str(stats), "criterion": "min",
                                                  "out": str(tmp_path / "g.json")}}]})
    _run(r)
    first = json.loads((tmp_path / "d.json").read_text())
    capsys.readouterr()
    sel = TABLE["select"]
    assert sel.param("criterion").default == "min"
    changed = dict(TABLE, select=replace(sel, params=tuple(
        replace(p, default="low") if p.name == "criterion" else p for p in sel.params)))
    rc.run(r, table=changed)
    err = capsys.readouterr().err
    assert "by-default: run" in err and "given: skip" in err, err
    assert json.loads((tmp_path / "d.json").read_text())["layers"] != first["layers"]
    rc.run(r, table=changed)
    assert "by-default: skip" in capsys.readouterr().err


def test_a_new_neutral_option_keeps_finished_steps_current(tmp_path, capsys):
    """An option added with a default that does what the command did before (graft's --up-gain 1) must not
    make every finished step stale: the record leaves it out. Any other new option's default does."""
    from dataclasses import replace
    from xpertctl.ops_table import opt
    stats = stats_file(tmp_path, COUNTS, [100, 100, 100])
    r = _write(tmp_path, {"name": "t", "steps": [
        {"id": "s", "op": "select", "args": {"stats": str(stats), "out": str(tmp_path / "d.json")}}]})
    sel = TABLE["select"]
    rc.run(r, table=TABLE)
    capsys.readouterr()
    for neutral, state in ((True, "s: skip"), (False, "s: run")):
        added = dict(TABLE, select=replace(sel, params=sel.params + (opt("gain", 1.0, "new.", neutral=neutral),)))
        rc.run(r, table=added, dry_run=True)
        assert state in capsys.readouterr().err
    assert TABLE["graft"].param("up_gain").neutral and TABLE["graft"].param("up_gain").default == 1.0


def test_a_grid_of_mappings_gives_each_step_its_own_fields(tmp_path):
    """Per-arm settings (the demo's tuned picks): a grid value may be a mapping, read with ${grid.KEY.FIELD};
    a var mapping likewise with ${vars.NAME.FIELD} (and list items by index)."""
    doc = {"name": "t", "vars": {"w": str(tmp_path / "w"), "arms": [{"name": "a", "n": 2}, {"name": "b", "n": 3}],
                                 "pick": {"crit": "mean", "seeds": [4, 5]}},
           "steps": [{"id": "sel-${grid.arm.name}-${vars.pick.seeds.1}", "op": "select", "grid": {"arm": "${vars.arms}"},
                      "args": {"stats": "s.safetensors", "criterion": "${vars.pick.crit}", "per_layer": "${grid.arm.n}",
                               "out": "${vars.w}/${grid.arm.name}.json"}}]}
    plan = rc.expand(rc.load(_write(tmp_path, doc)), tmp_path / "r.yaml")
    assert [(sid, a["per_layer"], a["criterion"], Path(a["out"]).name) for sid, _, a in plan] == [
        ("sel-a-5", 2, "mean", "a.json"), ("sel-b-5", 3, "mean", "b.json")]


@pytest.mark.parametrize("ref,needle", [("${grid.arm.colour}", "${grid.arm.colour}: arm has no field 'colour'"),
                                        ("${vars.pick.seeds.7}", "${vars.pick.seeds.7}: seeds has no item 7"),
                                        ("${vars.pick.crit.x}", "${vars.pick.crit.x}: crit is not a mapping")])
def test_a_bad_field_reference_is_one_line_error(tmp_path, ref, needle):
    doc = {"name": "t", "vars": {"arms": [{"name": "a"}], "pick": {"crit": "mean", "seeds": [4]}},
           "steps": [{"id": "s-${grid.arm.name}", "op": "select", "grid": {"arm": "${vars.arms}"},
                      "args": {"stats": "s.safetensors", "criterion": ref, "out": "o.json"}}]}
    with pytest.raises(XpertError) as e:
        rc.expand(rc.load(_write(tmp_path, doc)), tmp_path / "r.yaml")
    assert needle in str(e.value), str(e.value)


def test_nested_references_and_null_arguments(tmp_path):
    """${vars.arms.${grid.arm}.crit}: the inner reference is resolved first (a per-arm spec keyed by the grid's
    arm name); an argument given as null is left out of the command line, as if not given."""
    doc = {"name": "t", "vars": {"arms": {"a": {"crit": "mean", "plot": None}, "b": {"crit": "min", "plot": "p.png"}},
                                 "names": ["a", "b"]},
           "steps": [{"id": "sel-${grid.arm}", "op": "select", "grid": {"arm": "${vars.names}"},
                      "args": {"stats": "s.safetensors", "criterion": "${vars.arms.${grid.arm}.crit}",
                               "plot": "${vars.arms.${grid.arm}.plot}", "out": "${grid.arm}.json"}}]}
    plan = rc.expand(rc.load(_write(tmp_path, doc)), tmp_path / "r.yaml")
    assert [(a["criterion"], a["plot"]) for _, _, a in plan] == [("mean", None), ("min", "p.png")]
    argv = [rc.argv_for(op, a, "w", TABLE) for _, op, a in plan]
    assert "--plot" not in argv[0] and argv[1][argv[1].index("--plot") + 1] == "p.png"
    # and bound as if not given: the option's default, not None (graft --out-init got None)
    from xpertctl.ops_table import BY_NAME
    values = BY_NAME["graft"].bind({"src": "m", "out": "o", "out_init": None, "seed": None}, "w")
    assert values["out_init"] == "default" and values["seed"] == 0


def test_a_var_may_hold_a_template_for_the_steps_that_use_it(tmp_path):
    """A per-arm spec whose path depends on the step's grid (the scale-matched controls' reference init):
    grid references in vars are resolved where the var is used."""
    doc = {"name": "t", "vars": {"w": "out", "arms": {"a": {"plot": "${vars.w}/ref-${grid.seed}.png"}},
                                 "seeds": [1, 2]},
           "steps": [{"id": "sel-${grid.seed}", "op": "select", "grid": {"seed": "${vars.seeds}"},
                      "args": {"stats": "s.safetensors", "plot": "${vars.arms.a.plot}", "out": "${grid.seed}.json"}}]}
    plan = rc.expand(rc.load(_write(tmp_path, doc)), tmp_path / "r.yaml")
    assert [a["plot"] for _, _, a in plan] == ["out/ref-1.png", "out/ref-2.png"]
    doc["vars"]["loop"] = "${vars.loop}"
    doc["steps"][0]["args"]["plot"] = "${vars.loop}"
    with pytest.raises(XpertError):
        rc.expand(rc.load(_write(tmp_path, doc)), tmp_path / "r.yaml")


def test_dry_run_marks_a_step_stale_when_a_step_it_reads_from_will_run(tmp_path, cli):
    """Issue 31: after one upstream step changed, --dry-run showed `train: run` but `eval: skip (done)` for
    the eval reading that train's output; the real run would re-run it (its input changes)."""
    mini = ROOT / "fixtures" / "corpus-mini"
    doc = {"name": "t", "vars": {"w": str(tmp_path / "w"), "v": 300},
           "steps": [{"id": "tok", "op": "corpus tokenizer", "args": {"corpus": str(mini), "vocab_size": "${vars.v}",
                                                                       "out": "${vars.w}/tok"}},
                     {"id": "data", "op": "tokenize", "args": {"tokenizer": "${steps.tok.out}",
                                                               "domain": [f"legal={mini}/train/legal.txt"],
                                                               "out": "${vars.w}/data"}},
                     {"id": "other", "op": "corpus order", "args": {"corpus": str(mini), "per_domain": 1,
                                                                    "out": "${vars.w}/o.jsonl"}}]}
    r = _write(tmp_path, doc)
    code, _, err = cli("run", r)
    assert code == 0, err
    code, _, err = cli("run", r, "--dry-run", "--set", "vars.v=320")
    assert code == 0, err
    states = {l.split(":")[0].split("] ")[1]: l.split(": ", 1)[1].split("  ")[0] for l in err.splitlines() if l.startswith("[")}
    assert states == {"tok": "run", "data": "run (an input changes)", "other": "skip (done)"}, states


def test_recipes_take_the_names_help_shows_and_old_names_still_work(tmp_path, cli):
    """Issue 31: `data_dir:` and `stats_file:` were needed where `--help` says `--data` and STATS. The --help
    names run; the old names run with a deprecation notice; both at once is an error."""
    from xpertctl.ops_table import BY_NAME
    for c in BY_NAME.values():
        keys = [p.key for p in c.params]
        assert len(keys) == len(set(keys)), (c.name, keys)  # one key per parameter
        assert all(c.param(p.key) is p and c.param(p.name) is p for p in c.params), c.name
    assert BY_NAME["train"].param("data").name == "data_dir" and BY_NAME["select"].param("stats").name == "stats_file"
    stats = stats_file(tmp_path, COUNTS, [100, 100, 100])

    def recipe(args):
        return _write(tmp_path, {"name": "t", "steps": [{"id": "s", "op": "select", "args": args}]})
    code, _, err = cli("run", recipe({"stats": str(stats), "json": True, "out": str(tmp_path / "a.json")}))
    assert code == 0 and "deprecat" not in err and (tmp_path / "a.json").is_file(), err
    code, _, err = cli("run", recipe({"stats_file": str(stats), "out": str(tmp_path / "b.json")}))
    flat = " ".join(err.split())
    assert code == 0 and "'stats_file' is now 'stats'" in flat and (tmp_path / "b.json").is_file(), err
    code, _, err = cli("run", recipe({"stats": str(stats), "stats_file": str(stats), "out": str(tmp_path / "c.json")}))
    assert_user_error(code, err, "'stats' given twice")
    code, out, _ = cli("run", "--help")
    assert "docs/cli.md" in " ".join(out.replace("│", " ").split())


def test_a_tokenizer_read_from_a_model_directory_is_fingerprinted_without_its_weights(tmp_path, cli, fx):
    """Issue 31 (a newcomer): `tokenize --tokenizer student/` ran again after a change upstream rewrote only
    the student's weights; on a real corpus that is the costliest step. Its tokenizer files still count."""
    import shutil
    model = tmp_path / "student"
    shutil.copytree(ROOT / "fixtures" / "teacher", model)
    mini = ROOT / "fixtures" / "corpus-mini"
    doc = {"name": "t", "steps": [{"id": "data", "op": "tokenize", "args": {
        "tokenizer": str(model), "domain": [f"legal={mini}/train/legal.txt"], "out": str(tmp_path / "data")}}]}
    r = _write(tmp_path, doc)
    code, _, err = cli("run", r)
    assert code == 0, err
    weights = sorted(model.glob("*.safetensors"))
    assert weights
    for w in weights:  # new weights, same tokenizer
        w.write_bytes(w.read_bytes()[:-16] + bytes(16))
    code, _, err = cli("run", r, "--dry-run")
    assert code == 0 and "data: skip (done)" in err, err
    tok = model / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"unk_token": null', '"unk_token": null ', 1) + "\n")
    code, _, err = cli("run", r, "--dry-run")
    assert code == 0 and "data: run" in err, err
