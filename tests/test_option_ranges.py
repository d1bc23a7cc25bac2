"""Numeric options: each declares its range beside it in the table of operations, and the CLI, recipes and
`run --dry-run` all refuse a value outside it before anything runs. 0 where 0 means "off" really is off."""
import json

import pytest
import yaml
from safetensors.torch import load_file

from conftest import assert_user_error, token_data
from xpertctl.errors import XpertError
from xpertctl.ops_table import BY_NAME, COMMANDS, FRACTION, NONNEG, POSITIVE, Range


def test_every_numeric_option_declares_its_range():
    missing = [f"{c.name} {p.display}" for c in COMMANDS for p in c.params if p.type in (int, float) and p.range is None]
    assert missing == []


@pytest.mark.parametrize("rng,good,bad", [
    (POSITIVE, [1e-9, 1, 10**12], [0, -1, float("nan"), float("inf")]),
    (NONNEG, [0, 3], [-1, -1e-9, float("nan")]),
    (FRACTION, [0, 0.5, 1], [-0.01, 1.01, float("nan")]),
    (Range(0, 100, hi_open=True), [0, 99], [100, -1]),
    (Range(2), [2, 7], [1, 0]),
])
def test_range_semantics(rng, good, bad):
    assert all(rng.holds(v) for v in good) and not any(rng.holds(v) for v in bad)


@pytest.mark.parametrize("cmd,key,value,shown", [
    ("train", "lr", -1.0, "--lr -1: must be > 0"),
    ("train", "min_lr_ratio", 5.0, "--min-lr-ratio 5: must be in [0, 1]"),
    ("train", "grad_clip", -1.0, "--grad-clip -1: must be >= 0 (0: no clipping)"),
    ("stats", "max_tokens", -3, "--max-tokens -3: must be > 0"),
    ("corpus tokenizer", "vocab_size", 100, "--vocab-size 100: must be >= 259"),
    ("eval", "max_tokens", 0, "--max-tokens 0: must be > 0"),
])
def test_the_same_range_check_serves_recipes(cmd, key, value, shown):
    """A recipe step binds through the table: the CLI's message, with the step named."""
    c = BY_NAME[cmd]
    args = {p.name: "x" for p in c.params if p.required and p.type is not int}
    args.update({"domain": ["a=a.txt"], "task": ["ppl:d"], key: value} if cmd in ("stats", "eval") else {key: value})
    args = {k: v for k, v in args.items() if c.param(k) is not None}
    with pytest.raises(XpertError, match=r"step 's'.*" + shown.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        c.bind(args, "r.yaml: step 's'")


def test_dry_run_refuses_what_the_real_run_would(tmp_path, cli):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"name": "t", "steps": [{"id": "s", "op": "stats", "args": {
        "src": str(tmp_path), "domain": [f"a={tmp_path / 'a.txt'}"], "max_tokens": -3, "out": str(tmp_path / "o")}}]}))
    code, out, err = cli("run", r, "--dry-run")
    assert_user_error(code, err, "r.yaml", "step 's'", "--max-tokens -3: must be > 0")


def test_help_shows_the_range(cli):
    code, out, _ = cli("train", "--help")
    assert code == 0 and "Must be in [0, 1]" in out and "0: no" in out


def test_grad_clip_zero_means_no_clipping(fx, tmp_path_factory, tmp_path, cli):
    """--grad-clip 0 trains exactly as an unreachable clip threshold does (on main it zeroed every update)."""
    text = "the law shall apply to every licence holder . def main ( ) : return 0 . a noun names a thing . "
    tdata = token_data(fx, tmp_path_factory, "gc", {"a": "\n\n".join(f"{text} {k}" for k in range(30))})
    common = ["--data", tdata, "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2", "--warmup", "0",
              "--eval-every", "0"]
    weights = {}
    for clip in ("0", "1e9", "1e-3"):
        code, _, err = cli("train", fx / "llama", *common, "--grad-clip", clip, "-o", tmp_path / clip)
        assert code == 0, err
        weights[clip] = load_file(str(next((tmp_path / clip / "final").glob("*.safetensors"))))
    before = load_file(str(next((fx / "llama").glob("*.safetensors"))))
    key = next(k for k in weights["0"] if "mlp.down_proj" in k)
    moved = (weights["0"][key] - before[key]).abs().max()
    assert moved > 1e-3  # it trained
    assert all((weights["0"][k] - weights["1e9"][k]).abs().max() < 1e-6 for k in weights["0"])
    assert (weights["0"][key] - weights["1e-3"][key]).abs().max() > 1e-4  # and clipping is not a no-op


def test_reshape_help_marks_target_required():
    from xpertctl.cli import app, click_command
    reshape = click_command(app).commands["reshape"]
    target = next(p for p in reshape.params if p.name == "target")
    assert target.required and not next(p for p in reshape.params if p.name == "layers").required
