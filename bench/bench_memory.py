"""Peak RSS of `xpertctl eval --task ppl:` and `xpertctl train` against the vocabulary and the window:
a 2-layer, 64-wide Llama (transformers' LlamaForCausalLM + save_pretrained) at two vocabularies, with a
word-level tokenizer covering every row of its vocabulary, and text that uses all of it.

    python bench/bench_memory.py BUILD [--before SRC_DIR] [--vocabs 2048,50304] [--windows 512,2048]
                                       [--train-windows 512,1024] [--max-tokens 40000]

Each figure is one command in its own child process: its peak RSS (the kernel's ru_maxrss from wait4,
not a poll), wall and CPU time. `--before SRC_DIR` also runs every command from another xpertctl source tree
(e.g. `git archive` of main before the chunked loss) in the same way. Memory that grows with
vocabulary x window is a bug: logits are computed chunk by chunk from the final hidden states.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2 ** 30
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]

# run xpertctl from a given source tree, never the editable install's
RUNNER = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]; "
          "sys.path.insert(0, sys.argv.pop(1)); from xpertctl.cli import main; sys.argv[0] = 'xpertctl'; main()")


def make_model(out: Path, vocab: int, max_pos: int = 4096) -> Path:
    """LlamaForCausalLM, 2 layers, hidden 64, and a word-level tokenizer whose vocabulary is exactly `vocab`."""
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_pos,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp)
    words = {w: i for i, w in enumerate(SPECIAL + [f"w{k}" for k in range(vocab - len(SPECIAL))])}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.Fuse()  # never used for scoring; decode joins without spaces, harmless here
    tf.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>").save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def make_text(out: Path, vocab: int, tokens: int = 60_000, doc_words: int = 1500) -> Path:
    """Documents of random words drawn from the whole vocabulary (every logit row is a real target)."""
    if out.is_file():
        return out
    rng = np.random.default_rng(vocab)
    ids = rng.integers(0, vocab - len(SPECIAL), size=tokens)
    docs = [" ".join(f"w{k}" for k in ids[a: a + doc_words]) for a in range(0, tokens, doc_words)]
    out.write_text("\n\n".join(docs) + "\n")
    return out


def run(src: Path, args: list[str]) -> dict:
    """One xpertctl command from source tree `src`: peak RSS of its process (wait4's ru_maxrss), wall time and
    CPU time (user + system: on a shared machine the steadier figure)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", RUNNER, str(src), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    out, err = p.stdout.read().decode(), p.stderr.read().decode()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{' '.join(args)} ({src}):\n{err[-2000:]}")
    return {"peak_rss_gib": ru.ru_maxrss * 1024 / GIB, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("build", type=Path)
    ap.add_argument("--before", type=Path, help="another xpertctl source tree to measure the same way")
    ap.add_argument("--vocabs", default="2048,50304")
    ap.add_argument("--windows", default="512,2048", help="eval --seq-len values")
    ap.add_argument("--train-windows", default="512,1024", help="train --seq-len values (batch 8)")
    ap.add_argument("--max-tokens", type=int, default=40_000)
    ap.add_argument("--train-steps", type=int, default=2)
    a = ap.parse_args()
    build = a.build
    build.mkdir(parents=True, exist_ok=True)
    from xpertctl import data
    trees = {"after": ROOT} | ({"before": a.before} if a.before else {})
    rows = []
    for vocab in (int(v) for v in a.vocabs.split(",")):
        model = make_model(build / f"llama-2L-64-v{vocab}", vocab)
        text = make_text(build / f"text-v{vocab}.txt", vocab)
        tok_data = build / f"data-v{vocab}"
        if not (tok_data / data.MANIFEST).is_file():
            data.tokenize(model, [f"all={text}"], tok_data, val_pct=10, test_pct=0)
        jobs = [("eval", w, ["eval", str(model), "--task", f"ppl:{text}", "--seq-len", str(w), "--max-tokens",
                             str(a.max_tokens)]) for w in (int(x) for x in a.windows.split(","))]
        jobs += [("train", w, ["train", str(model), "--data", str(tok_data), "--steps", str(a.train_steps),
                               "--batch-size", "8", "--seq-len", str(w), "--eval-every", "0"])
                 for w in (int(x) for x in a.train_windows.split(","))]
        for cmd, w, args in jobs:
            row = {"command": cmd, "vocab": vocab, "window": w}
            for name, src in trees.items():
                out = build / f"out-{name}-{cmd}-v{vocab}-w{w}"
                shutil.rmtree(out, ignore_errors=True)
                out.unlink(missing_ok=True)
                r = run(src, args + ["-o", str(out) + (".json" if cmd == "eval" else ""), "--force"])
                row[name] = r
                print(f"{cmd:5s} vocab {vocab:6d} window {w:5d} {name:6s}: peak RSS {r['peak_rss_gib']:6.2f} GiB, "
                      f"{r['wall_s']:6.1f} s wall, {r['cpu_s']:6.1f} s CPU", flush=True)
            rows.append(row)
    print()
    head = "| command | vocab | window | " + " | ".join(f"{n} peak RSS (GiB) | {n} CPU (s)" for n in trees) + " |"
    print(head)
    print("|" + "---|" * (3 + 2 * len(trees)))
    for r in rows:
        print(f"| {r['command']} | {r['vocab']:,} | {r['window']:,} | " + " | ".join(
            f"{r[n]['peak_rss_gib']:.2f} | {r[n]['cpu_s']:.1f}" for n in trees) + " |")
    (build / "bench_memory.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
