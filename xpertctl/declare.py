"""How a command is declared: typed parameters (Param, built with arg / opt / flag), the ranges numeric
options accept (Range), and the Command that groups them with its help, example, adapter and rules.

This is the language `ops_table.COMMANDS` is written in. From one declaration follow the CLI flag, the
recipe key, the help text, choices, ranges, recipe type checks and `--dry-run` validation: cli.py builds
Typer commands from it, recipe.py binds a step's `args` with Command.bind, reference.py renders
docs/cli.md from it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import XpertError

REQUIRED = ...  # a Param without a default must be given


@dataclass(frozen=True)
class Range:
    """The numbers a numeric option accepts (NaN and infinities never)."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself refused
    hi_open: bool = False
    note: str = ""  # what an edge value means, e.g. "0: no clipping"

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'<' if self.hi_open else '<='} {self.hi:g}"

    def holds(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))

    @property
    def rule(self) -> str:
        """'must be in [0, 1]', 'must be >= 0 (0: no clipping)': for errors and help alike."""
        where = f"in {self}" if self.lo is not None and self.hi is not None else str(self)
        return f"must be {where}" + (f" ({self.note})" if self.note else "")

    def check(self, v: float, display: str) -> None:
        if not self.holds(v):
            raise XpertError(f"{display} {v:g}: {self.rule}")


POSITIVE = Range(0, lo_open=True)  # sizes, counts, steps
NONNEG = Range(0)  # seeds, intervals where 0 means "off"
FRACTION = Range(0, 1)


@dataclass(frozen=True)
class Param:
    name: str  # the adapter's keyword and the key in a recipe step's `args`
    type: type  # str, int, float, bool or Path (of each element when `multiple`)
    help: str
    default: Any = REQUIRED
    flags: tuple[str, ...] = ()  # () = a positional argument
    choices: tuple[str, ...] | None = None
    multiple: bool = False  # a repeatable option; a list in a recipe
    metavar: str | None = None
    path: Callable[[Any], str | None] | None = None  # an input: the path inside a value (--dry-run checks it)
    check: Callable[[Any], Any] | None = None  # validates a value before anything runs (CLI and recipes)
    glob: bool | Callable[[Any], str] = False  # a glob of inputs (or value -> its glob): a recipe step's record
    # fingerprints what it matches
    range: Range | None = None  # a numeric option's accepted values (checked like `check`)
    # the default does what the command did before the option existed: a recipe step's record leaves it out, so
    # steps finished before it stay current (drop the mark if the default ever changes what the command does)
    neutral: bool = False
    tokenizer: bool = False  # a directory read for its tokenizer only: a step's record fingerprints only those files

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def display(self) -> str:
        return max(self.flags, key=len) if self.flags else (self.metavar or self.name.upper())

    @property
    def key(self) -> str:
        """Its key in a recipe step's `args`: the name `--help` shows (an option without its dashes, a
        positional by its metavar), lower case with underscores. `name` (the adapter's keyword) still
        works where it differs, with a deprecation notice."""
        if self.flags:
            return self.display.split("/")[0].lstrip("-").replace("-", "_")
        return re.sub(r"\W+", "_", self.metavar or self.name).strip("_").lower()

    def coerce(self, value: Any, where: str) -> Any:
        """A recipe value (YAML-typed) as this parameter's type; lists for `multiple`."""
        if self.multiple:
            return [self._one(v, where) for v in (value if isinstance(value, list) else [value])]
        return self._one(value, where)

    def _one(self, v: Any, where: str) -> Any:
        if v is None and not self.required:
            return None
        t, bad = self.type, False
        if t is bool:
            bad = not isinstance(v, bool)
        elif t in (int, float):  # 3, 3.0 (int only if whole) or "3" from --set
            try:
                whole = not (t is int and isinstance(v, float) and not v.is_integer())
                num = t(v) if whole and not isinstance(v, (bool, list, dict)) else None
            except (TypeError, ValueError):
                num = None
            bad, v = num is None, v if num is None else num
        elif isinstance(v, (list, tuple)) and t is str:
            v = ",".join(map(str, v))  # a YAML list for a comma-separated option
        elif isinstance(v, (dict, list, tuple)):
            bad = True
        else:
            v = Path(str(v)) if t is Path else str(v)
        if bad:
            raise XpertError(f"{where}: {self.key} expects {'true/false' if t is bool else t.__name__}, got {v!r}")
        if self.choices and v not in self.choices:  # a recipe's value: named by its recipe key
            raise XpertError(f"{where}: {self.key} {v!r}: choose one of {', '.join(self.choices)}")
        return v


@dataclass(frozen=True)
class Command:
    name: str  # "select", or "corpus cloze" for a subcommand
    help: str  # first line: the summary in `xpertctl --help`
    example: str  # one or more command lines, shown under the command's help
    params: tuple[Param, ...]
    run: Callable[..., Any] = field(repr=False)  # adapter: every param by keyword -> what to print (path)
    rules: tuple[Callable[[dict], None], ...] = ()  # checks of options together (values by name; raise XpertError)
    formats: str = ""  # the files it reads, field by field: shown in --help and docs/cli.md
    output: str = ""  # what the table it prints means, column by column: shown in --help and docs/cli.md

    def param(self, key: str) -> Param | None:
        """The parameter a recipe key names: its `--help` name (Param.key) or its older name (Param.name)."""
        key = key.replace("-", "_")
        return next((p for p in self.params if p.key == key), None) \
            or next((p for p in self.params if p.name == key), None)

    def old_keys(self, args: dict) -> list[tuple[str, str]]:
        """(old, new) for each recipe key given under its older name rather than its `--help` name."""
        return [(k, self.param(k).key) for k in args
                if self.param(k) is not None and k.replace("-", "_") != self.param(k).key]

    def bind(self, args: dict, where: str) -> dict:
        """A recipe step's args -> every parameter's value (defaults filled); one-line errors."""
        for key in args:
            p = self.param(key)
            if p is None:
                known = [p.key for p in self.params]
                raise XpertError(f"{where}: {self.name} has no argument {key!r} ({did_you_mean(key, known)}"
                                 f"arguments: {', '.join(known)})")
        twice = [p.key for p in self.params if sum(self.param(k) is p for k in args) > 1]
        if twice:
            raise XpertError(f"{where}: {self.name}: {twice[0]!r} given twice (under its old and its new name)")
        given = {self.param(k).name: v for k, v in args.items()}
        values = {}
        for p in self.params:
            if p.name in given and (given[p.name] is not None or p.required):  # null: as if not given
                values[p.name] = p.coerce(given[p.name], where)
            elif p.required:
                raise XpertError(f"{where}: {self.name} needs {p.name!r} ({p.help})")
            else:
                values[p.name] = p.default
        self.check(values, where)
        return values

    def check(self, values: dict, where: str = "") -> None:
        """Each value's own check (a range, a target spec, ranks, a size...), then the rules that relate
        options: before any work starts, the same for the CLI, recipes and --dry-run."""
        try:
            for p in self.params:
                v = values.get(p.name)
                if v is None:
                    continue
                for x in v if p.multiple else [v]:
                    if p.range is not None:
                        p.range.check(x, p.display)
                    if p.check is not None:
                        p.check(x)
            for rule in self.rules:
                rule(values)
        except XpertError as e:
            raise XpertError(f"{where}: {e}" if where else str(e)) from None

    def argv(self, args: dict) -> list[str]:
        """The command line for a recipe step's args (as given, in order): shown, recorded, pasteable."""
        pos, opts = [], []
        for key, val in args.items():
            p = self.param(key)
            if val is None and not p.required:  # null in a recipe: as if not given
                continue
            vals = val if isinstance(val, list) and p.multiple else [val]
            if not p.flags:
                pos += [str(v) for v in vals]
            elif p.type is bool:
                on, _, off = p.display.partition("/")  # an on-by-default switch is --x/--no-x
                if val:
                    opts.append(on)
                elif off:
                    opts.append(off)
            else:
                for v in vals:
                    opts += [p.display, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
        return self.name.split() + pos + opts

    def inputs(self, values: dict) -> list[tuple[Param, str]]:
        """(param, path) for every input path in bound values."""
        found = []
        for p in self.params:
            v = values.get(p.name)
            if p.path is None or v is None:
                continue
            for x in v if p.multiple else [v]:
                path = p.path(x)
                if path:
                    found.append((p, path))
        return found

    def invoke(self, values: dict) -> Any:
        """Run the adapter after the same checks a recipe's bind (and so --dry-run) makes. A disk's refusal
        that no output's own writer reported (a log appended to, a directory made) is one line naming the
        file, or else the output."""
        self.check(values)
        try:
            return self.run(**values)
        except Exception as e:
            from .errors import write_failure
            failure = write_failure(e, values.get("out"))
            if failure is None:
                raise
            raise failure from None


# ---- parameter helpers ------------------------------------------------------------------------------

def _path(v) -> str:
    return str(v)


def _after(sep: str):
    """The path inside NAME=PATH (domains) or KIND:PATH (eval tasks)."""
    return lambda v: str(v).partition(sep)[2] or None


def arg(name: str, help: str, *, type: type = Path, metavar: str | None = None, input: bool = True, **kw) -> Param:
    """A positional argument (by default an input path)."""
    return Param(name, type, help, metavar=metavar or name.upper(), path=_path if input and type is Path else None, **kw)


def opt(name: str, default: Any, help: str, *flags: str, type: type | None = None, input: bool = False, **kw) -> Param:
    """An option; its flag is --name-with-dashes unless given; its type follows the default; a numeric
    option's range (range=...) is shown at the end of its help."""
    t = type or (builtin_type(default) if default not in (None, REQUIRED) else str)
    rng = kw.get("range")
    if rng is not None:
        help = f"{help} {rng.rule[0].upper()}{rng.rule[1:]}."
    return Param(name, t, help, default=default, flags=flags or (f"--{name.replace('_', '-')}",),
                 path=kw.pop("path", _path if input else None), **kw)


def flag(name: str, help: str, *flags: str) -> Param:
    return opt(name, False, help, *flags)


def builtin_type(value: Any) -> type:
    return {bool: bool, int: int, float: float}.get(value.__class__, str)


def out_param(help: str = "Output path.", required: bool = True) -> Param:
    return opt("out", REQUIRED if required else None, help, "-o", "--out", type=Path)


FORCE = flag("force", "Replace an existing output.")
TEXT_FIELD = opt("text_field", "text", "Text field of .jsonl[.gz|.zst] records / column of .parquet and .arrow "
                 "(.txt has none).")
JSON = flag("as_json", "Print the summary as JSON on stdout instead of the path (its \"path\" is the output).",
            "--json")


def did_you_mean(word: str, known) -> str:
    """'did you mean 'x'? ' for the closest of `known` to a misspelt `word` (empty when none is close)."""
    import difflib
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""
