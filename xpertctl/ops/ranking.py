"""The one top-k rule for choosing indices by score (experts, residual dimensions, neurons)."""
from __future__ import annotations

import numpy as np


def top_indices(score, n: int) -> np.ndarray:
    """Indices of the n highest scores, best first; ties go to the lower index (deterministic)."""
    score = np.asarray(score)
    return np.lexsort((np.arange(score.size), -score))[:n]
