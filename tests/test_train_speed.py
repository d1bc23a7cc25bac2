"""train's speed settings (--threads, --compile) change speed, not results beyond float noise."""
import json

import pytest
import torch

from conftest import assert_user_error, token_data
from xpertctl import train as tr


@pytest.fixture(scope="module")
def sdata(fx, tmp_path_factory):
    return token_data(fx, tmp_path_factory, "speedtok",
                      {"a": "\n\n".join(f"the man page lists options {k} . fortune favours the bold ." for k in range(60))})


def _cfg(**kw):
    return tr.TrainConfig(**{**dict(steps=4, batch_size=4, seq_len=16, lr=3e-3, warmup=1, eval_every=2,
                                    eval_batches=2, seed=3), **kw})


def _rows(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _same(a, b, rel):
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=rel)
    va, vb = ([r["val_loss"] for r in x if "val_loss" in r] for x in (a, b))
    assert len(va) == 2 and va == pytest.approx(vb, rel=rel)


def test_one_thread_same_losses_and_the_setting_is_restored(fx, sdata, tmp_path):
    before = torch.get_num_threads()
    tr.train(fx / "llama", tmp_path / "default", _cfg(), data_dir=sdata)
    tr.train(fx / "llama", tmp_path / "one", _cfg(), data_dir=sdata, threads=1)
    assert torch.get_num_threads() == before
    _same(_rows(tmp_path / "one"), _rows(tmp_path / "default"), 1e-5)
    cfg = json.loads((tmp_path / "one" / "train_config.json").read_text())["params"]
    assert "threads" not in cfg and "compile" not in cfg  # speed only: a resume may change them


def test_compile_same_losses_and_eager_evaluation(fx, sdata, tmp_path):
    tr.train(fx / "llama", tmp_path / "eager", _cfg(), data_dir=sdata)
    tr.train(fx / "llama", tmp_path / "compiled", _cfg(), data_dir=sdata, compile=True)
    a, b = _rows(tmp_path / "compiled"), _rows(tmp_path / "eager")
    _same(a, b, 1e-4)
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-6) and "val_loss" in a[1]


def test_bad_threads_is_one_line(fx, sdata, tmp_path, cli):
    out = tmp_path / "run"
    code, _, err = cli("train", fx / "llama", "--data", sdata, "--steps", "1", "--threads", "-1", "-o", out)
    assert_user_error(code, err, "--threads")
    assert not out.exists()
