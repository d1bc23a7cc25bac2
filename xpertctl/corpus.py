"""A multi-domain corpus from text that Debian packages ship, and a BPE tokenizer trained on it.

Domains (package -> what is read, in this order until the domain's byte cap):
  legal      base system      /usr/share/common-licenses/* and /usr/share/doc/*/copyright
  scripture  bible-kjv        the `bible` program's output (the text is stored compressed)
  lexicon    wordnet-base     glosses of /usr/share/wordnet/data.{noun,verb,adj,adv} (after "| "),
             dict-gcide, dict-devil   then the entries of the dictd dictionaries (Webster's 1913, ...)
  code       libpython3.11-stdlib  /usr/lib/python3.11/**/*.py (tests excluded), then the Python
                              sources of Debian's python3-* packages (/usr/lib/python3/dist-packages)
  manuals    man-db, python3.11-doc, linux-doc-6.1   man pages of sections 1, 5, 7, 8 rendered with
                              `man -l FILE | col -b` (up to a third of the cap), then the Python
                              documentation (HTML, tags stripped), then the Linux kernel's Documentation
  quotes     fortunes         /usr/share/games/fortunes/* (%-separated)
Documents are cleaned, deduplicated, cut to about `DOC_CHARS`, kept in a deterministic order and
assigned to train/val/test by a hash of their text (data.split_of). A missing package only shrinks its
domain (a notice names what was found).
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

from . import data
from .console import notice, progress
from .errors import XpertError

PACKAGES = ("wordnet-base", "fortunes", "bible-kjv", "man-db", "groff-base", "libpython3.11-stdlib",
            "dict-gcide", "dict-devil", "python3.11-doc", "linux-doc-6.1")
MAX_BYTES = 28_000_000  # per domain: ~100 MB in all, >= 30M tokens of the demo's 2,048-token BPE
DOC_CHARS = 1200
DOMAINS = ("legal", "scripture", "lexicon", "code", "manuals", "quotes")


def _clean(text: str) -> str:
    text = text.replace("\r", "").replace("\t", "    ")
    text = re.sub(r"[^\S\n]+\n", "\n", text)
    return re.sub(r"\n{2,}", "\n", text).strip()  # blank lines separate documents on disk


def _chunks(text: str, size: int = DOC_CHARS) -> list[str]:
    """Cut at paragraph boundaries into documents of about `size` characters."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        cur = f"{cur}\n{para}" if cur else para
        if len(cur) >= size:
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return out


def _read(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def legal() -> list[str]:
    files = sorted(Path("/usr/share/common-licenses").glob("*")) + sorted(Path("/usr/share/doc").glob("*/copyright"))
    return [c for f in files if f.is_file() for c in _chunks(_read(f))]


def scripture() -> list[str]:
    try:
        out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/bin:/bin", "COLUMNS": "100000"}).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^(\w+?\d+):\d+\s+(.*)$", line.strip())
        if m:
            chapters.setdefault(m.group(1), []).append(m.group(2))
    return [c for verses in chapters.values() for c in _chunks("\n\n".join(verses))]


def lexicon():
    glosses = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in _read(Path(f"/usr/share/wordnet/data.{pos}")).splitlines():
            if line.startswith("  ") or "| " not in line:
                continue  # licence header lines start with two spaces
            words = line.split(" ")[4:5]
            glosses.append(f"{words[0].replace('_', ' ') if words else ''}: {line.split('| ', 1)[1].strip()}")
    yield from _chunks("\n\n".join(glosses))
    for name in ("gcide", "devil"):
        yield from _chunks("\n\n".join(_dictd_entries(Path(f"/usr/share/dictd/{name}.dict.dz"))))


def _dictd_entries(path: Path) -> list[str]:
    """The entries of a dictd dictionary (dictzip is gzip): blank-line separated, without the
    database's own 00-database-* records and the per-entry source tags ("[1913 Webster]")."""
    import gzip
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
    except (OSError, EOFError):
        return []
    out = []
    for entry in re.split(r"\n\s*\n", text):
        entry = re.sub(r"^\s*\[[^\]]*(Webster|PJC|Century)[^\]]*\]\s*$", "", entry, flags=re.M).strip()
        if entry and "00-database" not in entry[:40] and "00database" not in entry[:40]:
            out.append(entry)
    return out


def code():
    for root, skip in ((Path("/usr/lib/python3.11"), {"site-packages", "dist-packages"}),
                       (Path("/usr/lib/python3/dist-packages"), set())):
        files = sorted(p for p in root.rglob("*.py") if not ({"test", "tests", "idle_test"} | skip)
                       & set(p.relative_to(root).parts))
        for f in files:
            yield from _chunks(_read(f))


def manuals(limit_bytes: int):
    """Man pages up to a third of the cap (rendering is the slow part: 4 at a time), then the Python
    documentation, then the Linux kernel's."""
    from concurrent.futures import ThreadPoolExecutor
    pages = [p for sec in ("1", "5", "7", "8") for p in sorted(Path(f"/usr/share/man/man{sec}").glob(f"*.{sec}*"))]
    size = 0
    with ThreadPoolExecutor(4) as pool:
        for text in pool.map(_man, pages[: 4000]):
            for c in _chunks(text):
                size += len(c)
                yield c
            if size >= limit_bytes // 3:
                break
    for f in sorted(Path("/usr/share/doc/python3.11/html").rglob("*.html")):
        if "_static" not in f.parts and "genindex" not in f.name:
            yield from _chunks(_html_text(_read(f)))
    for f in sorted(Path("/usr/share/doc/linux-doc-6.1/Documentation").rglob("*.rst.gz")):
        yield from _chunks(_read_gz(f))


def _man(p: Path) -> str:
    try:
        return subprocess.run(f"man -l {_q(p)} 2>/dev/null | col -b", shell=True, capture_output=True, text=True,
                              timeout=20, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _read_gz(p: Path) -> str:
    import gzip
    try:
        return gzip.decompress(p.read_bytes()).decode("utf-8", "replace")
    except (OSError, EOFError):
        return ""


def _html_text(html: str) -> str:
    """The text of a Sphinx page's `div.body` (navigation, scripts and styles dropped), a paragraph per block."""
    from html.parser import HTMLParser

    class Text(HTMLParser):
        BLOCK = {"p", "div", "section", "pre", "li", "dt", "dd", "h1", "h2", "h3", "h4", "tr", "table", "br"}

        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.parts, self.divs, self.body_at, self.in_script = [], 0, None, False

        def handle_starttag(self, tag, attrs):
            cls = (dict(attrs).get("class") or "").split()
            if tag in ("script", "style"):
                self.in_script = True
            if tag == "div":
                self.divs += 1
                if self.body_at is None and "body" in cls:
                    self.body_at = self.divs  # the page's text: read up to its own closing tag
            if tag in self.BLOCK:
                self.parts.append("\n\n" if tag in ("p", "pre", "section", "h1", "h2", "h3", "h4") else "\n")

        def handle_endtag(self, tag):
            if tag in ("script", "style"):
                self.in_script = False
            if tag == "div":
                if self.body_at == self.divs:
                    self.body_at = None
                self.divs -= 1

        def handle_data(self, d):
            if self.body_at is not None and not self.in_script:
                self.parts.append(d)

    t = Text()
    t.feed(html)
    return "".join(t.parts)


def _q(p: Path) -> str:
    return "'" + str(p).replace("'", "'\\''") + "'"


def quotes() -> list[str]:
    files = sorted(p for p in Path("/usr/share/games/fortunes").glob("*") if p.is_file() and "." not in p.name)
    return [q.strip() for f in files for q in _read(f).split("\n%\n") if len(q.strip()) > 20]


def build(out: Path, *, max_bytes: int = MAX_BYTES, force: bool = False) -> Path:
    """`xpertctl corpus build`: out/{train,val,test}/{domain}.txt + manifest.json."""
    from .io.writer import atomic_path, check_output
    check_output(out, force, marker="manifest.json")
    sources = {"legal": legal, "scripture": scripture, "lexicon": lexicon, "code": code,
               "manuals": lambda: manuals(max_bytes), "quotes": quotes}
    manifest = {"domains": {}, "doc_chars": DOC_CHARS, "max_bytes": max_bytes}
    with atomic_path(Path(out), force, marker="manifest.json") as tmp, progress() as bar:
        task = bar.add_task("corpus", total=len(sources), info="")
        for s in data.SPLITS:
            (tmp / s).mkdir(parents=True)
        for name, fn in sources.items():
            bar.update(task, info=name)
            seen, docs, size = set(), [], 0
            for d in fn():
                d = _clean(d)
                key = hashlib.sha256(re.sub(r"\s+", " ", d).lower().encode()).digest()
                if len(d) < 40 or key in seen:
                    continue
                seen.add(key)
                docs.append(d)
                size += len(d.encode())
                if size >= max_bytes:
                    break
            if not docs:
                notice(f"domain {name}: no text found (is its Debian package installed? see `make corpus`)")
                continue
            parts = {s: [d for d in docs if data.split_of(d) == s] for s in data.SPLITS}
            for s, ds in parts.items():
                (tmp / s / f"{name}.txt").write_text("\n\n".join(ds) + "\n")
            manifest["domains"][name] = {s: {"documents": len(ds), "bytes": sum(len(d.encode()) for d in ds)}
                                         for s, ds in parts.items()}
            bar.advance(task)
        if len(manifest["domains"]) < 2:
            raise XpertError("corpus: fewer than 2 domains found; install the packages: apt-get install "
                             + " ".join(PACKAGES))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out)


def train_tokenizer(corpus: Path, out: Path, *, vocab_size: int = 4096, force: bool = False) -> Path:
    """`xpertctl corpus tokenizer`: byte-level BPE on the train split, saved as an HF tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from .io.writer import atomic_path, check_output
    corpus = Path(corpus)
    files = sorted((corpus / "train").glob("*.txt"))
    if not files:
        raise XpertError(f"{corpus}: no train/*.txt (build it with `xpertctl corpus build`)")
    check_output(out, force, [corpus], marker="tokenizer.json")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    docs = [d for f in files for d in f.read_text().split("\n\n")]
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>")
    with atomic_path(Path(out), force, marker="tokenizer.json") as tmp:
        fast.save_pretrained(tmp)
    return Path(out)


def cloze(corpus: Path, out: Path, *, per_domain: int = 50, choices: int = 4, context_words: int = 24,
          continuation_words: int = 8, seed: int = 0, force: bool = False) -> Path:
    """`xpertctl corpus cloze`: a multiple-choice task from the held-out *test* split only.

    Each item: the first `context_words` words of a passage, its real next `continuation_words`
    words, and distractors: same-length continuations from other passages of the same domain."""
    import random
    from .io.writer import atomic_path, check_output
    files = data.corpus_domains(corpus)
    check_output(out, force, [Path(corpus)])
    rng = random.Random(seed)
    items = []
    for name, parts in files.items():
        words = [d.split() for d in data.read_documents(parts["test"])] if parts["test"].stat().st_size else []
        pool = [w for w in words if len(w) >= context_words + continuation_words]
        if len(pool) < choices:
            continue
        picks = rng.sample(range(len(pool)), min(per_domain, len(pool)))
        for i in picks:
            w = pool[i]
            start = rng.randrange(0, len(w) - context_words - continuation_words + 1)
            ctx = " ".join(w[start: start + context_words])
            # choices without a leading space: eval joins them with --target-delimiter " " (the harness's way)
            real = " ".join(w[start + context_words: start + context_words + continuation_words])
            others = [j for j in range(len(pool)) if j != i]
            distract = []
            for j in rng.sample(others, len(others)):
                v = pool[j]
                s = rng.randrange(0, len(v) - continuation_words + 1)
                cand = " ".join(v[s: s + continuation_words])
                if cand != real and cand not in distract:
                    distract.append(cand)
                if len(distract) == choices - 1:
                    break
            label = rng.randrange(choices)
            opts = distract[:label] + [real] + distract[label:]
            items.append({"domain": name, "context": ctx, "choices": opts, "label": label})
    if not items:
        raise XpertError(f"{corpus}: the test split has too little text for a cloze task")
    with atomic_path(Path(out), force) as tmp:
        tmp.write_text("".join(json.dumps(x) + "\n" for x in items))
    return Path(out)


def _shuffles(words: list[str], n: int, rng, tries: int = 50) -> list[str] | None:
    """n distinct reorderings of `words`, each different (as text) from the original; None if too few exist."""
    real, out = " ".join(words), []
    for _ in range(tries):
        w = list(words)
        rng.shuffle(w)
        s = " ".join(w)
        if s != real and s not in out:
            out.append(s)
            if len(out) == n:
                return out
    return None


def order(corpus: Path, out: Path, *, per_domain: int = 175, choices: int = 4, context_words: int = 24,
          continuation_words: int = 8, seed: int = 0, force: bool = False) -> Path:
    """`xpertctl corpus order`: a word-order multiple-choice task from the held-out *test* split only.

    Each item: `context_words` words of a passage, then its real next `continuation_words` words
    against `choices - 1` shuffled orders of the same words (so every choice has the same words and
    length: only the order tells them apart, which a model that learned the domain's syntax can do).
    Windows do not overlap; they are drawn at random (seeded) from every test document of a domain."""
    import random
    from .io.writer import atomic_path, check_output
    if choices < 2 or context_words < 1 or continuation_words < 2 or per_domain < 1:
        raise XpertError("corpus order: needs --choices >= 2, --per-domain >= 1, context >= 1 and continuation >= 2 words")
    files = data.corpus_domains(corpus)
    check_output(out, force, [Path(corpus)])
    rng = random.Random(seed)
    span = context_words + continuation_words
    items = []
    for name, parts in files.items():
        docs = data.read_documents(parts["test"]) if parts["test"].stat().st_size else []
        windows = [w[s: s + span] for w in (d.split() for d in docs) for s in range(0, len(w) - span + 1, span)]
        made = 0
        for i in rng.sample(range(len(windows)), len(windows)):
            w = windows[i]
            real = w[context_words:]
            wrong = _shuffles(real, choices - 1, rng)
            if wrong is None:
                continue
            label = rng.randrange(choices)
            # choices without a leading space: eval joins them with --target-delimiter " " (the harness's way)
            items.append({"domain": name, "context": " ".join(w[:context_words]),
                          "choices": wrong[:label] + [" ".join(real)] + wrong[label:], "label": label})
            made += 1
            if made == per_domain:
                break
    if not items:
        raise XpertError(f"{corpus}: the test split has too little text for a word-order task")
    with atomic_path(Path(out), force) as tmp:
        tmp.write_text("".join(json.dumps(x) + "\n" for x in items))
    return Path(out)


# ---- an instruction set from the corpus's own text (the demo's stand-in for the paper's Dolly SFT) ----

SFT_SOURCES = ("lexicon", "manuals", "scripture")
SFT_MAX_WORDS = 30  # responses are cut to this many words: short answers that a tiny model can be scored on


def _words(text: str, n: int = SFT_MAX_WORDS) -> str:
    return " ".join(text.split()[:n])


def sft_records(domain: str, doc: str) -> list[dict]:
    """Instruction records made from one corpus document of `domain` (none for other domains).

    lexicon: "gloss: definition" lines -> define the word; manuals: the NAME line (`cmd - what it does`)
    and option entries (an option line, then its indented description) -> what the command/option does,
    answered with the description's first sentence; scripture: a verse of 12+ words -> its second half
    given the first."""
    recs = []
    if domain == "lexicon":
        for line in doc.splitlines():
            word, sep, gloss = line.partition(": ")
            gloss = gloss.split('; "')[0].strip()  # WordNet example sentences follow the definition
            if sep and word.strip() and len(gloss.split()) >= 2:
                recs.append({"instruction": f'Define the word "{word.strip()}".', "response": _words(gloss)})
    elif domain == "manuals":
        lines = doc.splitlines()
        for n, line in enumerate(lines):
            if line.strip() == "NAME" and n + 1 < len(lines):
                name, sep, what = lines[n + 1].strip().partition(" - ")
                if sep and name and len(what.split()) >= 2:
                    recs.append({"instruction": f"What does the command `{name.strip()}` do?",
                                 "response": _words(what)})
            elif re.match(r"^-{1,2}[A-Za-z0-9]", line) and n + 1 < len(lines) and lines[n + 1].startswith("       ") \
                    and not lines[n + 1].strip().startswith("-"):
                desc = []
                for nxt in lines[n + 1:]:
                    if not nxt.startswith("       ") or nxt.strip().startswith("-"):
                        break
                    desc.append(nxt.strip())
                first = re.split(r"(?<=\.)\s", " ".join(desc), maxsplit=1)[0]
                if len(first.split()) >= 3:
                    recs.append({"instruction": f"What does the option `{line.strip()}` do?", "response": _words(first)})
    elif domain == "scripture":
        for verse in doc.splitlines():
            w = verse.split()
            if len(w) >= 12:
                half = len(w) // 2
                recs.append({"instruction": "Continue this verse from the King James Bible.",
                             "context": " ".join(w[:half]), "response": _words(" ".join(w[half:]))})
    return [{**r, "domain": domain} for r in recs]


def sft(corpus: Path, out: Path, *, max_train: int = 3000, max_test: int = 100, seed: int = 0,
        force: bool = False) -> Path:
    """`xpertctl corpus sft`: out/train.jsonl and out/test.jsonl of instruction records made from the
    corpus's train and test documents (so train and test are split by document hash, as the corpus is),
    at most `max_train` / `max_test` per source domain, drawn at random (seeded) in a fixed order."""
    import random
    from .io.writer import atomic_path, check_output
    if max_train < 1 or max_test < 1:
        raise XpertError(f"corpus sft: --max-train and --max-test must be >= 1, got {max_train} and {max_test}")
    files = data.corpus_domains(corpus)
    check_output(out, force, [Path(corpus)])
    have = [d for d in SFT_SOURCES if d in files]
    if not have:
        raise XpertError(f"{corpus}: none of the domains an instruction set is made from ({', '.join(SFT_SOURCES)})")
    rng = random.Random(seed)
    split_recs = {}
    for split, cap in (("train", max_train), ("test", max_test)):
        recs = []
        for d in have:
            p = files[d][split]
            mine = [r for doc in (data.read_documents(p) if p.stat().st_size else []) for r in sft_records(d, doc)]
            recs += [mine[i] for i in sorted(rng.sample(range(len(mine)), min(cap, len(mine))))]
        if not recs:
            raise XpertError(f"{corpus}: its {split} split yields no instruction records")
        split_recs[split] = recs
    with atomic_path(Path(out), force) as tmp:
        tmp.mkdir()
        for split, recs in split_recs.items():
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return Path(out)
