"""The adapters: one per command, each parses nothing, imports its op inside (so `xpertctl --help` stays
fast), calls it with the values the declaration bound, and returns what the CLI prints (the output path,
or a summary). `ops_table.COMMANDS` names which adapter each command calls.
"""
from __future__ import annotations

from .errors import XpertError
from .specs import int_list

def _target(spec, layers, hidden, ffn, heads, required=True):
    from .specs import parse_target
    if spec is None and layers is None and not required:
        return None
    return parse_target(spec, layers, hidden, ffn, heads)


# ---- adapters: parse nothing, call one op, return what the CLI prints --------------------------------

def _summary(info: dict, as_json: bool, console: str = "err"):
    """A summary: returned as JSON for stdout with --json, else tables on stderr (inspect: stdout)."""
    import json
    from . import console as c
    if as_json:
        return json.dumps(info, indent=2)
    for t in c.summary_tables(info):
        getattr(c, console).print(t)
    return info.get("path")


def _inspect(src, as_json):
    from . import summaries
    info = summaries.describe(src)
    if as_json:
        return _summary(info, True)
    _summary(info, False, "out")  # the tables are inspect's output: stdout


def _families(as_json):
    from dataclasses import asdict
    from .io import arch
    rows = [{**asdict(f), "expert_keys": list(arch.expert_keys(f)) if f.moe else [],
             "router": arch.router_key(f, False) if f.moe else None} for f in arch.FAMILIES]
    if as_json:
        import json
        return json.dumps(rows, indent=2)
    from .console import families_table, out
    out.print(families_table(rows))


def _stats(src, domain, out, tokenizer, max_tokens, seq_len, batch_size, device, dtype, top_k, neuron_top, stream_layers,
           stream_tokens, seed, text_field, as_json, force):
    from . import summaries
    from .ops import stats as op
    path = op.run(src, domain, out, tokenizer=tokenizer, max_tokens=max_tokens, seq_len=seq_len,
                  batch_size=batch_size, device=device, dtype=dtype, top_k=top_k, stream_layers=stream_layers,
                  stream_tokens=stream_tokens, seed=seed, text_field=text_field, neuron_top=neuron_top, force=force)
    return _summary(summaries.stats(path), as_json)


def _select(stats_file, out, criterion, per_layer, seed, plot, plot_layers, show, as_json, force):
    from .ops import select as op
    if out is None and not show and plot is None and not as_json:
        raise XpertError("select: give -o FILE, --plot FILE, --show or --json")
    doc, path = op.run(stats_file, out, criterion=criterion, per_layer=per_layer, seed=seed, plot_path=plot,
                       plot_layers=int_list(plot_layers, "--plot-layers"), force=force)
    if show:
        from .console import err, selection_table
        err.print(selection_table(doc))
    if as_json:
        from . import summaries
        return _summary(summaries.selection(doc, path), True)
    return path if path is not None else plot


def _decompose(src, selection, out, ranks, align, align_sweeps, weighting, no_tucker, as_json, force):
    from . import summaries
    from .ops import decompose as op
    path = op.run(src, selection, out, ranks=ranks, align_neurons=align, align_sweeps=align_sweeps, weighting=weighting,
                  no_tucker=no_tucker, force=force)
    return _summary(summaries.factors(path), as_json)


def _reshape(factors, target, out, layers, hidden, ffn, layer_map, combine, rescale, shared, width_select, width_rule,
             force):
    from .ops import reshape as op
    return op.run(factors, _target(target, layers, hidden, ffn, None), out, layer_map_how=layer_map,
                  combine=combine, width_select=width_select, rescale=rescale, shared=shared, width_rule=width_rule,
                  force=force)


def _graft(src, out, target, layers, hidden, ffn, heads, like, tokenizer, stats_file, selection, criterion, per_layer, ranks,
           align, align_sweeps, weighting, no_tucker, layer_map, combine, rescale, shared, width_select, width_rule, fit, calibration,
           calibration_tokens, ridge, holdout, ridge_select, fit_weighting, fit_steps, text_field, stream_layers, seq_len, device, arch, inherit, ffn_init, learngene, up_gain, final_norm, scale_like, out_init, dtype, seed,
           shard_size, force):
    from .io import parse_size
    from .ops import graft as op
    target = _target(target, layers, hidden, ffn, heads, required=False)
    heads = target.heads if target is not None else heads  # h of --target, or --heads
    return op.run(src, out, target=target, like=like, tokenizer=tokenizer,
                  stats=stats_file, selection=selection, criterion=criterion, per_layer=per_layer, ranks=ranks,
                  align_neurons=align, align_sweeps=align_sweeps, weighting=weighting, no_tucker=no_tucker,
                  layer_map_how=layer_map, combine=combine, rescale=rescale, shared=shared, fit=fit, calibration=calibration,
                  calibration_tokens=calibration_tokens, ridge=ridge, holdout=holdout, ridge_select=ridge_select,
                  fit_weighting=fit_weighting,
                  fit_steps=fit_steps, text_field=text_field, stream_layers=stream_layers,
                  seq_len=seq_len, device=device, width_select=width_select, width_rule=width_rule, heads=heads, arch=arch, dtype=dtype, inherit=inherit,
                  ffn_init=ffn_init, learngene=learngene, up_gain=up_gain, final_norm=final_norm, scale_like=scale_like, out_init=out_init, seed=seed, shard_size=parse_size(shard_size),
                  force=force)


def _fidelity(src, student, domain, out, tokenizer, max_tokens, seq_len, batch_size, device, dtype, stream_layers,
              stream_tokens, seed, text_field, force):
    from .ops import fidelity as op
    return op.run(src, student, domain, out, tokenizer=tokenizer, max_tokens=max_tokens, seq_len=seq_len,
                  batch_size=batch_size, device=device, dtype=dtype, stream_layers=stream_layers,
                  stream_tokens=stream_tokens, seed=seed, text_field=text_field, force=force)


def _tokenize(tokenizer, domain, corpus, out, val_pct, test_pct, workers, text_field, force):
    from . import data
    return data.tokenize(tokenizer, domain or [], out, val_pct=val_pct, test_pct=test_pct, corpus=corpus,
                         workers=workers, text_field=text_field, force=force)


def _train(ckpt, out, data_dir, sft, resume, force, threads, compile, **cfg):  # the rest: TrainConfig fields
    from .errors import Interrupted
    from .io.writer import check_output
    from .train import TrainConfig, interrupted_note, train as op
    # the output rule: train replaces (--force) or continues (--resume auto) only a run directory
    check_output(out, True, [ckpt, data_dir, sft, cfg.get("teacher")], marker="metrics.jsonl", make_parents=True)
    if cfg.get("teacher") is not None:
        cfg["teacher"] = str(cfg["teacher"])
    try:
        return op(ckpt, out, TrainConfig(**cfg), data_dir=data_dir, sft=sft, resume=resume, force=force,
                  threads=threads, compile=compile)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_note(out)) from None


def _learngene(src, out, data_dir, layers, hidden, ffn, heads, depth_scale, threads, force, **cfg):
    from .ops import learngene_train as op
    from .train import TrainConfig
    return op.run(src, data_dir, out, TrainConfig(**cfg), layers=layers, hidden=hidden, ffn=ffn, heads=heads,
                  depth_scale=depth_scale, threads=threads, force=force)


def _eval(ckpt, task, out, split, max_tokens, seq_len, max_new_tokens, device, seed, target_delimiter, text_field, force):
    import json
    from .console import err, results_table
    from .eval import run as op
    doc, path = op(ckpt, task, out, seq_len=seq_len, device=device, max_new_tokens=max_new_tokens, seed=seed,
                   split=split, max_tokens=max_tokens, target_delimiter=target_delimiter, text_field=text_field,
                   force=force)
    err.print(results_table(doc))
    return path if path is not None else json.dumps(doc["tasks"], indent=2)


def _corpus_build(out, max_bytes, force):
    from .corpus import build
    return build(out, max_bytes=max_bytes, force=force)


def _corpus_tokenizer(corpus, out, vocab_size, force):
    from .corpus import train_tokenizer
    return train_tokenizer(corpus, out, vocab_size=vocab_size, force=force)


def _corpus_cloze(corpus, out, per_domain, choices, seed, force):
    from .corpus import cloze
    return cloze(corpus, out, per_domain=per_domain, choices=choices, seed=seed, force=force)


def _corpus_order(corpus, out, per_domain, choices, context_words, continuation_words, seed, force):
    from .corpus import order
    return order(corpus, out, per_domain=per_domain, choices=choices, context_words=context_words,
                 continuation_words=continuation_words, seed=seed, force=force)


def _corpus_sft(corpus, out, max_train, max_test, seed, force):
    from .corpus import sft
    return sft(corpus, out, max_train=max_train, max_test=max_test, seed=seed, force=force)


def _init(family, out, tokenizer, layers, hidden, ffn, heads, kv_heads, experts, top_k, max_positions, seed, force):
    from .ops import init as op
    return op.run(family, out, tokenizer=tokenizer, layers=layers, hidden=hidden, ffn=ffn, heads=heads,
                  kv_heads=kv_heads, experts=experts, top_k=top_k, max_positions=max_positions, seed=seed, force=force)


def _tune(arm, out, title, force):
    from .tune import build
    return build(arm, out, title=title, force=force)


def _fetch(name, out, dtype, wheel, cache_dir, force):
    from . import fetch as op
    return op.run(name, out, dtype=dtype, wheel=wheel, cache_dir=cache_dir, force=force)


def _report(results, out, baseline, teacher, stats_file, selection, fidelity, primary, contrast, notes, title, budget,
            tuning, sft, force):
    from .report import build
    return build(results, out, baseline=baseline, teacher=teacher, stats=stats_file, selection=selection,
                 fidelity=fidelity, primary=primary, contrasts=contrast, notes=notes, title=title, budgets=budget,
                 tuning=tuning, sft=sft, force=force)


def _run(recipe, set_, dry_run, only, profile, resolved, jobs, *, table):
    """`table`: the commands a recipe's steps may name (ops_table passes its own)."""
    from . import recipe as runner
    if resolved:
        return runner.resolved(recipe, set_ or [], profile, table=table)
    return runner.run(recipe, set_ or [], dry_run=dry_run, only=only, profile=profile, jobs=jobs, table=table)
