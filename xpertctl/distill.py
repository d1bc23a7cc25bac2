"""Knowledge distillation: a frozen teacher's next-token distributions as a second training signal.

loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T), token-level, on exactly the positions
CE scores (label != -100 after the causal shift), so prompt and padding positions are excluded alike.
The T^2 factor keeps the KL gradient's scale independent of T (Hinton et al. 2015).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import XpertError


def check_options(teacher: str | None, alpha: float | None, temperature: float | None) -> None:
    if teacher is None:
        for flag, v in (("--kd-alpha", alpha), ("--kd-temperature", temperature)):
            if v is not None:
                raise XpertError(f"{flag}: only meaningful with --teacher DIR")
        return
    if alpha is not None and not 0.0 <= alpha <= 1.0:  # (NaN fails this too)
        raise XpertError(f"--kd-alpha {alpha}: must be between 0 and 1")
    if temperature is not None and not 0 < temperature < float("inf"):
        raise XpertError(f"--kd-temperature {temperature}: must be a positive number")


def load_teacher(teacher_dir: Path, student, student_dir: Path, load_causal_lm):
    """The teacher (read by train's `load_causal_lm`, handed in: distill does not import train), frozen
    (eval mode, no grad); refuses one whose vocabulary differs from the student's."""
    from . import data
    teacher_dir = Path(teacher_dir)
    model = load_causal_lm(teacher_dir)
    tv, sv = model.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise XpertError(f"--teacher {teacher_dir}: a {tv}-token vocabulary; the student {student_dir} has {sv}")
    ttok, stok = data.load_tokenizer(teacher_dir), data.load_tokenizer(student_dir)
    if ttok.get_vocab() != stok.get_vocab():
        raise XpertError(f"--teacher {teacher_dir}: another tokenizer than the student's ({student_dir}): "
                         "token ids would not mean the same")
    if getattr(model.config, "output_router_logits", False):
        model.config.output_router_logits = False  # an MoE's auxiliary router loss is not needed here
    model.eval().requires_grad_(False)
    return model


def kd_loss(ce: torch.Tensor, kl: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """(1 - alpha) * ce + alpha * T^2 * kl: `ce` is the student's own loss (its mean CE, plus an MoE's router
    term), `kl` the mean KL(teacher_T || student_T) over the same positions; both computed chunk by chunk
    from the final hidden states by losses.LMLoss, never from whole [batch, window, vocab] logits."""
    return (1.0 - alpha) * ce + alpha * temperature ** 2 * kl
