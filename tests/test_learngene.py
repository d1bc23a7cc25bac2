"""The TLEG learngene baseline (issue 28, item 4): an auxiliary network whose every layer is
theta_A + c_l * theta_B, trained by distillation from the teacher (`xpertctl learngene`), expanded to
descendants of any depth (`graft --ffn-init learngene --learngene AUX`).

The oracles are transformers' own LlamaForCausalLM with weights written by hand from theta_A and theta_B,
and the coefficients written out here: c_l = l / L (0-based l; TLEG's released code) or l / (L - 1)."""
import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from conftest import assert_user_error, token_data
from xpertctl.io import provenance

TEXT = ("fortune favours the bold . the man page lists options . a noun is a word that names a thing . "
        "in the beginning god created the heaven and the earth . the law shall apply to every licence holder . ")


def _by_hand(scale: str, l: int, n: int) -> float:
    if scale == "tleg":
        return l / n
    return l / (n - 1) if n > 1 else 0.0


def _config(layers=4):
    return tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def _layer_tensor_names(config):
    layer = tf.models.llama.modeling_llama.LlamaDecoderLayer(config, 0)
    return [n for n, _ in layer.named_parameters()]


def _random_genes(genes, seed=0):
    """theta_A and theta_B drawn at random (norms too: a fresh theta_B's norm part is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in genes.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if p.dim() == 1 else 0.0))


def _layer_value(model, l, name):
    owner, leaf = name.rsplit(".", 1)
    return getattr(model.model.layers[l].get_submodule(owner), leaf)


# ---- the Aux-Net: the parametrization -------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["tleg", "unit"])
def test_every_aux_layer_tensor_is_theta_a_plus_its_coefficient_times_theta_b(scale):
    from xpertctl.ops import learngene as lg
    config = _config(4)
    model, genes = lg.new_aux(config, scale, seed=0)
    _random_genes(genes)
    names = _layer_tensor_names(config)
    assert sorted(n for n, _ in genes.a.named_parameters()) == sorted(names)  # attention, FFN and both norms
    assert any("norm" in n for n in names) and any("self_attn" in n for n in names) and any("mlp" in n for n in names)
    for l in range(4):
        c = _by_hand(scale, l, 4)
        for n in names:
            want = genes.a.get_parameter(n) + c * genes.b.get_parameter(n)
            assert torch.equal(_layer_value(model, l, n), want), (l, n)


def test_a_fresh_aux_starts_from_the_standard_init_with_a_zero_norm_slope():
    from xpertctl.ops import learngene as lg
    model, genes = lg.new_aux(_config(4), "tleg", seed=0)
    for n, p in genes.b.named_parameters():
        if "norm" in n:
            assert not p.any(), n  # every layer starts with the same (unit) norm weights, as in TLEG
        else:
            assert 0.01 < float(p.detach().std()) < 0.03, n  # initializer_range 0.02, like theta_A
    _, genes2 = lg.new_aux(_config(4), "tleg", seed=1)
    assert not torch.equal(genes.a.mlp.up_proj.weight, genes2.a.mlp.up_proj.weight)  # seeded


@pytest.mark.parametrize("scale", ["tleg", "unit"])
def test_gradients_reach_theta_a_theta_b_and_the_shared_parts_only(scale):
    """Every trainable tensor is a gene or an embedding / final norm / head; each gene's gradient is the sum
    over layers of the layer gradients (theta_B's weighted by c_l), those of a plain HF Llama with the same
    weights."""
    from xpertctl.ops import learngene as lg
    config = _config(4)
    model, genes = lg.new_aux(config, scale, seed=0)
    _random_genes(genes)
    trainable = {id(p) for p in model.parameters()}
    shared = [model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight]
    assert trainable == {id(p) for p in genes.parameters()} | {id(p) for p in shared}
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    model(input_ids=x, labels=x).loss.backward()

    plain = tf.LlamaForCausalLM(config)
    names = _layer_tensor_names(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    for l in range(4):
        c = _by_hand(scale, l, 4)
        for n in names:
            state[f"model.layers.{l}.{n}"] = (genes.a.get_parameter(n) + c * genes.b.get_parameter(n)).detach()
    plain.load_state_dict(state, strict=True)
    plain(input_ids=x, labels=x).loss.backward()
    for n in names:
        per_layer = [plain.model.layers[l].get_parameter(n).grad for l in range(4)]
        want_a = sum(per_layer)
        want_b = sum(_by_hand(scale, l, 4) * g for l, g in enumerate(per_layer))
        assert torch.allclose(genes.a.get_parameter(n).grad, want_a, atol=1e-6), n
        assert torch.allclose(genes.b.get_parameter(n).grad, want_b, atol=1e-6), n
        assert genes.b.get_parameter(n).grad.abs().sum() > 0, n
    assert torch.allclose(model.lm_head.weight.grad, plain.lm_head.weight.grad, atol=1e-6)


# ---- expansion -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["tleg", "unit"])
def test_expansion_at_the_aux_depth_is_the_aux_net_itself(scale):
    from xpertctl.ops import learngene as lg
    config = _config(4)
    model, genes = lg.new_aux(config, scale, seed=0)
    _random_genes(genes)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(input_ids=x).logits
    plain = tf.LlamaForCausalLM(config).eval()
    plain.load_state_dict(lg.expand(lg.learngene_tensors(model, genes), 4, scale), strict=True)
    with torch.no_grad():
        got = plain(input_ids=x).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("scale", ["tleg", "unit"])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_expansion_to_other_depths_places_each_layer_on_the_line(scale, n):
    from xpertctl.ops import learngene as lg
    config = _config(4)
    model, genes = lg.new_aux(config, scale, seed=0)
    _random_genes(genes)
    tensors = lg.learngene_tensors(model, genes)
    assert set(tensors) == ({f"theta_A.{k}" for k in _layer_tensor_names(config)}
                            | {f"theta_B.{k}" for k in _layer_tensor_names(config)}
                            | {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"})
    state = lg.expand(tensors, n, scale)
    plain = tf.LlamaForCausalLM(tf.LlamaConfig(**{**config.to_dict(), "num_hidden_layers": n}))
    plain.load_state_dict(state, strict=True)  # exactly the tensors of an n-layer model
    for l in range(n):
        for k in _layer_tensor_names(config):
            want = tensors[f"theta_A.{k}"] + _by_hand(scale, l, n) * tensors[f"theta_B.{k}"]
            assert torch.equal(state[f"model.layers.{l}.{k}"], want), (l, k)
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(state[k], tensors[k])


# ---- the commands --------------------------------------------------------------------------------------

STEPS, BATCH, ACCUM, SEQ = 4, 2, 2, 16
TRAIN_ARGS = ["--layers", "3", "--steps", str(STEPS), "--batch-size", str(BATCH), "--grad-accum", str(ACCUM),
              "--seq-len", str(SEQ), "--lr", "3e-3", "--warmup", "1", "--eval-every", "2", "--eval-batches", "2"]


@pytest.fixture(scope="module")
def ldata(fx, tmp_path_factory):
    return token_data(fx, tmp_path_factory, "lgtok",
                      {name: "\n\n".join(f"{k} {TEXT} {name}" for k in range(30)) for name in ("x", "y")})


@pytest.fixture(scope="module")
def aux(fx, ldata, tmp_path_factory):
    """A 3-layer learngene distilled from the tiny OLMoE fixture, through the table of operations."""
    from xpertctl.ops_table import BY_NAME
    out = tmp_path_factory.mktemp("lg") / "aux"
    cmd = BY_NAME["learngene"]
    flags = dict(zip(TRAIN_ARGS[::2], TRAIN_ARGS[1::2]))
    args = {k.removeprefix("--").replace("-", "_"): v for k, v in flags.items()}
    assert cmd.invoke(cmd.bind({"src": str(fx / "olmoe"), "data_dir": str(ldata), **args, "out": str(out)}, "test")) == out
    return out


def test_learngene_command_writes_the_genes_and_counts_its_tokens(aux):
    rec = provenance.read(aux / "learngene.safetensors", "learngene")
    assert rec["aux"]["tokens"] == STEPS * BATCH * ACCUM * SEQ  # every token the Aux-Net (and the teacher) saw
    assert rec["aux"]["layers"] == 3 and rec["aux"]["depth_scale"] == "tleg"
    assert rec["params"]["kd_alpha"] == 1.0 and rec["params"]["kd_temperature"] == 1.0  # TLEG's soft distillation
    rows = [json.loads(l) for l in (aux / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4] and all(r["kl"] > 0 for r in rows)
    assert rows[-1]["tokens"] == rec["aux"]["tokens"]
    t = load_file(str(aux / "learngene.safetensors"))
    cfg = json.loads((aux / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["architectures"] == ["LlamaForCausalLM"]
    names = _layer_tensor_names(tf.LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    assert set(t) == ({f"theta_A.{k}" for k in names} | {f"theta_B.{k}" for k in names}
                      | {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"})
    assert all(t[f"theta_B.{k}"].any() for k in names)  # trained: even the norms' slopes left zero
    card = (aux / "README.md").read_text()
    assert "TLEG" in card and f"{rec['aux']['tokens']:,}" in card
    assert (aux / "tokenizer.json").is_file()


def test_learngene_same_seed_same_genes(fx, ldata, aux, tmp_path, cli):
    code, _, err = cli("learngene", fx / "olmoe", "--data", ldata, *TRAIN_ARGS, "-o", tmp_path / "again")
    assert code == 0, err
    a, b = load_file(str(aux / "learngene.safetensors")), load_file(str(tmp_path / "again" / "learngene.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_graft_expands_the_learngene_into_a_loadable_descendant(fx, aux, tmp_path, cli, n):
    code, out, err = cli("graft", fx / "olmoe", "--target", f"{n}L", "--ffn-init", "learngene", "--learngene", aux,
                         "-o", tmp_path / "d")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "d")
    t = load_file(str(aux / "learngene.safetensors"))
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == n
    sd = model.state_dict()
    names = [k.removeprefix("theta_A.") for k in t if k.startswith("theta_A.")]
    for l in range(n):
        for k in names:
            want = t[f"theta_A.{k}"] + (l / n) * t[f"theta_B.{k}"]  # every layer: attention, FFN, norms
            assert torch.equal(sd[f"model.layers.{l}.{k}"], want), (l, k)
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(sd[k], t[k])
    rec = provenance.read(tmp_path / "d" / "model.safetensors", "grafted")
    aux_tokens = provenance.read(aux / "learngene.safetensors")["aux"]["tokens"]
    assert rec["ffn_init"] == "learngene" and rec["learngene"]["tokens"] == aux_tokens
    card = (tmp_path / "d" / "README.md").read_text()
    assert "TLEG" in card and f"{aux_tokens:,}" in card and "auxiliary" in card
    assert (tmp_path / "d" / "tokenizer.json").is_file()


def test_descendant_at_the_aux_depth_has_the_aux_nets_logits(fx, aux, tmp_path, cli):
    """The Aux-Net rebuilt from the learngene file by the parametrization, against the grafted descendant."""
    from xpertctl.ops import learngene as lg
    code, _, err = cli("graft", fx / "olmoe", "--target", "3L", "--ffn-init", "learngene", "--learngene", aux,
                       "-o", tmp_path / "d3")
    assert code == 0, err
    config = tf.LlamaConfig.from_pretrained(aux)
    model, genes = lg.new_aux(config, "tleg", seed=0)
    t = load_file(str(aux / "learngene.safetensors"))
    with torch.no_grad():
        for n, p in genes.a.named_parameters():
            p.copy_(t[f"theta_A.{n}"]); genes.b.get_parameter(n).copy_(t[f"theta_B.{n}"])
        for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            model.get_parameter(k).copy_(t[k])
    x = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    d = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "d3").eval()
    with torch.no_grad():
        assert torch.equal(d(input_ids=x).logits, model.eval()(input_ids=x).logits)


def test_a_descendant_trains_and_its_fidelity_is_measured(fx, aux, ldata, tmp_path, cli):
    code, _, err = cli("graft", fx / "olmoe", "--target", "2L", "--ffn-init", "learngene", "--learngene", aux,
                       "-o", tmp_path / "d")
    assert code == 0, err
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 20)
    code, _, err = cli("fidelity", fx / "olmoe", tmp_path / "d", "-d", f"x={text}", "-o", tmp_path / "f.json")
    assert code == 0, err
    code, _, err = cli("train", tmp_path / "d", "--data", ldata, "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                       "--eval-every", "0", "-o", tmp_path / "run")
    assert code == 0, err


# ---- bad inputs: one line, nothing written ----------------------------------------------------------------

@pytest.mark.parametrize("args,needles", [
    (["--layers", "1"], ("--layers 1", "2")),
    (["--heads", "3"], ("--heads 3", "--hidden")),
    (["--kd-alpha", "1.5"], ("--kd-alpha",)),
    (["--depth-scale", "log"], ("--depth-scale",)),
])
def test_learngene_bad_options_are_one_line(fx, ldata, tmp_path, cli, args, needles):
    code, _, err = cli("learngene", fx / "olmoe", "--data", ldata, "--steps", "1", *args, "-o", tmp_path / "a")
    assert_user_error(code, err, *needles)
    assert not (tmp_path / "a").exists()


def test_learngene_bad_inputs_are_one_line(fx, ldata, aux, tmp_path, cli):
    (tmp_path / "empty").mkdir()
    cases = [
        ([tmp_path / "nowhere", "--data", ldata], ("nowhere",)),
        ([fx / "olmoe", "--data", tmp_path / "empty"], ("manifest",)),
        ([fx / "olmoe", "--data", ldata, "--seq-len", "100000"], ("--seq-len",)),
    ]
    for args, needles in cases:
        code, _, err = cli("learngene", *args, "--steps", "1", "-o", tmp_path / "a")
        assert_user_error(code, err, *needles)
        assert not (tmp_path / "a").exists()
    code, _, err = cli("learngene", fx / "olmoe", "--data", ldata, "--steps", "1", "-o", aux)
    assert_user_error(code, err, "already exists")


def test_graft_learngene_bad_inputs_are_one_line(fx, aux, tmp_path, cli):
    out = tmp_path / "g"
    cases = [
        (["--target", "2L", "--ffn-init", "learngene"], ("--ffn-init learngene", "--learngene")),
        (["--target", "2L", "--learngene", aux], ("--learngene", "--ffn-init learngene")),
        (["--target", "2L", "--ffn-init", "learngene", "--learngene", aux, "--rescale", "none"], ("--rescale",)),
        (["--target", "2L", "--ffn-init", "learngene", "--learngene", aux, "--inherit", "attention"], ("--inherit",)),
        (["--target", "2L,d16", "--ffn-init", "learngene", "--learngene", aux], ("hidden", "32")),
        (["--ffn-init", "learngene", "--learngene", aux], ("--target",)),
        (["--target", "2L", "--ffn-init", "learngene", "--learngene", fx / "llama"], ("not a learngene",)),
        (["--target", "2L", "--ffn-init", "learngene", "--learngene", tmp_path / "none"], ("none",)),
    ]
    for args, needles in cases:
        code, _, err = cli("graft", fx / "olmoe", *args, "-o", out)
        assert_user_error(code, err, *needles)
        assert not out.exists()
    code, _, err = cli("graft", fx / "mixtral", "--target", "2L", "--ffn-init", "learngene", "--learngene", aux, "-o", out)
    assert_user_error(code, err, "distilled from", "mixtral")
    assert not out.exists()
