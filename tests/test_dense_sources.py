"""Dense sources (issue 30, item 3): XPERT's cross-domain selection at neuron granularity.

The oracle of the counts is a tiny Llama built here with planted weights: every token id belongs to one
token set, each set drives exactly one FFN neuron of each layer (all other neurons compute exactly 0),
so which neuron is active on which token, its |activation| and the FFN's output energy are known by
hand. The fixtures of every dense family are checked against hooks of transformers' own modules.
"""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file

from conftest import DENSE_FAMILIES, assert_user_error
from xpertctl import data
from xpertctl.errors import XpertError
from xpertctl.io import open_checkpoint, provenance

# ---- the planted model ------------------------------------------------------------------------------

H = N = 8  # hidden size and FFN width: at --neuron-top 1/8 one neuron per token is active
EPS = 1e-6
A, B, C, DOWN = 2.0, 1.5, 1.0, 0.5  # gate gain, up gain, embedding scale, down column norm
# token sets by id in the fixture tokenizer: "to", "the", "in", "(" and ")"; every other id is background
SETS = [{87}, {51}, {78}, {4, 5}]
BACKGROUND = 4  # index of the background set
DIM = [0, 1, 2, 3, 7]  # the residual dimension each set's embedding points along
NEURON = [[0, 1, 2, 3, 7], [3, 2, 1, 0, 6]]  # per layer: the neuron each set drives
TEXTS = {
    "legal": ["the law shall apply to every licence holder .", "to the holder the law shall apply .",
              "every licence holder shall apply to the law ."],
    "scripture": ["in the beginning god created the heaven and the earth .", "and the earth was in the heaven .",
                  "in the beginning was the word ."],
    "code": ["def main ( ) : return the 0 .", "def main ( ) : return 0 .", "( the ) ( main ) : return ."],
}


def _set_of(tok_id: int) -> int:
    return next((k for k, s in enumerate(SETS) if tok_id in s), BACKGROUND)


@pytest.fixture(scope="module")
def planted(fx, tmp_path_factory):
    """A 2-layer Llama whose attention outputs 0 (o_proj = 0), so each FFN sees its token's embedding."""
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=H, intermediate_size=N, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         rms_norm_eps=EPS, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():
        emb = torch.zeros(96, H)
        for v in range(96):
            emb[v, DIM[_set_of(v)]] = C
        model.model.embed_tokens.weight.copy_(emb)
        for li, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            g, u, d = torch.zeros(N, H), torch.zeros(N, H), torch.zeros(H, N)
            for k, n in enumerate(NEURON[li]):
                g[n, DIM[k]], u[n, DIM[k]] = A, B
                d[4 + n % 3, n] = DOWN  # outputs go to dims 4-6, which no gate reads
            layer.mlp.gate_proj.weight.copy_(g)
            layer.mlp.up_proj.weight.copy_(u)
            layer.mlp.down_proj.weight.copy_(d)
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
    out = tmp_path_factory.mktemp("planted") / "llama"
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fx / "llama" / f, out / f)
    corpus = out.parent / "corpus"
    corpus.mkdir()
    for name, docs in TEXTS.items():
        (corpus / f"{name}.txt").write_text("\n\n".join(docs) + "\n")
    return out, corpus


def _domains(corpus):
    return [a for name in TEXTS for a in ("-d", f"{name}={corpus / (name + '.txt')}")]


def _hand_tokens(fx):
    """Each domain's token ids as the tokenizer gives them, each document followed by EOS."""
    tok = data.load_tokenizer(fx / "llama")
    return {name: [i for d in docs for i in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
            for name, docs in TEXTS.items()}


def _hand_acts():
    """|activation| of the active neuron in layer 0 and 1 (the same for every token, by construction)."""
    s0 = C / math.sqrt(C * C / H + EPS)  # the post-attention RMSNorm of C along one dimension
    a0 = F.silu(torch.tensor(A * s0, dtype=torch.float64)).item() * B * s0
    r = math.sqrt((C * C + (a0 * DOWN) ** 2) / H + EPS)  # layer 1's residual: embedding + layer 0's output
    s1 = C / r
    a1 = F.silu(torch.tensor(A * s1, dtype=torch.float64)).item() * B * s1
    return a0, a1


@pytest.fixture(scope="module")
def planted_stats(planted, tmp_path_factory):
    from xpertctl.ops import stats as st
    src, corpus = planted
    out = tmp_path_factory.mktemp("pstats") / "stats.safetensors"
    st.run(src, [f"{n}={corpus / (n + '.txt')}" for n in TEXTS], out, seq_len=16, batch_size=2)
    return out


def test_planted_counts_and_mass_by_hand(fx, planted_stats):
    t = load_file(str(planted_stats))
    rec = provenance.read(planted_stats, "stats")
    assert rec["level"] == "neuron" and rec["neuron_top"] == 0.125 and rec["neurons_per_token"] == 1
    assert rec["num_neurons"] == N and rec["layers"] == [0, 1] and rec["domains"] == list(TEXTS)
    assert t["counts"].shape == (3, 2, N) and t["counts"].dtype == torch.int64
    a0, a1 = _hand_acts()
    for d, ids in enumerate(_hand_tokens(fx).values()):
        assert int(t["tokens"][d]) == len(ids)
        per_set = [sum(_set_of(i) == k for i in ids) for k in range(len(DIM))]
        for li, act in ((0, a0), (1, a1)):
            want = torch.zeros(N, dtype=torch.int64)
            for k, n in enumerate(NEURON[li]):
                want[n] = per_set[k]
            assert t["counts"][d, li].tolist() == want.tolist(), (d, li)
            assert torch.allclose(t["mass"][d, li].double(), want.double() * act, rtol=1e-5, atol=1e-6)


def test_planted_counts_do_not_depend_on_batching(planted, tmp_path):
    from xpertctl.ops import stats as st
    src, corpus = planted
    doms = [f"{n}={corpus / (n + '.txt')}" for n in TEXTS]
    a = st.run(src, doms, tmp_path / "a.safetensors", seq_len=5, batch_size=1)
    b = st.run(src, doms, tmp_path / "b.safetensors", seq_len=32, batch_size=4)
    ta, tb = load_file(str(a)), load_file(str(b))
    assert torch.equal(ta["counts"], tb["counts"]) and torch.equal(ta["tokens"], tb["tokens"])


def test_planted_select_min_keeps_the_neurons_of_every_domain(fx, planted_stats, tmp_path, cli):
    # by hand: the background neuron and the neuron of "the" are active in every domain; the others in one
    toks = _hand_tokens(fx)
    freq = np.array([[sum(_set_of(i) == k for i in ids) / len(ids) for k in range(len(DIM))] for ids in toks.values()])
    order = sorted(range(len(DIM)), key=lambda k: (-freq[:, k].min(), k))
    assert {order[0], order[1]} == {1, BACKGROUND} and freq[:, order[2]].min() == 0
    out = tmp_path / "sel.json"
    code, so, err = cli("select", planted_stats, "--per-layer", "2", "-o", out)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["level"] == "neuron" and doc["per_layer"] == 2
    for li, l in enumerate(doc["layers"]):
        assert l["neurons"] == [NEURON[li][order[0]], NEURON[li][order[1]]]
        assert l["scores"] == pytest.approx([freq[:, order[0]].min(), freq[:, order[1]].min()])


def test_planted_student_fidelity_by_hand(fx, planted, planted_stats, tmp_path, cli):
    """A 2-neuron student keeps the background and "the" neurons; every token's FFN output has the same norm,
    so its rel_error is sqrt(share of the other tokens) in both layers; the zero FFN's is 1."""
    src, corpus = planted
    student = tmp_path / "student"
    code, _, err = cli("graft", src, "--target", "2L,f2", "--stats", planted_stats, "-o", student)
    assert code == 0, err
    ids = [i for v in _hand_tokens(fx).values() for i in v]
    missed = sum(_set_of(i) not in (1, BACKGROUND) for i in ids) / len(ids)
    code, _, err = cli("fidelity", src, student, *_domains(corpus), "--seq-len", "16", "-o", tmp_path / "f.json")
    assert code == 0, err
    doc = json.loads((tmp_path / "f.json").read_text())
    for row in doc["layers"]:
        assert row["rel_error"] == pytest.approx(math.sqrt(missed), rel=1e-4)
        ref = row["references"]
        assert ref["zero"]["rel_error"] == 1.0 and ref["selected_mixture"] is None
        assert row["rel_error"] <= ref["random_neurons"]["rel_error"] <= 1.0 + 1e-9
    assert doc["summary"]["random_neurons"]["rel_error"] >= doc["summary"]["student"]["rel_error"]


# ---- every dense family --------------------------------------------------------------------------

BARE_AS = {"llama": "llama", "qwen2": "llama", "mistral": "llama", "qwen3": "qwen3", "olmo": "olmo", "olmo2": "olmo2"}


@pytest.mark.parametrize("name", DENSE_FAMILIES)
def test_dense_families_open_and_read_their_ffns(fx, tmp_path, name):
    ck = open_checkpoint(fx / name)
    assert ck.family.name == name and ck.dense and ck.ffn_layers == [0, 1]
    assert ck.expert_ffn == 48 and ck.hidden == 32 and ck.summary()["layout"] == "dense"
    model = tf.AutoModelForCausalLM.from_pretrained(fx / name)
    for i in ck.ffn_layers:
        mlp = model.model.layers[i].mlp
        for got, want in zip(ck.mlp(i), (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            assert torch.equal(got, want.weight.detach())
    shutil.copy(fx / name / "model.safetensors", tmp_path / "bare.safetensors")  # no config.json: keys decide
    assert open_checkpoint(tmp_path / "bare.safetensors").family.name == BARE_AS[name]


def _reference_counts(model, ck, tok, docs, k, seq_len=16):
    """Independent reference: the FFN input from a hook on transformers' MLP module, act = silu(g x) * (u x)
    computed here, the k largest |act| per unpadded token counted."""
    xs = {}
    hooks = [model.model.layers[i].mlp.register_forward_hook(lambda m, a, o, i=i: xs.__setitem__(i, a[0]))
             for i in ck.ffn_layers]
    counts = torch.zeros(len(ck.ffn_layers), ck.expert_ffn, dtype=torch.int64)
    stream = data.token_stream(docs, tok)
    with torch.no_grad():
        for b in data.windows(stream, seq_len, 2, tok.pad_token_id):
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
            keep = b.attention_mask.reshape(-1).bool()
            for n, i in enumerate(ck.ffn_layers):
                g, u, _ = ck.mlp(i)
                x = xs[i].reshape(-1, ck.hidden)[keep]
                act = F.silu(x @ g.T) * (x @ u.T)
                idx = act.abs().topk(k, -1).indices
                counts[n] += torch.bincount(idx.reshape(-1), minlength=ck.expert_ffn)
    for h in hooks:
        h.remove()
    return counts, stream.numel()


@pytest.mark.parametrize("name", DENSE_FAMILIES)
def test_dense_stats_equal_an_independent_reference(fx, tmp_path, cli, name):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for dom, docs in TEXTS.items():
        (corpus / f"{dom}.txt").write_text("\n\n".join(docs) + "\n")
    out = tmp_path / "s.safetensors"
    code, so, err = cli("stats", fx / name, *_domains(corpus), "--seq-len", "16", "--batch-size", "2",
                        "--neuron-top", "0.25", "-o", out)
    assert code == 0, err
    assert so.strip() == str(out)
    t = load_file(str(out))
    rec = provenance.read(out, "stats")
    assert rec["level"] == "neuron" and rec["neurons_per_token"] == 12 and rec["family"] == name
    ck = open_checkpoint(fx / name)
    model = tf.AutoModelForCausalLM.from_pretrained(fx / name).eval()
    tok = data.load_tokenizer(fx / name)
    for d, docs in enumerate(TEXTS.values()):
        ref, n = _reference_counts(model, ck, tok, docs, 12)
        assert int(t["tokens"][d]) == n
        assert (t["counts"][d].sum(-1) == 12 * n).all()
        assert torch.equal(t["counts"][d], ref)


def test_stats_never_computes_logits(fx, tmp_path, monkeypatch):
    """Hidden states through hooks, the LM head never runs: memory does not grow with the vocabulary."""
    from xpertctl.ops import hf_model, stats as st
    calls = []
    load = hf_model.load_model

    def spy(*a, **k):
        m = load(*a, **k)
        m.lm_head.register_forward_hook(lambda *_: calls.append(1))
        return m
    monkeypatch.setattr(hf_model, "load_model", spy)
    (tmp_path / "a.txt").write_text("\n\n".join(TEXTS["legal"]))
    for name in ("olmoe", "llama"):
        st.run(fx / name, [f"a={tmp_path / 'a.txt'}"], tmp_path / f"{name}.safetensors", seq_len=16)
    assert calls == []


@pytest.mark.parametrize("name", ["llama", "olmo"])  # olmo: a final LayerNorm without weights
def test_dense_stats_stream_layers_equal_in_memory(fx, tmp_path, name):
    from xpertctl.ops import stats as st
    (tmp_path / "a.txt").write_text("\n\n".join(TEXTS["scripture"]))
    a = st.run(fx / name, [f"a={tmp_path / 'a.txt'}"], tmp_path / "a.safetensors", seq_len=16)
    b = st.run(fx / name, [f"a={tmp_path / 'a.txt'}"], tmp_path / "b.safetensors", seq_len=16, stream_layers=True)
    assert torch.equal(load_file(str(a))["counts"], load_file(str(b))["counts"])


@pytest.mark.parametrize("src,args,needles", [
    ("llama", ["--top-k", "2"], ["--top-k", "dense", "--neuron-top"]),
    ("olmoe", ["--neuron-top", "0.25"], ["--neuron-top", "dense"]),
    ("llama", ["--neuron-top", "0"], ["--neuron-top 0"]),
    ("llama", ["--neuron-top", "1.5"], ["--neuron-top 1.5"]),
])
def test_stats_options_of_the_other_kind_are_refused(fx, tmp_path, cli, src, args, needles):
    (tmp_path / "a.txt").write_text("the law")
    out = tmp_path / "s.safetensors"
    code, _, err = cli("stats", fx / src, "-d", f"a={tmp_path / 'a.txt'}", *args, "-o", out)
    assert_user_error(code, err, *needles)
    assert not out.exists()


# ---- select on constructed neuron stats ------------------------------------------------------------

def neuron_stats_file(tmp_path, counts, tokens, name="n.safetensors", source=None, mass=None):
    from safetensors.torch import save_file
    counts = torch.tensor(counts, dtype=torch.int64)
    D, L, n = counts.shape
    rec = provenance.record("stats", [], {}, source=source or {"path": "/m", "size": 1, "sha256": "x"},
                            family="llama", level="neuron", neuron_top=0.125, neurons_per_token=1, num_neurons=n,
                            layers=list(range(L)), domains=[f"d{i}" for i in range(D)])
    p = tmp_path / name
    save_file({"counts": counts, "mass": counts.float() if mass is None else torch.tensor(mass, dtype=torch.float32),
               "tokens": torch.tensor(tokens), "layers": torch.arange(L)}, str(p),
              metadata={"format": "pt", **provenance.as_metadata(rec)})
    return p


# 3 domains, 1 layer, 6 neurons, 100 tokens each. Neuron 1 moderately everywhere (min 35), neuron 3 30
# everywhere, neuron 0 a lot in d0 only, neuron 2 much in d1/d2 but 10 in d0.
NCOUNTS = [[[90, 40, 10, 30, 25, 5]], [[5, 45, 80, 30, 35, 5]], [[5, 35, 70, 30, 55, 5]]]


def test_select_neurons_min_and_controls(tmp_path):
    from xpertctl.ops import select as sel
    p = neuron_stats_file(tmp_path, NCOUNTS, [100, 100, 100])
    st = sel.load_stats(p)
    assert st.level == "neuron" and st.num_experts == 6
    layers = sel.choose(st, "min")  # default: half the FFN
    assert layers[0]["neurons"] == [1, 3, 4] and layers[0]["scores"] == pytest.approx([0.35, 0.30, 0.25])
    assert sel.choose(st, "min", 2)[0]["neurons"] == [1, 3]
    assert sel.choose(st, "low", 2)[0]["neurons"] == [5, 3]  # least used on average (5: 5%; 3: 30%)
    assert sel.choose(st, "all")[0]["neurons"] == [2, 1, 4, 0, 3, 5]  # every neuron, by mean frequency
    r = [sel.choose(st, "random", 3, seed=s)[0]["neurons"] for s in range(6)]
    assert len({tuple(x) for x in r}) > 1 and r[0] == sel.choose(st, "random", 3, seed=0)[0]["neurons"]
    cov = layers[0]["coverage"]  # share of each domain's active (token, neuron) pairs on the kept neurons
    assert cov["d0"] == pytest.approx((40 + 30 + 25) / 200)
    with pytest.raises(XpertError, match="--per-layer 7.*1..6 \\(neurons per layer\\)"):
        sel.choose(st, "min", 7)


def test_select_neuron_cli_show_inspect_plot(tmp_path, cli):
    p = neuron_stats_file(tmp_path, NCOUNTS, [100, 100, 100])
    out = tmp_path / "sel.json"
    code, so, err = cli("select", p, "-o", out, "--show", "--plot", tmp_path / "f.png")
    assert code == 0, err
    assert "neuron" in err and (tmp_path / "f.png").stat().st_size > 0
    doc = json.loads(out.read_text())
    assert doc["level"] == "neuron" and doc["num_neurons"] == 6 and "experts" not in doc["layers"][0]
    for art in (p, out):
        code, so, err = cli("inspect", art, "--json")
        assert code == 0, err
        assert json.loads(so)["level"] == "neuron"


def test_moe_commands_refuse_neuron_selections_and_dense_sources(fx, tmp_path, cli):
    src = open_checkpoint(fx / "olmoe").fingerprint
    p = neuron_stats_file(tmp_path, NCOUNTS, [100, 100, 100], source=src)
    sel_path = tmp_path / "sel.json"
    assert cli("select", p, "-o", sel_path)[0] == 0
    code, _, err = cli("decompose", fx / "olmoe", sel_path, "-o", tmp_path / "f.safetensors")
    assert_user_error(code, err, "sel.json", "neuron-level selection")
    code, _, err = cli("graft", fx / "olmoe", "--target", "2L", "--stats", p, "-o", tmp_path / "g")
    assert_user_error(code, err, "neuron-level")
    code, _, err = cli("decompose", fx / "llama", sel_path, "-o", tmp_path / "f.safetensors")
    assert_user_error(code, err, "dense llama", "decompose")
    assert not (tmp_path / "f.safetensors").exists() and not (tmp_path / "g").exists()


# ---- graft and fidelity from the dense fixtures ----------------------------------------------------

@pytest.fixture(scope="module")
def llama_stats(fx, tmp_path_factory):
    from xpertctl.ops import stats as st
    d = tmp_path_factory.mktemp("lstats")
    doms = []
    for name, docs in TEXTS.items():
        (d / f"{name}.txt").write_text("\n\n".join(docs * 3) + "\n")
        doms.append(f"{name}={d / (name + '.txt')}")
    return st.run(fx / "llama", doms, d / "stats.safetensors", seq_len=16), d


def test_graft_width_by_neuron_selection(fx, llama_stats, tmp_path, cli):
    stats, corpus = llama_stats
    out = tmp_path / "s"
    code, so, err = cli("graft", fx / "llama", "--target", "1L,f20", "--stats", stats, "--inherit",
                        "attention,embeddings,norms", "-o", out)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == 20 and cfg["num_hidden_layers"] == 1 and cfg["hidden_size"] == 32
    # by hand: the 20 neurons of layer 0 with the largest min-over-domains frequency (ties: lower index)
    t = load_file(str(stats))
    freq = (t["counts"][:, 0].double() / t["tokens"][:, None].double()).min(0).values.numpy()
    want = sorted(np.lexsort((np.arange(48), -freq))[:20].tolist())
    ck = open_checkpoint(fx / "llama")
    g, u, d = ck.mlp(0)
    student = tf.AutoModelForCausalLM.from_pretrained(out)
    mlp = student.model.layers[0].mlp
    assert torch.equal(mlp.gate_proj.weight, g[want]) and torch.equal(mlp.up_proj.weight, u[want])
    assert torch.equal(mlp.down_proj.weight, d[:, want])
    assert torch.equal(student.model.layers[0].self_attn.q_proj.weight, ck.tensor("model.layers.0.self_attn.q_proj.weight"))
    assert torch.equal(student.model.norm.weight, ck.tensor("model.norm.weight"))
    rec = provenance.read(out / "model.safetensors", "grafted")
    assert rec["neurons"][0]["source"] == 0 and rec["neurons"][0]["kept"] == 20 and rec["neurons"][0]["of"] == 48
    card = (out / "README.md").read_text()
    assert "neurons" in card and "20 of 48" in card and "attention, embeddings, norms" in card


def test_graft_depth_by_layer_map_and_width_from_selection(fx, llama_stats, tmp_path, cli):
    stats, _ = llama_stats
    sel_path = tmp_path / "sel.json"
    assert cli("select", stats, "--per-layer", "16", "-o", sel_path)[0] == 0
    doc = json.loads(sel_path.read_text())
    out = tmp_path / "s"
    code, _, err = cli("graft", fx / "llama", "--target", "1L", "--layer-map", "first", "--selection", sel_path,
                       "-o", out)
    assert code == 0, err
    student = tf.AutoModelForCausalLM.from_pretrained(out)
    assert student.config.intermediate_size == 16  # the selection's width
    g, _, _ = open_checkpoint(fx / "llama").mlp(0)
    assert torch.equal(student.model.layers[0].mlp.gate_proj.weight, g[sorted(doc["layers"][0]["neurons"])])
    # narrower than the selection: its best-scored first
    out2 = tmp_path / "s2"
    code, _, err = cli("graft", fx / "llama", "--target", "2L,f8,d16,h2", "--selection", sel_path, "-o", out2)
    assert code == 0, err
    s2 = tf.AutoModelForCausalLM.from_pretrained(out2)
    rec = provenance.read(out2 / "model.safetensors", "grafted")
    ri = rec["residual_index"]
    assert len(ri) == 16 and s2.config.hidden_size == 16
    g1, _, d1 = open_checkpoint(fx / "llama").mlp(1)
    ids = sorted(doc["layers"][1]["neurons"][:8])
    assert torch.equal(s2.model.layers[1].mlp.gate_proj.weight, g1[ids][:, ri])
    assert torch.equal(s2.model.layers[1].mlp.down_proj.weight, d1[ri][:, ids])


@pytest.mark.parametrize("name,args", [
    ("qwen2", ["--inherit", "attention,embeddings,norms"]),
    ("mistral", ["--inherit", "attention,embeddings,norms"]),
    ("qwen3", ["--inherit", "attention,embeddings,norms", "--arch", "qwen3"]),
    ("olmo", ["--inherit", "attention,embeddings"]),
    ("olmo2", ["--inherit", "embeddings"]),
])
def test_graft_every_dense_family(fx, tmp_path, cli, name, args):
    out = tmp_path / "s"
    code, _, err = cli("graft", fx / name, "--target", "2L,f24", *args, "-o", out)
    assert code == 0, err
    assert "no --stats or --selection" in err
    student = tf.AutoModelForCausalLM.from_pretrained(out)
    assert student.config.intermediate_size == 24
    if name == "qwen2":
        src = open_checkpoint(fx / name)
        assert torch.equal(student.model.layers[1].self_attn.k_proj.bias, src.tensor("model.layers.1.self_attn.k_proj.bias"))


@pytest.mark.parametrize("name,args,needles", [
    ("olmo2", ["--inherit", "norms"], ["olmo2", "norms"]),
    ("olmo", ["--inherit", "norms"], ["olmo", "norms"]),
    ("qwen3", ["--inherit", "attention"], ["--arch qwen3"]),
    ("llama", ["--layer-map", "merge"], ["--layer-map merge", "neurons"]),
    ("llama", ["--rescale", "routed"], ["--rescale", "MoE"]),
    ("llama", ["--ranks", "full,full,1"], ["--ranks", "MoE"]),
    ("llama", ["--ffn-init", "learngene"], ["learngene"]),
    ("llama", ["--fit", "down", "--calibration", "a=x.txt"], ["--fit", "MoE"]),
    ("llama", ["--target", "2L,f64"], ["FFN 64 is wider than the source's FFN 48"]),
])
def test_graft_dense_refusals(fx, tmp_path, cli, name, args, needles):
    out = tmp_path / "s"
    target = [] if "--target" in args else ["--target", "2L"]
    code, _, err = cli("graft", fx / name, *target, *args, "-o", out)
    assert_user_error(code, err, *needles)
    assert not out.exists()


def test_graft_wider_than_the_selection_is_refused(fx, llama_stats, tmp_path, cli):
    stats, _ = llama_stats
    sel_path = tmp_path / "sel.json"
    assert cli("select", stats, "--per-layer", "16", "-o", sel_path)[0] == 0
    code, _, err = cli("graft", fx / "llama", "--target", "2L,f24", "--selection", sel_path, "-o", tmp_path / "s")
    assert_user_error(code, err, "FFN 24 is wider than", "16 neurons")
    code, _, err = cli("graft", fx / "olmo", "--target", "2L", "--selection", sel_path, "-o", tmp_path / "s")
    assert_user_error(code, err, "sel.json", "another model")


def test_fidelity_of_the_full_student_is_exact(fx, llama_stats, tmp_path, cli):
    stats, corpus = llama_stats
    full = tmp_path / "full"
    code, _, err = cli("graft", fx / "llama", "--target", "2L", "--stats", stats, "-o", full)
    assert code == 0, err
    doms = [a for n in TEXTS for a in ("-d", f"{n}={corpus / (n + '.txt')}")]
    code, _, err = cli("fidelity", fx / "llama", full, *doms, "--seq-len", "16", "-o", tmp_path / "f.json")
    assert code == 0, err
    doc = json.loads((tmp_path / "f.json").read_text())
    assert [r["sources"] for r in doc["layers"]] == [[0], [1]]
    for r in doc["layers"]:
        assert r["rel_error"] < 1e-6 and r["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert r["references"]["random_neurons"]["rel_error"] < 1e-6  # all 48 of 48: the same FFN
        assert r["references"]["scratch"]["rel_error"] > 0.5
    half = tmp_path / "half"
    assert cli("graft", fx / "llama", "--target", "2L,f24", "--stats", stats, "-o", half)[0] == 0
    code, _, err = cli("fidelity", fx / "llama", half, *doms, "--seq-len", "16", "-o", tmp_path / "h.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "h.json").read_text())["layers"]
    assert all(0 < r["rel_error"] < 1 and 0 < r["references"]["random_neurons"]["rel_error"] for r in rows)
    assert "rand-neuron" in err
