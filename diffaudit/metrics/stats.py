"""Confidence intervals used by every metric.

Which interval the audit uses:

* **Fractions** (memorization ratio, replication rate, extraction fraction, authenticity) use the **Wilson score
  interval** (:func:`wilson_interval`, via :func:`proportion_estimate`). It is closed-form, deterministic, and keeps
  close to nominal coverage when the fraction is near 0 with a few hundred samples -- exactly the regime the onset
  rule watches (is the lower bound above 2%?). The percentile bootstrap of a proportion is too narrow there and
  collapses to ``[0, 0]`` / ``[1, 1]`` at 0 or n successes, which would make the onset rule trigger early.
* **Other statistics** (means, medians, percentiles, differences of means) use the **percentile bootstrap**
  (:func:`bootstrap_ci`), deterministic for a given ``seed``.

Both are available for either use (``proportion_estimate(..., method="bootstrap")``).
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np

from ..results import Estimate

logger = logging.getLogger(__name__)

_MAX_BOOT_BLOCK = 2_000_000  # resample indices drawn per block (bounded memory)


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise ValueError(f"confidence={confidence!r} must be strictly between 0 and 1 (e.g. 0.95)")
    return c


def as_1d(values, name: str, allow_empty: bool = False) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {a.shape}")
    if a.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty; need at least one value")
    a = a.astype(np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} NaN/inf values (first at index {int(np.argmax(bad))}); "
                         "drop non-finite samples before computing metrics")
    return a


def bootstrap_ci(values, stat: Callable = np.mean, n_boot: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> Estimate:
    """Percentile bootstrap CI of ``stat(values)``.

    ``values``: 1-D numbers or bools. ``stat`` is called as ``stat(x, axis=1)`` on a block of resamples when it
    accepts ``axis`` (numpy reductions do: vectorised), otherwise once per resample. Deterministic for a given
    ``seed``. Returns ``Estimate(value=stat(values), low, high, n, confidence)``.
    """
    x = as_1d(values, "values")
    c = _check_confidence(confidence)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot={n_boot!r} must be >= 1")
    n_boot = int(n_boot)
    n = x.size
    value = float(stat(x))
    rng = np.random.default_rng(seed)
    block = max(1, _MAX_BOOT_BLOCK // n)
    boots = np.empty(n_boot)
    vectorised = True
    for s in range(0, n_boot, block):
        m = min(block, n_boot - s)
        res = x[rng.integers(0, n, size=(m, n))]
        if vectorised:
            try:
                out = np.asarray(stat(res, axis=1), dtype=np.float64)
                if out.shape != (m,):
                    raise TypeError
                boots[s:s + m] = out
                continue
            except TypeError:
                vectorised = False
        boots[s:s + m] = [float(stat(r)) for r in res]
    low, high = np.quantile(boots, [(1.0 - c) / 2.0, (1.0 + c) / 2.0])
    return Estimate(value=value, low=float(low), high=float(high), n=n, confidence=c)


def _z(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + _check_confidence(confidence) / 2.0))


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n`` (Wilson 1927). Returns ``(low, high)`` in [0, 1]."""
    if int(n) != n or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer (number of trials)")
    if int(k) != k or not 0 <= k <= n:
        raise ValueError(f"k={k!r} must be an integer between 0 and n={n}")
    z = _z(confidence)
    p = k / n
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n)) / (1.0 + z2n)
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    if k == 0:
        low = 0.0
    if k == n:
        high = 1.0
    return low, high


def proportion_estimate(mask, *, confidence: float = 0.95, method: str = "wilson", n_boot: int = 2000,
                        seed: int = 0) -> Estimate:
    """Fraction of True in ``mask`` with a CI: Wilson score (default) or percentile bootstrap."""
    m = np.asarray(mask)
    if m.ndim != 1 or m.size == 0:
        raise ValueError(f"mask must be a non-empty 1-D boolean array; got shape {m.shape}")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError("mask must contain only booleans / 0 / 1")
        m = m.astype(bool)
    if method == "wilson":
        k, n = int(m.sum()), int(m.size)
        low, high = wilson_interval(k, n, confidence)
        return Estimate(value=k / n, low=low, high=high, n=n, confidence=float(confidence))
    if method == "bootstrap":
        return bootstrap_ci(m, np.mean, n_boot=n_boot, confidence=confidence, seed=seed)
    raise ValueError(f"method={method!r} is not supported; allowed: 'wilson', 'bootstrap'")
