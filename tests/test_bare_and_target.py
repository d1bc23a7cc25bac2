"""Bare .safetensors sources (what the shapes tell, --top-k, --tokenizer, a notice) and the heads of --target."""
import json
import shutil

import pytest
import transformers as tf
from safetensors.torch import load_file

from conftest import assert_user_error
from xpertctl.io import open_checkpoint


def _load(out):
    return tf.AutoModelForCausalLM.from_pretrained(out)


def test_target_heads_are_honoured(fx, tmp_path, cli):
    code, out, err = cli("graft", fx / "olmoe", "--target", "2L,h2", "-o", tmp_path / "g")
    assert code == 0, err
    cfg = _load(tmp_path / "g").config
    assert cfg.num_attention_heads == 2 and cfg.head_dim * 2 == cfg.hidden_size == 32


@pytest.mark.parametrize("cmd", ["graft", "reshape"])
def test_target_heads_must_divide_the_width(fx, tmp_path, cli, cmd):
    src = fx / "olmoe"
    if cmd == "reshape":
        sel = tmp_path / "sel.json"
        ck = open_checkpoint(src)
        sel.write_text(json.dumps({"source": ck.fingerprint, "num_experts": 8,
                                   "layers": [{"layer": i, "experts": [0, 1]} for i in ck.moe_layers]}))
        assert cli("decompose", src, sel, "-o", tmp_path / "f.safetensors")[0] == 0
        src = tmp_path / "f.safetensors"
    code, _, err = cli(cmd, src, "--target", "2L,d24,h5", "-o", tmp_path / "o")
    assert_user_error(code, err, "--target 2L,d24,", "h5: 5 heads do not divide the hidden size 24")
    assert not (tmp_path / "o").exists()


def test_inspect_bare_file_infers_vocab_and_heads(fx, tmp_path, cli):
    code, out, err = cli("inspect", fx / "bare" / "olmoe.safetensors", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["vocab"] == 96 and info["top_k"] is None and info["heads"] is None  # full-width QK-norm: unknown
    bare = tmp_path / "q.safetensors"
    shutil.copyfile(fx / "qwen3_moe" / "model.safetensors", bare)
    info = json.loads(cli("inspect", bare, "--json")[1])
    assert (info["heads"], info["kv_heads"], info["head_dim"], info["vocab"]) == (4, 2, 8, 96)


def test_graft_bare_file_heads_tokenizer_and_notice(fx, tmp_path, cli):
    bare = fx / "bare" / "olmoe.safetensors"
    code, _, err = cli("graft", bare, "--target", "2L", "-o", tmp_path / "a")
    assert_user_error(code, err, "--heads", "h in --target")
    code, out, err = cli("graft", bare, "--target", "2L,h4", "-o", tmp_path / "a")
    assert code == 0, err
    assert out == f"{tmp_path / 'a'}\n" and "no tokenizer" in err and "--tokenizer" in err
    assert not (tmp_path / "a" / "tokenizer.json").exists()
    code, out, err = cli("graft", bare, "--target", "2L,h4", "--tokenizer", fx / "olmoe", "-o", tmp_path / "b")
    assert code == 0, err
    assert "no tokenizer" not in err
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == (fx / "olmoe" / "tokenizer.json").read_bytes()
    tf.AutoTokenizer.from_pretrained(tmp_path / "b")
    (tmp_path / "empty").mkdir()
    code, _, err = cli("graft", bare, "--target", "2L,h4", "--tokenizer", tmp_path / "empty", "-o", tmp_path / "c")
    assert_user_error(code, err, "--tokenizer", "no tokenizer files")


def test_graft_bare_qwen3_file_needs_no_heads(fx, tmp_path, cli):
    bare = tmp_path / "q.safetensors"
    shutil.copyfile(fx / "qwen3_moe" / "model.safetensors", bare)
    code, _, err = cli("graft", bare, "--target", "2L", "-o", tmp_path / "g")
    assert code == 0, err
    assert _load(tmp_path / "g").config.num_attention_heads == 4


def test_stats_top_k_for_a_config_without_it(fx, tmp_path, cli):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copyfile(fx / "olmoe" / "model.safetensors", d / "olmoe.safetensors")
    cfg = json.loads((fx / "olmoe" / "config.json").read_text())
    cfg.pop("num_experts_per_tok")
    (d / "config.json").write_text(json.dumps(cfg))
    corpus = tmp_path / "c.txt"
    corpus.write_text("the law shall apply\n\nin the beginning god created")
    args = ["stats", d / "olmoe.safetensors", "-d", f"a={corpus}", "--tokenizer", fx / "olmoe", "-o", tmp_path / "s.st"]
    code, _, err = cli(*args)
    assert_user_error(code, err, "top-k unknown", "--top-k")
    code, out, err = cli(*args, "--top-k", "3")
    assert code == 0, err
    from xpertctl.io import provenance
    rec = provenance.read(tmp_path / "s.st")
    counts = load_file(str(tmp_path / "s.st"))["counts"]
    assert rec["top_k"] == 3 and int(counts[0, 0].sum()) == 3 * int(load_file(str(tmp_path / "s.st"))["tokens"][0])
