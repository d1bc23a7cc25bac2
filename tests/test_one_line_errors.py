"""Issue 13: one-line errors (or a notice) instead of tracebacks, silence or misleading messages; stats
--max-tokens samples documents across the whole domain."""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, assert_user_error, token_data
from xpertctl import data
from xpertctl.io import provenance

TEACHER = ROOT / "fixtures" / "teacher"
TEXT = ("the law shall apply to every licence holder . in the beginning god created the heaven and the earth . "
        "def main ( ) : return 0 . a noun is a word that names a thing . the man page lists options . ")


def _digest(root):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tdata(fx, tmp_path_factory):
    return token_data(fx, tmp_path_factory, "tok-err", {"a": "\n\n".join(f"{TEXT} {k}" for k in range(40))})


# ---- devices ------------------------------------------------------------------------------------

@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)


@pytest.mark.parametrize("cmd", ["train", "eval", "stats"])
@pytest.mark.parametrize("device,needle", [("cuda", "CPU-only"), ("cuda:1", "CPU-only"), ("gpu", "not a torch device")])
def test_device_is_checked_up_front(fx, tdata, tmp_path, cli, cpu_only, cmd, device, needle):
    out = tmp_path / "o"
    args = {"train": ["train", fx / "llama", "--data", tdata, "--steps", "1"],
            "eval": ["eval", fx / "llama", "--task", f"ppl:{tdata}"],
            "stats": ["stats", fx / "olmoe", "-d", f"a={ROOT / 'fixtures' / 'corpus-mini' / 'train' / 'legal.txt'}"]}[cmd]
    code, so, err = cli(*args, "--device", device, "-o", out)
    assert_user_error(code, err, f"--device {device}" if needle != "not a torch device" else "--device 'gpu'", needle)
    assert not out.exists()


# ---- token data against the model ---------------------------------------------------------------

def test_eval_refuses_data_of_a_larger_vocabulary(fx, tmp_path, cli):
    (tmp_path / "a.txt").write_text("\n\n".join(f"{TEXT} {k}" for k in range(20)))
    big = tmp_path / "big"
    data.tokenize(TEACHER, [f"a={tmp_path / 'a.txt'}"], big, val_pct=20, test_pct=10)  # 2048-token BPE
    code, _, err = cli("eval", fx / "llama", "--task", f"ppl:{big}", "-o", tmp_path / "r.json")
    assert_user_error(code, err, str(big), "2048-token vocabulary")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("cmd", ["train", "eval"])
def test_seq_len_beyond_the_model_positions(fx, tdata, tmp_path, cli, cmd):
    args = ["train", fx / "llama", "--data", tdata, "--steps", "1"] if cmd == "train" else \
        ["eval", fx / "llama", "--task", f"ppl:{tdata}"]
    code, _, err = cli(*args, "--seq-len", "256", "-o", tmp_path / "o")
    assert_user_error(code, err, "--seq-len 256", "max_position_embeddings", "128")
    assert not (tmp_path / "o").exists()


def test_empty_splits_warn_at_tokenize_and_are_named_by_train_and_eval(fx, tmp_path, cli):
    doc = next(f"{TEXT} {k}" for k in range(100) if data.split_of(f"{TEXT} {k}", 1, 1) == "train")
    (tmp_path / "one.txt").write_text(doc * 3)  # one document: the val and test splits come out empty
    d = tmp_path / "d"
    code, _, err = cli("tokenize", "--tokenizer", fx / "llama", "-d", f"one={tmp_path / 'one.txt'}",
                       "--val-pct", "1", "--test-pct", "1", "-o", d)
    assert code == 0, err
    flat = " ".join(err.split())
    assert "'one'" in flat and "val" in flat and "test" in flat and "empty" in flat
    code, _, err = cli("train", fx / "llama", "--data", d, "--steps", "2", "--seq-len", "8", "--eval-every", "1",
                       "-o", tmp_path / "run")
    assert_user_error(code, err, str(d), "val split", "empty", "--eval-every 0")
    assert not (tmp_path / "run").exists()
    code, _, err = cli("eval", fx / "llama", "--task", f"ppl:{d}", "--split", "test", "-o", tmp_path / "r.json")
    assert_user_error(code, err, str(d), "split 'test'", "'one'", "empty")
    # --eval-every 0 trains without validation, and says so (issue 31: its help said "at the end only")
    code, _, err = cli("train", fx / "llama", "--data", d, "--steps", "2", "--seq-len", "8", "--eval-every", "0",
                       "-o", tmp_path / "run")
    assert code == 0 and "no validation loss" in " ".join(err.split()), err
    code, out, _ = cli("train", "--help")
    assert "needs 0 and trains with no validation loss" in " ".join(out.replace("│", " ").split())


# ---- depth: a target deeper than the source repeats layers ----------------------------------------

def test_deeper_target_notice_on_stderr_and_in_the_model_card(fx, tmp_path, cli):
    out = tmp_path / "g"
    code, so, err = cli("graft", fx / "olmoe", "-t", "5L", "-o", out)  # the source has 3 layers
    assert code == 0, err
    flat = " ".join(err.split())
    assert "5 layers" in flat and "3" in flat and "repeat" in flat
    card = (out / "README.md").read_text()
    assert "repeat" in card and "5 layers" in card
    code, so, err = cli("graft", fx / "olmoe", "-t", "3L", "-o", tmp_path / "g3")
    assert code == 0 and "repeat" not in err


# ---- misleading checkpoint messages -----------------------------------------------------------------

def test_one_shard_is_named_as_a_shard(fx, tmp_path, cli):
    shard = sorted((fx / "olmoe-sharded").glob("model-*.safetensors"))[0]
    for args in (["inspect", shard], ["stats", shard, "-d", f"a={ROOT / 'fixtures/corpus-mini/train/legal.txt'}",
                                      "-o", tmp_path / "s.safetensors"]):
        code, _, err = cli(*args)
        assert_user_error(code, err, str(shard), "one shard", str(fx / "olmoe-sharded"))
        assert "dense" not in err


def test_missing_local_directory_is_not_called_a_hub_id(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    code, _, err = cli("inspect", "models/olmoe")  # models/ exists: a local path with a typo
    assert_user_error(code, err, "models/olmoe", "no such file or directory")
    assert "hub" not in err.lower()


def test_hub_id_in_the_local_cache_is_used(fx, tmp_path, cli, monkeypatch):
    import huggingface_hub.constants as hc
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-moe" / "snapshots" / ("a" * 40)
    shutil.copytree(fx / "olmoe", snap)
    (cache / "models--acme--tiny-moe" / "refs").mkdir()
    (cache / "models--acme--tiny-moe" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    code, so, err = cli("inspect", "acme/tiny-moe", "--json")
    assert code == 0, err
    assert json.loads(so)["family"] == "olmoe"
    code, _, err = cli("inspect", "acme/not-cached")
    assert_user_error(code, err, "acme/not-cached", "local Hugging Face cache")


# ---- stats --max-tokens samples the whole domain ------------------------------------------------

def test_stats_max_tokens_samples_documents_across_the_domain(fx, tmp_path, cli, monkeypatch):
    import xpertctl.ops.stats as st
    head = [f"the law shall apply to every licence holder {k} ." for k in range(30)]
    tail = [f"in the beginning god created the heaven and the earth {k} ." for k in range(30)]
    (tmp_path / "dom.txt").write_text("\n\n".join(head + tail))
    seen = []
    real = data.token_stream

    def spy(docs, tok, max_tokens=None):
        ids = real(docs, tok, max_tokens)
        seen.append(tok.decode(ids.tolist()))
        return ids
    monkeypatch.setattr(st.data, "token_stream", spy)
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        outs[name] = tmp_path / f"{name}.safetensors"
        args = ["stats", fx / "olmoe", "-d", f"x={tmp_path / 'dom.txt'}", "--max-tokens", "120", "--seq-len", "32",
                "--seed", str(seed), "-o", outs[name]]
        code, _, err = cli(*args)
        assert code == 0, err
    assert "god" in seen[0] and "law" in seen[0]  # documents from both halves of the file
    assert seen[0] == seen[1] and seen[0] != seen[2]  # seeded
    a, b = load_file(str(outs["a"])), load_file(str(outs["b"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rec = provenance.read(outs["c"], "stats")
    assert rec["seed"] == 1 and rec["params"]["sample"]["seed"] == 1 and rec["params"]["max_tokens"] == 120


@pytest.mark.parametrize("bad", [["-t", "4L", "--layer-map", "merge"], ["-t", "2L", "--ranks", "full,full,9"],
                                 ["-t", "2L", "--no-tucker", "--combine", "first"]])
def test_graft_without_stats_fails_in_one_line(fx, tmp_path, cli, bad):
    """Without --stats the graft says it will use every expert; a bad option must still fail in one line
    (the notice came first, then the error: two lines)."""
    code, _, err = cli("graft", fx / "olmoe", *bad, "-o", tmp_path / "g")
    assert_user_error(code, err, bad[2])
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("cmd", ["eval", "train"])
def test_a_run_directory_or_a_missing_model_is_named_for_what_it_is(fx, tdata, tmp_path, cli, cmd):
    """Issue 31 (a newcomer): `eval runs/xpert` said 'not a model directory (no config.json)' without
    pointing at runs/xpert/final, and a misspelt path got the same words instead of 'no such file'."""
    run = tmp_path / "run"
    shutil.copytree(fx / "llama", run / "final")
    tail = {"eval": ["--task", f"ppl:{tdata}", "-o", tmp_path / "r.json"],
            "train": ["--data", tdata, "--steps", "1", "-o", tmp_path / "t"]}[cmd]
    code, _, err = cli(cmd, run, *tail)
    assert_user_error(code, err, str(run), "a training run", str(run / "final"))
    code, _, err = cli(cmd, run / "fnal", *tail)
    assert_user_error(code, err, str(run / "fnal"), "no such file or directory")
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "t").exists()
