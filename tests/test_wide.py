"""Students wider than one expert (issue 30, item 2): up to the selected experts side by side.

The oracles here read the experts straight from the safetensors files (per-expert keys, Mixtral's w1/w3/w2,
fused gate_up_proj/down_proj) and compute the fixed-weight mixture sum_j a_j E_j(x) by hand."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import MOE_FAMILIES, assert_user_error
from xpertctl.errors import XpertError
from xpertctl.io import open_checkpoint, provenance
from xpertctl.ops import reshape
from xpertctl.specs import Target

ROUTED = [0.30, 0.05, 0.20]  # per-layer routing weight per token of the three selected experts (rotated per layer)
IDS = [5, 1, 6]


def swiglu(x, g, u, d):
    return (F.silu(x @ g.T) * (x @ u.T)) @ d.T


def raw_expert(model_dir, i, j):
    """(gate, up, down) of expert j in layer i, by key name, in float32."""
    with safe_open(str(model_dir / "model.safetensors"), "pt") as s:
        keys = set(s.keys())
        fused = f"model.layers.{i}.mlp.experts.gate_up_proj"
        if fused in keys:  # [E, 2I, H], gate rows first; down [E, H, I]
            gu = s.get_tensor(fused)[j].float()
            n = gu.shape[0] // 2
            return gu[:n], gu[n:], s.get_tensor(f"model.layers.{i}.mlp.experts.down_proj")[j].float()
        mx = f"model.layers.{i}.block_sparse_moe.experts.{j}."
        if mx + "w1.weight" in keys:
            return tuple(s.get_tensor(mx + f"{w}.weight").float() for w in ("w1", "w3", "w2"))
        p = f"model.layers.{i}.mlp.experts.{j}."
        return tuple(s.get_tensor(p + f"{m}_proj.weight").float() for m in ("gate", "up", "down"))


def raw_shared(model_dir, i):
    """(gate, up, down) of layer i's shared expert(s) and the constant its output is folded in with."""
    with safe_open(str(model_dir / "model.safetensors"), "pt") as s:
        keys = set(s.keys())
        for name, fold in (("shared_expert", 0.5), ("shared_experts", 1.0)):  # Qwen2-MoE's sigmoid gate: 0.5
            p = f"model.layers.{i}.mlp.{name}."
            if p + "gate_proj.weight" in keys:
                return tuple(s.get_tensor(p + f"{m}_proj.weight").float() for m in ("gate", "up", "down")), fold
    return None, None


def student_ffns(out):
    t = load_file(str(out / "model.safetensors"))
    n = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    return [tuple(t[f"model.layers.{k}.mlp.{m}_proj.weight"].float() for m in ("gate", "up", "down")) for k in range(n)]


def routed_of(n):
    return ROUTED[n % 3:] + ROUTED[:n % 3]


def hand_selection(tmp_path, ck, ids=IDS, freq=None, routed=True, name="sel.json"):
    """A selection with known, distinct per-expert routing weights per layer (no stats needed)."""
    layers = []
    for n, i in enumerate(ck.moe_layers):
        l = {"layer": i, "experts": list(ids), "freq": {"a": freq or [1.0 / len(ids)] * len(ids)}}
        if routed:
            r = routed_of(n)[:len(ids)]
            l.update(routed=r, routed_mass=sum(r) + 0.25)  # the block's whole mass: more than the selected part
        layers.append(l)
    p = tmp_path / name
    p.write_text(json.dumps({"criterion": "test", "per_layer": len(ids), "num_experts": ck.num_experts,
                             "layers": layers}))
    return p


def assert_mixture(src, out, weights, shared=False, atol=1e-5):
    """Each target layer t (uniform map over the MoE layers, one to one) computes sum_j a_j E_j(x) (+ the
    folded shared expert), checked on random inputs."""
    ck = open_checkpoint(src)
    ffns = student_ffns(out)
    assert len(ffns) == len(ck.moe_layers)
    x = torch.randn(64, ck.hidden, generator=torch.Generator().manual_seed(0))
    for t, i in enumerate(ck.moe_layers):
        want = sum(a * swiglu(x, *raw_expert(src, i, j)) for j, a in zip(IDS, weights(t)))
        if shared:
            sm, fold = raw_shared(src, i)
            want = want + fold * swiglu(x, *sm)
        got = swiglu(x, *ffns[t])
        assert torch.allclose(got, want, atol=atol, rtol=1e-4), (t, float((got - want).abs().max()))


def _graft(cli, src, tmp_path, f, *extra, name="g"):
    out = tmp_path / name
    L = len(open_checkpoint(src).moe_layers)
    code, _, err = cli("graft", src, "-t", f"{L}L,f{f}", "--dtype", "float32", "-o", out, *extra)
    assert code == 0, err
    return out


@pytest.mark.parametrize("name", MOE_FAMILIES + [f + "-fused" for f in MOE_FAMILIES])
def test_full_width_student_is_the_fixed_weight_mixture(fx, tmp_path, cli, name):
    """At m x I the student holds the m selected experts side by side, each expert's down columns times its
    routing weight (--rescale selected): exactly sum_j routed_j E_j(x), for every family and layout."""
    src = fx / name
    ck = open_checkpoint(src)
    sel = hand_selection(tmp_path, ck)
    out = _graft(cli, src, tmp_path, 3 * ck.expert_ffn, "--selection", sel)
    assert_mixture(src, out, routed_of)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 3 * ck.expert_ffn


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen2_moe-fused", "deepseek_v2", "deepseek_v3-fused"])
def test_full_width_with_shared_experts_appends_them(fx, tmp_path, cli, name):
    src = fx / name
    ck = open_checkpoint(src)
    sel = hand_selection(tmp_path, ck)
    out = _graft(cli, src, tmp_path, 3 * ck.expert_ffn + ck.shared_ffn, "--selection", sel, "--shared", "concat")
    assert_mixture(src, out, routed_of, shared=True)


@pytest.mark.parametrize("rescale,combine,weights", [
    ("routed", "usage", lambda t: [r * (sum(routed_of(t)) + 0.25) / sum(routed_of(t)) for r in routed_of(t)]),
    ("none", "usage", lambda t: [r / sum(routed_of(t)) for r in routed_of(t)]),
    ("selected", "uniform", lambda t: [sum(routed_of(t)) / 3] * 3),
])
def test_full_width_shares_follow_rescale_and_combine(fx, tmp_path, cli, rescale, combine, weights):
    """routed: the block's whole mass split in the experts' routing shares; none: the shares alone (sum 1,
    the experts' own scale); --combine uniform: equal shares of the selected mass."""
    src = fx / "olmoe"
    sel = hand_selection(tmp_path, open_checkpoint(src))
    out = _graft(cli, src, tmp_path, 48, "--selection", sel, "--rescale", rescale, "--combine", combine)
    assert_mixture(src, out, weights)


def test_full_width_without_routing_weights_uses_usage(fx, tmp_path, cli):
    """A selection without per-expert routing weights (made without stats): usage frequencies, the experts'
    scale (as the one-expert FFN is then the usage-weighted average)."""
    src = fx / "mixtral"
    freq = [0.5, 0.2, 0.3]
    sel = hand_selection(tmp_path, open_checkpoint(src), freq=freq, routed=False)
    out = _graft(cli, src, tmp_path, 48, "--selection", sel)
    assert_mixture(src, out, lambda t: freq)


def test_full_width_from_reshape_equals_the_one_shot_graft(fx, tmp_path, cli):
    src = fx / "qwen3_moe-fused"
    sel = hand_selection(tmp_path, open_checkpoint(src))
    facts, adapted = tmp_path / "f.safetensors", tmp_path / "a.safetensors"
    assert cli("decompose", src, sel, "-o", facts)[0] == 0
    code, _, err = cli("reshape", facts, "-t", "2L,f48", "-o", adapted)
    assert code == 0, err
    code, _, err = cli("graft", adapted, "-o", tmp_path / "g2", "--dtype", "float32")
    assert code == 0, err
    assert_mixture(src, tmp_path / "g2", routed_of)
    one = student_ffns(_graft(cli, src, tmp_path, 48, "--selection", sel))
    for a, b in zip(student_ffns(tmp_path / "g2"), one):
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_full_width_with_truncated_ranks_holds_the_rank_reduced_experts(fx, tmp_path, cli):
    """Ranks below full: each expert's rank-reduced matrices side by side (here the row rank of 8 of 16)."""
    src = fx / "olmoe"
    sel = hand_selection(tmp_path, open_checkpoint(src))
    facts, adapted = tmp_path / "f.safetensors", tmp_path / "a.safetensors"
    assert cli("decompose", src, sel, "-o", facts, "--ranks", "8,full,full", "--no-align")[0] == 0
    code, _, err = cli("reshape", facts, "-t", "3L,f48", "--rescale", "none", "-o", adapted)
    assert code == 0, err
    a, t = load_file(str(adapted)), load_file(str(facts))
    for n in range(3):
        shares = [r / sum(routed_of(n)) for r in routed_of(n)]
        order = sorted(range(3), key=lambda k: -shares[k])  # experts side by side, largest share first
        for m, dim in (("gate", 0), ("up", 0), ("down", 1)):
            core, u1 = t[f"layers.{n}.{m}.core"], t[f"layers.{n}.{m}.U1"]  # U2 and U3 full: the identity
            assert core.shape[0] == 8 and core.shape[2] == 3
            want = torch.cat([u1 @ core[:, :, k] * (shares[k] if m == "down" else 1) for k in order], dim=dim)
            assert torch.allclose(a[f"layers.{n}.{m}_proj"], want, atol=1e-5), (n, m)


def test_a_routed_block_with_fixed_weights_is_reproduced_exactly(fx, tmp_path, cli):
    """Known routing: an OLMoE whose router weights are zero and whose top-k takes every expert gives each
    expert weight 1/E on every token. stats -> select 2 -> graft at 2 experts' width: the student's FFN
    is the selected experts' routed mixture on every token (fidelity's reference), computed by hand too."""
    import shutil
    import transformers as tf
    E, I, H = 4, 16, 32
    cfg = tf.OlmoeConfig(vocab_size=96, hidden_size=H, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         num_hidden_layers=2, intermediate_size=I, num_experts=E, num_experts_per_tok=E)
    torch.manual_seed(0)
    model = tf.OlmoeForCausalLM(cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            p.copy_(torch.zeros_like(p) if n.endswith("mlp.gate.weight") else
                    torch.randn(p.shape, generator=g) * (0.1 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0))
    src = tmp_path / "fixed"
    model.save_pretrained(src)
    for f in (fx / "olmoe").glob("*token*"):
        shutil.copy(f, src / f.name)
    text = tmp_path / "t.txt"
    text.write_text("the law shall apply to every licence holder .\n\nin the beginning god created the heaven .\n\n"
                    "def main ( ) : return 0 . a noun is a word that names a thing .")
    stats, sel = tmp_path / "s.safetensors", tmp_path / "sel.json"
    assert cli("stats", src, "-d", f"a={text}", "-d", f"b={text}", "-o", stats)[0] == 0
    assert cli("select", stats, "--per-layer", "2", "-o", sel)[0] == 0
    doc = json.loads(sel.read_text())
    for l in doc["layers"]:
        assert l["routed"] == pytest.approx([1 / E, 1 / E])
    out = _graft(cli, src, tmp_path, 2 * I, "--selection", sel)
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(1))
    for t, (ffn, l) in enumerate(zip(student_ffns(out), doc["layers"])):
        want = sum(swiglu(x, *raw_expert(src, l["layer"], j)) for j in l["experts"]) / E
        assert torch.allclose(swiglu(x, *ffn), want, atol=1e-6)
    fid = tmp_path / "fid.json"
    code, _, err = cli("fidelity", src, out, "-d", f"a={text}", "-o", fid)
    assert code == 0, err
    for row in json.loads(fid.read_text())["layers"]:
        assert row["rel_error"] == pytest.approx(row["references"]["selected_mixture"]["rel_error"], abs=1e-5)


# ---- widths between one expert and all of them ---------------------------------------------------

def _experts(m=4, I=8, H=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(*s, generator=g) for s in ((I, H), (I, H), (H, I))) for _ in range(m)]


def _merged(experts, shares, members):
    """Group members' neurons merged: gate/up rows their share-weighted mean, down columns share-weighted sum."""
    a = [shares[j] for j in members]
    tot = sum(a)
    return (sum(w * experts[j][0] for w, j in zip(a, members)) / tot,
            sum(w * experts[j][1] for w, j in zip(a, members)) / tot,
            sum(w * experts[j][2] for w, j in zip(a, members)))


def _cat(parts):
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts], dim=1)


def _close(got, want):
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))


@pytest.mark.parametrize("rule", ["groups", "experts", "norm"])
def test_every_rule_at_full_width_is_the_experts_side_by_side(rule):
    ex, shares = _experts(), [0.1, 0.4, 0.2, 0.3]
    ffn, groups = reshape.widen(ex, torch.tensor(shares), 32, rule)
    got = swiglu(x := torch.randn(10, 6), *ffn)
    want = sum(a * swiglu(x, *e) for a, e in zip(shares, ex))
    assert torch.allclose(got, want, atol=1e-5)
    assert sorted(g["members"] for g in groups) == [[0], [1], [2], [3]]


def test_experts_rule_keeps_the_most_used_whole_and_consolidates_the_rest():
    ex, shares = _experts(), [0.1, 0.4, 0.2, 0.3]
    ffn, groups = reshape.widen(ex, torch.tensor(shares), 16, "experts")  # 2 experts' width of 4
    whole = (ex[1][0], ex[1][1], ex[1][2] * 0.4)
    _close(ffn, _cat([whole, _merged(ex, shares, [3, 2, 0])]))
    assert [(g["members"], g["width"]) for g in groups] == [([1], 8), ([3, 2, 0], 8)]
    ffn, groups = reshape.widen(ex, torch.tensor(shares), 24, "experts")  # 3 experts' width: two whole, two merged
    _close(ffn, _cat([(ex[1][0], ex[1][1], ex[1][2] * 0.4), (ex[3][0], ex[3][1], ex[3][2] * 0.3),
                      _merged(ex, shares, [2, 0])]))


def test_a_partial_group_keeps_its_highest_energy_neurons():
    """f not a multiple of I: the last group (experts: the remainder) is narrowed to what is left, keeping the
    neurons with the largest weight energy (planted here), in their order."""
    ex, shares = _experts(), [0.1, 0.4, 0.2, 0.3]
    keep = [1, 4, 5]
    for j in (2, 0):
        ex[j][0][keep] *= 10
    ffn, groups = reshape.widen(ex, torch.tensor(shares), 19, "experts")  # 2 whole + 3 neurons
    rest = _merged(ex, shares, [2, 0])
    _close(ffn, _cat([(ex[1][0], ex[1][1], ex[1][2] * 0.4), (ex[3][0], ex[3][1], ex[3][2] * 0.3),
                      (rest[0][keep], rest[1][keep], rest[2][:, keep])]))
    assert groups[-1]["width"] == 3 and groups[-1]["members"] == [2, 0]


def test_groups_rule_merges_the_most_alike_experts():
    """Experts 0 and 2 nearly equal, 1 and 3 nearly equal: at two experts' width those pairs are merged."""
    base = _experts(m=2, seed=1)
    g = torch.Generator().manual_seed(2)
    ex = [tuple(t + 0.01 * torch.randn(t.shape, generator=g) for t in base[k % 2]) for k in range(4)]
    shares = [0.3, 0.2, 0.25, 0.25]
    ffn, groups = reshape.widen(ex, torch.tensor(shares), 16, "groups")
    assert sorted(sorted(gr["members"]) for gr in groups) == [[0, 2], [1, 3]]
    want = _cat([_merged(ex, shares, gr["members"]) for gr in groups])
    _close(ffn, want)
    # a dominant expert stays whole: merging it costs the most
    shares = [0.7, 0.1, 0.1, 0.1]
    ex = _experts(m=3, seed=3)
    _, groups = reshape.widen(ex, torch.tensor(shares[:3]) / 0.9, 16, "groups")
    assert sorted(sorted(gr["members"]) for gr in groups) == [[0], [1, 2]]


def test_norm_rule_keeps_the_neurons_with_the_largest_output_scale():
    """Side by side, then the f neurons with the largest share x |gate row| x |up row| x |down column|."""
    ex, shares = _experts(m=2), [0.5, 0.5]
    ex[0][2][:, [0, 3]] *= 10  # large down columns in expert 0
    ex[1][0][[2, 5, 6]] *= 10  # large gate rows in expert 1
    ffn, groups = reshape.widen(ex, torch.tensor(shares), 13, "norm")
    big = {0: [0, 3], 1: [2, 5, 6]}
    side = _cat([(e[0], e[1], e[2] * a) for e, a in zip(ex, shares)])
    score = [shares[n // 8] * float(side[0][n].norm() * side[1][n].norm() * ex[n // 8][2][:, n % 8].norm())
             for n in range(16)]
    keep = sorted(sorted(range(16), key=lambda n: -score[n])[:13])
    assert all(n in keep for n in [j * 8 + k for j, ks in big.items() for k in ks])
    _close(ffn, (side[0][keep], side[1][keep], side[2][:, keep]))
    assert sorted((g["members"], g["width"]) for g in groups) == [([0], sum(n < 8 for n in keep)),
                                                                   ([1], sum(n >= 8 for n in keep))]


# ---- checks, depth maps, records ------------------------------------------------------------------

@pytest.mark.parametrize("name,ids,f,extra,needle", [
    ("olmoe", [3, 4], 33, [], "FFN 33 is wider than the selected experts' total 32 (2 experts of 16)"),
    ("qwen2_moe", [3, 4], 57, ["--shared", "concat"], "total 56 (2 experts of 16 + shared 24)"),
    ("olmoe", None, 129, [], "total 128 (8 experts of 16)"),
])
def test_too_wide_is_refused_naming_the_maximum(fx, tmp_path, cli, name, ids, f, extra, needle):
    src = fx / name
    sel = ["--selection", hand_selection(tmp_path, open_checkpoint(src), ids=ids)] if ids else []
    out = tmp_path / "g"
    code, _, err = cli("graft", src, "-t", f"2L,f{f}", *sel, *extra, "-o", out)
    assert_user_error(code, err, needle)
    assert not out.exists()


def test_reshape_too_wide_names_the_maximum(fx, tmp_path):
    ck = open_checkpoint(fx / "olmoe")
    from xpertctl.ops import decompose
    doc = json.loads(hand_selection(tmp_path, ck).read_text())
    t, meta = decompose.compute(ck, doc, "x")
    reshape.compute(t, meta, Target(2, ffn=48))  # fits
    with pytest.raises(XpertError, match=r"FFN 49 is wider than the selected experts' total 48 \(3 experts of 16\)"):
        reshape.compute(t, meta, Target(2, ffn=49))


@pytest.mark.parametrize("extra,needle", [
    (["--combine", "first"], "--combine first"),
    (["--combine", "literal"], "--combine literal"),
    (["--no-tucker"], "--no-tucker"),
    (["--ffn-init", "learngene"], "learngene"),
])
def test_wide_refuses_what_cannot_hold_experts_side_by_side(fx, tmp_path, cli, extra, needle):
    src = fx / "olmoe"
    sel = hand_selection(tmp_path, open_checkpoint(src))
    code, _, err = cli("graft", src, "-t", "2L,f32", "--selection", sel, *extra, "-o", tmp_path / "g")
    assert_user_error(code, err, needle)


@pytest.mark.parametrize("how", ["merge", "first"])
def test_depth_maps_apply_to_wide_students(fx, tmp_path, cli, how):
    """merge: the mean of the grouped layers' wide FFNs; first: the first layers' own (unaligned: each expert's
    neurons in their checkpoint order)."""
    src = fx / "olmoe"
    sel = hand_selection(tmp_path, open_checkpoint(src))
    out = tmp_path / "g"
    code, _, err = cli("graft", src, "-t", "1L,f48" if how == "merge" else "2L,f48", "--selection", sel,
                       "--layer-map", how, "--no-align", "--dtype", "float32", "-o", out)
    assert code == 0, err

    def wide(i, n):  # the experts side by side, largest routing share first
        parts = sorted(zip(routed_of(n), IDS), reverse=True)
        return _cat([(g, u, d * a) for a, (g, u, d) in ((a, raw_expert(src, i, j)) for a, j in parts)])
    ffns = student_ffns(out)
    if how == "merge":
        want = [tuple(sum(w[k] for w in (wide(0, 0), wide(1, 1), wide(2, 2))) / 3 for k in range(3))]
    else:
        want = [wide(0, 0), wide(1, 1)]
    for got, w in zip(ffns, want):
        _close(got, w)


def test_card_and_provenance_record_the_width_rule_and_groups(fx, tmp_path, cli):
    src = fx / "olmoe"
    sel = hand_selection(tmp_path, open_checkpoint(src))
    out = _graft(cli, src, tmp_path, 40, "--selection", sel, "--width-rule", "experts")
    rec = provenance.read(out / "model.safetensors", "grafted")
    assert rec["params"]["width_rule"] == "experts"
    groups = rec["width_groups"]
    assert set(groups) == {"0", "1", "2"}
    # layer 0: routed [0.30, 0.05, 0.20] for experts [5, 1, 6]: 5 and 6 whole, 1 narrowed to 8 neurons
    assert [(g["experts"], g["width"]) for g in groups["0"]] == [([5], 16), ([6], 16), ([1], 8)]
    card = (out / "README.md").read_text()
    assert "width rule" in card and "experts" in card
    # a one-expert-wide student records no width rule
    out1 = _graft(cli, src, tmp_path, 16, "--selection", sel, name="g1")
    rec1 = provenance.read(out1 / "model.safetensors", "grafted")
    assert rec1["params"]["width_rule"] is None and not rec1.get("width_groups")


def test_fit_and_norm_matched_take_a_wide_student(fx, tmp_path, cli):
    """The data-aware fit and the norm-matched control work on the wide FFN as on a one-expert one."""
    src = fx / "olmoe"
    sel = hand_selection(tmp_path, open_checkpoint(src))
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(["the law shall apply to every licence holder .", "in the beginning god created .",
                                 "def main ( ) : return 0 .", "a noun is a word that names a thing .",
                                 "the man page lists options .", "fortune favours the bold ."] * 3))
    out = _graft(cli, src, tmp_path, 40, "--selection", sel, "--fit", "down", "--calibration", f"a={text}",
                 "--ridge", "0.1", "--seq-len", "64")
    rec = provenance.read(out / "model.safetensors", "grafted")
    assert len(rec["params"]["fit"]["layers"]) == 3 and rec["params"]["width_rule"] == "groups"
    assert all(f[2].shape == (32, 40) for f in student_ffns(out))
    nm = _graft(cli, src, tmp_path, 40, "--selection", sel, "--ffn-init", "norm-matched", name="nm")
    base = student_ffns(_graft(cli, src, tmp_path, 40, "--selection", sel, name="base"))
    for a, b in zip(student_ffns(nm), base):
        assert torch.allclose(a[0].norm(dim=1), b[0].norm(dim=1), rtol=1e-4) and not torch.equal(a[0], b[0])
