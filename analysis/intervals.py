"""Bootstrap percentile intervals, shared by the fit, the law's queries and the design search."""

from __future__ import annotations

import numpy as np

DEFAULT_LEVEL = 0.95


def percentile_interval(values: np.ndarray, level: float = DEFAULT_LEVEL, axis: int = 0):
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return np.nanpercentile(values, lo, axis=axis), np.nanpercentile(values, hi, axis=axis)
