"""Next-token losses and log-likelihoods from a causal LM's final hidden states, a chunk of rows at a time.

A whole batch's logits ([batch, window, vocab]: 1.6 GB of float32 at 8 x 1,024 x 50,304) are never held,
nor their log-softmax. The model runs up to its final hidden states (its base model, `model.base_model`);
the output head (lm_head, then the logit scaling / soft-capping its config declares) is applied to at
most `chunk_rows(vocab)` positions at once, and only to positions that are scored. Under autograd every
chunk is checkpointed: the backward recomputes that chunk's logits rather than keeping all of them.
A batch that fits in one chunk (the demo's small models) runs the plain computation, unchunked.

Whether head(final hidden states) reproduces the model's own logits (and the loss its forward computes,
router load-balancing term included) is checked once per model on a few tokens; a model for which it
does not is scored from its full logits as before (one note on stderr): results never change, only
the memory.
"""
from __future__ import annotations

import inspect
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Logit elements per chunk: 8M = 32 MiB of float32 (about 4x that live while a chunk's loss and gradient
# are computed). 8 x 256 windows at the demo's 2,048-token vocabulary (4.2M) fit in one chunk.
CHUNK_ELEMENTS = 1 << 23


def chunk_rows(vocab: int, elements: int | None = None) -> int:
    """Positions per chunk for a `vocab`-wide head."""
    return max(1, (elements or CHUNK_ELEMENTS) // max(1, int(vocab)))


# ---- the output head ------------------------------------------------------------------------------

# Logit transforms after lm_head that a config may declare (config key -> transform), in the order the
# transformers classes apply them: Cohere's logit_scale, Granite's logits_scaling, Gemma 2/3's soft-capping.
LOGIT_TRANSFORMS = (("logit_scale", "multiply"), ("logits_scaling", "divide"), ("final_logit_softcapping", "softcap"))


@dataclass(frozen=True)
class Head:
    """hidden states -> logits: `linear` (lm_head), then the declared transforms."""
    linear: torch.nn.Module | None  # None: the "hidden states" already are the logits (the fallback)
    transforms: tuple[tuple[str, float], ...] = ()

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        z = h if self.linear is None else self.linear(h)
        for kind, v in self.transforms:
            if kind == "multiply":
                z = z * v
            elif kind == "divide":
                z = z / v
            else:  # softcap
                z = torch.tanh(z / v) * v
        return z


IDENTITY = Head(None)


def declared_head(model) -> Head | None:
    """lm_head and the logit transforms the config declares; None when the model has no separate head."""
    linear = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if linear is None or getattr(model, "base_model", model) is model:
        return None
    return Head(linear, tuple((kind, float(getattr(model.config, key))) for key, kind in LOGIT_TRANSFORMS
                              if getattr(model.config, key, None) is not None))


@dataclass(frozen=True)
class Plan:
    """How to get a model's logits (and its loss's router term) without its full logits."""
    head: Head  # IDENTITY: the fallback, the model's own full logits stand for the hidden states
    routes: bool  # its loss adds a router load-balancing term (an MoE whose config asks for router logits)


def _routes(model) -> bool:
    return bool(getattr(model.config, "output_router_logits", False)) and \
        "output_router_logits" in inspect.signature(type(model).forward).parameters


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_of(model) -> Plan:
    """The declared head when head(final hidden states) reproduces the model's own logits and loss
    (checked once per model, on 8 tokens), else the fallback to full logits (with one note on stderr)."""
    if model in _PLANS:
        return _PLANS[model]
    head, routes = declared_head(model), _routes(model)
    if head is None or not _reproduces(model, Plan(head, routes)):
        from .console import err
        err.print(f"note: {type(model).__name__}: its logits are not reproduced from its final hidden states; "
                  "scored from its full logits (memory grows with vocabulary x window)")
        head = IDENTITY
    _PLANS[model] = Plan(head, routes)
    return _PLANS[model]


@torch.no_grad()
def _reproduces(model, plan: Plan) -> bool:
    """The model's own logits and loss on 8 tokens equal head(final hidden states) and the loss from them."""
    was = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = (torch.arange(8, device=p.device) % int(model.config.vocab_size))[None]
        m = torch.ones_like(x)
        want = model(input_ids=x, attention_mask=m, labels=x, use_cache=False)
        h, head, aux = outputs(model, x, m, plan, router=True)
        logits, ref = head(h).float(), want.logits.float()
        if logits.shape != ref.shape or float((logits - ref).abs().max()) > 1e-4 * float(ref.abs().max()) + 1e-6:
            return False
        loss = F.cross_entropy(logits[0, :-1], x[0, 1:]) + (aux if aux is not None else 0.0)
        return bool(torch.isclose(loss, want.loss.float(), rtol=1e-4, atol=1e-6))
    finally:
        model.train(was)


def outputs(model, x: torch.Tensor, m: torch.Tensor | None, plan: Plan | None = None, router: bool = False):
    """(hidden states [B, T, H], head, router loss term or None): head(rows of the hidden states) are the
    model's logits at those positions. `router`: also the load-balancing term the model's own loss adds
    (when it has one; coefficient included)."""
    plan = plan or plan_of(model)
    if plan.head is IDENTITY:  # the fallback: the model's own full logits and aux loss
        out = model(input_ids=x, attention_mask=m, use_cache=False)
        aux = getattr(out, "aux_loss", None) if router and plan.routes else None
        return out.logits, IDENTITY, (model.router_aux_loss_coef * aux if aux is not None else None)
    router = router and plan.routes
    kw = {"output_router_logits": router} if hasattr(model.config, "output_router_logits") else {}
    out = model.base_model(input_ids=x, attention_mask=m, use_cache=False, **kw)
    aux = None
    if router:  # as the *ForCausalLM forward adds it: coef * load_balancing_loss_func(router logits, ...)
        balance = sys.modules[type(model).__module__].load_balancing_loss_func
        aux = model.router_aux_loss_coef * balance(out.router_logits, model.num_experts, model.num_experts_per_tok, m)
    return out.last_hidden_state, plan.head, aux


# ---- chunked sums over rows (plain functions on tensors) ------------------------------------------

_MMAP_SET = False


def _release_freed_chunks(device: torch.device) -> None:
    """On CPU with glibc, serve allocations of 4 MiB and more with mmap, so a chunk's freed logits go back to
    the system. glibc's default raises its mmap threshold to the size of the first freed chunk (up to 32 MiB)
    and serves the next chunks from its heaps, which then keep every chunk's pages: measured here, 25 chunks
    of 166 x 50,304 logits left 1 GiB resident (0.1 GiB with the threshold fixed). Process-wide, once; only
    when a loss is actually chunked; a no-op elsewhere (CUDA's allocator reuses its blocks)."""
    global _MMAP_SET
    if _MMAP_SET or device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    _MMAP_SET = True
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl): nothing to set
        pass


def _chunked(fn, rows: int, *tensors: torch.Tensor):
    """Sum of fn(*chunk) over chunks of `rows` rows of the tensors (fn returns a tuple of scalars); each
    chunk checkpointed under autograd when there is more than one."""
    n = tensors[0].shape[0]
    if n <= rows:
        return fn(*tensors)
    _release_freed_chunks(tensors[0].device)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    total = None
    for a in range(0, n, rows):
        part = tuple(t[a: a + rows] for t in tensors)
        got = checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part)
        total = got if total is None else tuple(s + g for s, g in zip(total, got))
    return total


def cross_entropy_sum(h: torch.Tensor, head: Head, targets: torch.Tensor, rows: int) -> torch.Tensor:
    """Sum over rows of -log softmax(head(h))[target] (h: [N, H], targets: [N], none ignored), in float32."""
    def fn(hc, tc):
        return (F.cross_entropy(head(hc).float(), tc, reduction="sum"),)
    return _chunked(fn, rows, h, targets)[0]


def kd_sums(h: torch.Tensor, head: Head, th: torch.Tensor, thead: Head, targets: torch.Tensor, temperature: float,
            rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the student's CE on targets, sum of KL(teacher_T || student_T)) over rows: h and th are the
    student's and the teacher's hidden states at the same positions ([N, H] and [N, H_t])."""
    def fn(hc, thc, tc):
        s = head(hc).float()
        with torch.no_grad():
            t = thead(thc).float()
        ce = F.cross_entropy(s, tc, reduction="sum")
        kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                      reduction="sum")
        return ce, kl
    return _chunked(fn, rows, h, th, targets)


@torch.no_grad()
def token_logprobs(h: torch.Tensor, head: Head, targets: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(head(h))[target], whether the target is the argmax) per row, float32 (h: [N, H])."""
    lps, hits = [], []
    if h.shape[0] > rows:
        _release_freed_chunks(h.device)
    for a in range(0, h.shape[0], rows):
        lsm = torch.log_softmax(head(h[a: a + rows]).float(), -1)
        t = targets[a: a + rows, None]
        lps.append(lsm.gather(-1, t)[:, 0])
        hits.append(lsm.argmax(-1) == t[:, 0])
    if not lps:
        return torch.zeros(0, device=h.device), torch.zeros(0, dtype=torch.bool, device=h.device)
    return torch.cat(lps), torch.cat(hits)


# ---- a model's loss and log-likelihoods -----------------------------------------------------------

def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM convention: position i is scored on labels[i + 1]; the last on nothing."""
    return F.pad(labels, (0, 1), value=-100)[..., 1:]


class LMLoss(torch.nn.Module):
    """model(x, mask, labels) -> its mean next-token CE on `labels` (unshifted, -100 ignored: the loss of
    transformers' causal LMs, with the router load-balancing term an MoE config asks for), from the final
    hidden states chunk by chunk. With a teacher's `outputs` hidden states: (loss, KL sum, count) for KD
    on the same positions. A module, so DDP and torch.compile wrap the whole computation."""

    def __init__(self, model, teacher=None, temperature: float = 1.0, rows: int | None = None):
        super().__init__()
        self.model = model
        self.plan = plan_of(model)  # here, not in forward: torch.compile traces forward
        self.teacher_head = plan_of(teacher).head if teacher is not None else None  # not a submodule
        self.temperature, self.rows = temperature, rows

    def forward(self, x, m, y, teacher_hidden=None):
        h, head, aux = outputs(self.model, x, m, self.plan, router=True)
        t = shifted_targets(y)
        keep = t != -100
        hs, tk = h[keep], t[keep]
        rows = self.rows or chunk_rows(self.model.config.vocab_size)
        if teacher_hidden is None:
            ce = cross_entropy_sum(hs, head, tk, rows) / tk.numel()
            kl = None
        else:
            ce_sum, kl_sum = kd_sums(hs, head, teacher_hidden[keep], self.teacher_head, tk, self.temperature, rows)
            ce, kl = ce_sum / tk.numel(), kl_sum / tk.numel()
        if aux is not None:
            ce = ce + aux
        return ce if kl is None else (ce, kl)


@torch.no_grad()
def target_logprobs(model, x: torch.Tensor, m: torch.Tensor | None, targets: torch.Tensor,
                    rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P(targets[b, i] | x[b, :i + 1]), whether it is the greedy token) at every position whose target
    is not -100 (0 and False elsewhere); [B, T] each. Only those positions go through the head."""
    h, head, _ = outputs(model, x, m)
    keep = targets != -100
    lp, hit = token_logprobs(h[keep], head, targets[keep], rows or chunk_rows(model.config.vocab_size))
    out = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
    greedy = torch.zeros(targets.shape, dtype=torch.bool, device=h.device)
    out[keep], greedy[keep] = lp, hit
    return out, greedy


@torch.no_grad()
def continuation_scores(model, seqs: list[tuple[list[int], int]], device: str) -> list[tuple[float, bool]]:
    """Per (ids, n): log P(the last n ids | the ids before them) and whether each of them is the greedy
    token, from one right-padded forward pass over ids[:-1]; only the n scored positions go through the
    output head, chunk by chunk. n <= 0 scores (0.0, True)."""
    T = max(len(ids) for ids, _ in seqs) - 1
    x = torch.zeros(len(seqs), max(T, 1), dtype=torch.long)
    m = torch.zeros(len(seqs), max(T, 1), dtype=torch.long)
    targets = torch.full((len(seqs), max(T, 1)), -100, dtype=torch.long)
    for r, (ids, n) in enumerate(seqs):
        x[r, : len(ids) - 1], m[r, : len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long), 1
        if n > 0:
            targets[r, len(ids) - 1 - n: len(ids) - 1] = torch.tensor(ids[-n:], dtype=torch.long)
    lp, hit = target_logprobs(model, x.to(device), m.to(device), targets.to(device))
    keep = targets.to(lp.device) != -100
    return [(float(lp[r][keep[r]].sum()) if n > 0 else 0.0, bool(hit[r][keep[r]].all()))
            for r, (_, n) in enumerate(seqs)]
