"""The claims a study tests, from per-seed numbers with 95% t-intervals over seeds (stats.py):

- **Over-optimisation** (per method and model size): along each run, gold falls from its best
  checkpoint to the last one while KL keeps growing. Per run the *drop* is the gold of its best
  evaluation minus the gold of its last (and the proxy's change over the same span); per seed
  the mean over the method's runs. Taking each run's best of several noisy evaluations biases
  the drop upwards by about the evaluation's noise, so the drop is *shown* only where its
  interval lies above ``DROP_NOISE`` standard errors of one evaluation's gold mean.
- **Length** (per method and size): per seed, the least-squares slope of the response length
  (tokens up to EOS) on KL over every evaluation of the method; "lengthens as KL grows" is
  shown where the slope's interval lies above 0. Where the mean length of some evaluation comes
  within 10% of the response cap, the report says so: past that the cap, not the policy, sets
  the length, and a straight line understates the growth. Not testable on the fixed-length
  task: its responses are scored over all their tokens, and a sampled EOS there ends nothing.
- **Scale** (per method, over the grid's model sizes): per seed, the KL of the best gold
  evaluation (where the method peaks), the best gold, and the drop; "larger models over-optimise
  later" is shown where the largest size's peak KL exceeds the smallest's by Welch's interval
  (the sizes' data differ: independent samples), "less" where its drop is smaller. "Later" is
  not testable where a size's best evaluation is its largest-KL one in most seeds: its peak, if
  any, lies past the data.

Each verdict is one of ``shown``, ``not shown`` (the interval holds 0: the data do not
separate), ``opposite`` (the interval excludes 0 the other way) and ``too few seeds``. "Gold"
is the study's quality measure (``measures.Measures``: on one's own data without a gold reward,
the held-out preference accuracy, and the proxy the training preference accuracy).
"""
from __future__ import annotations

import math

import numpy as np

from pyalign.study.measures import GOLD, Measures
from pyalign.study.stats import MIN_SEEDS, NO_DATA, Interval, mean_interval, welch_difference

DROP_NOISE = 2.0


def size_of(row: dict) -> str:
    return row.get("size") or ""


def groups(rows: list[dict]) -> list[tuple[str, str]]:
    """(size, method) pairs in the rows' order."""
    return list(dict.fromkeys((size_of(r), r["method"]) for r in rows))


def _select(rows, size: str, method: str) -> list[dict]:
    return [r for r in rows if size_of(r) == size and r["method"] == method]


def _runs(rows: list[dict]) -> dict:
    """(value, seed) -> the run's rows by step."""
    runs: dict = {}
    for r in rows:
        runs.setdefault((r["value"], r["seed"]), []).append(r)
    return {key: sorted(mine, key=lambda r: r["step"]) for key, mine in runs.items()}


def verdict_word(interval: Interval, floor: float = 0.0) -> str:
    """'shown' (the interval above ``floor``), 'opposite' (below 0), 'not shown' (between), or
    'too few seeds'."""
    if interval.n < MIN_SEEDS:
        return "too few seeds"
    if interval.low > floor:
        return "shown"
    if interval.high < 0:
        return "opposite"
    return "not shown"


def drops(rows: list[dict], measures: Measures = GOLD) -> dict:
    """Per seed: the mean over the runs of (gold at the run's best evaluation - gold at its last),
    and the mean proxy change over the same span (over the runs that have a proxy); the noise
    floor of the drop."""
    quality = measures.quality
    per_seed: dict = {}
    for (_, seed), run in _runs(rows).items():
        peak = max(range(len(run)), key=lambda i: run[i][quality])
        last = run[-1]
        proxy = last[measures.proxy] - run[peak][measures.proxy] \
            if measures.has_proxy(last) and measures.has_proxy(run[peak]) else None
        per_seed.setdefault(seed, []).append((run[peak][quality] - last[quality], proxy))
    errors = [r[measures.quality_se] for r in rows if r.get(measures.quality_se) is not None]
    proxies = [[p for _, p in v if p is not None] for v in per_seed.values()]
    return {"drop": mean_interval([float(np.mean([d for d, _ in v])) for v in per_seed.values()]),
            "proxy_change": mean_interval([float(np.mean(p)) for p in proxies if p]),
            "per_seed": {s: float(np.mean([d for d, _ in v])) for s, v in per_seed.items()},
            "floor": DROP_NOISE * float(np.median(errors)) if errors else 0.0}


def overoptimisation(rows: list[dict], measures: Measures = GOLD) -> list[dict]:
    """One entry per (size, method): the drop after the peak, the proxy's change, the verdict."""
    out = []
    for size, method in groups(rows):
        mine = _select(rows, size, method)
        found = drops(mine, measures)
        out.append({"size": size, "method": method, **found,
                    "kl_max": max((r["kl_to_init"] for r in mine), default=math.nan),
                    "verdict": verdict_word(found["drop"], found["floor"])})
    return out


def length_claims(rows: list[dict], fixed_length: bool = False, cap: float = math.inf) -> list[dict]:
    """One entry per (size, method): the length at the initial model, the per-seed slope of
    length on KL (tokens per nat) and intercept with their intervals, the KL range, the longest
    mean length and whether it nears ``cap``, and the verdict (not testable with
    ``fixed_length`` or when every response has the same length)."""
    out = []
    for size, method in groups(rows):
        mine = _select(rows, size, method)
        lengths = [r["response_length"] for r in mine]
        seeds = sorted({r["seed"] for r in mine})
        lines = [line([r["kl_to_init"] for r in mine if r["seed"] == s],
                      [r["response_length"] for r in mine if r["seed"] == s]) for s in seeds]
        fixed = fixed_length or (bool(lengths) and max(lengths) == min(lengths))
        tokens_per_nat = NO_DATA if fixed else mean_interval([slope for slope, _ in lines])
        longest = max(lengths) if lengths else math.nan
        out.append({"size": size, "method": method, "fixed_length": fixed, "slope": tokens_per_nat,
                    "per_seed": {s: slope for s, (slope, _) in zip(seeds, lines)},
                    "intercept": mean_interval([intercept for _, intercept in lines]),
                    "initial": mean_interval([r["response_length"] for r in mine if r["step"] == 0]),
                    "longest": longest, "cap": cap, "at_cap": longest >= 0.9 * cap,
                    "kl_max": max((r["kl_to_init"] for r in mine), default=math.nan),
                    "verdict": "not testable (fixed length)" if fixed else verdict_word(tokens_per_nat)})
    return out


def line(x, y) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line of y on x; nan with fewer than two distinct x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 2 or np.ptp(x) == 0:
        return math.nan, math.nan
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def peaks(rows: list[dict], quality: str = GOLD.quality) -> dict:
    """Per seed: the KL and gold of the best-gold evaluation of any of the rows' runs, and
    whether that is the seed's largest-KL evaluation (the peak is censored by the data's end)."""
    best, farthest = {}, {}
    for r in rows:
        if r["seed"] not in best or r[quality] > best[r["seed"]][quality]:
            best[r["seed"]] = r
        farthest[r["seed"]] = max(farthest.get(r["seed"], -math.inf), r["kl_to_init"])
    return {"kl": {s: r["kl_to_init"] for s, r in best.items()},
            "gold": {s: r[quality] for s, r in best.items()},
            "censored": sum(r["kl_to_init"] >= farthest[s] for s, r in best.items())}


def scale_claims(rows: list[dict], size_order, measures: Measures = GOLD) -> list[dict]:
    """Per method run at two or more sizes: per size the peak KL, best gold and drop intervals;
    the largest size against the smallest on "over-optimises later" and "less"."""
    out = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        sizes = [s for s in size_order if _select(rows, s, method)]
        if len(sizes) < 2:
            continue
        per_size, censored = {}, {}
        for size in sizes:
            mine = _select(rows, size, method)
            found, top = drops(mine, measures), peaks(mine, measures.quality)
            per_size[size] = {"peak_kl": list(top["kl"].values()), "best_gold": list(top["gold"].values()),
                              "drop": list(found["per_seed"].values())}
            if 2 * top["censored"] > len(top["kl"]):
                censored[size] = f"{top['censored']} of {len(top['kl'])}"
        small, large = per_size[sizes[0]], per_size[sizes[-1]]
        later = welch_difference(large["peak_kl"], small["peak_kl"])
        less = welch_difference(small["drop"], large["drop"])
        ends = [s for s in (sizes[0], sizes[-1]) if s in censored]
        later_verdict = verdict_word(later) if not ends else "not testable: " + ", ".join(
            f"{s} is best at its largest KL in {censored[s]} seeds" for s in ends)
        out.append({"method": method, "sizes": sizes, "smallest": sizes[0], "largest": sizes[-1],
                    "table": {s: {k: mean_interval(v) for k, v in d.items()} for s, d in per_size.items()},
                    "later": later, "less": less,
                    "later_verdict": later_verdict, "less_verdict": verdict_word(less)})
    return out


__all__ = ["overoptimisation", "length_claims", "scale_claims", "groups", "size_of", "verdict_word",
           "drops", "peaks", "DROP_NOISE"]
