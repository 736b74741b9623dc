"""Comparing methods at equal drift: Pareto frontiers of a quality metric against KL to the
initial model, "best quality within a KL budget" tables with their seed spread, and verdicts.

Every evaluation of every run of a method (all knob values, all checkpoints, the initial model
included) is a candidate: a practitioner who can afford KL <= budget picks the best of them. The
frontier is the set of candidates that no other candidate beats at lower or equal KL. The budget
table takes that best per seed, and reports the seed mean with its 95% t-interval (stats.py). A
method is ahead of another at a budget when the 95% interval of their difference lies above 0
(the paired difference over the seeds both ran, else Welch's), behind when it lies below, "not
separable" when it holds 0, and there is no verdict with fewer than ``stats.MIN_SEEDS`` seeds.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from pyalign.study.measures import GOLD
from pyalign.study.stats import MIN_SEEDS, mean_interval, paired_difference, welch_difference

BUDGET_QUANTILES = (0.25, 0.5, 0.75, 1.0)


def pareto_frontier(kl, value) -> list[tuple[float, float]]:
    """The non-dominated (kl, value) points, by increasing kl (and strictly increasing value)."""
    points = sorted(zip(map(float, kl), map(float, value)), key=lambda p: (p[0], -p[1]))
    frontier, best = [], -math.inf
    for x, y in points:
        if y > best:
            frontier.append((x, y))
            best = y
    return frontier


def best_within(kl, value, budget: float) -> float:
    """The best value among the candidates with kl <= budget (nan when there is none)."""
    kl, value = np.asarray(kl, float), np.asarray(value, float)
    inside = value[kl <= budget]
    return float(inside.max()) if inside.size else math.nan


def budget_table(rows: list[dict], method: str, budgets, metric: str = GOLD.quality) -> list[dict]:
    """Per budget: the best ``metric`` within the budget for each seed, their mean and its 95%
    t-interval (``interval``), min and max."""
    mine = [r for r in rows if r["method"] == method]
    seeds = sorted({r["seed"] for r in mine})
    table = []
    for budget in budgets:
        per_seed = {s: best_within([r["kl_to_init"] for r in mine if r["seed"] == s],
                                   [r[metric] for r in mine if r["seed"] == s], budget) for s in seeds}
        values = [v for v in per_seed.values() if not math.isnan(v)]
        interval = mean_interval(values)
        table.append({"budget": float(budget), "per_seed": per_seed, "interval": interval,
                      "mean": interval.mean, "low": interval.low, "high": interval.high,
                      "min": min(values) if values else math.nan,
                      "max": max(values) if values else math.nan})
    return table


def default_budgets(rows: list[dict], methods) -> list[float]:
    """Budgets at quantiles of the pooled KL of the methods' evaluations (2 significant digits)."""
    kls = np.asarray([r["kl_to_init"] for r in rows if r["method"] in methods and r["kl_to_init"] > 0])
    if kls.size == 0:
        return []
    budgets = []
    for q in BUDGET_QUANTILES:
        value = float(np.quantile(kls, q))
        rounded = float(f"{value:.2g}")
        if q == 1.0 and rounded < value:  # the largest budget covers every point
            rounded = float(f"{value * 1.05:.2g}")
        if rounded > 0 and rounded not in budgets:
            budgets.append(rounded)
    return budgets


def difference(method_row: dict, baseline_row: dict):
    """The 95% interval of (method - baseline) at one budget (rows of two budget tables): paired
    over the seeds both ran when there are ``MIN_SEEDS`` of them, else Welch's."""
    mine, theirs = method_row["per_seed"], baseline_row["per_seed"]
    shared = [s for s in mine if s in theirs and not math.isnan(mine[s]) and not math.isnan(theirs[s])]
    if len(shared) >= MIN_SEEDS:
        return paired_difference(mine, theirs)
    return welch_difference(list(mine.values()), list(theirs.values()))


def compare(method_row: dict, baseline_row: dict) -> str:
    """'ahead' / 'behind' / 'not separable' / 'too few seeds' / 'n/a' at one budget."""
    diff = difference(method_row, baseline_row)
    if diff.n == 0:
        return "n/a"
    if diff.n < MIN_SEEDS:
        return "too few seeds"
    return {1: "ahead", -1: "behind", 0: "not separable"}[diff.sign()]


def verdict(method: str, baseline: str, method_table: list[dict], baseline_table: list[dict],
            metric: str = GOLD.quality, label: Optional[str] = None) -> str:
    """One line: where each method is ahead, each budget with the interval of the difference;
    ``label``: the metric in words (default: its key's)."""
    outcomes = [(m["budget"], compare(m, b), difference(m, b)) for m, b in zip(method_table, baseline_table)]
    label = label or metric.replace("_", " ")

    def at(kind):
        return ", ".join(f"KL <= {budget:g}: {diff.text()}" for budget, outcome, diff in outcomes
                         if outcome == kind)
    kinds = {outcome for _, outcome, _ in outcomes if outcome != "n/a"}
    if not kinds:
        return f"{method} vs {baseline}: no budget where both have evaluations."
    seeds = max(diff.n for _, _, diff in outcomes)
    if kinds == {"too few seeds"}:
        return (f"{method} vs {baseline} on {label}: no verdict: {seeds} seed(s) where a verdict "
                f"needs {MIN_SEEDS} (a 95% t-interval of the seed mean).")
    how = (f"{method} − {baseline} in the best {label} within each budget, seed mean and 95% "
           f"t-interval over {seeds} seeds")
    parts = []
    if "ahead" in kinds:
        parts.append(f"{method} ahead at {at('ahead')}")
    if "behind" in kinds:
        parts.append(f"{baseline} ahead at {at('behind')}")
    if "not separable" in kinds:
        parts.append(f"not separable at {at('not separable')}")
    if "too few seeds" in kinds:
        parts.append(f"too few seeds at {at('too few seeds')}")
    if kinds == {"not separable"}:
        head = f"{method} and {baseline} are not separable on {label} at any budget"
    elif "ahead" in kinds and "behind" in kinds:
        head = f"{method} vs {baseline} on {label}: mixed"
    elif "ahead" in kinds:
        head = f"{method} above {baseline} on {label} where they separate"
    elif "behind" in kinds:
        head = f"{baseline} above {method} on {label} where they separate"
    else:
        head = f"{method} vs {baseline} on {label}: no verdict"
    return f"{head} ({how}): {'; '.join(parts)}."


def with_matched_baselines(rows: list[dict], matched: dict) -> list[dict]:
    """``rows`` plus, for each method run at one fixed value of its baseline's knob (``matched``:
    method -> (baseline, knob, value)), the baseline's runs at that value under the label
    ``"baseline (knob=value)"``: the papers' comparison (TR-X against X at the same beta,
    Elastic Reset against RLOO at the same KL coefficient), next to the one against the
    baseline's whole sweep."""
    extra = []
    for baseline, knob, value in matched.values():
        label = f"{baseline} ({knob}={value:g})"
        extra += [{**r, "method": label} for r in rows
                  if r["method"] == baseline and r["knob"] == knob and r["value"] == value]
    return rows + extra


def method_pairs(methods) -> list[tuple[str, str]]:
    """(method, baseline): TR-X vs X (its whole sweep, then X at TR-X's beta where the rows have
    it), Elastic Reset vs RLOO with a KL penalty (the sweep, then at Elastic Reset's
    coefficient) and without one."""
    methods = list(methods)
    pairs = []
    for m in methods:
        if m.startswith("tr-"):
            pairs += [(m, b) for b in methods if b == m[3:] or b.startswith(f"{m[3:]} (beta=")]
    if "elastic-reset" in methods:
        pairs += [("elastic-reset", b) for b in methods
                  if b in ("rloo", "rloo (no KL)") or b.startswith("rloo (kl_coef=")]
    return pairs


def compare_pairs(rows: list[dict], budgets: Optional[list[float]] = None,
                  metrics=GOLD.pair_metrics, labels: Optional[dict] = None) -> list[dict]:
    """Every method pair of the rows: budgets, both budget tables per metric, and the verdicts
    (``labels``: metric -> its words in them)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for method, baseline in method_pairs(methods):
        pair_budgets = list(budgets) if budgets else default_budgets(rows, (method, baseline))
        entry = {"method": method, "baseline": baseline, "budgets": pair_budgets, "tables": {},
                 "verdicts": {}}
        for metric in metrics:
            mine = budget_table(rows, method, pair_budgets, metric)
            theirs = budget_table(rows, baseline, pair_budgets, metric)
            entry["tables"][metric] = (mine, theirs)
            entry["verdicts"][metric] = verdict(method, baseline, mine, theirs, metric,
                                                (labels or {}).get(metric))
        out.append(entry)
    return out


__all__ = ["pareto_frontier", "best_within", "budget_table", "default_budgets", "difference", "compare",
           "verdict", "method_pairs", "compare_pairs"]
