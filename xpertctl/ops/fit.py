"""Beyond the paper: fit each student FFN's down projection to the MoE block it replaces, on data.

Gate and up stay as consolidated (they decide which neurons fire); the down projection is solved by
ridge least squares so that down(act(x)) best reproduces the block's output y on captured hidden
states x of calibration text:

  D^T = (A^T A + lam I)^-1 A^T Y,   A = silu(x G^T) * (x U^T)  [N, f],  Y = y[:, residual_index]  [N, d]

with lam = ridge * trace(A^T A) / f (scale-free). Sums of A^T A and A^T Y are accumulated block by
block in float64, so memory is f^2 + f*d per target layer whatever the token count. The fit absorbs
the routing scale (top-k weights summing to less than one) along with the direction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import XpertError
from ..io.checkpoint import Checkpoint
from . import capture



class NormalEquations:
    """Running A^T A and A^T Y for each target layer, fed by the block capture."""

    def __init__(self, adapted: dict[str, torch.Tensor], layer_map: list[list[int]]):
        self.ri = adapted["residual_index"].long()
        self.layer_map = layer_map
        self.gu = [(adapted[f"layers.{t}.gate_proj"].float(), adapted[f"layers.{t}.up_proj"].float())
                   for t in range(len(layer_map))]
        f = self.gu[0][0].shape[0]
        d = self.ri.numel()
        self.ata = [torch.zeros(f, f, dtype=torch.float64) for _ in layer_map]
        self.aty = [torch.zeros(f, d, dtype=torch.float64) for _ in layer_map]
        self.tokens = [0 for _ in layer_map]

    def __call__(self, io: capture.BlockIO) -> None:
        x, y = io.x[:, self.ri], io.y[:, self.ri].double()
        for t, group in enumerate(self.layer_map):
            if io.layer in group:
                g, u = self.gu[t]
                a = (F.silu(x @ g.T) * (x @ u.T)).double()
                self.ata[t] += a.T @ a
                self.aty[t] += a.T @ y
                self.tokens[t] += x.shape[0]

    def solve(self, ridge: float) -> list[torch.Tensor]:
        downs = []
        for t, (ata, aty) in enumerate(zip(self.ata, self.aty)):
            f = ata.shape[0]
            if self.tokens[t] < f:
                raise XpertError(f"--fit down: target layer {t} saw {self.tokens[t]} calibration tokens, fewer than its "
                                 f"{f} neurons; give more --calibration text or --calibration-tokens")
            lam = ridge * float(torch.trace(ata)) / f
            sol = torch.linalg.solve(ata + lam * torch.eye(f, dtype=ata.dtype), aty)  # [f, d]
            downs.append(sol.T.float().contiguous())
        return downs


def fit_down(ck: Checkpoint, model, tokenizer, docs: dict[str, list[str]], adapted: dict[str, torch.Tensor],
             meta: dict, *, ridge: float = 1e-3, seq_len: int, batch_size: int = 8, max_tokens: int | None = None,
             device: str = "cpu", stream_tokens: int | None = None) -> list[torch.Tensor]:
    """New down projections [d, f] per target layer, fitted on the calibration text."""
    if ridge < 0:
        raise XpertError(f"--ridge {ridge}: must be >= 0")
    eqs = NormalEquations(adapted, [list(g) for g in meta["layer_map"]])
    capture.run(ck, model, tokenizer, docs, eqs, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                device=device, stream_tokens=stream_tokens, label="calibrate")
    return eqs.solve(ridge)
