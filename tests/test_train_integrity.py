"""Training never silently does the wrong thing: a resumed run refuses changed options, a recipe step
whose arguments changed starts over, the logged lr is the lr the step used, --keep means what it says."""
import hashlib
import json
import math

import pytest
import yaml

from conftest import assert_user_error
from xpertctl import data
from xpertctl import recipe as rc
from xpertctl.ops_table import BY_NAME as TABLE
from xpertctl import train as tr

TEXT = ("the law shall apply to every licence holder . in the beginning god created the heaven and the earth . "
        "def main ( ) : return 0 . a noun is a word that names a thing . the man page lists options . ")


@pytest.fixture(scope="module")
def tdata(fx, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok13")
    (d / "a.txt").write_text("\n\n".join(f"{TEXT} {k}" for k in range(60)))
    (d / "b.txt").write_text("\n\n".join(f"{TEXT[::-1]} {k}" for k in range(60)))
    out, other = d / "data", d / "data2"
    data.tokenize(fx / "llama", [f"a={d / 'a.txt'}"], out, val_pct=20, test_pct=10)
    data.tokenize(fx / "llama", [f"b={d / 'b.txt'}"], other, val_pct=20, test_pct=10)
    return out, other


BASE = ["--steps", "8", "--batch-size", "2", "--seq-len", "16", "--lr", "3e-3", "--warmup", "2",
        "--eval-every", "4", "--eval-batches", "1", "--save-every", "4", "--seed", "0"]


def _rows(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _digest(root):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("change,needle", [
    (["--lr", "1e-3"], "--lr"),
    (["--seed", "5"], "--seed"),
    (["--batch-size", "4"], "--batch-size"),
    (["--data", "OTHER"], "--data"),
])
def test_resume_refuses_a_changed_option(fx, tdata, tmp_path, cli, change, needle):
    main, other = tdata
    run = tmp_path / "run"
    assert cli("train", fx / "llama", "--data", main, *BASE, "-o", run)[0] == 0
    before = _digest(run)
    args = ["--data", main, *BASE]
    for k in range(0, len(change), 2):
        val = str(other) if change[k + 1] == "OTHER" else change[k + 1]
        i = args.index(change[k])
        args[i + 1] = val
    code, out, err = cli("train", fx / "llama", *args, "--resume", "auto", "-o", run)
    assert_user_error(code, err, str(run), needle, "--force")
    assert out == "" and _digest(run) == before  # nothing touched


def test_resume_continues_on_the_same_tokens_made_again(fx, tdata, tmp_path, cli, monkeypatch):
    """The run's --data identity is the tokens, not how the manifest was written: the same text
    tokenized again with a copied tokenizer, from another directory and another command line, is the
    same run. (It was the manifest's bytes, so a recipe that re-made its data discarded 8,500 steps.)"""
    import shutil
    main, _ = tdata
    run = tmp_path / "run"
    assert cli("train", fx / "llama", "--data", main, *BASE, "-o", run)[0] == 0
    tok = tmp_path / "elsewhere" / "tok"
    shutil.copytree(fx / "llama", tok)
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = tmp_path / "again"
    data.tokenize(tok, [f"a={main.parent / 'a.txt'}"], again, val_pct=20, test_pct=10)
    assert (again / data.MANIFEST).read_bytes() != (main / data.MANIFEST).read_bytes()
    code, _, err = cli("train", fx / "llama", "--data", again, *BASE, "--resume", "auto", "-o", run)
    assert code == 0 and "resuming" in err, err


def _remade(src, dst, record: str, perturb: bool = False):
    """dst: src's model under another provenance record and transformers version (perturb: one weight moved)."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    if perturb:
        k = sorted(sd)[0]
        sd[k] = sd[k] + 1e-3
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt", "xpertctl": record})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["transformers_version"] = "0.0.1"
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst


def test_resume_continues_from_the_same_weights_under_another_record(fx, tdata, tmp_path, cli):
    """CKPT's identity is its weights and architecture, not its header's bytes: a student re-grafted under
    another command line or path (its provenance record differs) is the same start, so the run continues."""
    main, _ = tdata
    a = _remade(fx / "llama", tmp_path / "a", '{"command": "xpertctl graft src -o a"}')
    b = _remade(fx / "llama", tmp_path / "b", '{"command": "xpertctl graft /elsewhere/src -o b"}')
    run = tmp_path / "run"
    assert cli("train", a, "--data", main, *BASE, "-o", run)[0] == 0
    code, _, err = cli("train", b, "--data", main, *BASE, "--resume", "auto", "-o", run)
    assert code == 0 and "resuming" in err, err
    c = _remade(fx / "llama", tmp_path / "c", '{"command": "xpertctl graft src -o a"}', perturb=True)
    code, out, err = cli("train", c, "--data", main, *BASE, "--resume", "auto", "-o", run)
    assert_user_error(code, err, str(run), "CKPT", "--force")


def test_weights_identity_sees_a_change_anywhere_and_no_record(tmp_path):
    """All of the data counts (digest samples 9 blocks of a large file: a change between them, e.g. one
    re-grafted projection, must still make another start); the provenance record and who wrote config.json do not."""
    import torch
    from safetensors.torch import save_file
    from xpertctl.io import provenance
    sd = {f"w{k}": torch.randn(256, 1024, generator=torch.Generator().manual_seed(k)) for k in range(4)}  # 4 MiB

    def model(name, meta, version, **edit):
        d = tmp_path / name
        d.mkdir()
        t = {k: v.clone() for k, v in sd.items()}
        for k, idx in edit.items():
            t[k][idx] += 1.0
        save_file(t, str(d / "model.safetensors"), metadata=meta)
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 1024,
                                                   "transformers_version": version}))
        return provenance.weights_identity(d)
    a = model("a", {"format": "pt", "xpertctl": '{"command": "graft -o a"}'}, "5.0")
    b = model("b", {"format": "pt", "xpertctl": '{"command": "graft /x -o b"}'}, "5.9")
    c = model("c", {"format": "pt", "xpertctl": '{"command": "graft -o a"}'}, "5.0", w1=(100, 7))
    assert a == b and a != c
    for name, value in (("d", 1.0), ("e", 2.0)):  # torch's .bin format: its bytes count too
        (tmp_path / name).mkdir()
        torch.save({"w": torch.full((4,), value)}, tmp_path / name / "pytorch_model.bin")
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')
    assert provenance.weights_identity(tmp_path / "d") != provenance.weights_identity(tmp_path / "e")


def test_data_identity_is_the_tokens_and_their_order(fx, tdata, tmp_path):
    """Same tokens made again elsewhere: the same; the domains listed the other way round (their order
    orders the windows): another; a test split that training never reads changed: the same."""
    main, _ = tdata
    d = main.parent
    ab, ba = tmp_path / "ab", tmp_path / "ba"
    data.tokenize(fx / "llama", [f"a={d / 'a.txt'}", f"b={d / 'b.txt'}"], ab, val_pct=20, test_pct=10)
    data.tokenize(fx / "llama", [f"b={d / 'b.txt'}", f"a={d / 'a.txt'}"], ba, val_pct=20, test_pct=10)
    assert data.identity(ab) != data.identity(ba)
    before = data.identity(ab)
    t = ab / json.loads((ab / data.MANIFEST).read_text())["domains"]["a"]["test"]["file"]
    t.write_bytes(bytes(len(t.read_bytes())))
    assert data.identity(ab) == before


def _old_header_hash(fx, main):
    from xpertctl.io.files import read_header
    return hashlib.sha256(read_header(fx / "llama" / "model.safetensors").raw
                          + (fx / "llama" / "config.json").read_bytes()).hexdigest()


@pytest.mark.parametrize("key, old", [
    ("CKPT", _old_header_hash),  # the headers' bytes, before the identity was the weights
    ("--data", lambda fx, main: hashlib.sha256((main / data.MANIFEST).read_bytes()).hexdigest()),  # the manifest's
])
def test_resume_accepts_the_hashes_older_runs_recorded(fx, tdata, tmp_path, cli, key, old):
    """A checkpoint written before the identities were of content recorded byte hashes: it resumes."""
    import torch
    main, _ = tdata
    run = tmp_path / "run"
    assert cli("train", fx / "llama", "--data", main, *BASE, "-o", run)[0] == 0
    for st_file in run.glob("step-*/trainer_state.pt"):
        st = torch.load(st_file, weights_only=False)
        st["identity"][key] = old(fx, main)
        torch.save(st, st_file)
    code, _, err = cli("train", fx / "llama", "--data", main, *BASE, "--resume", "auto", "-o", run)
    assert code == 0 and "resuming" in err, err


def test_resume_refuses_other_tokens_under_the_same_manifest_shape(fx, tdata, tmp_path, cli):
    """Text that differs in one word is another run, though every manifest field but the corpus hash agrees."""
    main, _ = tdata
    run = tmp_path / "run"
    assert cli("train", fx / "llama", "--data", main, *BASE, "-o", run)[0] == 0
    src = tmp_path / "a.txt"
    src.write_text((main.parent / "a.txt").read_text().replace("heaven", "heavens", 1))
    other = tmp_path / "other"
    data.tokenize(fx / "llama", [f"a={src}"], other, val_pct=20, test_pct=10)
    code, out, err = cli("train", fx / "llama", "--data", other, *BASE, "--resume", "auto", "-o", run)
    assert_user_error(code, err, str(run), "--data", "--force")


def test_resume_same_options_continues_and_force_starts_over(fx, tdata, tmp_path, cli):
    main, _ = tdata
    run = tmp_path / "run"
    assert cli("train", fx / "llama", "--data", main, *BASE, "-o", run)[0] == 0
    # --device does not change what is trained: it may differ on resume
    code, _, err = cli("train", fx / "llama", "--data", main, *BASE, "--device", "cpu", "--resume", "auto", "-o", run)
    assert code == 0 and "resuming" in err and "from step 4" in " ".join(err.split())
    code, _, err = cli("train", fx / "llama", "--data", main, *BASE[:7], "1e-3", *BASE[8:], "--resume", "auto",
                       "--force", "-o", run)
    assert code == 0, err
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[1]["lr"] == pytest.approx(1e-3)  # the new lr, from step 1
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["params"]["lr"] == 1e-3


def test_logged_lr_is_the_lr_the_step_used(fx, tdata, tmp_path):
    main, _ = tdata
    cfg = tr.TrainConfig(steps=4, batch_size=2, seq_len=16, lr=1e-2, warmup=2, min_lr_ratio=0.1, eval_every=0)
    tr.train(fx / "llama", tmp_path / "run", cfg, data_dir=main)
    # warmup (s+1)/2 for s = 0, 1; then cosine from 1.0 to 0.1 over the 2 remaining steps
    want = [0.5e-2, 1e-2, 1e-2, 1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))]
    assert [r["lr"] for r in _rows(tmp_path / "run")] == pytest.approx(want, rel=1e-9)


def test_a_warmup_longer_than_the_run_is_said(fx, tdata, tmp_path, cli):
    """A newcomer's --steps 4 under the default --warmup 20 peaked at 1/5 of --lr without a word."""
    main, _ = tdata
    base = ("train", fx / "llama", "--data", main, "--steps", "4", "--batch-size", "2", "--seq-len", "16",
            "--lr", "1e-2", "--eval-every", "0")
    code, _, err = cli(*base, "-o", tmp_path / "a")
    assert code == 0, err
    assert "--warmup 20 is longer than the run's 4 steps: the learning rate peaks at 0.002, never reaching --lr 0.01" in err
    assert max(r["lr"] for r in _rows(tmp_path / "a")) == pytest.approx(2e-3)
    code, _, err = cli(*base, "--warmup", "4", "-o", tmp_path / "b")
    assert code == 0 and "is longer than the run" not in err


def test_keep_zero_is_refused_and_keep_one_keeps_one(fx, tdata, tmp_path, cli):
    main, _ = tdata
    code, _, err = cli("train", fx / "llama", "--data", main, *BASE, "--keep", "0", "-o", tmp_path / "r0")
    assert_user_error(code, err, "--keep 0")
    assert not (tmp_path / "r0").exists()
    run = tmp_path / "r1"
    args = [*BASE]
    args[1], args[args.index("--save-every") + 1] = "9", "2"  # 9 steps, a checkpoint every 2
    assert cli("train", fx / "llama", "--data", main, *args, "--keep", "1", "-o", run)[0] == 0
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000008"]


def _recipe(tmp_path, fx, main, lr):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "vars": {"lr": lr}, "steps": [
        {"id": "train", "op": "train", "args": {
            "ckpt": str(fx / "llama"), "data_dir": str(main), "steps": 8, "batch_size": 2, "seq_len": 16,
            "lr": "${vars.lr}", "warmup": 2, "eval_every": 0, "save_every": 4, "out": str(tmp_path / "run")}}]}))
    return p


def test_recipe_step_with_changed_args_starts_over(fx, tdata, tmp_path, capsys):
    main, _ = tdata
    r = _recipe(tmp_path, fx, main, 3e-3)
    rc.run(r, table=TABLE)
    capsys.readouterr()
    rc.run(r, ["vars.lr=1e-3"], table=TABLE)
    err = capsys.readouterr().err
    assert "resuming" not in err
    rows = _rows(tmp_path / "run")
    assert [x["step"] for x in rows] == list(range(1, 9)) and rows[1]["lr"] == pytest.approx(1e-3)


def test_recipe_resumes_a_killed_step_with_the_same_args(fx, tdata, tmp_path, capsys, monkeypatch):
    main, _ = tdata
    r = _recipe(tmp_path, fx, main, 3e-3)
    real = tr.lm_batch

    def killed(stream, c, step, micro, split_seed=0):
        if step == 5:
            raise KeyboardInterrupt
        return real(stream, c, step, micro, split_seed)
    monkeypatch.setattr(tr, "lm_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        rc.run(r, table=TABLE)
    monkeypatch.setattr(tr, "lm_batch", real)
    capsys.readouterr()
    rc.run(r, table=TABLE)
    assert "resuming" in capsys.readouterr().err
    assert [x["step"] for x in _rows(tmp_path / "run")] == list(range(1, 9))


def test_recipe_that_remakes_its_data_continues_its_killed_run(fx, tdata, tmp_path, capsys, monkeypatch):
    """The incident: a recipe re-ran its tokenize step (here from a copy of the tokenizer) and so re-ran its
    stale train step with --force, which discarded the run's checkpoints although the tokens were the same."""
    import shutil
    main, _ = tdata
    tok = tmp_path / "tok"
    shutil.copytree(fx / "llama", tok)
    p = tmp_path / "r.yaml"
    doc = {"name": "t", "vars": {"tok": str(fx / "llama")}, "steps": [
        {"id": "data", "op": "tokenize", "args": {"tokenizer": "${vars.tok}", "domain": [f"a={main.parent / 'a.txt'}"],
                                                 "val_pct": 20, "test_pct": 10, "out": str(tmp_path / "data")}},
        {"id": "train", "op": "train", "args": {
            "ckpt": str(fx / "llama"), "data": "${steps.data.out}", "steps": 8, "batch_size": 2, "seq_len": 16,
            "lr": 3e-3, "warmup": 2, "eval_every": 0, "save_every": 4, "resume": "auto", "out": str(tmp_path / "run")}}]}
    p.write_text(yaml.safe_dump(doc))
    real = tr.lm_batch

    def killed(stream, c, step, micro, split_seed=0):
        if step == 5:
            raise KeyboardInterrupt
        return real(stream, c, step, micro, split_seed)
    monkeypatch.setattr(tr, "lm_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        rc.run(p, table=TABLE)
    monkeypatch.setattr(tr, "lm_batch", real)
    capsys.readouterr()
    rc.run(p, [f"vars.tok={tok}"], table=TABLE)
    err = capsys.readouterr().err
    assert "data: run" in err and "resuming" in err and "starting over" not in err, err
    assert [x["step"] for x in _rows(tmp_path / "run")] == list(range(1, 9))


def test_resume_refuses_a_checkpoint_whose_weights_do_not_fit(fx, tdata, tmp_path, cli):
    from safetensors.torch import load_file, save_file
    main, _ = tdata
    run = tmp_path / "run"
    assert cli("train", fx / "llama", "--data", main, *BASE, "-o", run)[0] == 0
    f = run / "step-000004" / "model.safetensors"
    sd = load_file(str(f))
    sd.pop("model.norm.weight")  # a checkpoint missing a weight must not load silently (strict=False did)
    save_file(sd, str(f), metadata={"format": "pt"})
    code, out, err = cli("train", fx / "llama", "--data", main, *BASE, "--resume", "auto", "-o", run)
    assert_user_error(code, err, "step-000004", "model.norm.weight")


def test_a_retrained_checkpoint_is_evaluated_again(fx, tdata, tmp_path, capsys):
    """A recipe's eval of a training run's checkpoint must re-run when the training did (transformers'
    save_pretrained dropped the provenance train gave it, so every checkpoint of one architecture had the same
    header, the same fingerprint, and its eval was skipped as done: the demo's re-trained arms kept their old
    test perplexities). The record is now in the checkpoint, and transformers still loads it."""
    main, _ = tdata
    r = _recipe(tmp_path, fx, main, 3e-3)
    doc = yaml.safe_load(r.read_text())
    doc["steps"].append({"id": "ev", "op": "eval", "args": {"ckpt": str(tmp_path / "run" / "final"),
                         "task": [f"ppl:{main}"], "split": "test", "seq_len": 16, "out": str(tmp_path / "ev.json")}})
    r.write_text(yaml.safe_dump(doc))
    rc.run(r, table=TABLE)
    first = json.loads((tmp_path / "ev.json").read_text())
    capsys.readouterr()
    rc.run(r, ["vars.lr=1e-3"], table=TABLE)
    err = capsys.readouterr().err
    assert "ev: run" in err, err
    assert json.loads((tmp_path / "ev.json").read_text()) != first
    from safetensors import safe_open
    with safe_open(str(tmp_path / "run" / "final" / "model.safetensors"), "pt") as f:
        rec = json.loads(f.metadata()["xpertctl"])
    assert rec["kind"] == "train" and rec["params"]["lr"] == pytest.approx(1e-3)
    assert rec["inputs"][0]["sha256"] and rec["inputs"][0]["path"] == str((fx / "llama").resolve())
    import transformers
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
