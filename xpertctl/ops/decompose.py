"""XPERT step 2: stack each layer's selected experts per matrix and Tucker-decompose the stack."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..console import progress
from ..errors import XpertError
from ..io import open_checkpoint, provenance, write_safetensors
from ..io.checkpoint import Checkpoint
from . import select as sel
from ..specs import WEIGHTINGS
from .tucker import DEFAULT_RANKS, expert_factor, parse_ranks, resolve, tucker, tucker_given_experts

MATRICES = ("gate", "up", "down")


def _features(e: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One row per hidden neuron: its gate row, up row and down column together (float32)."""
    g, u, d = e
    return torch.cat([g.float(), u.float(), d.float().T], dim=1)


def _match(target: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """The permutation p maximizing sum_i <target_i, feat_p(i)> (weight matching, as in Git Re-Basin)."""
    rows, cols = linear_sum_assignment((target @ feat.T).double().numpy(), maximize=True)
    p = torch.tensor(cols[np.argsort(rows)], dtype=torch.long)
    _release_free_memory()
    return p


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim; nothing elsewhere).

    Each match allocates and frees tens of MiB (features, scores, scipy's copy). glibc raises its mmap
    threshold after such frees, so later blocks come from the heap, where small live objects pin the
    freed space: without a trim, aligning 64 OLMoE experts grew the heap by ~20 MiB per match (1.4 GiB
    over one pass), with it the RSS stays flat. About a millisecond per call."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        import ctypes
        lib = ctypes.CDLL("libc.so.6")
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def align(experts: list[tuple[torch.Tensor, ...]], weights: torch.Tensor | None = None,
          sweeps: int = 0) -> tuple[list[tuple[torch.Tensor, ...]], list[torch.Tensor]]:
    """The experts with their hidden neurons permuted by align_perms, and the permutations."""
    perms = align_perms(experts, weights, sweeps)
    return [permute(e, p) for e, p in zip(experts, perms)], perms


def permute(e: tuple[torch.Tensor, ...], p: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """An expert's neurons in the order p: gate rows, up rows and down columns together."""
    g, u, d = e
    return g[p], u[p], d[:, p]


def matrix(e: tuple[torch.Tensor, ...], k: int, p: torch.Tensor | None = None) -> torch.Tensor:
    """Matrix k (0 gate, 1 up, 2 down) of one expert in float32, its neurons in the order p."""
    x = e[k] if p is None else (e[k][p] if k < 2 else e[k][:, p])
    return x.float().contiguous()


SWEEP_MAX_EXPERTS = 16


def align_perms(experts: list[tuple[torch.Tensor, ...]], weights: torch.Tensor | None = None,
                sweeps: int = 0) -> list[torch.Tensor]:
    """Permutations of each expert's hidden neurons so neuron i means the same thing in every expert.

    Two experts' neuron i are unrelated until aligned (any permutation of an expert's neurons computes
    the same function). The reference is the most-used expert (largest weight; the first on ties),
    which keeps its order; every other expert is matched to it, then (opt-in, `--align-sweeps`) up to
    `sweeps` times to the usage-weighted sum of the others as aligned so far (iterated matching to the
    running mean, as in MC-SMoE / ZipIt-style merging), so no single pair decides for all. The sweeps
    are off by default: two of them tripled the matchings (23 instead of 7 per OLMoE layer of 8
    experts, 129 vs 57 s CPU for a 12-layer graft) for 0.004-0.006 of held-out rel_error on the
    teacher (bench/RESULTS.md). A neuron is its gate row, up
    row and down column together: one permutation per expert moves all three. Memory: one running
    sum and one expert's features at a time (64 experts of OLMoE stay well under a GiB); the experts
    themselves are not copied. Time: one assignment per expert and pass (~0.3 s at 1024 neurons), so
    above SWEEP_MAX_EXPERTS experts (a whole 64-expert layer, no selection) only the match to the
    reference runs: the running mean of dozens of experts barely moves, and three passes would
    triple a 64-expert graft's time.
    """
    n = len(experts)
    w = torch.ones(n, dtype=torch.float64) if weights is None else weights.double().clamp_min(0) + 1e-9
    ref = int(torch.argmax(w))
    ref_feat = _features(experts[ref])
    perms = [torch.arange(experts[0][0].shape[0]) for _ in range(n)]
    for j in range(n):
        if j != ref:
            perms[j] = _match(ref_feat, _features(experts[j]))
    if sweeps and 2 < n <= SWEEP_MAX_EXPERTS:
        total = sum(float(w[k]) * _features(experts[k])[perms[k]] for k in range(n))
        for _ in range(sweeps):
            changed = False
            for j in range(n):
                if j == ref:
                    continue
                fj = _features(experts[j])
                p = _match(total - float(w[j]) * fj[perms[j]], fj)  # leave-one-out: the others' weighted sum
                if not torch.equal(p, perms[j]):
                    total += float(w[j]) * (fj[p] - fj[perms[j]])
                    perms[j], changed = p, True
            if not changed:
                break
    return perms


def stacks(experts: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """(gate, up, down) of n experts -> {'gate': (I, H, n), 'up': (I, H, n), 'down': (H, I, n)}."""
    return {m: stack(experts, k) for k, m in enumerate(MATRICES)}


def stack(experts: list[tuple[torch.Tensor, ...]], k: int) -> torch.Tensor:
    """One matrix's stack (d1, d2, n) in float32: built one matrix at a time to bound memory."""
    return torch.stack([e[k].float() for e in experts], dim=-1)


def _expert_gram(x: torch.Tensor) -> torch.Tensor:
    """The n x n Gram of one matrix's stack (d1, d2, n) over its expert mode."""
    xm = x.reshape(-1, x.shape[-1])
    return (xm.T @ xm).double()


def joint_gram(experts: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """The experts' n x n Gram over gate, up and down together: G[j, k] = sum_m <X_mj, X_mk>.

    One expert-mode weighting per layer comes from it, so a neuron's gate row, up row and down column
    are combined with the same weights (per-matrix weightings can take gate from one expert and down
    from another)."""
    n = len(experts)
    g = torch.zeros(n, n, dtype=torch.float64)
    for k in range(3):
        rows, cols = experts[0][k].shape
        step = max(1, GRAM_CHUNK // max(1, n * cols))  # rows per chunk: an [n, step*cols] float32 block
        for r in range(0, rows, step):
            x = torch.stack([e[k][r:r + step].float().reshape(-1) for e in experts])
            g += (x @ x.T).double()
            del x
    return g


GRAM_CHUNK = 1 << 24  # floats per joint_gram block (64 MiB)


def layer_weights(layer_doc: dict) -> torch.Tensor:
    """Each selected expert's weight: its mean activation frequency over domains, normalized."""
    fr = layer_doc.get("freq") or {}
    if fr:
        w = torch.tensor(np.mean([v for v in fr.values()], axis=0), dtype=torch.float32)
    else:
        w = torch.ones(len(layer_doc["experts"]))
    return w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1 / len(w))


def read_layer(ck: Checkpoint, l: dict) -> list[tuple[torch.Tensor, ...]]:
    """The selected experts of one layer, in the checkpoint's dtype, checked finite."""
    return ck.finite_experts(l["layer"], l["experts"])


def mode3_sum(mats, coeffs: list[float]) -> torch.Tensor:
    """sum_j coeffs_j * mats_j in float32, accumulated in order (one matrix in memory at a time)."""
    out = None
    for c, x in zip(coeffs, mats):
        if out is None:
            out = torch.zeros_like(x)
        out.add_(x, alpha=c)
    return out


def collapsible(rank_spec: list, no_tucker: bool, combine: str) -> bool:
    """Whether a layer's combined FFN can be computed straight from the aligned experts: at full ranks
    every Tucker factor is the identity and the core is the stack itself, so `usage`, `uniform` and
    `literal` combinations are a weighted sum of the aligned experts (reshape.expert_mix's weights)."""
    return not no_tucker and list(rank_spec) == ["full", "full", "full"] and combine in ("usage", "uniform", "literal")


def layer_ffn(ck: Checkpoint, l: dict, align_neurons: bool, mix, sweeps: int = 0) -> tuple[tuple[torch.Tensor, ...], dict[str, float]]:
    """The combined (gate, up, down) of one layer at full ranks (see collapsible), and its (zero) errors.

    No stack, no factors: each matrix is the mix(weights)-weighted sum of the aligned experts, built
    from the experts as read (checkpoint dtype) one float32 matrix at a time. The same numbers as
    reshape.combine_layer on layer_factors' output."""
    i = l["layer"]
    experts = read_layer(ck, l)
    w = layer_weights(l)
    perms = align_perms(experts, w, sweeps) if align_neurons else [None] * len(experts)
    a = [float(v) for v in mix(w)]
    ffn = tuple(mode3_sum((matrix(e, k, p) for e, p in zip(experts, perms)), a) for k in range(3))
    return ffn, {f"layers.{i}.{m}": 0.0 for m in MATRICES}


def layer_factors(ck: Checkpoint, l: dict, rank_spec: list, ranks: str | None, align_neurons: bool,
                  no_tucker: bool, weighting: str = "joint", sweeps: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Factors of one selected layer: {'layers.{i}.{m}.core|U1|U2|U3|error'} (or '.mean'), its errors."""
    i, ids = l["layer"], l["experts"]
    experts = read_layer(ck, l)
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    w = layer_weights(l)
    if align_neurons:
        experts, perms = align(experts, w, sweeps)
        tensors[f"layers.{i}.perm"] = torch.stack(perms)
    tensors[f"layers.{i}.experts"] = torch.tensor(ids, dtype=torch.int64)
    tensors[f"layers.{i}.weights"] = w
    for m, x in zip(MATRICES, shared_ffn(ck, i) or ()):  # kept as is, for reshape --shared concat
        tensors[f"layers.{i}.shared.{m}"] = x
    u3 = None
    if not no_tucker and weighting == "joint":  # a full expert mode needs no Gram: its factor is the identity
        u3 = torch.eye(len(ids)) if rank_spec[2] == "full" else expert_factor(joint_gram(experts), rank_spec[2], ranks)
    for k, m in enumerate(MATRICES):
        key = f"layers.{i}.{m}"
        if no_tucker:  # both weightings: reshape's --combine usage takes .mean, --combine uniform .uniform
            tensors[f"{key}.mean"] = mode3_sum((matrix(e, k) for e in experts), w.tolist())
            tensors[f"{key}.uniform"] = mode3_sum((matrix(e, k) for e in experts), [1.0 / len(experts)] * len(experts))
            errors[key] = 0.0
            continue
        x = stack(experts, k)
        r = resolve(rank_spec, tuple(x.shape), ranks)
        if u3 is None and isinstance(rank_spec[2], float):  # per-matrix with an energy fraction: this matrix's own
            u3 = expert_factor(_expert_gram(x), rank_spec[2], ranks)
            per_matrix_u3 = True
        else:
            per_matrix_u3 = False
        if u3 is not None:
            core, (u1, u2, u3m), err = tucker_given_experts(x, r[0], r[1], u3)
        else:
            core, (u1, u2, u3m), err = tucker(x, r)
        del x
        tensors.update({f"{key}.core": core, f"{key}.U1": u1, f"{key}.U2": u2, f"{key}.U3": u3m,
                        f"{key}.error": torch.tensor(err)})
        errors[key] = err
        if per_matrix_u3:
            u3 = None
    return tensors, errors


def routing_masses(ck: Checkpoint, doc: dict) -> tuple[dict | None, dict | None, str | None]:
    """Per selected layer: the block's mean total top-k routing weight per token (`routed_mass`) and the
    part of it the selected experts receive (`selected_mass`, 0 for experts no token was routed to), from the
    stats behind the selection; and why there are none. A block mass of 0 is no mass recorded (a top-k
    softmax always gives some weight: the router returned none), not a mass to scale by. Stats made with `stats --top-k K` other than the model's own k record another
    routing than the one the model runs: their masses are not used (the FFNs stay at the experts' scale)."""
    k_stats, k_model = doc.get("top_k"), ck.top_k
    if doc["layers"] and all("routed_mass" not in l for l in doc["layers"]):
        return None, None, None
    if k_stats is not None and k_model is not None and int(k_stats) != int(k_model):
        return None, None, (f"the selection's stats were counted with top-k {k_stats} but {ck.path} routes with "
                            f"{k_model}: their routing weights are not the model's")
    total = {str(l["layer"]): float(l["routed_mass"]) for l in doc["layers"] if l.get("routed_mass", 0) > 0}
    # a recorded 0 stays: the selected experts never got a token's weight (reshape scales them by 0, as by 1e-6)
    sel = {str(l["layer"]): float(sum(l["routed"])) for l in doc["layers"]
           if str(l["layer"]) in total and l.get("routed")}
    why = None if sel or not total else "the selection records no per-expert routing weights (made by an older " \
        "xpertctl: run select again; --rescale routed uses the whole block's)"
    if why is None and any(l.get("routed_mass") == 0 for l in doc["layers"]):
        why = "their stats record a routing weight of 0: the router returned no weights"
    return total or None, sel or None, why


def shared_ffn(ck: Checkpoint, i: int) -> tuple[torch.Tensor, ...] | None:
    """The shared expert(s) of layer i (Qwen2-MoE `shared_expert`, DeepSeek `shared_experts`: one MLP) in
    float32, or None for families without them."""
    if ck.family.shared is None:
        return None
    return tuple(x.float().contiguous() for x in ck.shared(i))


def factor_meta(ck: Checkpoint, doc: dict, sel_path: Path | str, ranks: str | None, align_neurons: bool,
                no_tucker: bool, errors: dict[str, float], weighting: str = "joint") -> dict:
    routed, selected, why = routing_masses(ck, doc)
    return {
        "method": "mean" if no_tucker else "tucker", "ranks": ranks or DEFAULT_RANKS, "align": align_neurons,
        "weighting": None if no_tucker else weighting,
        "layers": [l["layer"] for l in doc["layers"]], "errors": errors,
        "experts": {str(l["layer"]): list(l["experts"]) for l in doc["layers"]},
        "routed_mass": routed, "selected_mass": selected, "routing_note": why,
        # each selected expert's routing weight per token, where the selected mass comes from: a wide FFN's shares
        "routed_shares": {str(l["layer"]): [float(v) for v in l["routed"]] for l in doc["layers"]
                          if selected and str(l["layer"]) in selected} or None,
        "source": ck.fingerprint, "family": ck.family.name, "hidden": ck.hidden, "expert_ffn": ck.expert_ffn,
        "shared_ffn": ck.shared_ffn, "shared_gate": "sigmoid" if ck.family.shared_gate else None,
        "selection": {"criterion": doc.get("criterion"), "per_layer": doc.get("per_layer"),
                      "path": str(Path(sel_path)), "sha256": provenance.sha256(Path(sel_path).read_bytes())
                      if Path(sel_path).is_file() else None},
    }


def compute(ck: Checkpoint, doc: dict, sel_path: Path | str, *, ranks: str | None = None, align_neurons: bool = True,
            no_tucker: bool = False, weighting: str = "joint", only: set[int] | None = None,
            each=None, mix=None, sweeps: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Factors for every selected layer (or those in `only`). With `each`, every layer's factors are
    handed to each(layer, tensors) instead of being kept (the one-shot graft streams them). With `mix`
    too (full ranks only, see collapsible), each layer is collapsed at once to its combined FFN,
    each(layer, (gate, up, down)), with expert weights mix(usage weights): no factors are formed."""
    sel.check_source(doc, Path(sel_path), ck)
    rank_spec = parse_ranks(ranks)
    check_weighting(weighting)
    if mix is not None and (each is None or no_tucker or rank_spec != ["full", "full", "full"]):
        raise ValueError("compute(mix=...) needs each=... and full ranks")
    layers = [l for l in doc["layers"] if only is None or l["layer"] in only]
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    with progress() as bar:
        task = bar.add_task("decompose", total=len(layers), info="")
        for l in layers:
            if mix is not None:
                t, e = layer_ffn(ck, l, align_neurons, mix, sweeps)
            else:
                t, e = layer_factors(ck, l, rank_spec, ranks, align_neurons, no_tucker, weighting, sweeps)
            errors.update(e)
            if each is not None:
                each(l["layer"], t)
            else:
                tensors.update(t)
            bar.update(task, advance=1, info=f"layer {l['layer']}")
    return tensors, factor_meta(ck, doc, sel_path, ranks, align_neurons, no_tucker, errors, weighting)


def check_ranks(ck: Checkpoint, doc: dict, ranks: str | None, only: set[int]) -> None:
    """--ranks against the stacks the selected layers in `only` would make, without reading a weight."""
    spec = parse_ranks(ranks)
    for l in (l for l in doc["layers"] if l["layer"] in only):
        n = len(l["experts"])
        for shape in ((ck.expert_ffn, ck.hidden, n), (ck.hidden, ck.expert_ffn, n)):
            resolve(spec, shape, ranks)


def check_sweeps(sweeps: int, align_neurons: bool) -> None:
    if sweeps < 0:
        raise XpertError(f"--align-sweeps {sweeps}: must be >= 0")
    if sweeps and not align_neurons:
        raise XpertError("--align-sweeps refines the neuron alignment; it cannot go with --no-align")


def check_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise XpertError(f"--weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    return weighting


def all_experts_doc(ck: Checkpoint) -> dict:
    """A selection of every expert (what one-shot graft uses without stats or a selection)."""
    return {"criterion": "all", "per_layer": ck.num_experts, "source": None, "num_experts": ck.num_experts,
            "layers": [{"layer": i, "experts": list(range(ck.num_experts))} for i in ck.moe_layers]}


def run(src: Path, selection: Path, out: Path, *, ranks: str | None = None, align_neurons: bool = True,
        no_tucker: bool = False, weighting: str = "joint", align_sweeps: int = 0, force: bool = False) -> Path:
    """`xpertctl decompose`: factors.safetensors."""
    from ..io import check_output
    ck = open_checkpoint(src).require_moe("decompose consolidates MoE experts; a dense model's FFN neurons go "
                                          "straight to graft (xpertctl graft SRC --stats STATS --target ...)")
    check_output(out, force, [ck.path, selection])
    parse_ranks(ranks)
    check_weighting(weighting)
    check_sweeps(align_sweeps, align_neurons)
    doc = sel.load_selection(selection)
    tensors, meta = compute(ck, doc, selection, ranks=ranks, align_neurons=align_neurons, no_tucker=no_tucker,
                            weighting=weighting, sweeps=align_sweeps)
    rec = provenance.record("factors", inputs=[ck.fingerprint, provenance.file_fingerprint(selection)],
                            params={"ranks": ranks, "align": align_neurons, "no_tucker": no_tucker,
                                    "weighting": weighting, "align_sweeps": align_sweeps}, **meta)
    return write_safetensors(out, tensors, provenance.as_metadata(rec), force=force)
