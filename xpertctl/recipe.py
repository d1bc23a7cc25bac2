"""YAML recipes: named steps, each one xpertctl command with its arguments, run in order.

    name: demo
    estimate: "about 5 minutes on 2 cores"      # printed first
    result: "${vars.work}/run-0/final"          # announced last ("done: ...")
    vars: {work: work/demo, seeds: [0, 1, 2]}
    profiles: {quick: {vars: {seeds: [0]}}}     # --profile quick
    steps:
      - id: stats
        op: stats
        args: {src: fixtures/teacher, domain: [a=x.txt, b=y.txt], out: "${vars.work}/stats.safetensors"}
      - id: "train-${grid.seed}"
        op: train
        grid: {seed: "${vars.seeds}"}
        args: {ckpt: "${steps.graft.out}", seed: "${grid.seed}", out: "${vars.work}/run-${grid.seed}"}

References: ${vars.NAME}, ${steps.ID.out} (an earlier step's `out`), ${steps.PATTERN.out} (the outs of
every earlier step whose id matches the glob PATTERN, as a list: what this run of the recipe made, not
whatever an older run left on disk), ${grid.KEY}. A value that is a single reference keeps its type (a
list stays a list). A grid expands a step into one per combination.
Each step is bound to its command in the table of operations (ops_table, handed in by the caller),
so its values are checked exactly as the command line's options are, and every input must exist or
be written by an earlier step, all before the first step runs. A step whose `out` exists and whose
record (op, arguments, input fingerprints) matches is skipped.
"""
from __future__ import annotations

import fnmatch
import glob
import itertools
import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from .console import err, notice
from .errors import XpertError, forget_written, interrupted_message
from .io.names import check_name

_REF = re.compile(r"\$\{([a-z]+)\.([^${}]+)\}")  # an innermost reference: nested ones resolve inside out


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    op: str
    args: dict[str, Any] = {}
    grid: dict[str, Any] | None = None


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    estimate: str = ""
    vars: dict[str, Any] = {}


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    estimate: str = ""  # printed before running, e.g. "about 25 minutes on 2 cores"
    result: str = ""  # the file to look at when done (references allowed); announced at the end
    vars: dict[str, Any] = {}
    profiles: dict[str, Profile] = {}  # named sets of var overrides (--profile quick)
    steps: list[Step]
    # --set steps.PATTERN.args.KEY=VALUE: applied to every expanded step whose id matches PATTERN
    _arg_overrides: list[tuple[str, str, Any, str]] = PrivateAttr(default_factory=list)


def _set(doc: dict, dotted: str, value: Any, path: Path) -> None:
    keys = dotted.split(".")
    cur = doc
    for k in keys[:-1]:
        if isinstance(cur, list):
            cur = cur[int(k)] if k.isdigit() and int(k) < len(cur) else None
        elif isinstance(cur, dict):
            cur = cur.setdefault(k, {})
        if not isinstance(cur, (dict, list)):
            raise XpertError(f"--set {dotted}: {path} has no such place")
    if isinstance(cur, list):
        cur[int(keys[-1])] = value
    else:
        cur[keys[-1]] = value


def _check_keys(doc: dict, path: Path) -> None:
    """A key the recipe language does not have, at the top, in a step or a profile: named with the likely
    one and the keys there are (the validator would only say 'Extra inputs are not permitted')."""
    from .declare import did_you_mean
    def check(mapping, model, where):
        for key in mapping:
            if key not in model.model_fields:
                known = list(model.model_fields)
                raise XpertError(f"{path}: {where}unknown key {key!r} ({did_you_mean(str(key), known)}"
                                 f"keys: {', '.join(known)})")
    check(doc, Recipe, "")
    for n, step in enumerate(doc.get("steps") or []):
        if isinstance(step, dict):
            check(step, Step, f"step {step.get('id', n)!r}: ")
    for name, prof in (doc.get("profiles") or {}).items():
        if isinstance(prof, dict):
            check(prof, Profile, f"profiles.{name}: ")


def load(path: Path, overrides: list[str] = (), profile: str | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise XpertError(f"{path}: no such recipe")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise XpertError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(doc, dict):
        raise XpertError(f"{path}: a recipe is a mapping with name, vars and steps")
    arg_overrides = []
    for o in overrides:
        key, sep, val = o.partition("=")
        if not sep or not key:
            raise XpertError(f"--set {o!r}: expected KEY=VALUE, e.g. vars.steps=100")
        value = yaml.safe_load(val)
        if key.startswith("vars."):  # a typo must not silently do nothing
            name = key[5:].split(".")[0]
            if name not in (doc.get("vars") or {}):
                known = ", ".join(doc.get("vars") or {}) or "(none)"
                raise XpertError(f"--set {o}: {path} has no var {name!r} (vars: {known})")
        elif key.startswith("steps."):  # steps.PATTERN.args.KEY (glob over expanded ids) or steps.PATTERN.FIELD
            pattern, sep, sub = key[6:].partition(".args.")
            if sep and sub:
                arg_overrides.append((pattern, sub, value, o))
                continue
            pattern, _, sub = key[6:].partition(".")
            ids = [n for n, st in enumerate(doc.get("steps") or []) if isinstance(st, dict)
                   and fnmatch.fnmatchcase(str(st.get("id")), pattern)]
            if not ids or not sub:
                raise XpertError(f"--set {o}: {path} has no step matching {pattern!r}")
            for n in ids:
                _set(doc, f"steps.{n}.{sub}", value, path)
            continue
        _set(doc, key, value, path)
    _check_keys(doc, path)
    try:
        recipe = Recipe.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        if first["loc"][:1] == ("steps",) and len(first["loc"]) > 1 and isinstance(first["loc"][1], int):
            sid = (doc.get("steps") or [{}])[first["loc"][1]]
            sid = sid.get("id") if isinstance(sid, dict) else None
            loc = f"step {sid!r}: " + ".".join(str(x) for x in first["loc"][2:]) if sid else loc
        raise XpertError(f"{path}: {loc}: {first['msg']}") from None
    recipe._arg_overrides = arg_overrides
    for name, prof in recipe.profiles.items():
        unknown = sorted(set(prof.vars) - set(recipe.vars))
        if unknown:
            raise XpertError(f"{path}: profiles.{name}: {', '.join(unknown)} not in vars")
    if profile is not None:
        if profile not in recipe.profiles:
            from .declare import did_you_mean
            raise XpertError(f"--profile {profile!r}: {path} has no profile of that name ("
                             + (f"{did_you_mean(profile, recipe.profiles)}profiles: {', '.join(recipe.profiles)})"
                                if recipe.profiles else "it has none)"))
        p = recipe.profiles[profile]
        recipe.vars.update(p.vars)
        recipe.estimate = p.estimate or recipe.estimate
        for o in overrides:  # --set still wins over the profile
            if o.startswith("vars."):
                key, _, val = o.partition("=")
                recipe.vars[key[5:]] = yaml.safe_load(val)
    return recipe


def _resolve(value: Any, ctx: dict, where: str, depth: int = 0) -> Any:
    """Every reference in `value` resolved, innermost first. A var may hold a template for the steps that use
    it (`${grid.seed}` in a var): outside a step (ctx without "grid") grid references are kept as text, and
    whatever a reference brings in is resolved in turn, in the step that uses it."""
    if depth > 20:
        raise XpertError(f"{where}: references nest more than 20 deep (a var that refers to itself?)")
    if isinstance(value, str):
        while True:  # ${vars.arms.${grid.arm}.x}: the inner reference first, then the one it completes
            m = _REF.fullmatch(value)
            if m:
                if _kept(m, ctx):
                    return value
                got = _lookup(m.group(1), m.group(2), ctx, where)
                return _resolve(got, ctx, where, depth + 1) if _has_ref(got) else got
            new = _REF.sub(lambda mm: mm.group(0) if _kept(mm, ctx) else
                           _inline(_lookup(mm.group(1), mm.group(2), ctx, where), mm.group(0), where), value)
            if new == value:
                return value
            value = new
    if isinstance(value, list):
        return [_resolve(v, ctx, where, depth) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, ctx, where, depth) for k, v in value.items()}
    return value


def _kept(m, ctx: dict) -> bool:
    """A grid reference read while resolving vars: left for the step that uses the var."""
    return m.group(1) == "grid" and "grid" not in ctx


def _has_ref(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_REF.search(value))
    if isinstance(value, list):
        return any(_has_ref(v) for v in value)
    if isinstance(value, dict):
        return any(_has_ref(v) for v in value.values())
    return False


def _inline(value: Any, ref: str, where: str) -> str:
    if isinstance(value, list) and ref.startswith("${steps."):  # a pattern's list has no place inside a string
        raise XpertError(f"{where}: {ref} is a list of outs; give it as the whole value")
    return str(value)


def _field(value: Any, name: str, fields: list[str], ref: str, where: str) -> Any:
    """${vars.NAME.FIELD...} / ${grid.KEY.FIELD...}: a mapping's field or a list's item (per-arm settings)."""
    for f in fields:
        if isinstance(value, dict):
            if f not in value:
                raise XpertError(f"{where}: {ref}: {name} has no field {f!r}")
            value = value[f]
        elif isinstance(value, list):
            if not (f.isdigit() and int(f) < len(value)):
                raise XpertError(f"{where}: {ref}: {name} has no item {f}")
            value = value[int(f)]
        else:
            raise XpertError(f"{where}: {ref}: {name} is not a mapping")
        name = f
    return value


def _lookup(kind: str, key: str, ctx: dict, where: str) -> Any:
    if kind in ("vars", "grid"):
        name, *fields = key.split(".")
        scope = ctx["vars"] if kind == "vars" else ctx.get("grid", {})
        if name not in scope:
            raise XpertError(f"{where}: ${{{kind}.{key}}} " + ("is not defined in vars" if kind == "vars"
                                                               else "is not a grid key of this step"))
        return _field(scope[name], name, fields, f"${{{kind}.{key}}}", where)
    if kind == "steps":
        sid, _, field = key.rpartition(".")
        if field == "out" and any(c in sid for c in "*?["):  # a pattern: every earlier step's out it matches
            outs = [o for s, o in ctx["steps"].items() if fnmatch.fnmatchcase(s, sid)]
            if not outs:
                raise XpertError(f"{where}: ${{steps.{key}}} matches no earlier step's id")
            return outs
        if field != "out" or sid not in ctx["steps"]:
            raise XpertError(f"{where}: ${{steps.{key}}} names no earlier step's out")
        return ctx["steps"][sid]
    raise XpertError(f"{where}: unknown reference ${{{kind}.{key}}}")


def resolved_vars(recipe: Recipe, path: Path) -> dict:
    """The recipe's vars with their references resolved (vars may refer to earlier vars)."""
    ctx: dict = {"vars": {}, "steps": {}}
    for k, v in recipe.vars.items():
        ctx["vars"][k] = _resolve(v, ctx, f"{path}: vars.{k}")
    return ctx["vars"]


def expand(recipe: Recipe, path: Path) -> list[tuple[str, str, dict]]:
    """(id, op, resolved args) for every step, grids expanded, references resolved in order."""
    ctx: dict = {"vars": resolved_vars(recipe, path), "steps": {}}
    plan, matched = [], set()
    for step in recipe.steps:
        where = f"{path}: step {step.id!r}"
        grid = _resolve(step.grid or {}, ctx, where)
        keys = list(grid)
        for k, v in grid.items():
            if not isinstance(v, list):
                raise XpertError(f"{where}: grid.{k} must be a list")
        # an empty list expands the step to none: a profile switches such steps on by filling the list
        combos = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))] if keys else [{}]
        for combo in combos:
            c = {**ctx, "grid": combo}
            sid = check_name(_resolve(step.id, c, where), f"{where}: id")  # it names the step's log file
            if sid in ctx["steps"] or any(p[0] == sid for p in plan):
                raise XpertError(f"{where}: id {sid!r} is used twice (put every grid key in the id)")
            raw = json.loads(json.dumps(step.args))
            for n, (pattern, sub, value, _) in enumerate(recipe._arg_overrides):
                if fnmatch.fnmatchcase(sid, pattern) or fnmatch.fnmatchcase(step.id, pattern):
                    _set(raw, sub, value, path)
                    matched.add(n)
            args = _resolve(raw, c, f"{path}: step {sid!r}")
            plan.append((sid, step.op, args))
            if "out" in args:
                ctx["steps"][sid] = args["out"]
    for n, (pattern, _, _, o) in enumerate(recipe._arg_overrides):
        if n not in matched:
            raise XpertError(f"--set {o}: {path} has no step matching {pattern!r}")
    return plan


def result(recipe: Recipe, path: Path) -> str:
    """The recipe's `result` with its references resolved ('' when it names none)."""
    ctx: dict = {"vars": resolved_vars(recipe, path), "steps": {}}
    return str(_resolve(recipe.result, ctx, f"{path}: result"))


# ---- running steps through the table of operations ------------------------------------------------

def command(op: str, where: str, table: dict):
    """The table entry of a step's op (a recipe cannot run a recipe)."""
    cmd = table.get(op) if op != "run" else None
    if cmd is None:
        ops = sorted(k for k in table if k != "run")
        raise XpertError(f"{where}: unknown op {op!r} (ops: {', '.join(ops)})")
    return cmd


def argv_for(op: str, args: dict, where: str, table: dict) -> list[str]:
    """The command line that runs `op` with `args` (keys are the command's parameter names)."""
    cmd = command(op, where, table)
    cmd.bind(args, where)
    return cmd.argv(args)


# what a tokenizer is made of in a model directory (transformers' and sentencepiece's file names)
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
                   "chat_template*", "config.json")


def fingerprint(value: str, tokenizer: bool = False) -> str | None:
    """The provenance fingerprint of an existing path argument (file, or directory tree): its content digest
    and its latest mtime, so that an input rewritten in place runs the step again even where the digest
    samples a large file (as make, a touched input does too). tokenizer: a model directory read for its
    tokenizer: only its tokenizer files (new weights of a student used as --tokenizer change nothing)."""
    from .io import provenance
    p = Path(value)
    if not p.exists():
        return None
    files = sorted({f for pat in TOKENIZER_FILES for f in p.glob(pat) if f.is_file()}) if tokenizer and p.is_dir() else []  # a set: tokenizer.model matches two patterns
    card = ("README.md",) if p.is_dir() and (p / "config.json").is_file() else ()
    fp = provenance.fingerprint(p, files=files, mtime=True) if files else provenance.fingerprint(p, mtime=True, skip=card)
    return f"{fp['sha256']}@{fp['mtime']}"


def _record(cmd, argv: list[str], args: dict) -> dict:
    """What makes a finished step current: its op, command line and the fingerprint of every input the
    table declares, whatever the path looks like (`data`, `a=corpus/x.txt`, `ppl:data`; keyed by the
    argument as written, as records always were), and of every file an input glob (report's --results)
    matches now; and the value of every option it leaves at its default."""
    inputs = {}
    for key, v in args.items():
        p = cmd.param(key)
        if v is None or p is None or (p.path is None and not p.glob):  # null: not given
            continue
        for x in v if isinstance(v, list) else [v]:
            if p.path is not None:
                path = p.path(x)
                found = [(str(x), path)] if path else []
            else:
                pattern = p.glob(x) if callable(p.glob) else x  # NAME=GLOB values name their glob
                found = [(m, m) for m in sorted(glob.glob(str(pattern)))]
            for name, path in found:
                fp = fingerprint(path, tokenizer=p.tokenizer)
                if fp:
                    inputs[name] = fp
    # the defaults the step relies on: a release that changes one (as --rescale's did) makes the step stale
    given = {cmd.param(k).name for k, v in args.items() if v is not None}  # null: not given
    defaults = {p.name: p.default if isinstance(p.default, (type(None), bool, int, float, str)) else str(p.default)
                for p in cmd.params if p.name not in given and not p.required and not p.neutral}
    return {"op": cmd.name, "argv": argv, "inputs": inputs, "defaults": defaults}


def _started(out: str, rec: dict) -> bool:
    """True when the step's last run had exactly these arguments and inputs and did not finish."""
    p = _record_path(out)
    try:
        return p.is_file() and json.loads(p.read_text()) == {**rec, "started": True}
    except json.JSONDecodeError:
        return False


def _record_path(out: str) -> Path:
    p = Path(out)
    return p.parent / f".{p.name}.step.json"


def _write_record(out: str, rec: dict) -> None:
    from .io.writer import write_text  # temp, fsync, rename: a killed runner leaves the old record or the new one
    write_text(_record_path(out), json.dumps(rec, indent=1), output=False)


def _check_inputs(cmd, values: dict, where: str, outputs: list[str]) -> None:
    """Every input path exists now or is written by an earlier step (its `out`, or inside it)."""
    for p, value in cmd.inputs(values):
        made = any(value == o or value.startswith(o.rstrip("/") + "/") or o.startswith(value.rstrip("/") + "/")
                   for o in outputs)
        if not made and not Path(value).exists():
            raise XpertError(f"{where}: {p.display} {value}: no such file or directory, and no earlier step writes it")


def plan_steps(path: Path, recipe: Recipe, table: dict, check_inputs: bool = True) -> list[tuple]:
    """(id, command, bound values, argv, args) per step: every op, value and input checked up front."""
    steps, outputs, old = [], [], {}
    for sid, op, args in expand(recipe, Path(path)):
        where = f"{path}: step {sid!r}"
        cmd = command(op, where, table)
        values = cmd.bind(args, where)
        old.update({(cmd.name, o): n for o, n in cmd.old_keys(args)})
        if check_inputs:
            _check_inputs(cmd, values, where, outputs)
        if args.get("out") is not None:
            outputs.append(str(args["out"]))
        steps.append((sid, cmd, values, cmd.argv(args), args))
    for (name, o), n in old.items():
        notice(f"{path}: {name}'s argument {o!r} is now {n!r} (the name `xpertctl {name} --help` shows); "
               f"{o!r} still works but will be removed")
    return steps


def resolved(path: Path, overrides: list[str] = (), profile: str | None = None, *, table: dict) -> str:
    """The recipe as it would run (profile and --set applied, grids expanded, references resolved): YAML."""
    recipe = load(path, overrides, profile)
    steps = [{"id": sid, "op": cmd.name, "args": args, "command": shlex.join(["xpertctl", *argv])}
             for sid, cmd, _, argv, args in plan_steps(path, recipe, table, check_inputs=False)]
    doc = {"name": recipe.name, "profile": profile, "estimate": recipe.estimate, "result": result(recipe, path),
           "vars": resolved_vars(recipe, path), "steps": steps}
    return yaml.safe_dump(doc, sort_keys=False, width=1000).rstrip("\n")


def run(path: Path, overrides: list[str] = (), dry_run: bool = False, only: list[str] | None = None,
        profile: str | None = None, jobs: int = 1, *, table: dict) -> list[str]:
    """`xpertctl run`: run (or with dry_run, print) every step through `table`; returns the outputs (none
    for a dry run: the plan goes to stderr).

    jobs > 1 runs independent steps side by side on worker processes (see _run_parallel)."""
    from .io import provenance
    if jobs < 1:
        raise XpertError(f"--jobs {jobs}: must be 1 or more")
    recipe = load(path, overrides, profile)
    steps = plan_steps(path, recipe, table)
    for o in only or []:
        if not any(fnmatch.fnmatchcase(sid, o) for sid, *_ in steps):
            raise XpertError(f"--only {o!r}: matches no step of {path} (e.g. {', '.join(s[0] for s in steps[:3])})")
    selected = [s for s in steps if not only or any(fnmatch.fnmatchcase(s[0], o) for o in only)]
    if only:
        _check_only(selected, steps)
    with _build_lock(path, steps, dry_run):
        if not dry_run:  # a read-only or forbidden place for any step's output: refused before the first step runs
            from .io.writer import check_writable
            for sid, cmd, values, argv, args in selected:
                out = args.get("out")
                if out is None:
                    continue
                try:
                    done = _done(out, _record(cmd, argv, args))
                except XpertError:
                    done = False  # an unreadable input: the step itself reports it when its turn comes
                if not done:
                    try:
                        check_writable(Path(out))
                    except XpertError as e:
                        raise XpertError(f"{path}: step {sid!r}: {e}") from None
        err.print(f"recipe {recipe.name}{f' (profile {profile})' if profile else ''}: {len(steps)} steps"
                  + (f"; estimate: {recipe.estimate}" if recipe.estimate else ""), highlight=False, soft_wrap=True)
        outs, todo, will_run = {}, [], []  # will_run: args of the steps this run (or plan) runs
        for n, (sid, cmd, values, argv, args) in enumerate(steps, 1):
            if only and not any(fnmatch.fnmatchcase(sid, o) for o in only):
                continue
            out = args.get("out")
            rec = _record(cmd, argv, args)
            done = _done(out, rec)
            if done and jobs > 1 and not dry_run and any(_reads(args, t[4]) for t in todo):
                done = False  # a step it reads from runs first: checked again when its turn comes
            stale = done and dry_run and any(_reads_output(args, a) for a in will_run)
            if not done or stale:
                will_run.append(args)
            if dry_run or done or jobs == 1:
                _say(n, len(steps), sid, "run (an input changes)" if stale else "skip (done)" if done else "run", argv)
            if dry_run or done:
                if out and not dry_run:  # stdout names outputs that exist; a plan wrote none
                    outs[n] = out
                continue
            if jobs > 1:
                todo.append((n, sid, cmd, values, args))
                continue
            values.update(_begin(out, rec, cmd, values, args))
            forget_written()  # a Ctrl-C names only this step's complete outputs
            try:
                with provenance.command(shlex.join(["xpertctl", *argv])):
                    cmd.invoke(values)
            except XpertError as e:
                raise XpertError(f"{path}: step {sid!r}: {e}") from None
            if out is not None:
                _write_record(out, rec)
                outs[n] = out
        if todo:
            outs.update(_run_parallel(path, todo, len(steps), jobs))
        if recipe.result and not dry_run:
            err.print(_done_line(result(recipe, path), steps, selected), highlight=False, soft_wrap=True, markup=False)
    return [outs[n] for n in sorted(outs)]


LOCK = ".xpertctl-run.lock"


def lock_path(steps: list[tuple]) -> Path | None:
    """Where a recipe build's lock lives: in the deepest directory holding every step's output (the build's
    work area), so two runs that would write the same outputs meet at one lock whatever recipe file,
    profile or --only they were started with; beside the first output when the outputs share no directory
    but the root. None when no step writes an output."""
    import os
    outs = [os.path.realpath(str(s[4]["out"])) for s in steps if s[4].get("out") is not None]
    if not outs:
        return None
    common = Path(os.path.commonpath([os.path.dirname(o) for o in outs]))
    if common == Path(common.anchor):
        common = Path(os.path.dirname(outs[0]))
    return common / LOCK


def _build_lock(path: Path, steps: list[tuple], dry_run: bool):
    """The lock a run holds while it runs steps (io.lock: PID, host, start time; a dead holder's is taken over)."""
    from contextlib import nullcontext
    from .console import notice
    from .io.lock import held
    where = None if dry_run else lock_path(steps)
    return nullcontext() if where is None else held(where, f"a run of recipe {path}", notice)


def _writer(path: str, steps: list[tuple]) -> tuple | None:
    """The step whose `out` is `path` or holds it."""
    import os
    path = os.path.normpath(path)
    for step in steps:
        out = step[4].get("out")
        out = os.path.normpath(str(out)) if out is not None else None
        if out is not None and (path == out or path.startswith(out + "/")):
            return step
    return None


def _check_only(selected: list[tuple], steps: list[tuple]) -> None:
    """--only: every input of a selected step exists, or a selected step writes it."""
    chosen = {s[0] for s in selected}
    for sid, cmd, values, _, _ in selected:
        for p, value in cmd.inputs(values):
            w = _writer(value, steps)
            if w is not None and w[0] not in chosen and not Path(value).exists():
                raise XpertError(f"--only: step {sid!r} reads {value}, which step {w[0]!r} writes; it has not run "
                                 f"and is not selected (add --only {w[0]!r}, or run without --only)")


def _done_line(res: str, steps: list[tuple], selected: list[tuple]) -> str:
    """`done: RESULT` when this run wrote (or found current) the recipe's result, else what it did."""
    w = _writer(res, steps)
    if Path(res).exists() and (w is None or w[0] in {s[0] for s in selected}):
        return f"done: {res}"
    return (f"done: {len(selected)} of {len(steps)} steps; {res} was not written"
            + (f" (step {w[0]!r} was not selected)" if w is not None else ""))


def _done(out: str | None, rec: dict) -> bool:
    """The step's output exists and its record (op, arguments, input fingerprints) is this one."""
    if out is None or not Path(out).exists() or not _record_path(out).is_file():
        return False
    try:
        return json.loads(_record_path(out).read_text()) == rec
    except json.JSONDecodeError:  # cut short by a killed runner: run the step again
        return False


def _say(n: int, total: int, sid: str, state: str, argv: list[str]) -> None:
    err.print(f"[{n}/{total}] {sid}: {state}  {shlex.join(['xpertctl', *argv])}", highlight=False,
              soft_wrap=True, markup=False)


def _begin(out: str | None, rec: dict, cmd, values: dict, args: dict) -> dict:
    """Mark the step started; returns the values to change: a killed run of this very train step
    continues from its checkpoint, and a stale output (its arguments changed) is replaced, never continued."""
    if out is None:
        return {}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    started = _started(out, rec)
    _write_record(out, {**rec, "started": True})
    if Path(out).exists() and cmd.name == "train" and "resume" not in args and started:
        return {"resume": "auto"}
    if Path(out).exists() and "force" in values:
        return {"force": True}
    return {}


# ---- side by side (--jobs N) ---------------------------------------------------------------------------

_GLOB = re.compile(r"[*?[]")


def _strings(value: Any) -> list[str]:
    """Every string in a step's args and the PATH part of NAME=PATH / KIND:PATH values, as absolute paths."""
    import os
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if not isinstance(value, (str, Path)) or not str(value):
        return []
    value = str(value)
    return [os.path.abspath(v) for v in [value] + [value.partition(sep)[2] for sep in "=:" if sep in value] if v]


def _touches(strings: list[str], out: str) -> bool:
    """Whether a path among `strings` is `out`, inside it, contains it, or is a glob that may match in it."""
    for s in strings:
        if s == out or s.startswith(out + "/") or out.startswith(s + "/"):
            return True
        m = _GLOB.search(s)
        if m and (fnmatch.fnmatchcase(out, s) or out.startswith(s[:m.start()]) or s[:m.start()].startswith(out + "/")):
            return True
    return False


def _reads(later: dict, earlier: dict) -> bool:
    """Whether the step with args `later` must wait for the one with args `earlier`: either writes where
    the other reads or writes, or either has no `out` (a barrier). Conservative: a spurious edge only
    costs parallelism."""
    if later.get("out") is None or earlier.get("out") is None:
        return True
    return _touches(_strings(later), _strings(earlier["out"])[0]) or \
        _touches(_strings(earlier), _strings(later["out"])[0])


def _reads_output(later: dict, earlier: dict) -> bool:
    """Whether a step with args `later` reads what the step with args `earlier` writes (a dry run's staleness)."""
    out = earlier.get("out")
    return out is not None and _touches(_strings({k: v for k, v in later.items() if k != "out"}), _strings(out)[0])


def dependencies(todo: list[tuple]) -> dict[int, set[int]]:
    """For each step to run (by number), the earlier steps to run that it must wait for."""
    return {nj: {ni for ni, *_, args_i in todo[:j] if _reads(args_j, args_i)}
            for j, (nj, *_, args_j) in enumerate(todo)}


def _run_parallel(path: Path, todo: list[tuple], total: int, jobs: int) -> dict[int, str]:
    """Run `todo` with up to `jobs` steps at once on `jobs` worker processes (`python -m
    xpertctl.step_worker`, each with cores/jobs threads unless OMP_NUM_THREADS is set, each running a
    step in-process as the one-at-a-time runner does, its output in a log beside the step record:
    .OUT.step.log). Fewer threads per step sum floats in another order: results equal a one-at-a-time
    run's up to float noise, and are byte-identical between runs with the same --jobs.

    A step starts when every step it reads from has finished, and is skipped then if its record
    matches. After a failure no new step starts; the running ones finish, and the first failure is
    raised as one line naming the step. Ctrl-C, SIGTERM or SIGHUP pass SIGINT on to the workers (each
    step cleans up), then the runner ends as interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    deps = dependencies(todo)
    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(k, threads)
    waiting = {t[0]: t for t in todo}
    idle, busy = [], {}  # workers; busy: n -> (worker, step, log, start time, record)
    finished, outs, failure = set(), {}, None

    def worker():
        while idle:
            w = idle.pop()
            if w.poll() is None:  # an idle worker may have been killed (e.g. out of memory)
                return w
        # its own session: a Ctrl-C reaches this runner only, which passes it on once (below)
        return subprocess.Popen([sys.executable, "-m", "xpertctl.step_worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
                                start_new_session=True)

    def start(step) -> bool:
        n, sid, cmd, values, args = step
        out = args.get("out")
        argv = cmd.argv(args)
        rec = _record(cmd, argv, args)  # the inputs it reads exist now
        if _done(out, rec):  # what it reads was rewritten identically
            _say(n, total, sid, "skip (done)", argv)
            outs[n] = str(out)
            finished.add(n)
            return False
        extra = _begin(out, rec, cmd, values, args)
        _say(n, total, sid, "run", argv)
        if out is not None:
            log = _record_path(out).with_suffix(".log")
        else:  # no output beside which to keep it
            fd, name = tempfile.mkstemp(prefix=f"xpertctl-{sid}-", suffix=".log")
            os.close(fd)
            log = Path(name)
        w = worker()
        busy[n] = (w, step, log, time.monotonic(), rec)
        # default=str: YAML values JSON lacks (a date) reach the command as the text they are on its line
        req = json.dumps({"op": cmd.name, "args": args, "extra": extra, "log": str(log), "command":
                          shlex.join(["xpertctl", *argv]), "where": f"{path}: step {sid!r}"}, default=str)
        try:
            w.stdin.write(req + "\n")
            w.stdin.flush()
        except OSError:  # it died: finish() reports it
            pass
        return True

    def finish(n, line: str):
        nonlocal failure
        w, (_, sid, _, _, args), log, t0, rec = busy.pop(n)
        out = args.get("out")
        try:
            reply = json.loads(line) if line else None
        except json.JSONDecodeError:
            reply = None
        if isinstance(reply, dict):
            idle.append(w)
        else:  # it died, or its answer is garbled: it runs nothing more
            if w.poll() is None:
                w.kill()
            reply = {"error": f"its worker ended (code {w.wait()}); see {log}"}
        if "error" not in reply:
            if out is not None:
                _write_record(out, rec)
                outs[n] = str(out)
            else:
                log.unlink()
            err.print(f"[{n}/{total}] {sid}: done in {time.monotonic() - t0:.0f} s", highlight=False, markup=False)
        elif failure is None:
            failure = f"{path}: step {sid!r}: {reply['error']}"
        finished.add(n)

    def stop(*_):
        raise KeyboardInterrupt

    handlers = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # under nohup, hanging up stops nothing
                handlers[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread: leave the process's handlers alone
            pass
    futures = {}
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            try:
                while True:
                    moved = failure is None
                    while moved:  # start what is ready; skipping a step may make others ready
                        moved = False
                        for n in [n for n in waiting if deps[n] <= finished]:
                            if len(futures) >= jobs:
                                break
                            moved = True
                            if start(waiting.pop(n)):
                                futures[pool.submit(busy[n][0].stdout.readline)] = n
                    if not futures:
                        break
                    done, _ = wait(futures, return_when=FIRST_COMPLETED)
                    for f in done:
                        finish(futures.pop(f), f.result())
            except BaseException:  # before the pool's exit, which waits for the running steps
                _interrupt([b[0] for b in busy.values()])
                raise
            finally:
                for w in idle:
                    w.stdin.close()  # a worker ends at the end of its input
                    w.wait()
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    if failure:
        raise XpertError(failure)
    return outs


def _interrupt(procs: list) -> None:
    """SIGINT to each busy worker (its step cleans up its partial output); terminate one that ignores it."""
    import signal
    import subprocess
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()


def serve(table: dict) -> None:
    """A --jobs worker: runs each step it is sent (one JSON line on stdin) in this process exactly as the
    one-at-a-time runner does, with the step's output (fds 1 and 2) in the step's log; answers one JSON
    line per step on its original stdout. Ends at the end of its input, or after an interrupted step."""
    import os
    import sys
    import traceback
    from .io import provenance
    chan = os.fdopen(os.dup(1), "w")
    # between steps fds 1 and 2 lead nowhere: a thread a step left behind cannot write into the answers
    idle = os.open(os.devnull, os.O_WRONLY)
    os.dup2(idle, 1), os.dup2(idle, 2)
    for line in sys.stdin:
        req = json.loads(line)
        forget_written()
        reply, stop = {}, False
        with open(req["log"], "w") as log:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
            try:
                cmd = table[req["op"]]
                values = cmd.bind(req["args"], req["where"])
                values.update(req["extra"])
                with provenance.command(req["command"]):
                    cmd.invoke(values)
            except XpertError as e:
                print(f"xpertctl: error: {e}", file=sys.stderr)
                reply = {"error": str(e)}
            except KeyboardInterrupt as e:
                print(f"xpertctl: {interrupted_message(e)}", file=sys.stderr)
                reply, stop = {"error": "interrupted"}, True
            except Exception as e:  # a bug, not a user error: the traceback goes to the step's log
                traceback.print_exc()
                reply = {"error": f"{type(e).__name__}: {e} (traceback in {req['log']})"}
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(idle, 1), os.dup2(idle, 2)
        chan.write(json.dumps(reply) + "\n")
        chan.flush()
        if stop:
            break
