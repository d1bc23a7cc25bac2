"""graft --final-norm refit: the final-norm gain of a student with an inherited head, fitted to its own stream."""
import copy
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import ROOT, assert_user_error

CAL = ROOT / "fixtures" / "corpus-mini" / "train"
DOCS = {"legal": (CAL / "legal.txt").read_text().split("\n\n")[:12],
        "code": (CAL / "code.txt").read_text().split("\n\n")[:12]}


def _nll_by_transformers(model, tok, docs, seq_len):
    """Transformers' own loss over the same windows the refit scores (each domain's EOS-joined documents)."""
    from xpertctl import data
    tot, n = 0.0, 0
    with torch.no_grad():
        for d in docs.values():
            for b in data.windows(data.token_stream(d, tok), seq_len, 4, tok.pad_token_id):
                labels = b.input_ids.masked_fill(b.attention_mask == 0, -100)
                k = int((labels[:, 1:] != -100).sum())
                tot += model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels).loss.item() * k
                n += k
    return tot / n


def test_a_student_that_is_its_source_gets_the_source_gain_back(fx):
    """Known answer: the student is the source with its final gain reset to ones; the refit must restore the
    source's gain, and the held-out NLL it reports with that gain must be the source's (transformers' loss)."""
    from xpertctl import data
    from xpertctl.ops import final_norm
    from xpertctl.ops.fit import split_documents
    src = transformers.AutoModelForCausalLM.from_pretrained(fx / "llama").eval()
    tok = data.load_tokenizer(fx / "llama")
    student = copy.deepcopy(src)
    with torch.no_grad():
        student.model.norm.weight.fill_(1.0)
    gain, rec = final_norm.refit(src, student, tok, DOCS, seq_len=32, holdout=0.25)
    torch.testing.assert_close(gain, src.model.norm.weight.detach(), rtol=1e-4, atol=1e-5)
    held = split_documents(DOCS, 0.25)[1]
    assert rec["held_out_nll"]["refitted"] == pytest.approx(_nll_by_transformers(src, tok, held, 32), abs=1e-4)
    assert rec["held_out_nll"]["inherited"] == pytest.approx(_nll_by_transformers(student, tok, held, 32), abs=1e-4)
    assert rec["calibration_tokens"] > 0 and rec["held_out_tokens"] > 0


def test_the_gain_fits_a_scaled_stream_per_dimension(fx):
    """The student's stream is the source's with two dims scaled by 50 (a massive dim): the refit gain on every
    dim is what makes gain * rmsnorm(student) equal the source's normed vector on average (least squares)."""
    from xpertctl import data
    from xpertctl.ops import final_norm
    src = transformers.AutoModelForCausalLM.from_pretrained(fx / "llama").eval()
    tok = data.load_tokenizer(fx / "llama")
    student = copy.deepcopy(src)
    scale = torch.ones(32)
    scale[[3, 17]] = 50.0
    student.model.norm.register_forward_pre_hook(lambda m, args: (args[0] * scale,))
    gain, _ = final_norm.refit(src, student, tok, DOCS, seq_len=32, holdout=0.25)
    xs, xt = [], []
    h = src.model.norm.register_forward_pre_hook(lambda m, a: xt.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        for d in DOCS.values():  # every fit document (the refit held the last quarter out)
            ids = data.token_stream(d[:len(d) - round(len(d) * 0.25)], tok)
            for b in data.windows(ids, 32, 4, tok.pad_token_id):
                src(input_ids=b.input_ids, attention_mask=b.attention_mask)
                keep = b.attention_mask.reshape(-1).bool()
                xt[-1] = xt[-1][keep]
                xs.append(xt[-1] * scale)
    h.remove()
    rms = lambda x: x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    ns, nt = rms(torch.cat(xs)), rms(torch.cat(xt)) * src.model.norm.weight.detach()
    best = torch.linalg.lstsq(ns.T.reshape(32, -1, 1), nt.T.reshape(32, -1, 1)).solution.reshape(32)  # per dim
    torch.testing.assert_close(gain, best, rtol=1e-3, atol=1e-4)


def _graft(cli, fx, tmp_path, *extra, name="g"):
    return cli("graft", fx / "mixtral", "--target", "1L", "--inherit", "embeddings,norms,attention",
               "-o", tmp_path / name, *extra)


def test_graft_refit_writes_the_gain_and_says_so(cli, fx, tmp_path):
    code, out, err = _graft(cli, fx, tmp_path, "--final-norm", "refit", "--calibration", f"legal={CAL / 'legal.txt'}",
                            "--calibration", f"code={CAL / 'code.txt'}", "--calibration-tokens", 600)
    assert code == 0, err
    code2, _, err2 = _graft(cli, fx, tmp_path, name="plain")
    assert code2 == 0, err2
    ours, plain = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("g", "plain"))
    src = load_file(str(fx / "mixtral" / "model.safetensors"))
    assert torch.equal(plain["model.norm.weight"], src["model.norm.weight"])  # the default keeps the source's gain
    assert not torch.equal(ours["model.norm.weight"], src["model.norm.weight"])
    assert all(torch.equal(ours[k], plain[k]) for k in plain if k != "model.norm.weight")  # nothing else changes
    card = (tmp_path / "g" / "README.md").read_text()
    rec = json.loads(card.split("```json")[1].split("```")[0])["params"]["final_norm"]
    assert "Final norm (`--final-norm refit`)" in card
    assert f"{rec['held_out_nll']['inherited']:.3f} with the source's gain" in card
    assert f"{rec['held_out_nll']['refitted']:.3f} refitted" in card
    assert set(rec["calibration"]) == {"legal", "code"} and rec["calibration_token_cap"] == 600
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g")


@pytest.mark.parametrize("extra, needles", [
    (("--final-norm", "refit"), ["--final-norm refit needs calibration text"]),
    (("--final-norm", "refit", "--calibration", f"legal={CAL / 'legal.txt'}", "--inherit", "norms"),
     ["--final-norm refit", "add embeddings to --inherit"]),
])
def test_refit_without_what_it_needs_is_one_line(cli, fx, tmp_path, extra, needles):
    code, out, err = _graft(cli, fx, tmp_path, *extra)
    assert_user_error(code, err, *needles)
    assert not (tmp_path / "g").exists()
