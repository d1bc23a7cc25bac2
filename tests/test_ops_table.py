"""The table of operations: one declaration serves the CLI and the recipe runner alike."""
from pathlib import Path

import pytest
import typer
import yaml

from conftest import assert_user_error
from xpertctl import recipe as rc
from xpertctl.errors import XpertError
from xpertctl.ops_table import BY_NAME, COMMANDS, Command, arg, flag, opt


def test_every_cli_command_is_a_table_entry_with_its_parameters():
    from xpertctl.cli import app, click_command
    root = click_command(app)
    seen = {}
    todo = [("", root)]
    while todo:
        prefix, cmd = todo.pop()
        for name, sub in getattr(cmd, "commands", {}).items():
            full = f"{prefix} {name}".strip()
            if getattr(sub, "commands", None):
                todo.append((full, sub))
            else:
                seen[full] = {p.name for p in sub.params}
    assert set(seen) == set(BY_NAME)
    for name, params in seen.items():
        assert params == {p.name for p in BY_NAME[name].params}, name


def _toy(calls):
    def echo(words, times, loud, out):
        calls.append((words, times, loud, out))
        return out
    return Command("echo", "Echo words.", "xpertctl echo hi -o out.txt", (
        arg("words", "What to say.", type=str),
        opt("times", 1, "How often."),
        flag("loud", "Shout."),
        opt("out", None, "Where.", "-o", "--out", type=Path),
    ), echo)


def test_a_new_command_is_one_declaration_for_cli_and_recipes(tmp_path, capsys):
    """What the merger does for a new command: declare it once; both front ends then run it."""
    from xpertctl.cli import build_app, click_command
    calls = []
    toy = _toy(calls)
    click_command(build_app((toy,))).main(["echo", "hi", "--times", "3", "--loud", "-o", "x.txt"], standalone_mode=False)
    assert calls[-1] == ("hi", 3, True, Path("x.txt")) and capsys.readouterr().out == "x.txt\n"
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"name": "t", "steps": [
        {"id": "a", "op": "echo", "args": {"words": "hi", "times": 2, "out": str(tmp_path / "o.txt")}}]}))
    assert rc.run(r, table={"echo": toy}) == [str(tmp_path / "o.txt")]
    assert calls[-1] == ("hi", 2, False, tmp_path / "o.txt")


@pytest.mark.parametrize("args,needle", [
    ({"words": "hi", "times": "many"}, "times expects int, got 'many'"),
    ({"words": "hi", "loud": "yes"}, "loud expects true/false"),
    ({"times": 2}, "echo needs 'words'"),
    ({"words": "hi", "colour": 1}, "echo has no argument 'colour'"),
])
def test_recipe_values_are_type_checked_by_the_table(args, needle):
    with pytest.raises(XpertError, match=needle.replace("(", r"\(")):
        _toy([]).bind(args, "r.yaml: step 'a'")


def test_recipe_choices_come_from_the_table(tmp_path, cli):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"name": "t", "steps": [{"id": "s", "op": "select", "args": {
        "stats": "s.safetensors", "criterion": "best", "out": "o.json"}}]}))
    code, _, err = cli("run", r)
    assert_user_error(code, err, "r.yaml", "step 's'", "criterion 'best': choose one of min, mean, vote")


def test_choices_are_the_ops_own_lists():
    from xpertctl import specs
    from xpertctl.ops import graft, reshape, select
    assert BY_NAME["select"].param("criterion").choices == select.CRITERIA == specs.CRITERIA
    assert BY_NAME["reshape"].param("layer_map").choices == reshape.LAYER_MAPS
    assert tuple(graft.TARGET_CLASSES) == BY_NAME["graft"].param("arch").choices
