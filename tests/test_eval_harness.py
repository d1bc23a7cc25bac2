"""eval follows lm-evaluation-harness 0.4.13: the target delimiter, acc_norm by the choice's length, the
tokenizer's default special tokens, left truncation, word perplexity and bits per byte; `lmeval:TASKS`
runs the harness itself. References are built by hand from token ids, or by the harness."""
import json
import math
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import transformers as tf

from conftest import ROOT, assert_user_error
from xpertctl import data
from xpertctl import eval as ev

TEACHER = ROOT / "fixtures" / "teacher"


@pytest.fixture(scope="module")
def bos_llama(fx, tmp_path_factory):
    """The llama fixture with a tokenizer that adds BOS by default (as Llama's own tokenizers do)."""
    d = tmp_path_factory.mktemp("bosllama") / "m"
    shutil.copytree(fx / "llama", d)
    tj = json.loads((d / "tokenizer.json").read_text())
    bos = "<s>"
    bos_id = tj["model"]["vocab"][bos] if "vocab" in tj["model"] else None
    tj["post_processor"] = {"type": "TemplateProcessing",
                            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    model = tf.AutoModelForCausalLM.from_pretrained(d).eval()
    tok = data.load_tokenizer(d)
    assert tok("the law")["input_ids"][0] == tok.bos_token_id  # the fixture does what it claims
    return d, model, tok


def _ll_by_hand(model, ids: list[int], n_cont: int) -> float:
    """log P(last n_cont ids | the ids before them), one forward pass on exactly these ids."""
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0].float(), -1)
    return sum(float(lp[p - 1, ids[p]]) for p in range(len(ids) - n_cont, len(ids)))


def _ids(tok, words):
    """Word by word (the fixture's tokenizer splits on whitespace first), never the whole string."""
    return [i for w in words for i in tok(w, add_special_tokens=False)["input_ids"]]


def test_mc_joins_with_the_delimiter_and_adds_default_special_tokens(bos_llama):
    _, model, tok = bos_llama
    # a harness-style item: choices without a leading space; the delimiter " " joins them
    got = ev.choice_loglikelihoods(model, tok, "the law shall", ["apply", "return"], "cpu")
    ctx = [tok.bos_token_id] + _ids(tok, ["the", "law", "shall"])
    want = [_ll_by_hand(model, ctx + _ids(tok, [w]), len(_ids(tok, [w]))) for w in ("apply", "return")]
    assert want[0] != want[1]
    assert got == pytest.approx(want, abs=1e-5)
    # --target-delimiter "": a file written with leading spaces scores the same
    assert ev.choice_loglikelihoods(model, tok, "the law shall", [" apply", " return"], "cpu", "") == \
        pytest.approx(want, abs=1e-5)


def test_mc_acc_norm_divides_by_the_choice_length_without_delimiter(bos_llama, tmp_path):
    _, model, tok = bos_llama
    items = [("the law shall", ["apply", "the heaven and the earth", "god"], 0),
             ("in the beginning", ["god created", "a", "the man page lists options"], 1),
             ("def main", ["( ) : return 0", "law", "noun"], 2)]
    f = tmp_path / "mc.jsonl"
    f.write_text("".join(json.dumps({"context": c, "choices": ch, "label": y}) + "\n" for c, ch, y in items))
    acc = acc_norm = 0
    for c, ch, y in items:
        ctx = [tok.bos_token_id] + _ids(tok, c.split())
        lls = np.array([_ll_by_hand(model, ctx + _ids(tok, x.split()), len(_ids(tok, x.split()))) for x in ch])
        acc += int(np.argmax(lls) == y)
        acc_norm += int(np.argmax(lls / np.array([len(x) for x in ch])) == y)
    res = ev.multiple_choice(model, tok, str(f), "cpu")
    assert (res["acc"], res["acc_norm"]) == (acc / 3, acc_norm / 3)


def test_mc_truncates_on_the_left_to_the_model_length(bos_llama):
    _, model, tok = bos_llama
    n_pos = model.config.max_position_embeddings  # 128
    words = ("the law shall apply to every licence holder . " * 40).split()[: n_pos + 40]
    got = ev.choice_loglikelihoods(model, tok, " ".join(words), ["god"], "cpu", max_length=n_pos)[0]
    ids = ([tok.bos_token_id] + _ids(tok, words) + _ids(tok, ["god"]))[-(n_pos + 1):]
    assert got == pytest.approx(_ll_by_hand(model, ids, len(_ids(tok, ["god"]))), abs=1e-5)
    # the CLI uses the model's length (an untruncated pass would run past max_position_embeddings)


def test_mc_cli_target_delimiter_option(bos_llama, tmp_path, cli):
    d, model, tok = bos_llama
    spaced, plain = tmp_path / "spaced.jsonl", tmp_path / "plain.jsonl"
    spaced.write_text(json.dumps({"context": "the law", "choices": [" shall", " god"], "label": 0}) + "\n")
    plain.write_text(json.dumps({"context": "the law", "choices": ["shall", "god"], "label": 0}) + "\n")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert cli("eval", d, "--task", f"mc:{plain}", "-o", a)[0] == 0
    assert cli("eval", d, "--task", f"mc:{spaced}", "--target-delimiter", "", "-o", b)[0] == 0
    ra, rb = (json.loads(p.read_text())["tasks"] for p in (a, b))
    assert ra[f"mc:{plain}"]["target_delimiter"] == " " and rb[f"mc:{spaced}"]["target_delimiter"] == ""
    assert ra[f"mc:{plain}"]["acc"] == rb[f"mc:{spaced}"]["acc"]


def test_ppl_reports_word_perplexity_and_bits_per_byte(bos_llama, tmp_path):
    _, model, tok = bos_llama
    docs = ["the law shall apply to every licence holder .", "in the beginning god created the heaven and the earth ."]
    f = tmp_path / "d.txt"
    f.write_text("\n\n".join(docs))
    res = ev.perplexity(model, tok, str(f), 64, "cpu")["d"]
    # by hand: each document on its own, every token predicted, the first from the prefix token (BOS)
    ll = 0.0
    for doc in docs:
        ids = [tok.bos_token_id] + [tok.bos_token_id] + _ids(tok, doc.split())  # prefix + the tokenizer's BOS
        ll += _ll_by_hand(model, ids, len(ids) - 1)
    words = sum(len(d.split()) for d in docs)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert res["words"] == words and res["bytes"] == n_bytes
    assert res["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)
    # the token-level figure is unchanged: exp(mean NLL) over the EOS-joined stream's windows
    assert res["ppl"] == pytest.approx(math.exp(res["nll"]))


# ---- against lm-evaluation-harness itself (the `lmeval` extra) ------------------------------------

# lm_eval is imported inside the tests: `make setup` installs the extra, and one test runs without it.


def _cloze_items(tmp_path, n=8):
    from xpertctl import corpus
    f = tmp_path / "cloze.jsonl"
    corpus.cloze(ROOT / "fixtures" / "corpus-mini", f, per_domain=2, seed=7)
    items = [json.loads(l) for l in f.read_text().splitlines()][:n]
    f.write_text("".join(json.dumps(x) + "\n" for x in items))
    return f, items


def _task_yaml(tmp_path, name, data_file, **extra):
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data_file}",
             "test_split: test"] + [f"{k}: {v}" for k, v in extra.items()]
    p = tmp_path / f"{name}.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_harness_style_cloze_and_merged_lmeval_results_agree(tmp_path, cli):
    f, items = _cloze_items(tmp_path)
    assert all(not c.startswith(" ") for x in items for c in x["choices"])  # cloze writes the harness's way
    task = _task_yaml(tmp_path, "xp_cloze", f, output_type="multiple_choice", doc_to_text='"{{context}}"',
                      doc_to_choice="choices", doc_to_target="label",
                      metric_list="\n  - metric: acc\n  - metric: acc_norm")
    out = tmp_path / "r.json"
    code, _, err = cli("eval", TEACHER, "--task", f"mc:{f}", "--task", f"lmeval:{task}", "-o", out)
    assert code == 0, err
    doc = json.loads(out.read_text())["tasks"]
    ours, theirs = doc[f"mc:{f}"], doc[f"lmeval:{task}"]["xp_cloze"]
    assert theirs["n"] == ours["n"] == len(items)
    assert (theirs["acc"], theirs["acc_norm"]) == (ours["acc"], ours["acc_norm"])


def test_loglikelihoods_match_the_harness_item_by_item(tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    model = tf.AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    tok = data.load_tokenizer(TEACHER)
    _, items = _cloze_items(tmp_path)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    reqs = [Instance("loglikelihood", {}, (x["context"], " " + c), i) for x in items for i, c in enumerate(x["choices"])]
    theirs = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    ours = [ll for x in items for ll in ev.choice_loglikelihoods(model, tok, x["context"], x["choices"], "cpu")]
    assert np.max(np.abs(np.array(ours) - np.array(theirs))) < 1e-4  # measured: 3e-5 on 55 items
    # word perplexity / bits per byte: the harness's rolling log-likelihood of each document
    texts = [x["context"] for x in items]
    rolling = sum(lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts],
                                           disable_tqdm=True))
    assert ev.rolling_loglikelihood(model, tok, texts, lm.max_length, "cpu") == pytest.approx(rolling, rel=1e-5)


def test_lmeval_errors_are_one_line(fx, tmp_path, cli, monkeypatch):
    missing = _task_yaml(tmp_path, "xp_gone", tmp_path / "nowhere.jsonl", output_type="multiple_choice",
                         doc_to_text='"{{context}}"', doc_to_choice="choices", doc_to_target="label")
    code, out, err = cli("eval", fx / "llama", "--task", f"lmeval:{missing}", "-o", tmp_path / "r.json")
    assert_user_error(code, err, "lmeval:", "dataset not available")
    code, out, err = cli("eval", fx / "llama", "--task", "lmeval:no_such_task_xyz", "-o", tmp_path / "r.json")
    assert_user_error(code, err, "unknown task 'no_such_task_xyz'")
    assert not (tmp_path / "r.json").exists()



def test_lmeval_task_file_the_harness_cannot_build_is_one_line(fx, tmp_path, cli):
    """A task YAML without dataset_path made the harness raise a TypeError: a traceback (now one line)."""
    bad = tmp_path / "xp_bad.yaml"
    bad.write_text("task: xp_bad\n")
    code, out, err = cli("eval", fx / "llama", "--task", f"lmeval:{bad}", "-o", tmp_path / "r.json")
    assert_user_error(code, err, f"lmeval:{bad}", "could not build")
    assert not (tmp_path / "r.json").exists()

def test_lmeval_without_the_extra_is_one_line(fx, tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    code, out, err = cli("eval", fx / "llama", "--task", "lmeval:boolq", "-o", tmp_path / "r.json")
    assert_user_error(code, err, "lmeval", "xpertctl[lmeval]")
    assert not (tmp_path / "r.json").exists()
