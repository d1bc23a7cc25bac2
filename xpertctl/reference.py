"""docs/cli.md, rendered from the command table: every command, argument, option, default, accepted
value and recipe key, so the reference cannot drift from the CLI (tests/test_reference.py fails when
the committed file is not what this renders). `make docs` (python -m xpertctl.reference) rewrites it."""
from __future__ import annotations

import sys
from pathlib import Path

from .ops_table import COMMANDS, Command, Param

HEADER = """# Command reference

<!-- Generated from xpertctl/ops_table.py by `make docs` (python -m xpertctl.reference). Do not edit:
     tests/test_reference.py fails when this file is not what the table renders. -->

Every command, its arguments and options, their defaults and accepted values. The **recipe key** is
the name a recipe step's `args` use for it (the `--help` name without dashes; a positional by its
metavar); `xpertctl run` accepts the older names some releases used, with a deprecation notice.
Every command prints its output's path on stdout; bad input is one line on stderr and exit code 2.

"""


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(p: Param) -> str:
    if p.required:
        return "required"
    if p.type is bool:
        return "off" if not p.default else "on"
    if p.default is None:
        return "—"
    return f"`{p.default}`"


def _value(p: Param) -> str:
    if p.type is bool:
        return "switch"
    kind = f"one of {', '.join(f'`{c}`' for c in p.choices)}" if p.choices else \
        {int: "integer", float: "number", str: "text", Path: "path"}.get(p.type, p.type.__name__)
    return kind + ("; repeatable (a list in a recipe)" if p.multiple else "")


def _usage(c: Command) -> str:
    pos = [p.display if p.required else f"[{p.display}]" for p in c.params if not p.flags]
    req = [f"{p.display} …" for p in c.params if p.flags and p.required]
    return " ".join(["xpertctl", c.name, *pos, *req, "[OPTIONS]"])


def render_command(c: Command) -> str:
    summary, _, more = c.help.partition("\n")
    lines = [f"## `xpertctl {c.name}`", "", _cell(summary), ""]
    if more.strip():
        lines += [more.strip(), ""]
    lines += ["```", _usage(c), "```", "",
              "| argument / option | recipe key | value | default | what it does |", "|---|---|---|---|---|"]
    for p in c.params:
        name = p.display if not p.flags else ", ".join(f"`{f}`" for f in p.flags)
        lines.append(f"| {name if p.flags else f'`{name}`'} | `{p.key}` | {_value(p)} | {_default(p)} | {_cell(p.help)} |")
    if c.formats:
        lines += ["", "Files it reads:", "", *(f"- {_cell(line)}" for line in c.formats.splitlines())]
    if c.output:
        lines += ["", "What it prints:", "", *(f"- {_cell(line)}" for line in c.output.splitlines())]
    lines += ["", "Example:", "", "```sh", *c.example.strip().splitlines(), "```", ""]
    return "\n".join(lines)


def render() -> str:
    index = ["| command | what it does |", "|---|---|"] + [
        f"| [`{c.name}`](#xpertctl-{c.name.replace(' ', '-')}) | {_cell(c.help.partition(chr(10))[0])} |"
        for c in COMMANDS]
    return HEADER + "\n".join(index) + "\n\n" + "\n".join(render_command(c) for c in COMMANDS)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
