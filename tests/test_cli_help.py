"""The command line as a newcomer meets it: --version, completion, help that teaches, families."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

COMMANDS = ["inspect", "families", "stats", "select", "decompose", "reshape", "graft", "fidelity", "tokenize", "train", "eval",
            "corpus build", "corpus tokenizer", "corpus cloze", "corpus order", "corpus sft", "init", "report", "run"]


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(cli, flag):
    from xpertctl import __version__
    code, out, err = cli(flag)
    assert code == 0 and out == f"{__version__}\n", err


def test_shell_completion_is_on():
    env = {**os.environ, "_XPERTCTL_COMPLETE": "complete_bash", "COMP_WORDS": "xpertctl deco", "COMP_CWORD": "1"}
    r = subprocess.run([sys.executable, "-c", "from xpertctl.cli import main; main()"], env=env,
                       capture_output=True, text=True, cwd=ROOT)
    assert "decompose" in r.stdout, r.stderr
    code = subprocess.run([sys.executable, "-c", "from xpertctl.cli import main; main()", "--show-completion", "bash"],
                          capture_output=True, text=True).stdout
    assert "_XPERTCTL_COMPLETE" in code or "complete" in code


def _help(cli, name):
    code, out, err = cli(*name.split(), "--help")
    assert code == 0, err
    return out


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_an_example_and_described_options(cli, name):
    from xpertctl.cli import app, click_command
    text = _help(cli, name)
    assert "Example" in text and f"xpertctl {name}" in " ".join(text.split())
    assert "<bool>" not in text
    cmd = click_command(app)
    for word in name.split():
        cmd = cmd.commands[word]
    for p in cmd.params:
        assert (p.help or "").strip(), f"{name} {p.name}: no description"


@pytest.mark.parametrize("name,flag,values", [
    ("select", "--criterion", ["min", "mean", "vote", "random", "low", "all"]),
    ("graft", "--arch", ["llama", "qwen3"]),
    ("graft", "--criterion", ["min", "mean"]),
    ("reshape", "--layer-map", ["uniform", "first", "merge"]),
    ("graft", "--combine", ["usage", "uniform", "literal", "first"]),
    ("reshape", "--rescale", ["routed", "selected", "none"]),
    ("graft", "--shared", ["none", "concat"]),
    ("decompose", "--weighting", ["joint", "per-matrix"]),
    ("graft", "--fit", ["none", "down", "ffn"]),
    ("graft", "--ridge-select", ["domains", "documents", "both"]),
    ("graft", "--fit-weighting", ["tokens", "domains"]),
    ("reshape", "--width-select", ["norm", "first"]),
    ("graft", "--ffn-init", ["xpert", "scratch", "norm-matched"]),
    ("stats", "--dtype", ["float32", "bfloat16", "float16"]),
    ("train", "--resume", ["no", "auto"]),
    ("eval", "--split", ["train", "val", "test"]),
])
def test_enumerated_options_are_choices(cli, name, flag, values):
    from xpertctl.cli import app, click_command
    cmd = click_command(app).commands[name]
    p = next(p for p in cmd.params if flag in p.opts)
    assert list(p.type_descriptor.choices)[: len(values)] == values
    code, _, err = cli(name, "x", "-o", "y", flag, "nonsense")
    assert code == 2 and flag in err and "nonsense" in err and len(err.strip().splitlines()) == 1


def test_root_help_lists_every_command(cli):
    text = _help(cli, "")
    for name in {c.split()[0] for c in COMMANDS}:
        assert name in text


def test_families_lists_the_architecture_table(cli):
    from xpertctl.io.arch import FAMILIES
    code, out, err = cli("families", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [f["name"] for f in doc] == [f.name for f in FAMILIES]
    olmoe = doc[0]
    assert olmoe["moe"] and olmoe["expert_keys"][0] == "model.layers.{i}.mlp.experts.{j}.gate_proj.weight"
    code, out, err = cli("families")
    assert code == 0 and "mixtral" in out and "block_sparse_moe" in out
