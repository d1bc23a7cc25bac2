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
