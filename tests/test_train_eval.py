"""train: loss goes down, resume is exact, arms see identical batches, DDP matches; eval matches refs."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as tf

from conftest import assert_user_error, finished, token_data, torchrun
from xpertctl import data
from xpertctl import eval as ev
from xpertctl import train as tr

TEXT = ("the law shall apply to every licence holder . in the beginning god created the heaven and the earth . "
        "def main ( ) : return 0 . a noun is a word that names a thing . the man page lists options . ")


@pytest.fixture(scope="module")
def tdata(fx, tmp_path_factory):
    return token_data(fx, tmp_path_factory, "tok", {name: "\n\n".join(f"{TEXT} {k}" for k in range(40))
                                                    for name in ("a", "b")})


def _cfg(**kw):
    base = dict(steps=12, batch_size=4, seq_len=16, lr=3e-3, warmup=2, eval_every=6, eval_batches=2, seed=0)
    base.update(kw)
    return tr.TrainConfig(**base)


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_tokenize_manifest_and_splits(tdata):
    td = data.load_token_data(tdata)
    m = td.manifest
    assert td.domains == ["a", "b"] and m["dtype"] == "uint16"
    for d in td.domains:
        assert all(m["domains"][d][s]["tokens"] > 0 for s in data.SPLITS)
        assert td.array(d, "train").max() < m["tokenizer"]["vocab_size"]
    # the split is a function of the document text alone: not of the process (str hash() is salted per
    # process), not of the other documents; and the percentages hold
    docs = [f"document {k}: {TEXT[k % 50:]}" for k in range(2000)]
    here = [data.split_of(d, 10, 5) for d in docs]
    code = ("import json, sys; from xpertctl import data; "
            "print(json.dumps([data.split_of(d, 10, 5) for d in json.load(sys.stdin)]))")
    other = subprocess.run([sys.executable, "-c", code], input=json.dumps(docs[::-1]), capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"}, check=True)
    assert json.loads(other.stdout)[::-1] == here
    frac = {s: here.count(s) / len(here) for s in data.SPLITS}
    assert abs(frac["val"] - 0.10) < 0.03 and abs(frac["test"] - 0.05) < 0.02
    assert all(data.split_of(d, 0, 0) == "train" for d in docs[:200])


def test_fifty_steps_lower_the_loss(fx, tdata, tmp_path):
    out = tr.train(fx / "llama", tmp_path / "run", _cfg(steps=50, eval_every=25), data_dir=tdata)
    losses = _losses(tmp_path / "run")
    assert len(losses) == 50 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "val_loss" in rows[24] and "val_loss" in rows[49] and rows[-1]["tokens"] == 50 * 4 * 16
    m = tf.AutoModelForCausalLM.from_pretrained(out)  # an HF dir with the tokenizer beside it
    assert (out / "tokenizer.json").exists() and m.config.num_hidden_layers == 2


@pytest.mark.parametrize("family", ["llama", "olmoe", "mixtral", "qwen3_moe"])
def test_resume_after_kill_gives_identical_losses(fx, tdata, tmp_path, monkeypatch, family):
    """MoE too: transformers 5 saves fused experts in the per-expert layout of the hub checkpoints, which a
    plain load_state_dict of the step checkpoint refused (the teacher's resume failed at step 3500)."""
    cfg = _cfg(save_every=4)
    tr.train(fx / family, tmp_path / "full", cfg, data_dir=tdata)
    real = tr.lm_batch

    def killed(stream, c, step, micro, split_seed=0):
        if step == 9 and split_seed == 0:
            raise KeyboardInterrupt  # dies during step 10, after the step-8 checkpoint
        return real(stream, c, step, micro, split_seed)
    monkeypatch.setattr(tr, "lm_batch", killed)
    with pytest.raises(KeyboardInterrupt):
        tr.train(fx / family, tmp_path / "cut", cfg, data_dir=tdata)
    assert len(_losses(tmp_path / "cut")) == 9 and tr.latest_checkpoint(tmp_path / "cut").name == "step-000008"
    monkeypatch.setattr(tr, "lm_batch", real)
    tr.train(fx / family, tmp_path / "cut", cfg, data_dir=tdata, resume="auto")
    assert _losses(tmp_path / "cut") == pytest.approx(_losses(tmp_path / "full"), abs=1e-6)


def test_two_arms_see_identical_batches(fx, tdata, tmp_path, monkeypatch, cli):
    seen = {}
    real = tr.lm_batch

    def spy(stream, c, step, micro, split_seed=0):
        x = real(stream, c, step, micro, split_seed)
        seen.setdefault(arm, []).append(x[0].clone())
        return x
    monkeypatch.setattr(tr, "lm_batch", spy)
    for arm, init in (("xpert", "xpert"), ("scratch", "scratch")):
        g = tmp_path / f"g-{arm}"
        assert cli("graft", fx / "olmoe", "-t", "2L", "-o", g, "--ffn-init", init)[0] == 0
        tr.train(g, tmp_path / arm, _cfg(steps=5), data_dir=tdata)
    assert len(seen["xpert"]) == len(seen["scratch"]) > 5
    assert all(torch.equal(a, b) for a, b in zip(seen["xpert"], seen["scratch"]))
    assert _losses(tmp_path / "xpert") != _losses(tmp_path / "scratch")  # different inits, same data


def test_sft_masks_the_prompt(fx, tmp_path):
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps({"instruction": "say the law", "context": "legal", "response": "the law shall apply"}) + "\n")
    tok = data.load_tokenizer(fx / "llama")
    (ids, labels), = tr.sft_examples(f, tok, 64)
    n_prompt = len(tok(data.prompt_of(json.loads(f.read_text())), add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id
    tr.train(fx / "llama", tmp_path / "run", _cfg(steps=3, seq_len=64), sft=f)
    assert len(_losses(tmp_path / "run")) == 3


def test_torchrun_two_processes_match_one(fx, tdata, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", str(fx / "llama"), "--data", str(tdata), "--steps", "4", "--batch-size", "4", "--seq-len", "16",
            "--lr", "3e-3", "--warmup", "1", "--eval-every", "0"]
    one = subprocess.run([sys.executable, "-m", "xpertctl.cli", *args, "-o", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    # Two 2-process runs at once: each finds its own rendezvous port (two suites share CI machines).
    runs = [torchrun(args, tmp_path / name, env) for name in ("two", "two-again")]
    for p in runs:
        finished(p)
    for name in ("two", "two-again"):
        assert _losses(tmp_path / name) == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)


# ---- eval --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_tok(fx):
    return tf.AutoModelForCausalLM.from_pretrained(fx / "llama").eval(), data.load_tokenizer(fx / "llama")


def test_ppl_equals_direct_exp_mean_nll(model_tok):
    model, tok = model_tok
    ids = data.token_stream([TEXT], tok)[:40]
    nll, n = ev.nll_windows(model, ids, seq_len=64)
    with torch.no_grad():
        direct = model(input_ids=ids[None], labels=ids[None]).loss
    assert n == 39 and math.exp(nll / n) == pytest.approx(math.exp(float(direct)), rel=1e-5)


def test_mc_acc_and_acc_norm(model_tok, tmp_path):
    model, tok = model_tok
    recs = [{"context": "the law shall", "choices": ["apply", "god created the heaven"], "label": 1},
            {"context": "def main ( ) :", "choices": ["return 0", "the earth"], "label": 0}]
    f = tmp_path / "mc.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    res = ev.multiple_choice(model, tok, str(f), "cpu")
    acc = acc_norm = 0
    for r in recs:
        lls = []
        for c in r["choices"]:
            ctx = tok(r["context"], add_special_tokens=False)["input_ids"]
            whole = tok(r["context"] + " " + c, add_special_tokens=False)["input_ids"]  # target delimiter " "
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0, :-1], -1)
            lls.append(sum(float(lp[p - 1, whole[p]]) for p in range(len(ctx), len(whole))))
        acc += int(np.argmax(lls) == r["label"])
        acc_norm += int(np.argmax(np.array(lls) / [len(c) for c in r["choices"]]) == r["label"])
    assert res["acc"] == acc / 2 and res["acc_norm"] == acc_norm / 2


def test_gen_rouge_matches_rouge_score(model_tok, tmp_path, monkeypatch):
    from rouge_score import rouge_scorer
    model, tok = model_tok
    f = tmp_path / "gen.jsonl"
    f.write_text(json.dumps({"instruction": "say", "response": "the law shall apply"}) + "\n")
    fixed = tok("the law shall", add_special_tokens=False)["input_ids"]

    def fake_generate(ids, **kw):  # deterministic text, so the score is checkable
        return torch.cat([ids, torch.tensor([fixed])], 1)
    monkeypatch.setattr(model, "generate", fake_generate)
    res = ev.generation(model, tok, str(f), "cpu", 8)
    said = tok.decode(fixed, skip_special_tokens=True)
    assert said == "the law shall"
    want = rouge_scorer.RougeScorer(["rougeL"]).score("the law shall apply", said)["rougeL"].fmeasure
    assert res["rougeL"] == pytest.approx(100 * want)


def test_eval_cli_writes_results(fx, tdata, tmp_path, cli):
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "the law", "choices": ["shall", "god"], "label": 0}) + "\n")
    out = tmp_path / "r.json"
    code, so, err = cli("eval", fx / "llama", "--task", f"ppl:{tdata}", "--task", f"mc:{mc}", "-o", out)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert set(doc["tasks"][f"ppl:{tdata}"]) >= {"a", "b", "fingerprint"} and doc["model"]["sha256"]


@pytest.mark.parametrize("rec,needle", [
    ('{"context": "x", "choices": ["a"], "label": 3}', "mc.jsonl:2: label 3 out of range"),
    ('{"context": "x", "choices": ["a"]}', "mc.jsonl:2: field 'label'"),
    ('not json', "mc.jsonl:2: not valid JSON"),
])
def test_eval_bad_task_records(fx, tmp_path, cli, rec, needle):
    f = tmp_path / "mc.jsonl"
    f.write_text('{"context": "x", "choices": ["a", "b"], "label": 0}\n' + rec + "\n")
    code, _, err = cli("eval", fx / "llama", "--task", f"mc:{f}")
    assert_user_error(code, err, needle)


def test_train_refuses_other_tokenizer_and_non_causal(fx, tdata, tmp_path, cli):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(fx / "llama", other)
    tj = json.loads((other / "tokenizer.json").read_text())
    tj["model"]["vocab"]["zzz"] = tj["model"]["vocab"].pop(next(iter(k for k in tj["model"]["vocab"] if k.isalpha())))
    (other / "tokenizer.json").write_text(json.dumps(tj))
    code, _, err = cli("train", other, "--data", tdata, "-o", tmp_path / "r", "--steps", "1")
    assert_user_error(code, err, "another tokenizer")
    bert = tmp_path / "bert"
    tf.BertModel(tf.BertConfig(vocab_size=96, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16)).save_pretrained(bert)
    code, _, err = cli("train", bert, "--data", tdata, "-o", tmp_path / "r2", "--steps", "1")
    assert_user_error(code, err, "not a causal LM")
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()
