"""The scaling-law fit of over-optimisation, ``R(d) = d * (a - b * log d)`` with ``d = sqrt(KL)``
(Gao et al. 2023 for best-of-n and RL; Rafailov et al. 2024 for direct alignment), per algorithm.

R is a gain over the initial model, so R(0) = 0: the gold reward minus the SFT model's gold on
the same prompts (``gold_gain``), or the gold win rate against the SFT model minus one half
(the targets of ``measures.Measures``; without a gold reward the held-out preference margin
and accuracy minus one half). The
model is linear in (a, b), so the least-squares fit is exact (``numpy.linalg.lstsq``); points
at d = 0 carry no information and are left out. With b > 0 the curve peaks at
``d* = exp(a / b - 1)`` with ``R(d*) = b * d*``; with b <= 0 it never turns down (no peak in
sight: d* is reported as infinite). The interval is a bootstrap over seeds: the seeds are
resampled with replacement (every evaluation of a seed's runs moves together) and the fit
repeated; the 2.5th and 97.5th percentiles are reported.

A fit *holds* (``fit_holds``) when it explains at least ``R2_MIN`` = 0.9 of the variance of the
evaluations it summarises and its b stays above 0 across the seed bootstrap (the 2.5th
percentile > 0: the turn-down is not one resample's accident), with at least
``stats.MIN_SEEDS`` seeds to bootstrap, and its peak d* lies inside the data (at most the
largest d observed: a peak past the data is an extrapolation, not a hump the data show).
Below R² 0.9 a tenth or more of the variance is structure the curve misses: on the first
default study (fits of R² 0.72-0.87) the best checkpoints lay 0.1 gold above every curve, which
runs past KL 20 pulled down. A study reports a, b and d* only for the fits that hold; for the
others it says why and gives the model-free numbers alone (frontiers.py, claims.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from pyalign.study.measures import GOLD, Measures
from pyalign.study.stats import MIN_SEEDS

BOOTSTRAP_SAMPLES = 500
R2_MIN = 0.9


@dataclasses.dataclass
class HumpFit:
    a: float
    b: float
    r2: float
    n: int

    @property
    def peak_d(self) -> float:
        if self.b <= 0:
            return math.inf
        exponent = self.a / self.b - 1.0
        return math.exp(exponent) if exponent < 700 else math.inf  # past float64: no peak in sight

    @property
    def peak_value(self) -> float:
        return self.b * self.peak_d if self.b > 0 else math.inf

    def __call__(self, d):
        d = np.asarray(d, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(d > 0, d * (self.a - self.b * np.log(np.where(d > 0, d, 1.0))), 0.0)


def fit_hump(d, r) -> Optional[HumpFit]:
    """Least squares of ``r = d * (a - b log d)`` over the points with d > 0; None with fewer
    than two such points or a degenerate design."""
    d, r = np.asarray(d, dtype=np.float64), np.asarray(r, dtype=np.float64)
    keep = (d > 0) & np.isfinite(d) & np.isfinite(r)
    d, r = d[keep], r[keep]
    if d.size < 2:
        return None
    design = np.stack([d, -d * np.log(d)], axis=1)
    if np.linalg.matrix_rank(design) < 2:
        return None
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    residual = r - design @ np.array([a, b])
    total = float(((r - r.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / total if total > 0 else float("nan")
    return HumpFit(float(a), float(b), r2, int(d.size))


def bootstrap_hump(d, r, seeds, *, samples: int = BOOTSTRAP_SAMPLES, rng_seed: int = 0) -> dict:
    """Percentile intervals (2.5, 97.5) of a, b, d* and R(d*) over seed resamples."""
    d, r, seeds = np.asarray(d, float), np.asarray(r, float), np.asarray(seeds)
    unique = np.unique(seeds)
    rng = np.random.default_rng(rng_seed)
    draws = {"a": [], "b": [], "peak_d": [], "peak_value": []}
    for _ in range(samples):
        chosen = rng.choice(unique, size=unique.size, replace=True)
        rows = np.concatenate([np.flatnonzero(seeds == s) for s in chosen])
        fit = fit_hump(d[rows], r[rows])
        if fit is None:
            continue
        for key in draws:
            draws[key].append(getattr(fit, key))
    out = {}
    for key, values in draws.items():
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            out[key] = (math.nan, math.nan)
        else:
            # order statistics, not interpolation: a "no peak" draw (inf) stays inf, never nan
            low = np.percentile(values, 2.5, method="lower")
            high = np.percentile(values, 97.5, method="higher")
            out[key] = (float(low), float(high))
    return out


def slope(x, y) -> float:
    """Least-squares slope of y on x (nan with fewer than two distinct x)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 2 or np.ptp(x) == 0:
        return math.nan
    return float(np.polyfit(x, y, 1)[0])


def fit_holds(fit: Optional[HumpFit], interval: dict, seeds: int, d_max: float) -> tuple[bool, str]:
    """(whether the fit describes a hump in the data, and if not why): R² >= R2_MIN, the
    bootstrap's b interval above 0 from at least MIN_SEEDS seeds, and d* <= ``d_max``, the
    largest d observed (module docstring)."""
    if fit is None:
        return False, "the fit does not describe the data: too few evaluations to fit"
    reasons = []
    if not fit.r2 >= R2_MIN:
        reasons.append(f"R² = {fit.r2:.2f} < {R2_MIN}")
    if seeds < MIN_SEEDS:
        reasons.append(f"{seeds} seed(s), where the bootstrap of b needs {MIN_SEEDS}")
    elif not interval.get("b", (math.nan,))[0] > 0:
        low, high = interval.get("b", (math.nan, math.nan))
        reasons.append(f"b's 95% bootstrap interval [{low:.3g}, {high:.3g}] is not above 0")
    if reasons:
        return False, "the fit does not describe the data: " + "; ".join(reasons)
    if not fit.peak_d <= d_max:
        return False, (f"no hump inside the data: the fitted peak d* = {fit.peak_d:.3g} lies past the "
                       f"largest √KL observed ({d_max:.3g})")
    return True, ""


def fit_table(rows: list[dict], measures: Measures = GOLD) -> list[dict]:
    """One entry per (method, target of ``measures``): the fit, its bootstrap interval, whether
    it holds (and why not), the seed count and the best value observed."""
    table = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        d = [r["sqrt_kl"] for r in mine]
        seeds = [r["seed"] for r in mine]
        for target, at_zero in measures.targets.items():
            values = [r[target] - at_zero for r in mine]
            fit = fit_hump(d, values)
            interval = bootstrap_hump(d, values, seeds) if fit is not None else {}
            holds, why_not = fit_holds(fit, interval, len(set(seeds)), max(d, default=0.0))
            table.append({"method": method, "target": target, "fit": fit, "interval": interval,
                          "holds": holds, "why_not": why_not, "seeds": len(set(seeds)), "n": len(mine),
                          "max_observed": max(values) if values else math.nan})
    return table


__all__ = ["HumpFit", "fit_hump", "bootstrap_hump", "slope", "fit_holds", "fit_table", "R2_MIN"]
