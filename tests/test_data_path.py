"""The data path at scale: streaming readers of every format, tokenize on several workers (bytes as
before), training windows read in place (batches as before), --domain-weights, domain-name checks,
ppl splits, bounded --max-tokens sampling."""
import gzip
import hashlib
import json

import numpy as np
import pytest

from conftest import assert_user_error
from xpertctl import data, documents
from xpertctl import eval as ev
from xpertctl import train as tr
from xpertctl.errors import XpertError

SUBJECTS = ["the law shall apply to every licence holder", "in the beginning god created the heaven",
            "def main ( ) : return 0", "a noun is a word that names a thing", "the man page lists options",
            "naïve café — ünïcödé text €"]


def _docs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return [f"{SUBJECTS[k % len(SUBJECTS)]} {k} " + " ".join(rng.choice(SUBJECTS, size=int(rng.integers(1, 6))))
            for k in range(n)]


def _jsonl(docs, field="text"):
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs))


def _write_formats(d, docs):
    """The same documents in every format the reader takes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    d.mkdir(parents=True, exist_ok=True)
    (d / "c.txt").write_text("\n\n\n".join(docs) + "\n")
    (d / "c.jsonl").write_text(_jsonl(docs))
    (d / "c.jsonl.gz").write_bytes(gzip.compress(_jsonl(docs).encode()))
    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(docs).encode()))
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), d / "c.parquet", row_group_size=7)
    with pa.ipc.new_stream(str(d / "c.arrow"), pa.schema([("text", pa.string())])) as w:
        for k in range(0, len(docs), 9):
            w.write_batch(pa.record_batch([pa.array(docs[k: k + 9])], names=["text"]))
    return d


def test_every_format_yields_the_documents_of_the_jsonl(tmp_path):
    docs = _docs()
    d = _write_formats(tmp_path / "f", docs)
    want = list(documents.iter_documents(d / "c.jsonl"))
    assert want == [x.strip() for x in docs]
    for name in ("c.txt", "c.jsonl.gz", "c.jsonl.zst", "c.parquet", "c.arrow"):
        assert list(documents.iter_documents(d / name)) == want, name
    # a directory: every file in sorted order
    assert list(documents.iter_documents(d)) == want * 6


def test_datasets_save_to_disk_dir(tmp_path):
    import datasets
    docs = _docs(40, seed=3)
    datasets.Dataset.from_dict({"text": docs, "n": list(range(40))}).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    assert list(documents.iter_documents(tmp_path / "ds")) == docs


def test_txt_paragraphs_across_chunk_boundaries(tmp_path, monkeypatch):
    """Blank-line paragraphs exactly as str.split('\\n\\n') of the whole text, whatever the chunking."""
    text = "a\n\n\nb é\n\n\n\nc\n \nd\n\n" + "€" * 5 + "\n\ne\n"
    (tmp_path / "t.txt").write_text(text)
    want = [p.strip() for p in text.split("\n\n") if p.strip()]
    for chunk in (1, 2, 3, 5, 1 << 20):
        monkeypatch.setattr(documents, "CHUNK", chunk)
        assert list(documents.iter_documents(tmp_path / "t.txt")) == want, chunk


def test_directory_names_the_files_it_skips(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "notes.md").write_text("# not read")
    assert list(documents.iter_documents(tmp_path)) == ["one", "two"]
    err = capsys.readouterr().err
    assert "skipped 1 file" in err and "notes.md" in err



def test_a_directory_without_corpus_files_names_what_it_holds(tmp_path):
    """The error lists the files it found (it listed only the accepted types), so a .csv is seen as the cause."""
    (tmp_path / "a.csv").write_text("text\none\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# two")
    with pytest.raises(XpertError, match=r"no corpus files in the directory.*\.txt.*it holds: a\.csv, sub/b\.md$"):
        list(documents.iter_documents(tmp_path))


# ---- tokenize --------------------------------------------------------------------------------------

def _reference_bins(tok, docs, val_pct, test_pct):
    """What tokenize must write: documents in order, each followed by EOS, split by sha256 of the text."""
    out = {s: [] for s in ("train", "val", "test")}
    ends = {s: [] for s in out}
    for d in docs:
        p = int.from_bytes(hashlib.sha256(d.encode()).digest()[:8], "little") % 100
        s = "test" if p < test_pct else "val" if p < test_pct + val_pct else "train"
        out[s] += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ends[s].append(len(out[s]))
    return ({s: np.array(v, dtype=np.uint16).tobytes() for s, v in out.items()},
            {s: np.array(v, dtype=np.uint64).tobytes() for s, v in ends.items()})


def test_tokenize_bins_identical_for_1_and_2_workers_and_to_reference(fx, tmp_path, monkeypatch):
    from xpertctl import tokenizing
    monkeypatch.setattr(tokenizing, "BATCH_DOCS", 7)  # many jobs, so order across workers matters
    docs = {"a": _docs(80, seed=1), "b": _docs(50, seed=2)}
    (tmp_path / "a.jsonl.zst").write_bytes(__import__("zstandard").ZstdCompressor().compress(_jsonl(docs["a"]).encode()))
    (tmp_path / "b.txt").write_text("\n\n".join(docs["b"]))
    tok = data.load_tokenizer(fx / "llama")
    outs = {}
    for w in (1, 2):
        outs[w] = data.tokenize(fx / "llama", [f"a={tmp_path / 'a.jsonl.zst'}", f"b={tmp_path / 'b.txt'}"],
                                tmp_path / f"d{w}", val_pct=20, test_pct=10, workers=w)
    for dom, ds in docs.items():
        bins, idx = _reference_bins(tok, ds, 20, 10)
        for s in ("train", "val", "test"):
            assert bins[s], (dom, s)  # every split holds documents: the test can see a misplaced one
            for w in (1, 2):
                assert (outs[w] / f"{dom}.{s}.bin").read_bytes() == bins[s], (dom, s, w)
                assert (outs[w] / f"{dom}.{s}.idx").read_bytes() == idx[s], (dom, s, w)
    td = data.load_token_data(outs[2])
    assert td.document_ends("a", "val").tolist() == list(np.frombuffer(_reference_bins(tok, docs["a"], 20, 10)[1]["val"], np.uint64))


@pytest.mark.parametrize("name,content,args,needle", [
    ("bad.jsonl.gz", gzip.compress(b'{"text": "hello"}\n' * 50)[:-30] + b"garbage-tail-bytes-here", [], "corrupt gzip"),
    ("bad.jsonl.zst", b"\x28\xb5\x2f\xfd" + b"not zstd at all" * 10, [], "corrupt zstd"),
    ("ok.jsonl", b'{"body": "hello"}\n', [], "field 'text' missing"),
    ("ok.jsonl", b'{"text": "hello"}\n', ["--text-field", "body"], "field 'body' missing"),
    ("p.parquet", None, [], "no column 'text'"),
])
def test_tokenize_bad_corpus_is_one_line_and_writes_nothing(fx, tmp_path, cli, name, content, args, needle):
    f = tmp_path / name
    if content is None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"body": ["a b c"] * 5}), f)
    else:
        f.write_bytes(content)
    before = f.read_bytes()
    code, so, err = cli("tokenize", "--tokenizer", fx / "llama", "-d", f"x={f}", "-o", tmp_path / "out", *args)
    assert_user_error(code, err, str(f), needle)
    assert not (tmp_path / "out").exists() and so == ""
    assert f.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp left behind


@pytest.mark.parametrize("name,needle", [("../a", "path separator"), ("a/b", "path separator"),
                                         (".hidden", "starts with '.'"), ("..", "starts with '.'"),
                                         ("a\\b", "path separator")])
def test_domain_names_are_plain_names(fx, tmp_path, cli, name, needle):
    (tmp_path / "in").mkdir()
    f = tmp_path / "in" / "x.txt"
    f.write_text("one document\n\nanother")
    code, _, err = cli("tokenize", "--tokenizer", fx / "llama", "-d", f"{name}={f}", "-o", tmp_path / "in" / "td")
    assert_user_error(code, err, "domain name", needle)
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["x.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_tokenize_file_of_a_split_corpus_points_to_corpus(fx, tmp_path, cli):
    """fixtures/corpus-mini is already hash-split: its train file has no val/test documents."""
    from conftest import ROOT
    f = ROOT / "fixtures" / "corpus-mini" / "train" / "legal.txt"
    code, so, err = cli("tokenize", "--tokenizer", fx / "llama", "-d", f"legal={f}", "-o", tmp_path / "td")
    assert code == 0, err
    flat = " ".join(err.split())
    assert "--corpus" in flat and "--val-pct 0 --test-pct 0" in flat
    code, so, err = cli("tokenize", "--tokenizer", fx / "llama", "-d", f"legal={f}", "-o", tmp_path / "td0",
                        "--val-pct", "0", "--test-pct", "0")
    assert code == 0 and "note" not in err, err



def test_tokenize_val_file_of_a_split_corpus_points_to_corpus(fx, tmp_path, cli):
    """A val (or test) file of an already split corpus has no training documents by hash: the error says why
    and what to pass, as the train file's notice does (it said only 'no training tokens after the split')."""
    from conftest import ROOT
    f = ROOT / "fixtures" / "corpus-mini" / "val" / "legal.txt"
    code, so, err = cli("tokenize", "--tokenizer", fx / "llama", "-d", f"legal={f}", "-o", tmp_path / "td")
    assert_user_error(code, err, str(f), "'val' part", "--corpus", "--val-pct 0 --test-pct 0")
    assert not (tmp_path / "td").exists()


def test_a_datasets_dict_dir_is_refused_not_its_splits_merged(fx, tmp_path, cli):
    """save_to_disk of a DatasetDict holds one directory per split: read as one corpus, eval ppl: scored train
    and test together and tokenize hash-split them again. It is refused, naming the splits; a split's
    directory reads as before."""
    import datasets
    datasets.disable_progress_bars()  # its bars go to stderr, which the contract reads
    tr_docs, te_docs = _docs(30, seed=7), _docs(10, seed=8)
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": tr_docs}),
                          "test": datasets.Dataset.from_dict({"text": te_docs})}).save_to_disk(str(dd))
    with pytest.raises(XpertError, match="DatasetDict"):
        list(documents.iter_documents(dd))
    assert list(documents.iter_documents(dd / "test")) == te_docs
    for args in (["tokenize", "--tokenizer", fx / "llama", "-d", f"a={dd}", "-o", tmp_path / "td"],
                 ["eval", fx / "llama", "--task", f"ppl:{dd}", "-o", tmp_path / "r.json"]):
        code, so, err = cli(*args)
        assert_user_error(code, err, str(dd), "test, train", str(dd / "train"))
        assert not (tmp_path / "td").exists() and not (tmp_path / "r.json").exists()


# ---- training windows ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three(fx, tmp_path_factory):
    """Token data of three domains of distinct text; 'c' is shorter than a window."""
    d = tmp_path_factory.mktemp("three")
    (d / "a.txt").write_text("\n\n".join(_docs(60, seed=5)))
    rev = [" ".join(reversed(x.split())) for x in SUBJECTS]  # known words, in an order 'a' never has
    (d / "b.txt").write_text("\n\n".join(f"{rev[k % 6]} {k} {rev[(k + 1) % 6]}" for k in range(60)))
    (d / "c.txt").write_text("tiny")
    return data.tokenize(fx / "llama", [f"a={d / 'a.txt'}", f"c={d / 'c.txt'}", f"b={d / 'b.txt'}"], d / "data",
                         val_pct=0, test_pct=0)


def test_train_batches_identical_to_one_concatenated_stream(three):
    """Today's batches: starts drawn over the domains concatenated in manifest order. Read in place,
    a window crossing a domain end continues into the next domain, exactly as in that stream."""
    m = json.loads((three / "manifest.json").read_text())
    stream = np.concatenate([np.fromfile(three / m["domains"][d]["train"]["file"], dtype=np.uint16)
                             for d in m["domains"]]).astype(np.int64)
    td = data.load_token_data(three)
    crossed = 0
    for T in (8, 64):
        cfg = tr.TrainConfig(batch_size=6, seq_len=T, seed=3)
        win = td.windows("train", T)
        edge = m["domains"]["a"]["train"]["tokens"]
        for step in range(20):
            for micro in range(2):
                rng = np.random.default_rng([cfg.seed, 0, step, micro])
                starts = rng.integers(0, len(stream) - T, size=cfg.batch_size)
                want = np.stack([stream[s: s + T] for s in starts])
                x, y, mask = tr.lm_batch(win, cfg, step, micro)
                assert (x.numpy() == want).all() and (y == x).all() and mask.all()
                crossed += int(((starts < edge) & (starts + T > edge)).sum())
    assert crossed > 0  # windows over the a|c|b boundaries were drawn and read from two memmaps


def test_domain_weights_draw_only_from_weighted_domains(three):
    td = data.load_token_data(three)
    arrays = {d: np.asarray(td.array(d, "train"), dtype=np.int64) for d in td.domains}
    w = data.parse_domain_weights("a=0,c=0,b=1", td, 8)
    cfg = tr.TrainConfig(batch_size=8, seq_len=8, seed=1)
    win = td.windows("train", 8, w)
    b = arrays["b"]
    for step in range(10):
        x = tr.lm_batch(win, cfg, step, 0)[0].numpy()
        for row in x:
            assert any((b[s: s + 8] == row).all() for s in range(len(b) - 8))
    w = data.parse_domain_weights("a=1,c=0,b=1", td, 8)
    x = np.concatenate([tr.lm_batch(td.windows("train", 8, w), cfg, s, 0)[0].numpy() for s in range(20)])
    from_a = [any((arrays["a"][s: s + 8] == r).all() for s in range(len(arrays["a"]) - 8)) for r in x]
    assert 0.3 < np.mean(from_a) < 0.7  # equal weights though a and b differ in size


@pytest.mark.parametrize("spec,needle", [("a=1,b=1", "no weight for 'c'"), ("a=1,b=1,c=1", "fewer than --seq-len"),
                                         ("a=1,x=1", "no domain 'x'"), ("a=-1,b=1,c=0", "weights >= 0"),
                                         ("a=0,b=0,c=0", "at least one"), ("a=one", "weights >= 0")])
def test_domain_weights_bad(three, spec, needle):
    from xpertctl.errors import XpertError
    with pytest.raises(XpertError, match=needle.replace("(", r"\(")):
        data.parse_domain_weights(spec, data.load_token_data(three), 8)


def test_train_cli_domain_weights(fx, three, tmp_path, cli):
    code, _, err = cli("train", fx / "llama", "--data", three, "--steps", "2", "--batch-size", "2", "--seq-len", "8",
                       "--eval-every", "0", "--domain-weights", "a=1,b=3,c=0", "-o", tmp_path / "run")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["params"]["domain_weights"] == "a=1,b=3,c=0"
    code, _, err = cli("train", fx / "llama", "--data", three, "--steps", "2", "--seq-len", "8", "--eval-every", "0",
                       "--domain-weights", "a=1", "-o", tmp_path / "run2")
    assert_user_error(code, err, "--domain-weights", "no weight")
    assert not (tmp_path / "run2").exists()


# ---- eval ppl --------------------------------------------------------------------------------------

def test_ppl_split_of_corpus_dir_and_refused_for_plain_text(fx, tmp_path, cli):
    from conftest import ROOT
    corpus = ROOT / "fixtures" / "corpus-mini"
    out = {}
    for split in ("val", "test"):
        code, so, err = cli("eval", fx / "llama", "--task", f"ppl:{corpus}", "--split", split, "--max-tokens", "64",
                            "--seq-len", "32")
        assert code == 0, err
        out[split] = json.loads(so)[f"ppl:{corpus}"]
    assert set(out["val"]) - {"fingerprint"} == {"code", "legal", "lexicon", "manuals", "quotes", "scripture"}
    assert out["val"]["legal"]["ppl"] != out["test"]["legal"]["ppl"]
    code, _, err = cli("eval", fx / "llama", "--task", f"ppl:{corpus / 'test'}", "--split", "test")
    assert_user_error(code, err, "--split", "plain text")


def test_ppl_token_data_same_with_and_without_index(fx, three, tmp_path):
    import shutil
    model = tr.load_causal_lm(fx / "llama").eval()
    tok = data.load_tokenizer(fx / "llama")
    a = ev.perplexity(model, tok, str(three), 16, "cpu", "train", max_tokens=300)
    old = tmp_path / "old"
    shutil.copytree(three, old)
    m = json.loads((old / "manifest.json").read_text())
    for e in m["domains"].values():
        for s in ("train", "val", "test"):
            e[s].pop("index")
    (old / "manifest.json").write_text(json.dumps(m))
    for f in old.glob("*.idx"):
        f.unlink()
    b = ev.perplexity(model, tok, str(old), 16, "cpu", "train", max_tokens=300)
    assert a == b and a["a"]["words"] > 0


# ---- --max-tokens sampling of a large domain --------------------------------------------------------

@pytest.mark.parametrize("fmt", ["txt", "jsonl", "jsonl.gz"])
def test_large_domain_sample_reads_documents_across_it(fx, tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(data, "SMALL_DOMAIN", 0)  # every domain is "large" here
    words = "the law shall apply to every licence holder".split()
    code = [f"{words[k // 64]} {words[k // 8 % 8]} {words[k % 8]}" for k in range(200)]  # distinct, known words
    head = [f"the law shall apply : {c} ." for c in code]
    tail = [f"in the beginning god created : {c} ." for c in code]
    docs = head + tail
    f = tmp_path / f"d.{fmt}"
    if fmt == "txt":
        f.write_text("\n\n".join(docs))
    elif fmt == "jsonl":
        f.write_text(_jsonl(docs))
    else:
        f.write_bytes(gzip.compress(_jsonl(docs).encode()))
    tok = data.load_tokenizer(fx / "llama")
    got = {}
    for seed in (0, 0, 1):
        ids = data.domain_tokens(data.DomainText(f, seed), tok, 150)
        assert len(ids) == 150
        text = tok.decode(ids.tolist(), skip_special_tokens=False)
        got.setdefault(seed, []).append(text)
    assert got[0][0] == got[0][1] and got[0][0] != got[1][0]  # seeded
    assert "law" in got[0][0] and "god" in got[0][0]  # documents from both halves
    ids = data.domain_tokens(data.DomainText(f, 0), tok, 150).tolist()
    eos = [k for k, t in enumerate(ids) if t == tok.eos_token_id]
    pieces = [tuple(ids[a + 1: b]) for a, b in zip([-1] + eos, eos)]  # whole documents (the last is cut)
    real = {tuple(tok(d, add_special_tokens=False)["input_ids"]) for d in docs}
    assert len(pieces) > 5 and all(p in real for p in pieces)  # each a real document
    assert len(set(pieces)) == len(pieces)  # none twice


# ---- --text-field on every command that reads documents ---------------------------------------------

def _same_docs_two_fields(tmp_path, docs: dict[str, list[str]]):
    """{domain: (file with the text under "text", file with the same text under "body")}; the two
    files of a domain have the same name and byte layout, in two directories."""
    out = {}
    for field in ("text", "body"):
        (tmp_path / field).mkdir(exist_ok=True)
        for name, ds in docs.items():
            (tmp_path / field / f"{name}.jsonl").write_text(_jsonl(ds, field))
    for name in docs:
        out[name] = (tmp_path / "text" / f"{name}.jsonl", tmp_path / "body" / f"{name}.jsonl")
    return out


def _stats_tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path))



@pytest.mark.parametrize("cmd", ["tokenize", "stats", "fidelity", "graft"])
def test_text_field_on_plain_text_only_is_refused_not_ignored(fx, tmp_path, cli, cmd):
    """--text-field names a field of .jsonl/.parquet/.arrow records; given with .txt domains only it did
    nothing, silently (eval ppl: already refused it). One line, before any model runs, nothing written."""
    t = tmp_path / "in"
    t.mkdir()
    (t / "a.txt").write_text("\n\n".join(_docs(30, seed=21)))
    (t / "d").mkdir()
    (t / "d" / "b.txt").write_text("\n\n".join(_docs(30, seed=22)))
    dom = ["-d", f"a={t / 'a.txt'}", "-d", f"b={t / 'd'}"]
    out = tmp_path / "out"
    if cmd == "fidelity":
        assert cli("graft", fx / "olmoe", "-t", "2L", "-o", tmp_path / "student")[0] == 0
    argv = {"tokenize": ["tokenize", "--tokenizer", fx / "llama", *dom, "-o", out],
            "stats": ["stats", fx / "olmoe", *dom, "-o", out],
            "fidelity": ["fidelity", fx / "olmoe", tmp_path / "student", *dom, "-o", out],
            "graft": ["graft", fx / "olmoe", "-t", "2L", "--fit", "down", "--calibration", f"a={t / 'a.txt'}",
                      "--calibration", f"b={t / 'd'}", "-o", out]}[cmd]
    code, so, err = cli(*argv, "--text-field", "body")
    assert_user_error(code, err, "--text-field body", ".txt")
    assert so == "" and not out.exists()


@pytest.mark.parametrize("cap", [None, "large"], ids=["whole", "sampled-large"])
def test_stats_text_field_counts_equal_the_same_documents_under_text(fx, tmp_path, cli, monkeypatch, cap):
    """The same documents under "body" (--text-field body) give the counts they give under "text", whole
    or sampled from a domain over the small-domain threshold; a recipe step passes text_field too."""
    import yaml
    from xpertctl import recipe as rc
    from xpertctl.ops_table import BY_NAME
    files = _same_docs_two_fields(tmp_path, {"a": _docs(40, seed=11), "b": [" ".join(reversed(d.split()))
                                                                           for d in _docs(40, seed=12)]})
    opts = []
    if cap:
        monkeypatch.setattr(data, "SMALL_DOMAIN", 1000)  # both domains are "large": offsets are sampled
        opts = ["--max-tokens", "120", "--seed", "4"]
    code, _, err = cli("stats", fx / "olmoe", *[x for n, (t, _) in files.items() for x in ("-d", f"{n}={t}")],
                       "-o", tmp_path / "text.st", *opts)
    assert code == 0, err
    code, _, err = cli("stats", fx / "olmoe", *[x for n, (_, b) in files.items() for x in ("-d", f"{n}={b}")],
                       "--text-field", "body", "-o", tmp_path / "body.st", *opts)
    assert code == 0, err
    r = tmp_path / "r.yaml"
    args = {"src": str(fx / "olmoe"), "domain": [f"{n}={b}" for n, (_, b) in files.items()], "text_field": "body",
            "out": str(tmp_path / "recipe.st")}
    if cap:
        args |= {"max_tokens": 120, "seed": 4}
    r.write_text(yaml.safe_dump({"name": "t", "steps": [{"id": "s", "op": "stats", "args": args}]}))
    rc.run(r, table=BY_NAME)
    want = _stats_tensors(tmp_path / "text.st")
    assert not (want["counts"][0] == want["counts"][1]).all()  # distinct domains route differently
    if cap:
        assert want["tokens"].tolist() == [120, 120]
    for other in ("body.st", "recipe.st"):
        got = _stats_tensors(tmp_path / other)
        assert set(got) == set(want)
        for k in want:
            assert (got[k] == want[k]).all(), (other, k)


def test_fidelity_graft_fit_and_eval_ppl_read_the_text_field(fx, tmp_path, cli):
    from safetensors.torch import load_file
    files = _same_docs_two_fields(tmp_path, {"a": _docs(40, seed=21), "b": _docs(40, seed=22)})
    sel = tmp_path / "sel.json"
    from xpertctl.io import open_checkpoint
    ck = open_checkpoint(fx / "olmoe")
    sel.write_text(json.dumps({"criterion": "x", "source": ck.fingerprint, "num_experts": ck.num_experts,
                               "layers": [{"layer": i, "experts": [0, 1]} for i in ck.moe_layers]}))
    outs = {}
    for k, field in enumerate(("text", "body")):
        extra = ["--text-field", "body"] if field == "body" else []
        cal = [x for n, f in files.items() for x in ("--calibration", f"{n}={f[k]}")]
        code, _, err = cli("graft", fx / "olmoe", "-t", "2L", "--selection", sel, "--fit", "down", *cal,
                           "--seq-len", "32", "--calibration-tokens", "600", *extra, "-o", tmp_path / f"g-{field}")
        assert code == 0, err
        code, _, err = cli("fidelity", fx / "olmoe", tmp_path / f"g-{field}",
                           *[x for n, f in files.items() for x in ("-d", f"{n}={f[k]}")], "--seq-len", "32",
                           *extra, "-o", tmp_path / f"f-{field}.json")
        assert code == 0, err
        code, so, err = cli("eval", fx / "llama", "--task", f"ppl:{files['a'][k]}", "--seq-len", "32", *extra)
        assert code == 0, err
        outs[field] = (load_file(str(tmp_path / f"g-{field}" / "model.safetensors")),
                       json.loads((tmp_path / f"f-{field}.json").read_text()),
                       json.loads(so)[f"ppl:{files['a'][k]}"])
    (gt, ft, pt), (gb, fb, pb) = outs["text"], outs["body"]
    downs = [k for k in gt if k.endswith("mlp.down_proj.weight")]
    assert downs and all((gt[k] == gb[k]).all() for k in gt)
    assert ft["layers"] == fb["layers"] and ft["tokens"] == fb["tokens"] and fb["xpertctl"]["params"]["text_field"] == "body"
    assert pt["a"] == pb["a"] and pt["a"]["words"] > 0


def test_provenance_says_how_each_domain_was_sampled(fx, tmp_path, cli, monkeypatch):
    """Over the small-domain threshold, the record says what was read: documents after byte offsets
    (plain text), a reservoir (compressed), the seeded order of every document (a small domain)."""
    from safetensors import safe_open
    from xpertctl.io import open_checkpoint, provenance
    (tmp_path / "small.txt").write_text("\n\n".join(_docs(4, seed=31)))
    (tmp_path / "plain.txt").write_text("\n\n".join(_docs(80, seed=32)))
    (tmp_path / "packed.jsonl.gz").write_bytes(gzip.compress(_jsonl(_docs(200, seed=33)).encode()))
    sizes = {p.stem.split(".")[0]: p.stat().st_size for p in tmp_path.iterdir()}
    monkeypatch.setattr(data, "SMALL_DOMAIN", 1000)
    assert sizes["small"] <= 1000 < min(sizes["plain"], sizes["packed"])
    doms = [x for n in ("small", "plain", "packed") for x in ("-d", f"{n}={next(tmp_path.glob(n + '.*'))}")]
    code, _, err = cli("stats", fx / "olmoe", *doms, "--max-tokens", "60", "-o", tmp_path / "s.st")
    assert code == 0, err

    def check(how):
        assert set(how) == {"small", "plain", "packed"}
        assert "seeded random order" in how["small"] and "read whole" in how["small"]
        assert "byte offsets" in how["plain"] and "order" not in how["plain"]
        assert "reservoir" in how["packed"] and "order" not in how["packed"]
    check(provenance.read(tmp_path / "s.st")["params"]["sample"]["how"])
    ck = open_checkpoint(fx / "olmoe")
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps({"criterion": "x", "source": ck.fingerprint, "num_experts": ck.num_experts,
                               "layers": [{"layer": i, "experts": [0, 1]} for i in ck.moe_layers]}))
    cal = [x.replace("-d", "--calibration") for x in doms]
    code, _, err = cli("graft", fx / "olmoe", "-t", "2L", "--selection", sel, "--fit", "down", *cal, "--seq-len", "32",
                       "--calibration-tokens", "300", "-o", tmp_path / "g")
    assert code == 0, err
    with safe_open(str(tmp_path / "g" / "model.safetensors"), "pt") as f:
        check(json.loads(f.metadata()["xpertctl"])["params"]["fit"]["sample"]["how"])
    code, _, err = cli("fidelity", fx / "olmoe", tmp_path / "g", *doms, "--max-tokens", "60", "--seq-len", "32",
                       "-o", tmp_path / "f.json")
    assert code == 0, err
    check(json.loads((tmp_path / "f.json").read_text())["xpertctl"]["params"]["sample"]["how"])
    code, _, err = cli("stats", fx / "olmoe", *doms, "-o", tmp_path / "all.st")  # no cap: nothing sampled
    assert code == 0 and provenance.read(tmp_path / "all.st")["params"]["sample"] is None


@pytest.mark.parametrize("name", ["c.jsonl.zst", "c.parquet", "c.arrow"])
def test_a_wrong_text_field_is_refused_before_the_model_loads(fx, tmp_path, cli, monkeypatch, name):
    from xpertctl.ops import hf_model

    def never(*a, **k):
        raise AssertionError("the model was loaded before the text field was checked")
    monkeypatch.setattr(hf_model, "load_model", never)
    f = _write_formats(tmp_path / "f", _docs(20, seed=41)) / name
    code, so, err = cli("stats", fx / "olmoe", "-d", f"a={f}", "--text-field", "body", "-o", tmp_path / "s.st")
    assert_user_error(code, err, str(f), "'body'", "--text-field")
    assert not (tmp_path / "s.st").exists()


def test_tokenize_of_a_corpus_records_the_corpus_splits_not_unused_percentages(fx, tmp_path, cli):
    """Issue 31 (a newcomer): with --corpus the corpus keeps its own splits, yet manifest.json said
    "split": {"val_pct": 5, "test_pct": 5}."""
    from conftest import ROOT
    code, out, err = cli("tokenize", "--tokenizer", fx / "llama", "--corpus", ROOT / "fixtures" / "corpus-mini",
                         "-o", tmp_path / "d")
    assert code == 0, err
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["split"] == {"from": "corpus"}, m["split"]
    code, out, err = cli("tokenize", "--tokenizer", fx / "llama", "-d", f"a={ROOT / 'fixtures/corpus-mini/train/legal.txt'}",
                         "--val-pct", "7", "-o", tmp_path / "e")
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["split"] == {"val_pct": 7, "test_pct": 5}
