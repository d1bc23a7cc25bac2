"""Issue 21: the paper's questions in miniature — the word-order task, the learngene init, the SFT set,
the report's new sections and the demo profiles."""
import json
import random
from pathlib import Path

import pytest

from conftest import ROOT, assert_user_error

MINI = ROOT / "fixtures" / "corpus-mini"


def _corpus(tmp_path: Path, texts: dict[str, list[str]]) -> Path:
    """A corpus dir whose test split holds exactly `texts` (train/val get one filler document each)."""
    root = tmp_path / "corpus"
    for s in ("train", "val", "test"):
        (root / s).mkdir(parents=True)
        for name, docs in texts.items():
            (root / s / f"{name}.txt").write_text("\n\n".join(docs if s == "test" else ["filler words here"]) + "\n")
    return root


def _numbered(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_order_items_are_real_windows_against_reorderings(tmp_path, cli):
    # distinct words, so every item can be located in its document independently of the builder
    docs = {"alpha": [_numbered("a", 100), _numbered("b", 70)], "beta": [_numbered("c", 64), "too short to use"]}
    corpus = _corpus(tmp_path, docs)
    code, out, err = cli("corpus", "order", corpus, "-o", tmp_path / "order.jsonl", "--per-domain", "50", "--seed", "3")
    assert code == 0, err
    items = [json.loads(l) for l in (tmp_path / "order.jsonl").read_text().splitlines()]
    # non-overlapping 32-word windows: 100 -> 3, 70 -> 2, 64 -> 2, the short document none
    assert sorted(x["domain"] for x in items) == ["alpha"] * 5 + ["beta"] * 2
    starts = set()
    for x in items:
        ctx, choices = x["context"].split(), x["choices"]
        assert len(ctx) == 24 and len(choices) == 4 and len(set(choices)) == 4
        doc = next(d.split() for d in docs[x["domain"]] if ctx[0] in d.split())
        s = doc.index(ctx[0])
        assert s % 32 == 0 and doc[s: s + 24] == ctx
        starts.add((x["domain"], ctx[0]))
        real = doc[s + 24: s + 32]
        assert choices[x["label"]] == " ".join(real)
        for j, c in enumerate(choices):
            assert sorted(c.split()) == sorted(real)  # the same words in every choice
            assert (c == " ".join(real)) == (j == x["label"])
            assert not c.startswith(" ")
    assert len(starts) == len(items)
    labels = [x["label"] for x in items]
    assert len(set(labels)) > 1  # the answer is not always in the same place


def test_order_skips_windows_without_enough_distinct_orders_and_caps_per_domain(tmp_path):
    from xpertctl import corpus
    same = " ".join(["w"] * 24 + ["x"] * 8)  # 8 identical words: no other order exists
    mixed = " ".join(f"m{i}" for i in range(32 * 6))
    root = _corpus(tmp_path, {"d": [same, mixed]})
    out = corpus.order(root, tmp_path / "o.jsonl", per_domain=4, seed=0)
    items = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(items) == 4 and all(x["context"].startswith("m") for x in items)


def test_order_is_deterministic_and_seeded(tmp_path):
    from xpertctl import corpus
    a = corpus.order(MINI, tmp_path / "a.jsonl", per_domain=5, seed=1).read_text()
    b = corpus.order(MINI, tmp_path / "b.jsonl", per_domain=5, seed=1).read_text()
    c = corpus.order(MINI, tmp_path / "c.jsonl", per_domain=5, seed=2).read_text()
    assert a == b and a != c and len(a.splitlines()) == 30


def test_order_on_a_corpus_without_test_text_is_one_line(tmp_path, cli):
    root = _corpus(tmp_path, {"d": ["only a few words"]})
    code, out, err = cli("corpus", "order", root, "-o", tmp_path / "o.jsonl")
    assert_user_error(code, err, "too little text")
    assert not (tmp_path / "o.jsonl").exists()


# ---- the learngene init ----------------------------------------------------------------------------

def test_fit_genes_is_the_least_squares_line_per_weight():
    import numpy as np
    import torch
    from xpertctl.ops import learngene
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(5, 3, generator=g) for _ in range(4)]
    x = learngene.depth_positions(4)
    a, b = learngene.fit_genes(mats, x)
    flat = np.stack([m.numpy().ravel() for m in mats])  # [layers, weights]
    slope, icpt = np.polyfit(x.numpy(), flat, 1)  # numpy's own least-squares line, weight by weight
    assert np.allclose(b.numpy().ravel(), slope, atol=1e-5) and np.allclose(a.numpy().ravel(), icpt, atol=1e-5)
    one_a, one_b = learngene.fit_genes(mats[:1], learngene.depth_positions(1))
    assert torch.equal(one_a, mats[0]) and not one_b.any()


def test_expand_recovers_a_linear_depth_profile_hidden_by_neuron_permutations():
    import torch
    from xpertctl.ops import learngene
    g = torch.Generator().manual_seed(1)
    A = [torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g), torch.randn(8, 16, generator=g)]
    B = [0.3 * torch.randn(m.shape, generator=g) for m in A]
    per_src = {}
    for s in range(5):  # source layers on an exact line, each with its own order of the 16 neurons
        x = s / 4
        gate, up, down = (a + x * b for a, b in zip(A, B))
        p = torch.arange(16) if s == 0 else torch.randperm(16, generator=g)
        per_src[10 + s] = (gate[p], up[p], down[:, p])
    out = learngene.expand(per_src, 3)
    for t, ffn in enumerate(out):  # target layers at depth 0, 1/2, 1 of the same line, in layer 0's order
        for k in range(3):
            assert torch.allclose(ffn[k], A[k] + (t / 2) * B[k], atol=1e-5), (t, k)
    unaligned = learngene.expand(per_src, 3, align=False)
    assert not torch.allclose(unaligned[1][0], A[0] + 0.5 * B[0], atol=1e-2)  # the alignment is what recovers it


def test_graft_learngene_interpolates_the_aligned_layer_ffns(fx, tmp_path, cli):
    """mixtral fixture (2 layers): the line through two layers is exact, so the 3-layer learngene is
    (W0, mean of W0 and W1 aligned to W0, W1 aligned to W0); W_s from decompose + reshape, aligned here."""
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from scipy.optimize import linear_sum_assignment
    src = fx / "mixtral"
    code, _, err = cli("graft", src, "--target", "3L", "--ffn-init", "learngene", "--rescale", "none",
                       "--dtype", "float32", "-o", tmp_path / "lg")
    assert code == 0, err
    # per-layer FFNs through the XPERT path: every expert (no selection) at the source depth, layer map first
    from xpertctl.ops import decompose, reshape
    from xpertctl.io import open_checkpoint
    ck = open_checkpoint(src)
    doc = decompose.all_experts_doc(ck)
    per = {}
    decompose.compute(ck, doc, "(all experts)", each=lambda i, t: per.__setitem__(i, t),
                      mix=lambda w: reshape.expert_mix(w, torch.eye(w.numel()), "usage"))
    w0, w1 = per[0], per[1]
    feat = lambda f: torch.cat([f[0], f[1], f[2].T], 1).double().numpy()
    rows, cols = linear_sum_assignment(feat(w0) @ feat(w1).T, maximize=True)
    p = torch.tensor(cols[np.argsort(rows)])
    w1 = (w1[0][p], w1[1][p], w1[2][:, p])
    got = load_file(str(tmp_path / "lg" / "model.safetensors"))
    for t, x in enumerate((0.0, 0.5, 1.0)):
        for k, m in enumerate(("gate_proj", "up_proj", "down_proj")):
            want = (1 - x) * w0[k] + x * w1[k]
            assert torch.allclose(got[f"model.layers.{t}.mlp.{m}.weight"], want, atol=1e-5), (t, m)
    card = (tmp_path / "lg" / "README.md").read_text()
    assert "Learngene" in card



# ---- the SFT set ---------------------------------------------------------------------------------------

def test_sft_records_from_known_text(tmp_path, cli):
    root = tmp_path / "c"
    texts = {
        "lexicon": {"train": 'dog: a domesticated canid; "the dog barked"\nx: y',
                    "test": 'cat: a small domesticated carnivore; "the cat sat"\nowl: nocturnal bird of prey'},
        "manuals": {"train": "NAME\n       ls - list directory contents\nSYNOPSIS",
                    "test": "NAME\n       cp - copy files and directories\nOPTIONS\n-a, --archive\n"
                            "       same as -dR. Preserves links.\n-x\n       -y"},
        "scripture": {"train": "In the beginning God created the heaven and the earth and all that is in them.",
                      "test": "short verse.\nAnd God said, Let there be light: and there was light over all."},
        "code": {"train": "def f(): pass", "test": "def g(): pass"},
    }
    for dom, parts in texts.items():
        for s in ("train", "val", "test"):
            (root / s).mkdir(parents=True, exist_ok=True)
            (root / s / f"{dom}.txt").write_text(parts.get(s, "filler text") + "\n")
    code, out, err = cli("corpus", "sft", root, "-o", tmp_path / "sft")
    assert code == 0, err
    read = lambda n: [json.loads(l) for l in (tmp_path / "sft" / n).read_text().splitlines()]
    test = read("test.jsonl")
    assert test == [
        {"instruction": 'Define the word "cat".', "response": "a small domesticated carnivore", "domain": "lexicon"},
        {"instruction": 'Define the word "owl".', "response": "nocturnal bird of prey", "domain": "lexicon"},
        {"instruction": "What does the command `cp` do?", "response": "copy files and directories", "domain": "manuals"},
        {"instruction": "What does the option `-a, --archive` do?", "response": "same as -dR.", "domain": "manuals"},
        {"instruction": "Continue this verse from the King James Bible.",
         "context": "And God said, Let there be", "response": "light: and there was light over all.",
         "domain": "scripture"}]
    train = read("train.jsonl")
    assert [r["response"] for r in train] == ["a domesticated canid", "list directory contents",
                                              "the earth and all that is in them."]
    from xpertctl import data
    for r in test + train:
        data.prompt_of(r)  # what train --sft and eval gen: read


def test_sft_caps_each_domain_and_is_seeded(tmp_path):
    from xpertctl import corpus
    a = corpus.sft(MINI, tmp_path / "a", max_train=7, max_test=3, seed=0)
    b = corpus.sft(MINI, tmp_path / "b", max_train=7, max_test=3, seed=0)
    assert (a / "test.jsonl").read_text() == (b / "test.jsonl").read_text()
    recs = [json.loads(l) for l in (a / "train.jsonl").read_text().splitlines()]
    from collections import Counter
    assert all(n <= 7 for n in Counter(r["domain"] for r in recs).values()) and len(recs) >= 7
