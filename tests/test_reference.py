"""docs/cli.md is the command reference: rendered from the command table, checked against the live CLI."""
import re

import pytest

from conftest import ROOT
from xpertctl import reference
from xpertctl.cli import app, click_command

DOC = ROOT / "docs" / "cli.md"


def test_the_committed_reference_is_what_the_table_renders():
    assert DOC.is_file(), "docs/cli.md is missing: run `make docs`"
    assert DOC.read_text() == reference.render(), "docs/cli.md is stale: run `make docs` and commit it"


def _leaves(cmd, path=()):
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _leaves(sub, (*path, name))
    else:
        yield " ".join(path), cmd


def test_every_option_of_every_live_help_is_in_its_section():
    """The oracle is click's own command tree (what `--help` prints), not the table the file came from."""
    text = DOC.read_text()
    sections = dict(re.findall(r"^## `xpertctl ([^`]+)`\n(.*?)(?=^## |\Z)", text, re.S | re.M))
    leaves = dict(_leaves(click_command(app)))
    assert len(leaves) >= 20 and set(leaves) == set(sections), set(leaves) ^ set(sections)
    for name, cmd in leaves.items():
        for p in cmd.params:
            names = [*p.opts, *p.secondary_opts] if p.param_type_name == "option" else [p.metavar or p.name.upper()]
            for n in names:
                assert n.strip("{}") in sections[name], f"{name}: {n} is not in docs/cli.md"


def test_render_names_what_a_reader_needs(tmp_path):
    """A made-up command shows its usage, keys, defaults, choices and example (the renderer itself)."""
    from xpertctl.ops_table import Command, arg, flag, opt
    c = Command("demo thing", "Do a thing.\nMore words.", "xpertctl demo thing x -o y",
                (arg("src", "Input."), opt("how", "a", "How.", choices=("a", "b")), flag("loud", "Shout."),
                 opt("n", 3, "Count.")), run=lambda **k: None)
    md = reference.render_command(c)
    assert "xpertctl demo thing SRC [OPTIONS]" in md and "More words." in md
    assert "| `SRC` | `src` | path | required | Input. |" in md
    assert "| `--how` | `how` | one of `a`, `b` | `a` | How. |" in md
    assert "| `--loud` | `loud` | switch | off | Shout. |" in md and "| `--n` | `n` | integer | `3` |" in md
    assert "xpertctl demo thing x -o y" in md


def test_the_recipe_example_in_docs_is_valid(tmp_path, cli):
    """docs/recipes.md's example passes `run --dry-run` (every value checked, every input present)."""
    text = (ROOT / "docs" / "recipes.md").read_text()
    example = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    r = tmp_path / "small.yaml"
    r.write_text(example.replace("build/small", str(tmp_path / "w")).replace("fixtures/", f"{ROOT}/fixtures/"))
    code, _, err = cli("run", r, "--dry-run")
    assert code == 0 and "graft-1: run" in err and "deprecat" not in err, err
    code, _, err = cli("run", r, "--dry-run", "--profile", "quick")
    assert code == 0 and "graft-1" not in err, err


def test_help_teaches_the_files_each_command_reads(cli):
    """Issue 31: the task-file fields, the SFT record and the text formats are in the live `--help`,
    checked against the fields the readers require (the readers refuse a record without them)."""
    def help_of(*cmd):
        code, out, err = cli(*cmd, "--help")
        assert code == 0, err
        return " ".join(out.split())
    ev = help_of("eval")
    for field in ('"context"', '"choices"', '"label"', '"instruction"', '"response"', ".jsonl.zst", ".parquet"):
        assert field in ev, field
    assert '"instruction"' in help_of("train") and '"response"' in help_of("train")
    for cmd in ("stats", "graft", "fidelity", "tokenize"):
        assert ".txt" in help_of(cmd) and "--text-field" in help_of(cmd), cmd


def test_a_record_missing_a_field_the_help_names_is_refused(tmp_path):
    from xpertctl import data
    from xpertctl.errors import XpertError
    f = tmp_path / "mc.jsonl"
    f.write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n')
    with pytest.raises(XpertError, match=r"field 'label' missing or not int \(the record has 'context', 'choices', "
                                         r"'answer'; needs context, choices, label\)"):
        data.read_jsonl(f, {"context": str, "choices": list, "label": int})


def test_help_explains_the_tables_a_command_prints(cli):
    """Issue 31 (a newcomer's note): fidelity's sel-mix/scratch columns and decompose's bare `errors` table
    were explained nowhere but the source. Every column fidelity prints is named in its --help (dense and
    MoE sources), and decompose's error table says what it measures."""
    from xpertctl import console
    from xpertctl.ops import fidelity
    def help_of(*cmd):
        code, out, err = cli(*cmd, "--help")
        assert code == 0, err
        return " ".join(out.split())
    agree = {"rel_error": 0.5, "cosine": 0.8}
    fh = help_of("fidelity")
    for refs in ({"selected_mixture": agree, "scratch": agree}, {"random_neurons": agree, "scratch": agree}):
        row = {"target": 0, "sources": [0], "rel_error": 0.5, "cosine": 0.8, "scale": 1.0, "references": refs}
        for col in fidelity.table([row], "t").columns:
            name = col.header.split()[0]
            assert f"{name}:" in fh, name
    sh = help_of("select")
    expert = {"level": "expert", "criterion": "min", "per_layer": 2, "layers": [
        {"layer": 0, "experts": [4, 9], "freq": {"a": [0.3, 0.2], "b": [0.4, 0.25]}, "prob": {"a": [0.1, 0.2]}}]}
    neuron = {"level": "neuron", "criterion": "min", "per_layer": 2, "num_neurons": 8, "neuron_top": 2, "layers": [
        {"layer": 0, "neurons": [1, 5], "scores": [0.5, 0.4], "coverage": {"a": 0.5}, "mass_share": {"a": 0.3}}]}
    for doc in (expert, neuron):
        for col in console.selection_table(doc).columns:
            assert f"{col.header.split()[0]}:" in sh, col.header
    titles = [t.title for t in console.summary_tables({"path": "f.safetensors", "kind": "factors",
                                                       "errors": {"0": {"gate": 0.5, "up": 0.4, "down": 0.3}}})]
    assert "errors" not in titles and any("||W - W_hat|| / ||W||" in t for t in titles), titles
    assert "errors:" in help_of("decompose")
