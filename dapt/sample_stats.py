"""dapt's one sample standard deviation.

Used by the perplexity bootstrap (the standard error of the replicates) and by the downstream seed
statistics. A foundation module because both the modeling and the evaluation layers need it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def sample_std(values: Any) -> float:
    """The sample standard deviation (``n - 1`` denominator) of ``values``; 0.0 for fewer than two.

    A constant sample returns exactly 0.0 (numpy's mean of equal floats can be off in the last bit,
    which would leave a spread of ~1e-17): the paired seed test relies on an exact zero to say "the
    same difference on every seed; no variance to test" instead of running a t-test on constants.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size < 2 or bool(np.all(arr == arr[0])):
        return 0.0
    return float(arr.std(ddof=1))
