"""Losses and log-likelihoods in bounded memory (xpertctl/losses.py): computed chunk by chunk from the final
hidden states, they equal the plain computation from the model's full logits, written out here — CE with
the router load-balancing term, KD, their gradients, perplexity, continuation scores, multiple choice,
generation and the lm-eval adapter — on several families, for chunks that divide nothing, single
positions and chunks larger than the whole batch, with padding and prompt masks; and the output head
never sees more than one chunk of positions (on main it saw whole [batch, window] blocks)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from conftest import token_data
from xpertctl import data, distill, losses
from xpertctl import eval as ev
from xpertctl import train as tr

FAMILIES = ["llama", "qwen3", "olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
VOCAB = 96  # the fixtures' vocabulary


def _qwen3(seed=11):
    """A dense Qwen3 (a graft target family; no fixture of its own)."""
    cfg = tf.Qwen3Config(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_hidden_layers=2, intermediate_size=48, max_position_embeddings=128, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return tf.Qwen3ForCausalLM(cfg)


def _model(fx, family, router=True):
    """float32, train mode; MoE sources with output_router_logits (their loss then has the aux term)."""
    m = _qwen3() if family == "qwen3" else tf.AutoModelForCausalLM.from_pretrained(fx / family, dtype=torch.float32)
    if router and hasattr(m.config, "output_router_logits"):
        m.config.output_router_logits = True
    return m.train()


def _batch(seed=0, B=3, T=17):
    """Distinct rows; row 0 has a prompt (labels -100), row 2 right padding (mask 0, labels -100)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, VOCAB, (B, T), generator=g)
    m = torch.ones_like(x)
    y = x.clone()
    y[0, :6] = -100
    m[2, T - 5:] = 0
    y[2, T - 5:] = -100
    x[2, T - 5:] = 0
    return x, m, y


class _RowSpy:
    """The largest number of positions one call of a module (lm_head) received."""

    def __init__(self, module):
        self.most = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, mod, inp, out):
        self.most = max(self.most, inp[0].reshape(-1, inp[0].shape[-1]).shape[0])


def _full_ce(logits, y):
    """Mean next-token NLL over labels != -100, from the whole logits (written out)."""
    lp = torch.log_softmax(logits.float(), -1)
    tot, n = 0.0, 0
    for b in range(y.shape[0]):
        for i in range(y.shape[1] - 1):
            if y[b, i + 1] != -100:
                tot, n = tot - lp[b, i, y[b, i + 1]], n + 1
    return tot / n


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# ---- tensor level --------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 3, 7, 23, 500])
def test_chunked_sums_equal_the_full_computation_with_gradients(rows):
    g = torch.Generator().manual_seed(rows)
    N, H, V, T = 23, 8, 50, 2.5
    h0, th = torch.randn(N, H, generator=g), torch.randn(N, 6, generator=g)
    lin, tlin = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(6, V, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(V, H, generator=g)); tlin.weight.copy_(torch.randn(V, 6, generator=g))
    t = torch.randint(0, V, (N,), generator=g)

    def full():
        h = h0.clone().requires_grad_()
        lp = torch.log_softmax(lin(h), -1)
        ce = -lp[torch.arange(N), t].sum()
        with torch.no_grad():
            pt = torch.log_softmax(tlin(th) / T, -1)
        ps = torch.log_softmax(lin(h) / T, -1)
        kl = (pt.exp() * (pt - ps)).sum()
        (ce + 3 * kl).backward()
        return ce.detach(), kl.detach(), h.grad, lin.weight.grad.clone(), lp.detach()

    ce_ref, kl_ref, gh_ref, gw_ref, lp_ref = full()
    lin.weight.grad = None
    h = h0.clone().requires_grad_()
    head, thead = losses.Head(lin), losses.Head(tlin)
    ce, kl = losses.kd_sums(h, head, th, thead, t, T, rows)
    (ce + 3 * kl).backward()
    assert ce.item() == pytest.approx(ce_ref.item(), rel=1e-5) and kl.item() == pytest.approx(kl_ref.item(), rel=1e-5)
    assert torch.allclose(h.grad, gh_ref, rtol=1e-4, atol=1e-6)
    assert torch.allclose(lin.weight.grad, gw_ref, rtol=1e-4, atol=1e-6)
    assert tlin.weight.grad is None
    assert losses.cross_entropy_sum(h0, head, t, rows).item() == pytest.approx(ce_ref.item(), rel=1e-5)
    lp, hit = losses.token_logprobs(h0, head, t, rows)
    assert torch.allclose(lp, lp_ref[torch.arange(N), t], atol=1e-5)
    assert torch.equal(hit, lp_ref.argmax(-1) == t)


# ---- training: CE (+ router term) and KD, values and gradients ------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows", [5, 16, 1000])
def test_train_loss_and_gradients_equal_the_models_own(fx, family, rows):
    model = _model(fx, family)
    x, m, y = _batch(seed=len(family))
    out = model(input_ids=x, attention_mask=m, labels=y, use_cache=False)
    aux = getattr(out, "aux_loss", None)
    ce = _full_ce(out.logits, y)
    coef = getattr(model.config, "router_aux_loss_coef", 0.0)
    assert out.loss.item() == pytest.approx(float(ce + (coef * aux if aux is not None else 0.0)), rel=1e-5)
    if family in ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe"):
        assert aux is not None and float(coef * aux) > 1e-4  # the router term is there and big enough to see
    out.loss.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    lm = losses.LMLoss(model, rows=rows)
    assert lm.plan.head is not losses.IDENTITY  # the chunked path, not the fallback
    spy = _RowSpy(model.lm_head)
    loss = lm(x, m, y)
    loss.backward()
    spy.handle.remove()
    assert float(loss) == pytest.approx(float(out.loss), rel=1e-5)
    got = _grads(model)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-7), k
    kept = int((y[:, 1:] != -100).sum())
    assert spy.most == min(rows, kept)  # backward recomputed chunk by chunk too


@pytest.mark.parametrize("rows,alpha,T", [(4, 0.5, 2.0), (9, 0.3, 1.0), (1000, 0.7, 3.0)])
@pytest.mark.parametrize("student,teacher", [("llama", "olmoe"), ("qwen3", "mixtral")])
def test_kd_loss_and_gradients_equal_full_logits(fx, rows, alpha, T, student, teacher):
    s, t = _model(fx, student), _model(fx, teacher, router=False).eval().requires_grad_(False)
    x, m, y = _batch(seed=rows)
    ls = s(input_ids=x, attention_mask=m, use_cache=False).logits
    with torch.no_grad():
        lt = t(input_ids=x, attention_mask=m, use_cache=False).logits
    keep = torch.zeros_like(y, dtype=torch.bool)
    keep[:, :-1] = y[:, 1:] != -100
    ps, pt = torch.log_softmax(ls[keep] / T, -1), torch.log_softmax(lt[keep] / T, -1)
    kl = (pt.exp() * (pt - ps)).sum(-1).mean()
    ce = _full_ce(ls, y)
    ref = (1 - alpha) * ce + alpha * T * T * kl
    ref.backward()
    want = _grads(s)
    s.zero_grad(set_to_none=True)

    lm = losses.LMLoss(s, t, T, rows=rows)
    spy_s, spy_t = _RowSpy(s.lm_head), _RowSpy(t.lm_head)
    th, _, _ = losses.outputs(t, x, m)
    ce2, kl2 = lm(x, m, y, th)
    loss = distill.kd_loss(ce2, kl2, alpha, T)
    loss.backward()
    assert ce2.item() == pytest.approx(ce.item(), rel=1e-5) and kl2.item() == pytest.approx(kl.item(), rel=1e-4)
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    got = _grads(s)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-7), k
    assert max(spy_s.most, spy_t.most) <= rows


@pytest.fixture(scope="module")
def cdata(fx, tmp_path_factory):
    text = ("the law shall apply to every licence holder . in the beginning god created the heaven and the earth . "
            "def main ( ) : return 0 . a noun is a word that names a thing . ")
    return token_data(fx, tmp_path_factory, "chunktok", {"a": "\n\n".join(f"{text} {k}" for k in range(40))})


def test_train_runs_chunked_with_the_same_losses_and_weights(fx, cdata, tmp_path, monkeypatch):
    """`train` (plain and KD, with validation): chunks of 8 positions give the unchunked run's losses and
    weights, and neither output head ever sees more than 8 positions at once (8: also the one check of
    each model's own logits)."""
    spies = []
    real = tr.load_causal_lm

    def spying(ckpt):
        model = real(ckpt)
        spies.append(_RowSpy(model.lm_head))
        return model
    monkeypatch.setattr(tr, "load_causal_lm", spying)
    for kd in ({}, dict(teacher=str(fx / "olmoe"), kd_alpha=0.5, kd_temperature=2.0)):
        cfg = tr.TrainConfig(steps=3, batch_size=3, seq_len=16, lr=3e-3, warmup=1, eval_every=2, eval_batches=2, **kd)
        runs = {}
        for elements in (VOCAB * 8, 1 << 30):
            monkeypatch.setattr(losses, "CHUNK_ELEMENTS", elements)
            spies.clear()
            out = tmp_path / f"{bool(kd)}-{elements}"
            tr.train(fx / "llama", out, cfg, data_dir=cdata)
            runs[elements] = ([json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()],
                              tf.AutoModelForCausalLM.from_pretrained(out / "final").state_dict())
            most = max(s.most for s in spies)
            assert most <= 8 if elements < 1 << 30 else most > 8
        (ra, wa), (rb, wb) = runs.values()
        for key in ("loss", "val_loss") + (("ce", "kl") if kd else ()):
            a, b = [r.get(key) for r in ra], [r.get(key) for r in rb]
            assert [v is None for v in a] == [v is None for v in b]
            assert [v for v in a if v is not None] == pytest.approx([v for v in b if v is not None], rel=1e-5), key
        worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        assert worst < 1e-5, worst  # float summation order only (seen up to ~1e-6 after 3 AdamW steps)


# ---- evaluation: ppl, continuation scores, mc, generation --------------------------------------------

def _by_hand(model, ids, n):
    """(log P(last n of ids | before), all greedy) from the model's full logits on exactly these ids."""
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0].float(), -1)
    pos = range(len(ids) - 1 - n, len(ids) - 1)
    return sum(float(lp[p, ids[p + 1]]) for p in pos), all(int(lp[p].argmax()) == ids[p + 1] for p in pos)


@pytest.mark.parametrize("family", ["llama", "qwen3", "olmoe", "qwen2_moe", "deepseek_v2"])
@pytest.mark.parametrize("rows", [1, 7, 10_000])
def test_eval_scores_equal_full_logits(fx, family, rows, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", VOCAB * rows)
    model = _model(fx, family).eval()
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(3, VOCAB, (61,), generator=g)
    # windows of 16: three full, one of 13 (61 = 3 * 16 + 13); batches of 2 (the second is padded);
    # continuation scores: rows of different lengths in one padded batch, one scoring nothing
    seqs = [(ids[:20].tolist(), 5), (ids[30:36].tolist(), 5), (ids[40:49].tolist(), 1), (ids[50:55].tolist(), 0)]
    losses.plan_of(model)  # its one check runs the model's own forward on 8 tokens
    spy = _RowSpy(model.lm_head)
    nll, n = ev.nll_windows(model, ids, seq_len=16, batch_size=2)
    got = losses.continuation_scores(model, seqs, "cpu")
    spy.handle.remove()
    assert spy.most <= rows
    want, cnt = 0.0, 0
    for a in range(0, 61, 16):
        w = ids[a: a + 16].tolist()
        want -= _by_hand(model, w, len(w) - 1)[0]
        cnt += len(w) - 1
    assert n == cnt == 57 and nll == pytest.approx(want, rel=1e-5)
    for (s, k), (ll, greedy) in zip(seqs, got):
        if k == 0:
            assert (ll, greedy) == (0.0, True)
            continue
        ref_ll, ref_greedy = _by_hand(model, s, k)
        assert ll == pytest.approx(ref_ll, abs=1e-5) and greedy == ref_greedy
    # a greedy continuation is recognised as one
    ctx = ids[:10].tolist()
    with torch.no_grad():
        nxt = int(model(input_ids=torch.tensor([ctx])).logits[0, -1].argmax())
    assert losses.continuation_scores(model, [(ctx + [nxt], 1)], "cpu")[0][1] is True


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_mc_and_rolling_equal_full_logits(fx, family, tmp_path, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", VOCAB * 3)
    model = _model(fx, family).eval()
    tok = data.load_tokenizer(fx / family)
    recs = [{"context": "the law shall", "choices": ["apply", "god created the heaven", "return 0"], "label": 1},
            {"context": "def main ( ) :", "choices": ["return 0", "the earth"], "label": 0},
            {"context": "a noun is", "choices": ["a word that names a thing", "law", "the man page lists"], "label": 2}]
    f = tmp_path / "mc.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    acc = acc_norm = 0
    for r in recs:
        ctx = tok(r["context"], add_special_tokens=False)["input_ids"]
        lls = []
        for c in r["choices"]:
            whole = tok(r["context"] + " " + c, add_special_tokens=False)["input_ids"]
            lls.append(_by_hand(model, whole, len(whole) - len(ctx))[0])
        acc += int(np.argmax(lls) == r["label"])
        acc_norm += int(np.argmax(np.array(lls) / [len(c) for c in r["choices"]]) == r["label"])
    res = ev.multiple_choice(model, tok, str(f), "cpu")
    assert (res["acc"], res["acc_norm"]) == (acc / 3, acc_norm / 3)
    # rolling windows of 6 over two documents (a prefix token first): every token predicted once
    docs = ["the law shall apply to every licence holder .", "in the beginning god created the heaven and the earth ."]
    want = 0.0
    for d in docs:
        full = [ev.prefix_token_id(tok)] + tok(d)["input_ids"]
        for end in range(1, len(full), 6):
            stop = min(len(full), end + 6)
            want += _by_hand(model, full[max(0, stop - 7): stop], stop - end)[0]
    assert ev.rolling_loglikelihood(model, tok, docs, 6, "cpu", batch_size=3) == pytest.approx(want, rel=1e-5)


def test_generation_projects_only_the_last_position(fx, tmp_path):
    """gen: transformers' generate asks for the last position's logits only (logits_to_keep=1), and the
    greedy text equals a loop over the full logits."""
    model = _model(fx, "llama").eval()
    tok = data.load_tokenizer(fx / "llama")
    rec = {"instruction": "say the law", "response": "the law shall apply"}
    ids = tok(data.prompt_of(rec), add_special_tokens=False)["input_ids"]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    f = tmp_path / "gen.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    from rouge_score import rouge_scorer
    said = tok.decode(seq[len(ids):], skip_special_tokens=True)
    want = 100 * rouge_scorer.RougeScorer(["rougeL"]).score(rec["response"], said)["rougeL"].fmeasure
    spy = _RowSpy(model.lm_head)
    assert ev.generation(model, tok, str(f), "cpu", 6)["rougeL"] == pytest.approx(want)
    assert spy.most == 1


# ---- the lm-eval adapter ---------------------------------------------------------------------------

def test_lmeval_adapter_equals_the_harness_request_by_request(fx, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from xpertctl import lmeval
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", VOCAB * 4)
    # a dense model: with OLMoE this failed once in a full run (0.32 nats on one rolling document; not
    # reproduced alone), where a top-k routing near-tie can flip when the two sides batch and sum in
    # another order; the adapter is the same code for every family
    model = _model(fx, "llama", router=False).eval()
    tok = data.load_tokenizer(fx / "llama")
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=12)
    ours = lmeval.chunked_hflm(HFLM)(pretrained=model, tokenizer=tok, batch_size=3, max_length=12)
    words = "the law shall apply to every licence holder . in the beginning god created the heaven and the earth".split()
    reqs = [Instance("loglikelihood", {}, (" ".join(words[:k]), " " + " ".join(words[k: k + j])), 0)
            for k, j in ((1, 1), (3, 2), (5, 4), (16, 3), (2, 1), (9, 1))]  # (16, 3): truncated on the left
    losses.plan_of(model)  # its one check runs the model's own forward on 8 tokens
    spy = _RowSpy(model.lm_head)
    got = ours.loglikelihood(reqs, disable_tqdm=True)
    assert spy.most <= 4
    spy.handle.remove()
    want = stock.loglikelihood(reqs, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want]
    # is-greedy, at the token level (text round trips may re-tokenize): the argmax token, then another
    ctx = ours.tok_encode("the law")
    with torch.no_grad():
        order = model(input_ids=torch.tensor([ctx])).logits[0, -1].argsort(descending=True).tolist()
    toks = [(None, ctx, [order[0]]), (None, ctx, [order[1]])]
    got, want = ours._loglikelihood_tokens(toks, disable_tqdm=True), stock._loglikelihood_tokens(toks, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in want] == [True, False]
    assert [l for l, _ in got] == pytest.approx([l for l, _ in want], abs=1e-5)
    assert np.max(np.abs(np.array([l for l, _ in got]) - np.array([l for l, _ in want]))) < 1e-5
    docs = [Instance("loglikelihood_rolling", {}, (" ".join(words[k:]),), 0) for k in (0, 7)]
    assert ours.loglikelihood_rolling(docs, disable_tqdm=True) == \
        pytest.approx(stock.loglikelihood_rolling(docs, disable_tqdm=True), rel=1e-6)


# ---- the head each family declares; the fallback -------------------------------------------------------

def _declaring(kind):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  intermediate_size=48, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(5)
    if kind == "softcap":
        m = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0))
    elif kind == "multiply":
        m = tf.CohereForCausalLM(tf.CohereConfig(**common, logit_scale=0.25))
    else:
        m = tf.GraniteForCausalLM(tf.GraniteConfig(**common, logits_scaling=4.0))
    with torch.no_grad():  # logits of a few units: the transforms visibly change them
        m.get_output_embeddings().weight.mul_(400.0)
    return m


@pytest.mark.parametrize("kind", ["softcap", "multiply", "divide"])
def test_declared_logit_transforms_are_applied(kind):
    model = _declaring(kind).eval()
    plan = losses.plan_of(model)
    assert plan.head is not losses.IDENTITY and [k for k, _ in plan.head.transforms] == [kind]
    x, m, _ = _batch(seed=3)
    with torch.no_grad():
        ref = model(input_ids=x, attention_mask=m).logits
        h, head, _ = losses.outputs(model, x, m)
        assert torch.allclose(head(h), ref, atol=1e-5)
        assert not torch.allclose(model.get_output_embeddings()(h), ref, atol=1e-2)  # the transform matters
    targets = losses.shifted_targets(torch.where(m.bool(), x, -100))
    lp, _ = losses.target_logprobs(model, x, m, targets, rows=5)
    want = torch.log_softmax(ref, -1)[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
    keep = targets[:, :-1] != -100
    assert torch.allclose(lp[:, :-1][keep], want[keep], atol=1e-4)


def test_a_model_whose_logits_are_not_reproduced_falls_back_to_them(fx, capsys):
    """A config declaring a transform its class does not apply: detected, scored from the full logits."""
    model = _model(fx, "llama")
    model.config.final_logit_softcapping = 0.05
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
    lm = losses.LMLoss(model, rows=4)
    assert lm.plan.head is losses.IDENTITY and "full logits" in capsys.readouterr().err
    x, m, y = _batch(seed=9)
    assert lm(x, m, y).item() == pytest.approx(model(input_ids=x, attention_mask=m, labels=y).loss.item(), rel=1e-5)
    nll, n = ev.nll_windows(model.eval(), x[0], seq_len=8)
    with torch.no_grad():
        want = sum(-_by_hand(model, x[0, a: a + 8].tolist(), len(x[0, a: a + 8]) - 1)[0] for a in range(0, 17, 8)
                   if len(x[0, a: a + 8]) > 1)
    assert n == 14 and nll == pytest.approx(want, rel=1e-5)


def test_chunk_rule_leaves_small_models_unchunked():
    assert losses.chunk_rows(2048) >= 8 * 256  # the demo: 8 x 256 windows at a 2,048-token vocabulary
    assert losses.chunk_rows(50_304) * 50_304 <= losses.CHUNK_ELEMENTS
    assert losses.chunk_rows(10 ** 9) == 1
