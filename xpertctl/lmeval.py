"""`--task lmeval:TASKS`: lm-evaluation-harness itself on the loaded model, its results merged into
results.json. An optional extra (`pip install 'xpertctl[lmeval]'`): imported only when asked for.

TASKS is a comma-separated list of harness task names (boolq, hellaswag, mmlu, piqa, winogrande,
medmcqa, ...) and/or task YAML files (their directory is added to the harness's include path; the
task name is the file's `task:` field), so local datasets work offline."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from . import losses
from .errors import XpertError
from .io import provenance

EXTRA = "pip install 'xpertctl[lmeval]'"


@contextmanager
def _quiet(*names: str):
    """Loggers of the download stack at ERROR for the block: a failure becomes our one line, not theirs."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def require() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise XpertError(f"--task lmeval:...: needs lm-evaluation-harness, which is not installed ({EXTRA})") from None


def parse(arg: str) -> tuple[list[str], list[str], str | None, bool]:
    """(task names, include directories, fingerprint of the task files, whether a registry name is used)."""
    import yaml
    names, includes, blobs, registry = [], [], [], False
    for entry in (e.strip() for e in arg.split(",")):
        if not entry:
            continue
        p = Path(entry)
        if p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise XpertError(f"--task lmeval:{arg}: {p}: no such task file")
            try:
                doc = yaml.safe_load(p.read_text())
            except yaml.YAMLError:
                # harness YAMLs may use tags such as !function: fall back to a plain scan
                doc = {"task": next((l.split(":", 1)[1].strip() for l in p.read_text().splitlines()
                                     if l.startswith("task:")), None)}
            name = doc.get("task") if isinstance(doc, dict) else None
            if not isinstance(name, str) or not name:
                raise XpertError(f"--task lmeval:{arg}: {p}: no 'task:' name in the task file")
            names.append(name)
            includes.append(str(p.resolve().parent))
            blobs.append(p.read_bytes())
        else:
            names.append(entry)
            registry = True
    if not names:
        raise XpertError(f"--task lmeval:{arg}: no task named")
    return names, sorted(set(includes)), provenance.sha256(b"".join(blobs)) if blobs else None, registry


def chunked_hflm(HFLM):
    """The harness's HFLM whose log-likelihood requests are scored by losses.continuation_scores: the same
    requests, order, left truncation and (log-likelihood, is-greedy) answers, but from the final hidden
    states chunk by chunk instead of a [batch, window, vocab] log-softmax. (The harness's one-token
    continuation cache only saved forward passes; generation is the harness's own.)"""
    from lm_eval.models.utils import Collator

    class ChunkedHFLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            bs = override_bs or self.batch_size
            if self.backend != "causal" or not isinstance(bs, int):  # seq2seq, or batch size "auto"
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            re_ord = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
            res = []
            for chunk in re_ord.get_batched(n=bs):
                # as the harness: (context + continuation)[-(max_length + 1):], the continuation scored
                seqs = [((ctx + cont)[-(self.max_length + 1):], len(cont)) for _, ctx, cont in chunk]
                for (key, _, _), answer in zip(chunk, losses.continuation_scores(self.model, seqs, self.device)):
                    res.append(answer)
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
            return re_ord.get_original(res)

    return ChunkedHFLM


def evaluate(model, tok, arg: str, *, device: str = "cpu", batch_size: int = 8, seed: int = 0,
             max_length: int | None = None) -> dict:
    """{task: {metric: value, ..., "n": samples}, "lm_eval": version} for the already loaded model."""
    require()
    names, includes, fp, registry = parse(arg)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices are not ours to print
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    # indexing the harness's own ~200 task folders takes seconds: only when a task is named from it
    tm = TaskManager(include_path=includes or None, include_defaults=registry)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise XpertError(f"--task lmeval:{arg}: unknown task {unknown[0]!r} (not a harness task, nor in a given task file)")
    kw = {"max_length": max_length} if max_length else {}
    lm = chunked_hflm(HFLM)(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device, **kw)
    try:
        with _quiet("huggingface_hub", "datasets", "fsspec", "urllib3"):  # offline: no HEAD/retry lines first
            res = simple_evaluate(model=lm, tasks=names, task_manager=tm, log_samples=False, random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except (OSError, ValueError) as e:  # datasets: ConnectionError / FileNotFoundError / DatasetNotFoundError
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise XpertError(f"--task lmeval:{arg}: dataset not available ({e.__class__.__name__}: {first})") from None
    except (TypeError, KeyError, AttributeError) as e:
        if not includes:  # the harness's own tasks: a bug, not the user's input
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]  # a task file missing a field (e.g. dataset_path)
        raise XpertError(f"--task lmeval:{arg}: the harness could not build a task from the given file(s) "
                         f"({e.__class__.__name__}: {first}); check its fields (dataset_path, ...)") from None
    out: dict = {}
    for task, metrics in res["results"].items():
        row = {}
        for k, v in metrics.items():
            if k in ("alias", "name", "sample_len"):
                continue
            metric, _, filt = k.partition(",")
            key = metric if filt in ("", "none") else f"{metric},{filt}"
            row[key] = None if v == "N/A" else v
        n = res.get("n-samples", {}).get(task, {})
        row["n"] = n.get("effective") if isinstance(n, dict) else None
        row["version"] = res.get("versions", {}).get(task)
        out[task] = row
    out["lm_eval"] = getattr(lm_eval, "__version__", None)
    out["fingerprint"] = fp
    return out
