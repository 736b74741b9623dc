"""The intervals a study's verdicts rest on: 95% Student-t intervals of a mean over seeds, of a
paired difference over shared seeds, and of a difference of two independent means (Welch).

Why a t-interval of the seed mean: a study's unit of replication is the seed (it draws the
preference data, their order and every sample of a run), and the quantities compared (the best
gold reward within a KL budget, a length slope, a peak's KL) are one number per seed. The seed
mean's 95% t-interval has the coverage it claims at any seed count when those numbers are
roughly normal, and says honestly how little a few seeds know: its half-width is
``t(n-1) * sd / sqrt(n)`` with t = 12.7 at two seeds, 4.30 at three and 2.78 at five. A
verdict needs ``MIN_SEEDS`` = 3 (below it a study reports "too few seeds", never a verdict
from the [min, max] of two seeds, which is a 50% interval for their median); the presets run 5.
Two methods run at the same seeds share each seed's data (pyalign.trainers.trainer:
make_generator), so they are compared by the paired difference, which removes the seed-to-seed
spread that both share; independent samples (two model sizes, whose data come from different SFT
models) by Welch's interval.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

MIN_SEEDS = 3
# Two-sided 95% quantiles of Student's t, by degrees of freedom (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def t_quantile(df: float) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (a fractional df, as
    Welch's, is rounded down: the wider interval)."""
    if not df >= 1:
        return math.nan
    if df < len(_T975) + 1:
        return _T975[int(df) - 1]
    z = _Z975  # the Cornish-Fisher expansion: within 1e-3 of the table from df = 30 on
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean (or difference) over ``n`` seeds and its 95% interval (nan below two seeds)."""
    mean: float
    low: float
    high: float
    n: int

    def sign(self) -> int:
        """+1 when the interval lies above 0, -1 below, 0 when it holds 0 or is undefined."""
        if self.low > 0:
            return 1
        if self.high < 0:
            return -1
        return 0

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.mean):
            return "–"
        if math.isnan(self.low):
            return f"{self.mean:.{digits}g} (n = {self.n})"
        return f"{self.mean:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}]"


NO_DATA = Interval(math.nan, math.nan, math.nan, 0)


def mean_interval(values) -> Interval:
    """The mean of ``values`` (one per seed; nan ones dropped) and its 95% t-interval."""
    values = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    n = int(values.size)
    if n == 0:
        return NO_DATA
    mean = float(values.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = t_quantile(n - 1) * float(values.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(first: dict, second: dict) -> Interval:
    """``first - second`` over the seeds both have a number for (dicts seed -> value)."""
    shared = [s for s in first if s in second and not math.isnan(first[s]) and not math.isnan(second[s])]
    return mean_interval([first[s] - second[s] for s in shared])


def welch_difference(first, second) -> Interval:
    """``mean(first) - mean(second)`` of two independent samples, Welch's 95% interval (n: the
    smaller sample)."""
    a = np.asarray([v for v in first if not math.isnan(v)], dtype=np.float64)
    b = np.asarray([v for v in second if not math.isnan(v)], dtype=np.float64)
    if a.size == 0 or b.size == 0:
        return NO_DATA
    mean = float(a.mean() - b.mean())
    n = int(min(a.size, b.size))
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    va, vb = float(a.var(ddof=1)) / a.size, float(b.var(ddof=1)) / b.size
    if va + vb == 0:
        return Interval(mean, mean, mean, n)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = t_quantile(df) * math.sqrt(va + vb)
    return Interval(mean, mean - half, mean + half, n)


def enough_seeds(interval: Interval) -> bool:
    return interval.n >= MIN_SEEDS


__all__ = ["MIN_SEEDS", "Interval", "NO_DATA", "t_quantile", "mean_interval", "paired_difference",
           "welch_difference", "enough_seeds"]
