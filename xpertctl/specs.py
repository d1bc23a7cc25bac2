"""Option values shared by commands: the enumerations (the one place each is listed; the ops import
them and the table of operations offers them as choices) and small parsers (lists, target specs)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import XpertError


DTYPES = ("float32", "bfloat16", "float16")
CRITERIA = ("min", "mean", "vote", "random", "low", "all")  # select; the last three are controls
LAYER_MAPS = ("uniform", "first", "merge")  # reshape: depth map
COMBINES = ("usage", "uniform", "literal", "first")  # reshape: expert-mode combination
RESCALES = ("routed", "selected", "none")  # reshape: scale the down projection by the whole block's or the selected experts' routing mass
RESCALE_DEFAULT = "selected"  # no layer worse than a zero FFN on the demo's held-out text (README: the method)
SHARED = ("none", "concat")  # reshape/graft: drop the shared experts, or append their neurons to the FFN
WEIGHTINGS = ("joint", "per-matrix")  # decompose: one expert-mode factor per layer, or one per matrix
FITS = ("none", "down", "ffn")  # graft: data-aware fit of the down projections, or of the whole FFN
RIDGE_SELECTS = ("domains", "documents", "both")  # graft --fit: what the ridge is chosen on (ops/fit.py)
FIT_WEIGHTINGS = ("tokens", "domains")  # graft --fit: how calibration domains weigh in the down fit (ops/fit.py)
WIDTH_SELECTS = ("norm", "first")  # reshape: which residual dims / neurons a narrower target keeps
ARCHS = ("llama", "qwen3")  # graft: the dense target class
FFN_INITS = ("xpert", "scratch", "norm-matched", "learngene")  # graft: XPERT FFNs, the identical model with fresh FFNs, or fresh FFNs at XPERT's row norms
SPLITS = ("train", "val", "test")  # token data splits
RESUME = ("no", "auto")  # train


def parse_dtype(name: str, flag: str = "--dtype"):
    """'bfloat16' -> torch.bfloat16 (the dtypes xpertctl reads, computes and writes in)."""
    import torch
    if name not in DTYPES:
        raise XpertError(f"{flag} {name!r}: choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise XpertError(f"{what} {text!r}: expected comma-separated integers") from None


@dataclass(frozen=True)
class Target:
    """Target dense shape; None means "same as the source"."""
    layers: int | None = None
    hidden: int | None = None
    ffn: int | None = None
    heads: int | None = None

    def __str__(self) -> str:
        parts = [f"{self.layers}L" if self.layers else None, f"d{self.hidden}" if self.hidden else None,
                 f"f{self.ffn}" if self.ffn else None, f"h{self.heads}" if self.heads else None]
        return ",".join(p for p in parts if p)

    def check_fits(self, hidden: int, ffn: int, ffn_source: str | None = None) -> None:
        """The one width check: not wider than the source, and the heads divide the width. `ffn_source` says
        what `ffn` is the width of (default: one source expert)."""
        d, f = self.hidden or hidden, self.ffn or ffn
        if d > hidden:
            raise XpertError(f"--target {self}: hidden {d} is wider than the source's {hidden}")
        if f > ffn:
            what = ffn_source or f"one source expert's {ffn}"
            raise XpertError(f"--target {self}: FFN {f} is wider than {what}")
        if self.heads and d % self.heads:
            raise XpertError(f"--target {self}: {self.heads} heads do not divide the hidden size {d}")


_PART = re.compile(r"^(?:(\d+)L|d(\d+)|f(\d+)|h(\d+))$")


def target_parts(spec: str | None) -> dict[str, int]:
    """The parts of a target spec ('12L,d2048,f1024,h16' -> layers, hidden, ffn, heads); syntax only."""
    vals: dict[str, int] = {}
    if spec:
        for part in spec.replace(" ", "").split(","):
            m = _PART.match(part)
            if not m:
                raise XpertError(f"--target {spec!r}: cannot read {part!r} (expected e.g. 12L,d2048,f1024,h16)")
            for key, g in zip(("layers", "hidden", "ffn", "heads"), m.groups()):
                if g is not None:
                    if key in vals:
                        raise XpertError(f"--target {spec!r}: {key} given twice")
                    vals[key] = int(g)
    return vals


def parse_target(spec: str | None, layers: int | None = None, hidden: int | None = None,
                 ffn: int | None = None, heads: int | None = None) -> Target:
    """'12L', '12L,d2048,f1024', '8L,h16' plus --layers/--hidden/--ffn/--heads (flags win)."""
    vals = target_parts(spec)
    for key, v in (("layers", layers), ("hidden", hidden), ("ffn", ffn), ("heads", heads)):
        if v is not None:
            vals[key] = v
    for key, v in vals.items():
        if v <= 0:
            raise XpertError(f"--target: {key} must be positive, got {v}")
    if "layers" not in vals:
        raise XpertError(f"--target {spec!r}: the number of layers is required (e.g. 12L)")
    return Target(**vals)


def check_device(name: str, flag: str = "--device") -> str:
    """Refuse a device this torch cannot use, up front (not as a traceback mid-run)."""
    import torch
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise XpertError(f"{flag} {name!r}: not a torch device (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise XpertError(f"{flag} {name}: this torch ({torch.__version__}) is a CPU-only build without CUDA")
        if not torch.cuda.is_available():
            raise XpertError(f"{flag} {name}: no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise XpertError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise XpertError(f"{flag} {name}: MPS is not available")
    elif dev.type != "cpu":
        raise XpertError(f"{flag} {name!r}: unsupported device type (use cpu, cuda, cuda:N or mps)")
    return name
