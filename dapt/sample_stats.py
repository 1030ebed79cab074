"""dapt's one sample standard deviation.

Used by the perplexity bootstrap (the standard error of the replicates) and by the downstream seed
statistics. A foundation module because both the modeling and the evaluation layers need it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def sample_std(values: Any, *, scale: float | None = None) -> float:
    """The sample standard deviation (``n - 1`` denominator) of ``values``; 0.0 for fewer than two.

    A sample whose values agree to within float rounding returns exactly 0.0: the paired seed test
    relies on an exact zero to say "the same difference on every seed; no variance to test" instead
    of running a t-test on a ~1e-17 spread. ``scale`` is the magnitude of the numbers the values were
    computed from (for differences ``a - b``: the largest ``|a|``, ``|b|``), since rounding error is
    relative to them; by default the values' own magnitude.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size < 2:
        return 0.0
    magnitude = float(np.max(np.abs(arr))) if scale is None else float(scale)
    if float(np.ptp(arr)) <= 8 * np.finfo(np.float64).eps * magnitude:
        return 0.0
    return float(arr.std(ddof=1))
