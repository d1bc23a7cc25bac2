"""stats counts equal an independent router reference; select criteria on known answers."""
import json

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from conftest import MOE_FAMILIES, assert_user_error, stats_file as _stats_file
from xpertctl import data
from xpertctl.errors import XpertError
from xpertctl.io import open_checkpoint, provenance
from xpertctl.ops.hf_model import load_model
from xpertctl.ops import select as sel
from xpertctl.ops import stats as st

TEXTS = {
    "legal": "the law shall apply to every licence holder . the licence holder shall apply the law",
    "scripture": "in the beginning god created the heaven and the earth . and the earth was",
    "code": "def main ( ) : return 0 . def main ( ) : return 0 . return",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for name, text in TEXTS.items():
        (d / f"{name}.txt").write_text("\n\n".join(f"{text} {n}" for n in range(6)))
    (d / "mixed.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS.values()) + "\n")
    return d


def _reference_indices(model, ck, ids, mask):
    """Independent reference: router logits from output_router_logits=True, routed as each family does."""
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
    logits = [l for l in out.router_logits if l is not None]
    assert len(logits) == len(ck.moe_layers)
    k, res = ck.top_k, []
    for n, layer in enumerate(ck.moe_layers):
        lg = logits[n].reshape(-1, ck.num_experts).float()
        if ck.family.name == "deepseek_v3":
            gate = model.model.layers[layer].mlp.gate
            s = lg.sigmoid() + gate.e_score_correction_bias
            G = model.config.n_group
            grp = s.view(-1, G, ck.num_experts // G).topk(2, -1).values.sum(-1)
            keep = torch.zeros_like(grp).scatter_(1, grp.topk(model.config.topk_group, -1).indices, 1)
            s = s.masked_fill(~keep.repeat_interleave(ck.num_experts // G, 1).bool(), float("-inf"))
            idx = s.topk(k, -1).indices
        else:
            idx = lg.softmax(-1).topk(k, -1).indices
        res.append(idx[mask.reshape(-1).bool()])
    return res


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_counts_equal_reference(fx, name):
    ck = open_checkpoint(fx / name)
    model = load_model(ck, torch.float32, "cpu")
    tok = data.load_tokenizer(fx / name)
    docs = {d: [t] * 3 for d, t in TEXTS.items()}
    res = st.collect(ck, model, tok, docs, top_k=ck.top_k, seq_len=16, batch_size=3, max_tokens=None, device="cpu")
    assert res.counts.shape == (3, len(ck.moe_layers), ck.num_experts)
    for d, text in enumerate(docs.values()):
        stream = data.token_stream(docs[list(docs)[d]], tok)
        assert int(res.tokens[d]) == stream.numel()
        # per layer the counts sum to tokens x top-k
        assert (res.counts[d].sum(-1) == stream.numel() * ck.top_k).all()
        ref = torch.zeros(len(ck.moe_layers), ck.num_experts, dtype=torch.int64)
        with torch.no_grad():
            for b in data.windows(stream, 16, 3, tok.pad_token_id):
                for n, idx in enumerate(_reference_indices(model, ck, b.input_ids, b.attention_mask)):
                    ref[n] += torch.bincount(idx.reshape(-1), minlength=ck.num_experts)
        assert torch.equal(res.counts[d], ref)


def test_padding_does_not_change_counts(fx):
    ck = open_checkpoint(fx / "olmoe")
    model = load_model(ck, torch.float32, "cpu")
    tok = data.load_tokenizer(fx / "olmoe")
    docs = {"a": [TEXTS["legal"] * 2]}
    # 1 window per batch, no padding except the tail, vs many windows padded together at odd lengths
    a = st.collect(ck, model, tok, docs, top_k=2, seq_len=7, batch_size=1, max_tokens=None, device="cpu")
    b = st.collect(ck, model, tok, docs, top_k=2, seq_len=7, batch_size=4, max_tokens=None, device="cpu")
    assert torch.equal(a.counts, b.counts) and torch.equal(a.tokens, b.tokens)
    # direct: the same tokens with 5 extra padding positions give the same counts
    counter = st.RouterCounter(model, ck, 2)
    ids = data.token_stream(docs["a"], tok)[:10]
    padded = torch.cat([ids, torch.zeros(5, dtype=torch.long)])[None]
    mask = torch.cat([torch.ones(10), torch.zeros(5)]).long()[None]
    with torch.no_grad():
        counter.mask = mask.reshape(-1).bool()
        model(input_ids=padded, attention_mask=mask)
        c_pad = counter.counts.clone()
        counter.counts.zero_(); counter.mask = None
        model(input_ids=ids[None])
    counter.remove()
    assert torch.equal(c_pad, counter.counts)


def test_stats_cli_writes_counts_and_provenance(fx, corpus, cli, tmp_path):
    out = tmp_path / "stats.safetensors"
    code, so, err = cli("stats", fx / "qwen2_moe", "-d", f"legal={corpus / 'legal.txt'}", "-d",
                        f"code={corpus / 'code.txt'}", "-d", f"mixed={corpus / 'mixed.jsonl'}",
                        "-o", out, "--seq-len", "32", "--max-tokens", "200")
    assert code == 0, err
    assert so.strip() == str(out)
    t = load_file(str(out))
    assert t["counts"].dtype == torch.int64 and t["mass"].dtype == torch.float32
    assert t["counts"].shape == (3, 2, 8) and t["layers"].tolist() == [0, 1]
    assert t["tokens"][0] == 200 and (t["counts"].sum(-1) == t["tokens"][:, None] * 2).all()
    # softmax mass: each token contributes probability 1 spread over experts
    assert torch.allclose(t["mass"].sum(-1), t["tokens"][:, None].float(), rtol=1e-4)
    rec = provenance.read(out, "stats")
    assert rec["domains"] == ["legal", "code", "mixed"] and rec["top_k"] == 2 and rec["num_experts"] == 8
    assert rec["source"]["sha256"] == open_checkpoint(fx / "qwen2_moe").fingerprint["sha256"]
    assert rec["params"]["seq_len"] == 32 and rec["version"]


@pytest.mark.parametrize("args,needle", [
    (["-d", "x={c}/empty.txt"], "empty corpus"),
    (["-d", "x={c}/data.csv"], "unknown corpus file type '.csv'"),
    (["-d", "x={c}/bin.txt"], "binary file"),
    (["-d", "x={c}/bad.jsonl"], "bad.jsonl:2"),
    (["-d", "nonsense"], "expected NAME=PATH"),
    (["-d", "x={c}/legal.txt", "--seq-len", "100000"], "--seq-len"),
])
def test_stats_bad_input(fx, corpus, cli, tmp_path, args, needle):
    (corpus / "empty.txt").write_text("\n\n  \n")
    (corpus / "data.csv").write_text("a,b\n")
    (corpus / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (corpus / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    out = tmp_path / "s.safetensors"
    code, _, err = cli("stats", fx / "olmoe", *[a.format(c=corpus) for a in args], "-o", out)
    assert_user_error(code, err, needle)
    assert not out.exists()


def test_stats_refuses_a_dense_checkpoint_without_swiglu(fx, corpus, cli, tmp_path):
    """Dense sources are counted per FFN neuron (tests/test_dense_sources.py); an FFN that is not SwiGLU is
    not what any target computes."""
    import shutil
    src = tmp_path / "gelu"
    shutil.copytree(fx / "llama", src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    code, _, err = cli("stats", src, "-d", f"x={corpus / 'legal.txt'}", "-o", tmp_path / "s.safetensors")
    assert_user_error(code, err, "gelu", "SwiGLU")
    assert not (tmp_path / "s.safetensors").exists()


# ---- select on constructed stats ----------------------------------------------------------------

# 3 domains, 1 layer, 6 experts, 100 tokens each.  Expert 0: used a lot in d0 only. Expert 1: used
# moderately everywhere (the cross-domain one). Expert 2: lots in d1 and d2, little in d0.
COUNTS = [[[90, 40, 10, 30, 25, 5]], [[5, 45, 80, 30, 35, 5]], [[5, 35, 70, 30, 55, 5]]]


@pytest.mark.parametrize("criterion,n,expected", [
    ("min", 2, [1, 3]),         # min over domains: e1=35, e3=30, e4=25, e2=10, e0=e5=5
    ("mean", 2, [2, 1]),        # means: e2=53.3, e1=40, e4=38.3, e0=33.3, e3=30, e5=5
    ("low", 2, [5, 3]),         # least used on average
    ("all", None, [0, 1, 2, 3, 4, 5]),
])
def test_criteria_known_answers(tmp_path, criterion, n, expected):
    s = sel.load_stats(_stats_file(tmp_path, COUNTS, [100, 100, 100]))
    got = sel.choose(s, criterion, n)[0]["experts"]
    assert (sorted(got) if criterion == "all" else got) == expected


def test_vote_counts_top_n_membership(tmp_path):
    # top-2 per domain: d0 {0,1}, d1 {2,1}, d2 {2,4} -> votes: 1:2, 2:2, 0:1, 4:1
    s = sel.load_stats(_stats_file(tmp_path, COUNTS, [100, 100, 100]))
    assert sorted(sel.choose(s, "vote", 2)[0]["experts"]) == [1, 2]


def test_frequency_normalizes_by_domain_tokens(tmp_path):
    # d1 has 10x the tokens: raw counts would favour expert 0, frequencies favour expert 1
    counts = [[[50, 40, 0]], [[100, 300, 0]]]
    s = sel.load_stats(_stats_file(tmp_path, counts, [100, 1000]))
    assert sel.choose(s, "min", 1)[0]["experts"] == [1]


def test_random_is_reproducible_by_seed(tmp_path):
    s = sel.load_stats(_stats_file(tmp_path, [[[1] * 16] * 4], [10]))
    a = sel.choose(s, "random", 4, seed=3)
    assert a == sel.choose(s, "random", 4, seed=3)
    assert a != sel.choose(s, "random", 4, seed=4)
    assert all(len(set(l["experts"])) == 4 for l in a)


def test_selection_json_round_trips(tmp_path, cli):
    stats = _stats_file(tmp_path, COUNTS, [100, 100, 100])
    out = tmp_path / "sel.json"
    code, so, err = cli("select", stats, "-o", out, "--per-layer", "3", "--show")
    assert code == 0, err
    shown = " ".join(err.split())  # --show prints the table on stderr: the criterion and the chosen experts
    assert "criterion=min" in shown and "1 3 4" in shown
    doc = sel.load_selection(out)
    assert doc["criterion"] == "min" and doc["per_layer"] == 3 and doc["layers"][0]["experts"] == [1, 3, 4]
    assert doc["stats"]["sha256"] == provenance.file_fingerprint(stats)["sha256"]
    assert doc["layers"][0]["freq"]["d0"] == [0.4, 0.3, 0.25]
    doc2, _ = sel.run(stats, None, per_layer=3)
    assert doc2["layers"] == doc["layers"]


def test_select_default_per_layer_is_top_k(tmp_path):
    s = sel.load_stats(_stats_file(tmp_path, COUNTS, [100] * 3, top_k=3))
    assert len(sel.choose(s)[0]["experts"]) == 3


@pytest.mark.parametrize("args,needle", [
    (["--per-layer", "7"], "--per-layer 7: must be 1..6"),
    (["--per-layer", "0"], "--per-layer 0"),
    (["--criterion", "best"], "'--criterion': Value error, 'best' is not one of 'min', 'mean'"),
])
def test_select_bad_options(tmp_path, cli, args, needle):
    stats = _stats_file(tmp_path, COUNTS, [100] * 3)
    code, _, err = cli("select", stats, "-o", tmp_path / "o.json", *args)
    assert_user_error(code, err, needle)
    assert not (tmp_path / "o.json").exists()


def test_select_rejects_non_stats_file(fx, cli, tmp_path):
    code, _, err = cli("select", fx / "olmoe" / "model.safetensors", "-o", tmp_path / "o.json")
    assert_user_error(code, err, "not an xpertctl artifact")


def test_plot_is_a_png_with_a_panel_per_layer(tmp_path):
    counts = [[[10, 20, 30, 40]] * 5, [[40, 30, 20, 10]] * 5]
    s = sel.load_stats(_stats_file(tmp_path, counts, [100, 100]))
    layers = sel.choose(s, "min", 2)
    assert len(sel.figure(s, layers).axes) == 5
    assert len(sel.figure(s, layers, [1, 3]).axes) == 2
    p = sel.plot(s, layers, tmp_path / "p.png", [1, 3])
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(XpertError, match="not MoE layers"):
        sel.figure(s, layers, [9])


@pytest.mark.parametrize("name", ["olmoe", "mixtral", "qwen2_moe", "deepseek_v3", "qwen3_moe-fused", "olmoe-sharded"])
def test_stream_layers_counts_equal_normal_path(fx, name):
    from xpertctl.ops.stream import load_streaming
    ck = open_checkpoint(fx / name)
    tok = data.load_tokenizer(fx / name)
    docs = {d: [t] * 3 for d, t in TEXTS.items()}
    kw = dict(top_k=ck.top_k, seq_len=16, batch_size=2, max_tokens=None, device="cpu")
    normal = st.collect(ck, load_model(ck, torch.float32, "cpu"), tok, docs, **kw)
    streamed = st.collect(ck, load_streaming(ck, torch.float32), tok, docs, stream_tokens=48, **kw)
    assert torch.equal(normal.counts, streamed.counts) and torch.equal(normal.tokens, streamed.tokens)
    assert torch.allclose(normal.mass, streamed.mass, atol=1e-4)


def test_stream_layers_cli(fx, corpus, cli, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    args = ["-d", f"legal={corpus / 'legal.txt'}", "-d", f"code={corpus / 'code.txt'}", "--seq-len", "32"]
    assert cli("stats", fx / "mixtral-fused", *args, "-o", a)[0] == 0
    code, _, err = cli("stats", fx / "mixtral-fused", *args, "--stream-layers", "--stream-tokens", "64", "-o", b)
    assert code == 0, err
    assert torch.equal(load_file(str(a))["counts"], load_file(str(b))["counts"])


def test_selection_records_router_probability_from_mass(tmp_path):
    """The stats `mass` array is used: each chosen expert's mean router probability per domain."""
    from safetensors.torch import load_file, save_file
    p = _stats_file(tmp_path, COUNTS, [100, 100, 100])
    t = load_file(str(p))
    t["mass"] = torch.arange(18, dtype=torch.float32).reshape(3, 1, 6)  # distinct from the counts
    save_file(t, str(p), metadata=__import__("safetensors").safe_open(str(p), "pt").metadata())
    layer = sel.choose(sel.load_stats(p), "min", 2)[0]
    assert layer["experts"] == [1, 3]
    assert layer["prob"] == {"d0": [0.01, 0.03], "d1": [0.07, 0.09], "d2": [0.13, 0.15]}


def test_select_with_plot_prints_one_path(tmp_path, cli):
    stats = _stats_file(tmp_path, COUNTS, [100, 100, 100])
    code, out, err = cli("select", stats, "-o", tmp_path / "s.json", "--plot", tmp_path / "f.png")
    assert code == 0, err
    assert out == f"{tmp_path / 's.json'}\n" and (tmp_path / "f.png").is_file()
    code, out, err = cli("select", stats, "--plot", tmp_path / "g.png")
    assert code == 0 and out == f"{tmp_path / 'g.png'}\n"
