"""The minimal training loop: pretraining on token memmaps or SFT on instruction JSONL.

Batches are a pure function of (seed, step, micro-step), never of the model: two arms with the same
seed see identical data whatever their initialization, and a resumed run continues exactly where the
killed one stopped. Under `torchrun` the same command trains with DDP (each rank takes its rows of
the same global batch, so the loss matches a one-process run of that batch).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import data, distill, losses
from .console import err, progress
from .errors import XpertError
from .io import provenance
from .specs import check_device, parse_dtype


@dataclass
class TrainConfig:
    steps: int | None = None
    tokens: int | None = None  # alternative to steps: total training tokens
    batch_size: int = 8  # global sequences per micro-step (split across ranks)
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    domain_weights: str | None = None  # NAME=W,... training mixture (None: proportional to tokens)
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 0  # 0: only the final checkpoint
    keep: int = 2  # the last N step checkpoints are kept (N >= 1)
    device: str = "cpu"
    save_dtype: str | None = None  # dtype of the final checkpoint (training runs in float32)
    teacher: str | None = None  # knowledge distillation from this HF causal LM (see distill.py)
    kd_alpha: float | None = None  # weight of the KL term; 0.5 when --teacher is given
    kd_temperature: float | None = None  # softmax temperature of both sides; 1.0 when --teacher is given


def lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        prog = (step - cfg.warmup) / max(1, total - cfg.warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))
    return f


# ---- batches: deterministic in (seed, step, micro) ----------------------------------------------------

def lm_batch(source, cfg: TrainConfig, step: int, micro: int, split_seed: int = 0):
    """(x, labels, mask) of one micro-step: windows of `source` (data.Windows, or one token array)."""
    rng = np.random.default_rng([cfg.seed, split_seed, step, micro])
    if not isinstance(source, data.Windows):
        source = data.Windows([source], cfg.seq_len)
    x = torch.from_numpy(source.draw(rng, cfg.batch_size))
    return x, x.clone(), torch.ones_like(x)


def sft_examples(path: Path, tokenizer, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per record; labels are -100 on the prompt: loss on the response only."""
    recs = data.read_jsonl(path, {"instruction": str, "response": str})
    out = []
    for r in recs:
        p = tokenizer(data.prompt_of(r), add_special_tokens=False)["input_ids"]
        a = tokenizer(r["response"].strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + a)[:seq_len]
        labels = ([-100] * len(p) + a)[:seq_len]
        if any(l != -100 for l in labels):
            out.append((ids, labels))
    if not out:
        raise XpertError(f"{path}: no example keeps a response token within --seq-len {seq_len}")
    return out


def sft_batch(examples, cfg: TrainConfig, step: int, micro: int, pad_id: int, split_seed: int = 0):
    rng = np.random.default_rng([cfg.seed, split_seed, step, micro])
    pick = [examples[i] for i in rng.integers(0, len(examples), size=cfg.batch_size)]
    T = max(len(ids) for ids, _ in pick)
    x = torch.full((len(pick), T), pad_id, dtype=torch.long)
    y = torch.full((len(pick), T), -100, dtype=torch.long)
    m = torch.zeros((len(pick), T), dtype=torch.long)
    for r, (ids, labels) in enumerate(pick):
        x[r, : len(ids)], y[r, : len(ids)], m[r, : len(ids)] = torch.tensor(ids), torch.tensor(labels), 1
    return x, y, m


# ---- checkpoints -----------------------------------------------------------------------------------

def save_checkpoint(model, tokenizer_dir: Path | None, run: Path, name: str, state: dict | None, rec: dict) -> Path:
    """An HF directory (+ trainer_state.pt for resuming), written as every output is (io.writer.atomic_path:
    hidden temp, the umask's modes, fsync, rename; a disk's refusal is one line)."""
    from .io import writer
    final = run / name
    with writer.atomic_path(final, True, marker="config.json") as tmp:
        model.save_pretrained(tmp)
        for f in tmp.glob("*.safetensors"):  # save_pretrained drops a metadata argument: the record goes in after
            writer.add_metadata(f, provenance.as_metadata(rec))
        if tokenizer_dir is not None:
            from .io.checkpoint import tokenizer_files
            for f, src in tokenizer_files(tokenizer_dir).items():
                if not (tmp / f).exists():
                    shutil.copyfile(src, tmp / f)
        if state is not None:
            writer.save_torch(state, tmp / "trainer_state.pt")
    if name != "final":  # a step checkpoint is the run's working state, not an output a late Ctrl-C names
        writer.written.remove(Path(os.path.abspath(final)))
    return final


def latest_checkpoint(run: Path) -> Path | None:
    done = sorted(p for p in run.glob("step-*") if (p / "trainer_state.pt").is_file())
    return done[-1] if done else None


# ---- the loop --------------------------------------------------------------------------------------

def not_a_model(path: Path) -> str:
    """Why `path` is not a model directory, in the words that help: missing, or a training run (whose
    model is its final/ or latest step), or a directory without config.json."""
    if not path.exists():
        return "no such file or directory"
    if (path / "final" / "config.json").is_file():
        return f"a training run directory; its model is {path / 'final'}"
    if path.is_dir() and (step := latest_checkpoint(path)) is not None:
        return f"an unfinished training run (no final/); its latest checkpoint is {step}"
    return "not a model directory (no config.json)"


def load_causal_lm(ckpt: Path):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").is_file():
        raise XpertError(f"{ckpt}: {not_a_model(ckpt)}")
    try:
        cfg = AutoConfig.from_pretrained(ckpt)
    except (OSError, ValueError, KeyError) as e:
        raise XpertError(f"{ckpt}: unreadable config ({str(e).splitlines()[0][:120]})") from None
    archs = cfg.architectures or []
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise XpertError(f"{ckpt}: {', '.join(archs)} is not a causal LM")
    from .io.checkpoint import check_model_dir
    check_model_dir(ckpt)  # a config.json that lies about the weights: one line, before the model is built
    try:
        return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise XpertError(f"{ckpt}: cannot load as a causal LM ({str(e).splitlines()[0][:160]})") from None


@dataclass
class Batches:
    """Where a run's batches come from: get(step, micro, split) with split 0 = train, 1 = validation."""
    get: Callable
    has_val: bool
    tokens_per_step: int | None  # None for SFT (examples have different lengths)


@dataclass
class Rank:
    """This process under torchrun (rank 0 of 1 otherwise) and its rows [lo, hi) of every global batch."""
    ddp: bool
    rank: int
    world: int
    lo: int
    hi: int


def train(ckpt: Path, out: Path, cfg: TrainConfig, *, data_dir: Path | None = None, sft: Path | None = None,
          resume: str = "no", force: bool = False, threads: int = 0, compile: bool = False) -> Path | None:
    """`xpertctl train`: RUN/step-NNNNNN/, RUN/final/, RUN/metrics.jsonl. Returns RUN/final (None on
    ranks other than 0 under torchrun). `threads` (0: torch's default) and `compile` change speed, not
    results beyond float noise, so they are not part of the run's config."""
    cfg = check_options(cfg, data_dir, sft, resume, threads)
    rk = this_rank(cfg)
    out = Path(out)
    if out.exists() and resume == "no" and not force:
        raise XpertError(f"{out}: already exists (use --resume auto to continue it, or --force)")
    from .io.checkpoint import resolve_source
    ckpt = resolve_source(ckpt)
    model, tok = load_causal_lm(ckpt), data.load_tokenizer(ckpt)
    teacher = distill.load_teacher(cfg.teacher, model, ckpt, load_causal_lm) if cfg.teacher else None
    batches = lm_batches(cfg, data_dir, ckpt, model) if data_dir is not None else sft_batches(cfg, sft, tok)
    total = total_steps(cfg, ckpt, model, batches)
    if cfg.warmup > total and rk.rank == 0:  # legal (a schedule cut short), but not what a user expects
        from .console import notice
        notice(f"--warmup {cfg.warmup} is longer than the run's {total} steps: the learning rate peaks at "
               f"{cfg.lr * total / cfg.warmup:.3g}, never reaching --lr {cfg.lr:g}")
    device = setup_device(cfg, rk)
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    if teacher is not None:
        teacher.to(device)
    opt, sched = make_optimizer(model, cfg, total)
    identity = run_identity(cfg, ckpt, data_dir, sft)
    start = start_or_resume(out, model, opt, sched, identity, resume, force, rk, data_dir, ckpt)
    step_fn = Stepper(model, teacher, cfg, device, rk, compile)
    # the init's and the teacher's fingerprints: a checkpoint trained from another init has another header,
    # so a recipe's eval of it is not skipped as done (fingerprints of safetensors read the header only)
    rec = provenance.record("train", inputs=[provenance.weights_fingerprint(p) for p in (ckpt, cfg.teacher) if p],
                            params=asdict(cfg) | {"data": str(data_dir) if data_dir else None,
                                                  "sft": str(sft) if sft else None}, seed=cfg.seed)
    if rk.rank == 0:
        from .io import writer
        out.mkdir(parents=True, exist_ok=True)
        writer.clear_stale(out)  # checkpoints a killed run was writing (.step-NNNNNN.tmp-PID)
        writer.write_text(out / "train_config.json", json.dumps(rec, indent=2) + "\n", output=False)

    metrics = open(out / "metrics.jsonl", "a") if rk.rank == 0 else None
    t0, seen = time.perf_counter(), 0
    with progress(transient=False) as bar:
        task = bar.add_task("train", total=total, completed=start, info="")
        for step in range(start, total):
            loss, lr_used, kd, got = step_fn.step(batches, step, opt, sched)
            seen += got
            row = {"step": step + 1, "loss": loss, "lr": lr_used, "tokens": (step + 1) * (batches.tokens_per_step or 0) or None,
                   "tok_s": seen / max(time.perf_counter() - t0, 1e-9)} | kd
            boundary = cfg.eval_every and (step + 1) % cfg.eval_every == 0
            if batches.has_val and (boundary or step + 1 == total):
                row["val_loss"] = step_fn.evaluate(batches)
            if rk.rank == 0:
                metrics.write(json.dumps(row) + "\n"); metrics.flush()
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
                    save_step(model, opt, sched, cfg, identity, ckpt, out, step + 1, rec)
            bar.update(task, advance=1, info=f"loss {row['loss']:.3f}  {row['tok_s']:,.0f} tok/s"
                       + (f"  val {row['val_loss']:.3f}" if "val_loss" in row else ""))
    if rk.rank == 0:
        metrics.close()
        if cfg.save_dtype:
            model.to(parse_dtype(cfg.save_dtype))
            model.config.dtype = cfg.save_dtype
        save_checkpoint(model, ckpt, out, "final", None, rec)
    if rk.ddp:
        import torch.distributed as dist
        dist.barrier(); dist.destroy_process_group()
    torch.set_num_threads(prev_threads)
    return out / "final" if rk.rank == 0 else None


# ---- setup -----------------------------------------------------------------------------------------

def check_options(cfg: TrainConfig, data_dir, sft, resume: str, threads: int) -> TrainConfig:
    """Refuse bad options before anything is loaded; the config with the KD defaults filled in."""
    if (data_dir is None) == (sft is None):
        raise XpertError("give exactly one of --data DATA_DIR (pretraining) or --sft FILE.jsonl")
    if resume not in ("no", "auto"):
        raise XpertError(f"--resume {resume!r}: choose no or auto")
    if cfg.save_dtype is not None:
        parse_dtype(cfg.save_dtype, "--save-dtype")
    for name in ("batch_size", "grad_accum", "seq_len"):
        if getattr(cfg, name) <= 0:
            raise XpertError(f"--{name.replace('_', '-')}: must be positive")
    if cfg.keep < 1:
        raise XpertError(f"--keep {cfg.keep}: keep at least 1 step checkpoint (--save-every 0 saves none)")
    if cfg.domain_weights is not None and sft is not None:
        raise XpertError("--domain-weights is for --data (pretraining), not --sft")
    check_device(cfg.device)
    distill.check_options(cfg.teacher, cfg.kd_alpha, cfg.kd_temperature)
    if threads < 0:
        raise XpertError(f"--threads {threads}: must be 0 (torch's default) or positive")
    if cfg.teacher is not None:  # resolved here so the saved config (and a resume's check) holds the values used
        cfg = replace(cfg, kd_alpha=0.5 if cfg.kd_alpha is None else cfg.kd_alpha,
                      kd_temperature=1.0 if cfg.kd_temperature is None else cfg.kd_temperature)
    return cfg


def this_rank(cfg: TrainConfig) -> Rank:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if cfg.batch_size % world:
        raise XpertError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    return Rank(world > 1, rank, world, rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)


def lm_batches(cfg: TrainConfig, data_dir: Path, ckpt: Path, model) -> Batches:
    """Pretraining windows read in place from each domain's memmap (the training mixture: --domain-weights;
    validation windows always in proportion to the val tokens, so runs with other mixtures compare)."""
    td = data.load_token_data(data_dir)
    data.check_tokenizer(td, ckpt, model.config.vocab_size)
    weights = data.parse_domain_weights(cfg.domain_weights, td, cfg.seq_len)
    train_w, val_w = td.windows("train", cfg.seq_len, weights), td.windows("val", cfg.seq_len)
    if len(train_w) <= cfg.seq_len:
        raise XpertError(f"{data_dir}: {len(train_w)} training tokens, fewer than --seq-len {cfg.seq_len}")
    has_val = len(val_w) > cfg.seq_len
    if not has_val and cfg.eval_every:
        raise XpertError(f"{data_dir}: the val split {'is empty' if not len(val_w) else f'has only {len(val_w)} tokens'}"
                         f" (fewer than --seq-len {cfg.seq_len} + 1), so there is no validation loss; "
                         "re-tokenize with a larger --val-pct (or, for a file of an already split corpus, the corpus "
                         "with --corpus), or pass --eval-every 0 to train without validation")
    if not has_val:
        from .console import notice
        notice(f"{data_dir}: no val split: this run has no validation loss (metrics.jsonl has training loss only)")
    get = lambda step, micro, split=0: lm_batch(train_w if split == 0 else val_w, cfg, step, micro, split)
    return Batches(get, has_val, cfg.batch_size * cfg.grad_accum * cfg.seq_len)


def sft_batches(cfg: TrainConfig, sft: Path, tok) -> Batches:
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ex = sft_examples(sft, tok, cfg.seq_len)
    return Batches(lambda step, micro, split=0: sft_batch(ex, cfg, step, micro, pad, split), False, None)


def total_steps(cfg: TrainConfig, ckpt: Path, model, batches: Batches) -> int:
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and cfg.seq_len > int(max_pos):
        raise XpertError(f"--seq-len {cfg.seq_len}: longer than {ckpt}'s max_position_embeddings ({max_pos})")
    per = batches.tokens_per_step
    total = cfg.steps or (math.ceil(cfg.tokens / per) if cfg.tokens and per else None)
    if not total or total <= 0:
        raise XpertError("give --steps (or --tokens for pretraining)")
    return total


def setup_device(cfg: TrainConfig, rk: Rank) -> torch.device:
    device = torch.device(cfg.device)
    if rk.ddp:
        import torch.distributed as dist
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def make_optimizer(model, cfg: TrainConfig, total: int):
    """AdamW (weight decay on matrices only) and the warmup + cosine schedule."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))


def start_or_resume(out: Path, model, opt, sched, identity: dict, resume: str, force: bool, rk: Rank,
                    data_dir: Path | None = None, ckpt: Path | None = None) -> int:
    """The first step to run: 0 (a new run; --force clears OUT) or the last checkpoint's step, whose
    weights, optimizer, schedule and RNG state are restored (only for the same run)."""
    last = latest_checkpoint(out) if out.exists() else None
    if resume == "auto" and last is not None:
        changed = changed_options(last, identity, data_dir, ckpt)
        if changed and not force:
            raise XpertError(f"{out}: cannot resume, changed since {last.name}: {changed}; "
                             "give the same options, or --force to start over")
        if changed:  # --resume auto --force: continue only an identical run, otherwise start over
            err.print(f"{out}: {changed} changed; starting over (--force)")
            resume = "no"
    if out.exists() and resume == "no":  # --force: start over
        shutil.rmtree(out) if rk.rank == 0 else None
    if resume != "auto" or not out.exists():
        return 0
    if last is None:
        _truncate_metrics(out / "metrics.jsonl", 0) if rk.rank == 0 else None
        return 0
    _load_weights(model, last)
    st = torch.load(last / "trainer_state.pt", weights_only=False)
    opt.load_state_dict(st["optimizer"]); sched.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["rng"])
    if rk.rank == 0:
        _truncate_metrics(out / "metrics.jsonl", st["step"])
        err.print(f"resuming {out} from step {st['step']}")
    return st["step"]


def save_step(model, opt, sched, cfg: TrainConfig, identity: dict, ckpt: Path, out: Path, step: int, rec: dict) -> None:
    """A resumable step checkpoint; only the last --keep are kept."""
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
             "step": step, "config": asdict(cfg), "identity": identity}
    save_checkpoint(model, ckpt, out, f"step-{step:06d}", state, rec)
    for old in sorted(out.glob("step-*"))[:-cfg.keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---- one optimizer step ------------------------------------------------------------------------------

class Stepper:
    """The forward/backward of one optimizer step (gradient accumulation, KD, DDP rows) and validation."""

    def __init__(self, model, teacher, cfg: TrainConfig, device, rk: Rank, compile: bool):
        self.model, self.teacher, self.cfg, self.device, self.rk = model, teacher, cfg, device, rk
        # the loss from the final hidden states, chunk by chunk (losses.py): never a [batch, window, vocab] logits
        self.lm = losses.LMLoss(model, teacher, cfg.kd_temperature or 1.0)
        net = self.lm
        if rk.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
        if compile:  # evaluation stays eager: an eval-mode graph would be a second compilation
            net = torch.compile(net)
        self.net = net
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()

    def rows(self, *ts):
        return [t[self.rk.lo: self.rk.hi].to(self.device) for t in ts]

    def loss(self, x, y, m, mod=None):
        x, y, m = self.rows(x, y, m)
        with self.amp:
            return (mod or self.net)(x, m, y)

    def kd_loss(self, x, y, m):
        """(loss, ce, kl) of one micro-batch; the teacher sees this rank's rows of it."""
        x, y, m = self.rows(x, y, m)
        with self.amp:
            with torch.no_grad():
                t_hidden, _, _ = losses.outputs(self.teacher, x, m)
            ce, kl = self.net(x, m, y, t_hidden)
        loss = distill.kd_loss(ce, kl, self.cfg.kd_alpha, self.cfg.kd_temperature)
        return loss, ce.detach(), kl.detach()

    def step(self, batches: Batches, step: int, opt, sched) -> tuple[float, float, dict, int]:
        """One optimizer step: (mean loss, the lr it used, KD's ce and kl, tokens seen)."""
        cfg, ddp = self.cfg, self.rk.ddp
        loss_sum = ce_sum = kl_sum = 0.0
        seen = 0
        for micro in range(cfg.grad_accum):
            x, y, m = batches.get(step, micro)
            if self.teacher is None:
                loss = self.loss(x, y, m) / cfg.grad_accum
            else:
                loss, ce, kl = self.kd_loss(x, y, m)
                loss = loss / cfg.grad_accum
                ce_sum += float(ce) / cfg.grad_accum; kl_sum += float(kl) / cfg.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
            seen += int(m.sum())
        if cfg.grad_clip:  # 0: no clipping (clipping to norm 0 would zero every update)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        lr_used = sched.get_last_lr()[0]  # before sched.step(), which sets the next step's lr
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        kd = {"ce": _mean_across(ce_sum, ddp), "kl": _mean_across(kl_sum, ddp)} if self.teacher is not None else {}
        return _mean_across(loss_sum, ddp), lr_used, kd, seen

    @torch.no_grad()
    def evaluate(self, batches: Batches) -> float:
        self.model.eval()
        vals = [float(self.loss(*batches.get(b, 0, split=1), mod=self.lm)) for b in range(self.cfg.eval_batches)]
        self.model.train()
        return _mean_across(sum(vals) / len(vals), self.rk.ddp)


# ---- resuming only the same run -----------------------------------------------------------------------

# Options that do not change what is trained: a resumed run may differ in these.
RESUME_FREE = ("device", "keep", "save_every", "save_dtype")


def run_identity(cfg: TrainConfig, ckpt: Path, data_dir: Path | None, sft: Path | None) -> dict:
    """What must be equal for a checkpoint to be continued: every training option and the inputs'
    fingerprints (the starting model, the token data or SFT file)."""
    ident = {f"--{k.replace('_', '-')}": v for k, v in asdict(cfg).items() if k not in RESUME_FREE}
    ident["CKPT"] = provenance.weights_identity(Path(ckpt))
    if data_dir is not None:
        ident["--data"] = data.identity(data_dir)
    if sft is not None:
        ident["--sft"] = provenance.sha256(Path(sft).read_bytes())
    if cfg.teacher is not None:  # the teacher's weights, not just its path: a retrained teacher is another run
        ident["TEACHER"] = provenance.weights_identity(Path(cfg.teacher))
    return ident


def _header_hash(ckpt: Path) -> str:
    from .io.files import read_header
    heads = b"".join(read_header(f).raw for f in sorted(Path(ckpt).glob("*.safetensors")))
    return provenance.sha256(heads + (Path(ckpt) / "config.json").read_bytes())


def _as_recorded_before(saved: dict, identity: dict, data_dir: Path | None, ckpt: Path | None) -> dict:
    """Identities recorded before they were of content (the bytes of the manifest, of the headers, of the
    teacher's directory) count as today's when the input still hashes to them the old way."""
    teacher = identity.get("--teacher")
    old = {"--data": lambda: provenance.sha256((Path(data_dir) / data.MANIFEST).read_bytes()) if data_dir else None,
           "CKPT": lambda: _header_hash(ckpt) if ckpt else None,
           "TEACHER": lambda: provenance.fingerprint(Path(teacher))["sha256"] if teacher and Path(teacher).is_dir() else None}
    for k, was in old.items():
        if saved.get(k) and identity.get(k) and saved[k] != identity[k] and saved[k] == was():
            saved = {**saved, k: identity[k]}
    return saved


def changed_options(last: Path, identity: dict, data_dir: Path | None = None, ckpt: Path | None = None) -> str:
    """'' when the checkpoint `last` was written by a run with this identity, else the changes."""
    st = torch.load(last / "trainer_state.pt", weights_only=False, map_location="cpu")
    saved = st.get("identity")
    if saved is None:  # a checkpoint from before identities were recorded: compare the options
        saved = {f"--{k.replace('_', '-')}": v for k, v in st.get("config", {}).items() if k not in RESUME_FREE}
        identity = {k: v for k, v in identity.items() if k.startswith("--") and k not in ("--data", "--sft")}
    saved = _as_recorded_before(saved, identity, data_dir, ckpt)
    diffs = []
    for k in sorted(set(saved) | set(identity)):
        a, b = saved.get(k), identity.get(k)
        if a != b:
            diffs.append(f"{k} ({_short(a)} -> {_short(b)})" if k in ("CKPT", "--data", "--sft") or a is None or b is None
                         else f"{k} {b} (was {a})")
    return ", ".join(diffs)


def _short(v) -> str:
    return "none" if v is None else (f"sha256 {v[:12]}" if isinstance(v, str) and len(v) == 64 else str(v))


def _load_weights(model, last: Path) -> None:
    """Load a step checkpoint's weights into the training model. Through transformers' own loader: it saves
    an MoE's fused experts in the per-expert layout of hub checkpoints, and converts them back on load (a
    plain load_state_dict of the file refuses them). A missing or unexpected weight is an error."""
    dtype = next(model.parameters()).dtype
    try:
        ref, info = type(model).from_pretrained(last, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise XpertError(f"{last}: does not match the model ({str(e).splitlines()[0]}); use --force to start over")
    bad = [("unexpected", k) for k in info.get("unexpected_keys", ())] + \
        [("missing", k) for k in info.get("missing_keys", ())] + [("mismatched", k) for k in info.get("mismatched_keys", ())]
    if bad:
        raise XpertError(f"{last}: does not match the model ({bad[0][0]} {bad[0][1]!r}); use --force to start over")
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    if missing or unexpected:
        raise XpertError(f"{last}: does not match the model ({'unexpected' if unexpected else 'missing'} "
                         f"{(unexpected or missing)[0]!r}); use --force to start over")


def _mean_across(x: float, ddp: bool) -> float:
    if not ddp:
        return x
    import torch.distributed as dist
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows past the resumed step (they were written by the killed run)."""
    if path.is_file():
        from .io.writer import write_text
        rows = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        write_text(path, "".join(r + "\n" for r in rows), output=False)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def interrupted_note(out: Path) -> str:
    """What a Ctrl-C of `train` leaves in OUT: step checkpoints are kept on purpose (resumable)."""
    out = Path(out)
    if not (out / "metrics.jsonl").exists():
        return "no partial output was kept"
    last = latest_checkpoint(out)
    if last is not None:
        return (f"{out} is kept with its step checkpoints (last: {last.name}); continue it with "
                "--resume auto, or start over with --force")
    return (f"{out} is kept (metrics so far; no step checkpoint yet, --save-every N saves them); "
            "--resume auto or --force starts it over")
