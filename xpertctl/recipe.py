"""YAML recipes: named steps, each one xpertctl command with its arguments, run in order.

    name: demo
    vars: {work: work/demo, seeds: [0, 1, 2]}
    steps:
      - id: stats
        op: stats
        args: {src: fixtures/teacher, domain: [a=x.txt, b=y.txt], out: "${vars.work}/stats.safetensors"}
      - id: "train-${grid.seed}"
        op: train
        grid: {seed: "${vars.seeds}"}
        args: {ckpt: "${steps.graft.out}", seed: "${grid.seed}", out: "${vars.work}/run-${grid.seed}"}

References: ${vars.NAME}, ${steps.ID.out} (an earlier step's `out`), ${grid.KEY}. A value that is a
single reference keeps its type (a list stays a list). A grid expands a step into one per combination.
Each step is run through the CLI itself, so it validates exactly as the command line does. A step
whose `out` exists and whose record (op, arguments, input fingerprints) matches is skipped.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .console import err
from .errors import XpertError

_REF = re.compile(r"\$\{([a-z]+)\.([^}]+)\}")


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
    vars: dict[str, Any] = {}
    profiles: dict[str, Profile] = {}  # named sets of var overrides (--profile quick)
    steps: list[Step]


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
    for o in overrides:
        key, sep, val = o.partition("=")
        if not sep or not key:
            raise XpertError(f"--set {o!r}: expected KEY=VALUE, e.g. vars.steps=100")
        if key.startswith("steps."):  # steps.ID.args.x=... addresses a step by id
            parts = key.split(".")
            idx = next((n for n, s in enumerate(doc.get("steps") or []) if isinstance(s, dict) and s.get("id") == parts[1]), None)
            if idx is None:
                raise XpertError(f"--set {o!r}: {path} has no step {parts[1]!r}")
            key = ".".join(["steps", str(idx)] + parts[2:])
        _set(doc, key, yaml.safe_load(val), path)
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
    if profile is not None:
        if profile not in recipe.profiles:
            raise XpertError(f"--profile {profile!r}: {path} has profiles {', '.join(recipe.profiles) or '(none)'}")
        p = recipe.profiles[profile]
        recipe.vars.update(p.vars)
        recipe.estimate = p.estimate or recipe.estimate
        for o in overrides:  # --set still wins over the profile
            if o.startswith("vars."):
                key, _, val = o.partition("=")
                recipe.vars[key[5:]] = yaml.safe_load(val)
    return recipe


def _resolve(value: Any, ctx: dict, where: str) -> Any:
    if isinstance(value, str):
        m = _REF.fullmatch(value)
        if m:
            return _lookup(m.group(1), m.group(2), ctx, where)
        return _REF.sub(lambda mm: str(_lookup(mm.group(1), mm.group(2), ctx, where)), value)
    if isinstance(value, list):
        return [_resolve(v, ctx, where) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, ctx, where) for k, v in value.items()}
    return value


def _lookup(kind: str, key: str, ctx: dict, where: str) -> Any:
    if kind == "vars":
        if key not in ctx["vars"]:
            raise XpertError(f"{where}: ${{vars.{key}}} is not defined in vars")
        return ctx["vars"][key]
    if kind == "grid":
        if key not in ctx.get("grid", {}):
            raise XpertError(f"{where}: ${{grid.{key}}} is not a grid key of this step")
        return ctx["grid"][key]
    if kind == "steps":
        sid, _, field = key.rpartition(".")
        if field != "out" or sid not in ctx["steps"]:
            raise XpertError(f"{where}: ${{steps.{key}}} names no earlier step's out")
        return ctx["steps"][sid]
    raise XpertError(f"{where}: unknown reference ${{{kind}.{key}}}")


def expand(recipe: Recipe, path: Path) -> list[tuple[str, str, dict]]:
    """(id, op, resolved args) for every step, grids expanded, references resolved in order."""
    ctx: dict = {"vars": {}, "steps": {}}
    for k, v in recipe.vars.items():  # vars may refer to earlier vars
        ctx["vars"][k] = _resolve(v, ctx, f"{path}: vars.{k}")
    plan = []
    for step in recipe.steps:
        where = f"{path}: step {step.id!r}"
        grid = _resolve(step.grid or {}, ctx, where)
        keys = list(grid)
        for k, v in grid.items():
            if not isinstance(v, list) or not v:
                raise XpertError(f"{where}: grid.{k} must be a non-empty list")
        combos = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))] or [{}]
        for combo in combos:
            c = {**ctx, "grid": combo}
            sid = _resolve(step.id, c, where)
            if sid in ctx["steps"] or any(p[0] == sid for p in plan):
                raise XpertError(f"{where}: id {sid!r} is used twice (put every grid key in the id)")
            args = _resolve(step.args, c, f"{path}: step {sid!r}")
            plan.append((sid, step.op, args))
            if "out" in args:
                ctx["steps"][sid] = args["out"]
    return plan


# ---- running steps through the CLI ----------------------------------------------------------------

def _command(op: str, where: str):
    import typer
    from .cli import app
    cmd = typer.main.get_command(app)
    for word in op.split():
        sub = getattr(cmd, "commands", {}).get(word)
        if sub is None or word == "run":
            ops = sorted(k for k in getattr(cmd, "commands", {}) if k != "run")
            raise XpertError(f"{where}: unknown op {op!r} (ops: {', '.join(ops)})")
        cmd = sub
    return cmd


def argv_for(op: str, args: dict, where: str) -> list[str]:
    """The command line that runs `op` with `args` (keys are the command's parameter names)."""
    cmd = _command(op, where)
    params = {p.name: p for p in cmd.params}
    pos, opts = [], []
    for key, val in args.items():
        p = params.get(key.replace("-", "_"))
        if p is None:
            known = ", ".join(sorted(n for n in params if n != "help"))
            raise XpertError(f"{where}: {op} has no argument {key!r} (arguments: {known})")
        vals = val if isinstance(val, list) else [val]
        if p.param_type_name == "argument":
            pos += [str(v) for v in vals]
        elif getattr(p, "is_flag", False):
            if val:
                opts.append(p.opts[0])
        else:
            flag = max(p.opts, key=len)
            for v in vals:
                opts += [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return op.split() + pos + opts


def fingerprint(value: str) -> str | None:
    """A cheap content fingerprint for an existing path argument (file, or directory tree)."""
    p = Path(value)
    if not p.exists():
        return None
    h = hashlib.sha256()
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{st.st_size}".encode())
        if st.st_size <= 1 << 20 or f.suffix in (".json",):
            h.update(f.read_bytes())
        elif f.suffix == ".safetensors":
            from .io.files import read_header
            h.update(read_header(f).raw)
    return h.hexdigest()


def _record(op: str, argv: list[str], args: dict) -> dict:
    inputs = {}
    for k, v in args.items():
        if k == "out":
            continue
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, str) and ("/" in x or "." in x):
                parts = x.split("=", 1)  # NAME=PATH arguments
                fp = fingerprint(parts[-1])
                if fp:
                    inputs[x] = fp
    return {"op": op, "argv": argv, "inputs": inputs}


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


def run(path: Path, overrides: list[str] = (), dry_run: bool = False, only: list[str] | None = None,
        profile: str | None = None) -> list[str]:
    """`xpertctl run`: run (or with dry_run, print) every step; returns the outputs."""
    from .cli import app
    recipe = load(path, overrides, profile)
    plan = expand(recipe, Path(path))
    argvs = [(sid, op, argv_for(op, args, f"{path}: step {sid!r}"), args) for sid, op, args in plan]
    err.print(f"recipe {recipe.name}{f' (profile {profile})' if profile else ''}: {len(argvs)} steps"
              + (f"; estimate: {recipe.estimate}" if recipe.estimate else ""), highlight=False, soft_wrap=True)
    outs = []
    for n, (sid, op, argv, args) in enumerate(argvs, 1):
        if only and not any(re.fullmatch(o.replace("*", ".*"), sid) for o in only):
            continue
        out = args.get("out")
        rec = _record(op, argv, args)
        done = out is not None and Path(out).exists() and _record_path(out).is_file() and \
            json.loads(_record_path(out).read_text()) == rec
        state = "skip (done)" if done else "run"
        err.print(f"[{n}/{len(argvs)}] {sid}: {state}  xpertctl {' '.join(argv)}", highlight=False, soft_wrap=True)
        if dry_run or done:
            if out:
                outs.append(out)
            continue
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            started = _started(out, rec)
            _record_path(out).write_text(json.dumps({**rec, "started": True}, indent=1))
            if Path(out).exists() and op == "train" and "--resume" not in argv and started:
                argv = argv + ["--resume", "auto"]  # a killed run of this very step continues from its checkpoint
            elif Path(out).exists() and "--force" not in argv:
                argv = argv + ["--force"]  # a stale output (its arguments changed) is replaced, never continued
        import sys
        saved = sys.argv
        sys.argv = ["xpertctl", *argv]
        try:
            rv = app(argv, prog_name="xpertctl", standalone_mode=False)
            if rv == 130:  # typer turns Ctrl-C into exit code 130 outside standalone mode
                raise KeyboardInterrupt
        except XpertError as e:
            raise XpertError(f"{path}: step {sid!r}: {e}") from None
        finally:
            sys.argv = saved
        if out is not None:
            _record_path(out).write_text(json.dumps(rec, indent=1))
            outs.append(out)
    return outs
