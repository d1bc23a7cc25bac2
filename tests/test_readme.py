"""The README's command reference matches the CLI: every command and option is there, and every
option the README names for a command exists."""
import re

import pytest

from conftest import ROOT
from xpertctl.ops_table import BY_NAME

README = (ROOT / "README.md").read_text()
REFERENCE = README.split("## Command reference")[1].split("\n## ")[0]
LINES = [l for l in REFERENCE.splitlines() if l.startswith("| `")]
ROWS = {name: next((l for l in LINES if l.split("|")[1].strip().startswith(f"`{name}")
                    or f"/ `{name} " in l.split("|")[1]), None) for name in BY_NAME}


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_every_command_and_option_is_in_the_reference(name):
    row = ROWS[name]
    assert row is not None, f"no reference row for {name}"
    flags = [p.display for p in BY_NAME[name].params if p.flags and p.display not in ("--force", "--out")]
    missing = [f for f in flags if f not in row]
    assert not missing, f"{name}: {missing} not in its reference row"


def test_every_option_the_reference_names_exists():
    all_flags = {x for c in BY_NAME.values() for p in c.params for f in p.flags for x in (f, *f.split("/"))} \
        | {"--help", "--version", "-V"}
    for name, row in ROWS.items():
        cmds = [c for c in BY_NAME.values() if ROWS[c.name] == row]  # a row may document several commands
        own = {x for c in cmds for p in c.params for f in p.flags for x in (f, *f.split("/"))}
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[a-zA-Z])\b", row):
            assert flag in own or flag in all_flags, f"{name}: README names {flag}, which does not exist"


def test_the_bad_input_count_is_the_matrix_size():
    """'The bad-input matrix (tests/test_bad_inputs.py) holds N such cases': N is its length."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bad_inputs", ROOT / "tests" / "test_bad_inputs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    stated = re.search(r"bad-input matrix\s+\(`tests/test_bad_inputs.py`\)\s+holds\s+(\d+)\s+such cases", README)
    assert stated and int(stated.group(1)) == len(mod.CASES), (stated and stated.group(1), len(mod.CASES))
