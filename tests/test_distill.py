"""train --teacher: the logged KD loss equals a direct computation from both models' logits; alpha=0 is
plain training bit for bit; validation stays plain CE; resume, grad-accum, SFT and torchrun agree; a
teacher with another vocabulary is refused before anything is written."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from conftest import assert_user_error, finished, token_data, torchrun
from xpertctl import data
from xpertctl import train as tr

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("fortune favours the bold . the man page lists options . a noun is a word that names a thing . "
        "in the beginning god created the heaven and the earth . the law shall apply to every licence holder . ")


@pytest.fixture(scope="module")
def kdata(fx, tmp_path_factory):
    return token_data(fx, tmp_path_factory, "kdtok",
                      {name: "\n\n".join(f"{k} {TEXT} {name}" for k in range(30)) for name in ("x", "y")})


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("kdsft") / "sft.jsonl"
    recs = [{"instruction": "say the law", "response": "the law shall apply to every licence holder"},
            {"instruction": "what is a noun", "context": "lexicon", "response": "a word that names a thing"},
            {"instruction": "begin", "response": "in the beginning god created the heaven"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return f


def _cfg(**kw):
    base = dict(steps=6, batch_size=4, seq_len=16, lr=3e-3, warmup=2, eval_every=3, eval_batches=2, seed=1)
    base.update(kw)
    return tr.TrainConfig(**base)


def _rows(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run):
    m = tf.AutoModelForCausalLM.from_pretrained(run / "final")
    return {k: v.clone() for k, v in m.state_dict().items()}


def _oracle(student_dir, teacher_dir, x, y, m, alpha, T):
    """CE, KL and the KD loss of one batch in float64, written out from the definitions."""
    s = tf.AutoModelForCausalLM.from_pretrained(student_dir).eval()
    t = tf.AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        ls = s(input_ids=x, attention_mask=m).logits.double()
        lt = t(input_ids=x, attention_mask=m).logits.double()
    ce = kl = 0.0
    n = 0
    for b in range(x.shape[0]):
        for i in range(x.shape[1] - 1):
            target = int(y[b, i + 1])
            if target == -100:
                continue
            n += 1
            ce += -float(torch.log_softmax(ls[b, i], -1)[target])
            p = torch.softmax(lt[b, i] / T, -1)
            kl += float((p * (torch.log(p) - torch.log_softmax(ls[b, i] / T, -1))).sum())
    ce, kl = ce / n, kl / n
    return ce, kl, (1 - alpha) * ce + alpha * T * T * kl


@pytest.mark.parametrize("alpha,T", [(0.3, 1.0), (0.7, 3.0)])
def test_logged_kd_loss_equals_direct_computation(fx, kdata, tmp_path, monkeypatch, alpha, T):
    from xpertctl import distill
    held = {}
    real = distill.load_teacher

    def spy(*a, **k):
        held["teacher"] = real(*a, **k)
        return held["teacher"]
    monkeypatch.setattr(distill, "load_teacher", spy)
    cfg = _cfg(steps=2, lr=0.0, eval_every=0, teacher=str(fx / "olmoe"), kd_alpha=alpha, kd_temperature=T)
    tr.train(fx / "llama", tmp_path / "run", cfg, data_dir=kdata)
    rows = _rows(tmp_path / "run")
    stream = data.load_token_data(kdata).stream("train")
    for step in (0, 1):  # lr=0: the student is the initial one at both steps
        ce, kl, loss = _oracle(fx / "llama", fx / "olmoe", *tr.lm_batch(stream, cfg, step, 0), alpha, T)
        assert kl > 1e-4  # distinct models: the test can see a wrong KL
        assert rows[step]["ce"] == pytest.approx(ce, rel=1e-5)
        assert rows[step]["kl"] == pytest.approx(kl, rel=1e-4)
        assert rows[step]["loss"] == pytest.approx(loss, rel=1e-5)
    t = held["teacher"]  # frozen: eval mode, no gradients ever
    assert not t.training and all(not p.requires_grad and p.grad is None for p in t.parameters())


def test_sft_kd_scores_only_response_positions(fx, sft_file, tmp_path):
    alpha, T = 0.5, 2.0
    cfg = _cfg(steps=1, lr=0.0, seq_len=64, teacher=str(fx / "olmoe"), kd_alpha=alpha, kd_temperature=T)
    tr.train(fx / "llama", tmp_path / "run", cfg, sft=sft_file)
    row, = _rows(tmp_path / "run")
    tok = data.load_tokenizer(fx / "llama")
    pad = tok.pad_token_id
    x, y, m = tr.sft_batch(tr.sft_examples(sft_file, tok, 64), cfg, 0, 0, pad)
    assert (y == -100).sum() > (m == 0).sum()  # prompts and padding are both masked
    ce, kl, loss = _oracle(fx / "llama", fx / "olmoe", x, y, m, alpha, T)
    assert row["ce"] == pytest.approx(ce, rel=1e-5) and row["kl"] == pytest.approx(kl, rel=1e-4)
    assert row["loss"] == pytest.approx(loss, rel=1e-5)


def test_alpha_zero_is_plain_training_bit_for_bit(fx, kdata, tmp_path):
    tr.train(fx / "llama", tmp_path / "plain", _cfg(), data_dir=kdata)
    tr.train(fx / "llama", tmp_path / "kd0", _cfg(teacher=str(fx / "olmoe"), kd_alpha=0.0), data_dir=kdata)
    plain, kd0 = _rows(tmp_path / "plain"), _rows(tmp_path / "kd0")
    assert [r["loss"] for r in kd0] == [r["loss"] for r in plain]
    assert [r.get("val_loss") for r in kd0] == [r.get("val_loss") for r in plain]
    assert all(r["kl"] > 0 for r in kd0)  # the teacher did run
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "kd0")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kd_changes_training_and_validation_is_plain_ce(fx, kdata, tmp_path):
    tr.train(fx / "llama", tmp_path / "plain", _cfg(lr=0.0), data_dir=kdata)
    tr.train(fx / "llama", tmp_path / "kd", _cfg(lr=0.0, teacher=str(fx / "olmoe"), kd_alpha=0.5), data_dir=kdata)
    plain, kd = _rows(tmp_path / "plain"), _rows(tmp_path / "kd")
    # same (unchanged) student: validation is the same plain CE, the training loss is not
    assert [r.get("val_loss") for r in kd] == [r.get("val_loss") for r in plain] and "val_loss" in kd[2]
    assert [r["ce"] for r in kd] == pytest.approx([r["loss"] for r in plain], rel=1e-6)
    assert all(abs(r["loss"] - r["ce"]) > 1e-4 for r in kd)
    tr.train(fx / "llama", tmp_path / "kd-lr", _cfg(teacher=str(fx / "olmoe"), kd_alpha=0.5), data_dir=kdata)
    tr.train(fx / "llama", tmp_path / "plain-lr", _cfg(), data_dir=kdata)
    a, b = _weights(tmp_path / "kd-lr"), _weights(tmp_path / "plain-lr")
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the KL term reaches the gradients


def test_resume_with_kd_gives_identical_losses(fx, kdata, tmp_path, monkeypatch):
    cfg = _cfg(steps=8, save_every=3, teacher=str(fx / "olmoe"), kd_alpha=0.5, kd_temperature=2.0)
    tr.train(fx / "llama", tmp_path / "full", cfg, data_dir=kdata)
    real = tr.lm_batch

    def killed(stream, c, step, micro, split_seed=0):
        if step == 7 and split_seed == 0:
            raise KeyboardInterrupt  # dies during step 8, after the step-6 checkpoint
        return real(stream, c, step, micro, split_seed)
    monkeypatch.setattr(tr, "lm_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        tr.train(fx / "llama", tmp_path / "cut", cfg, data_dir=kdata)
    monkeypatch.setattr(tr, "lm_batch", real)
    assert tr.latest_checkpoint(tmp_path / "cut").name == "step-000006"
    saved = json.loads((tmp_path / "cut" / "train_config.json").read_text())["params"]
    assert saved["teacher"] == str(fx / "olmoe") and saved["kd_alpha"] == 0.5 and saved["kd_temperature"] == 2.0
    tr.train(fx / "llama", tmp_path / "cut", cfg, data_dir=kdata, resume="auto")
    full, cut = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    for key in ("loss", "ce", "kl"):
        assert [r[key] for r in cut] == pytest.approx([r[key] for r in full], abs=1e-6), key


def test_resume_with_kd_ignores_the_teachers_readme_but_not_its_weights(fx, kdata, tmp_path):
    """TEACHER's identity is its weights: a README written beside them (the fixtures' teachers have one)
    does not make a KD run another run; the teacher's weights changed do."""
    import shutil
    from safetensors.torch import load_file, save_file
    from xpertctl.errors import XpertError
    t = tmp_path / "teacher"
    shutil.copytree(fx / "olmoe", t)
    cfg = _cfg(steps=8, save_every=3, teacher=str(t), kd_alpha=0.5, kd_temperature=2.0)
    tr.train(fx / "llama", tmp_path / "run", cfg, data_dir=kdata)
    (t / "README.md").write_text("# the teacher\ntrained on 100M tokens\n")
    tr.train(fx / "llama", tmp_path / "run", cfg, data_dir=kdata, resume="auto")  # continues
    sd = load_file(str(t / "model.safetensors"))
    k = sorted(sd)[-1]
    sd[k] = sd[k] * 1.5
    save_file(sd, str(t / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(XpertError, match="TEACHER"):
        tr.train(fx / "llama", tmp_path / "run", cfg, data_dir=kdata, resume="auto")


def test_grad_accum_matches_one_big_batch(fx, kdata, tmp_path, monkeypatch):
    """Two micro-batches of 2 rows == one batch of the same 4 rows (every row has seq_len-1 targets)."""
    kd = dict(teacher=str(fx / "olmoe"), kd_alpha=0.6, kd_temperature=2.0)
    accum = _cfg(batch_size=2, grad_accum=2, eval_every=0, **kd)
    tr.train(fx / "llama", tmp_path / "accum", accum, data_dir=kdata)
    real = tr.lm_batch

    def joined(stream, c, step, micro, split_seed=0):
        parts = [real(stream, accum, step, k, split_seed) for k in range(2)]
        return tuple(torch.cat(t) for t in zip(*parts))
    monkeypatch.setattr(tr, "lm_batch", joined)
    tr.train(fx / "llama", tmp_path / "big", _cfg(batch_size=4, eval_every=0, **kd), data_dir=kdata)
    a, b = _rows(tmp_path / "accum"), _rows(tmp_path / "big")
    for key in ("loss", "ce", "kl"):  # float32 sums over differently shaped batches: ~1e-5 apart on the small KL
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4), key
    wa, wb = _weights(tmp_path / "accum"), _weights(tmp_path / "big")
    # float32 sums of differently shaped batches drift by ~1e-5 over the run (seen to cross 1e-5 once on a
    # loaded machine); a wrong accumulation (e.g. no 1/grad_accum) moves weights by the update size, ~1e-3
    assert all(torch.allclose(wa[k], wb[k], atol=5e-5) for k in wa)


def _swap_two_tokens(src, dst):
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(k for k in vocab if k.isalpha())[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


def test_mismatched_teacher_is_one_line_and_writes_nothing(fx, kdata, tmp_path, cli):
    base = ["train", fx / "llama", "--data", kdata, "--steps", "2", "--batch-size", "2", "--seq-len", "16"]
    shutil.copytree(ROOT / "fixtures" / "teacher", tmp_path / "t2048")  # the demo teacher: a 2048-token BPE
    cases = [
        (["--teacher", tmp_path / "t2048"], ("--teacher", "vocab")),
        (["--teacher", _swap_two_tokens(fx / "olmoe", tmp_path / "swapped")], ("--teacher", "tokenizer")),
        (["--teacher", tmp_path / "nowhere"], ("nowhere",)),
        (["--teacher", fx / "olmoe", "--kd-alpha", "1.5"], ("--kd-alpha",)),
        (["--teacher", fx / "olmoe", "--kd-temperature", "0"], ("--kd-temperature",)),
        (["--kd-alpha", "0.5"], ("--kd-alpha", "--teacher")),
    ]
    for n, (extra, needles) in enumerate(cases):
        out = tmp_path / f"out{n}"
        code, _, err = cli(*base, *extra, "-o", out)
        assert_user_error(code, err, *needles)
        assert not out.exists(), extra


def test_torchrun_two_processes_match_one_with_kd(fx, kdata, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", str(fx / "llama"), "--data", str(kdata), "--steps", "3", "--batch-size", "4", "--seq-len", "16",
            "--lr", "3e-3", "--warmup", "1", "--eval-every", "0", "--teacher", str(fx / "olmoe"),
            "--kd-alpha", "0.5", "--kd-temperature", "2"]
    one = subprocess.run([sys.executable, "-m", "xpertctl.cli", *args, "-o", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    finished(torchrun(args, tmp_path / "two", env))
    r1, r2 = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    for key in ("loss", "ce", "kl"):
        assert [r[key] for r in r2] == pytest.approx([r[key] for r in r1], rel=1e-4), key
    assert not math.isnan(r1[-1]["kl"])
