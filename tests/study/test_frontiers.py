"""Pareto frontiers, best-within-budget tables with t-intervals over seeds, and verdicts from the
paired seed difference, on hand-made points."""
import math

import pytest

from pyalign.study.frontiers import (
    best_within,
    budget_table,
    compare,
    compare_pairs,
    default_budgets,
    difference,
    method_pairs,
    pareto_frontier,
    verdict,
    with_matched_baselines,
)


def test_pareto_frontier_keeps_only_undominated_points():
    kl = [0.0, 1.0, 2.0, 2.0, 3.0, 4.0, 5.0]
    gold = [0.1, 0.3, 0.2, 0.35, 0.35, 0.5, 0.4]
    assert pareto_frontier(kl, gold) == [(0.0, 0.1), (1.0, 0.3), (2.0, 0.35), (4.0, 0.5)]


def test_best_within_budget():
    kl, gold = [0.0, 1.0, 2.0, 4.0], [0.1, 0.3, 0.2, 0.5]
    assert best_within(kl, gold, 0.5) == 0.1
    assert best_within(kl, gold, 2.0) == 0.3
    assert best_within(kl, gold, 10.0) == 0.5
    assert math.isnan(best_within([1.0], [0.2], 0.5))


def _rows(method, seed, points):
    return [{"method": method, "seed": seed, "kl_to_init": k, "gold_reward": g} for k, g in points]


# tr-dpo beats dpo by 0.2 on every seed within KL <= 1 and 2; within 3 the paired differences are
# 0.04, 0, -0.04 (seed 0, 1, 2): not separable.
ROWS = [r for s in (0, 1, 2) for r in
        _rows("tr-dpo", s, [(0.0, 0.0), (1.0, 0.40 + 0.01 * s), (3.0, 0.50 - 0.02 * s)])
        + _rows("dpo", s, [(0.0, 0.0), (1.0, 0.20 + 0.01 * s), (3.0, 0.46 + 0.02 * s)])]
T_975_2DF = 4.303  # Student's t, 2 degrees of freedom, two-sided 95%


def test_budget_table_mean_and_t_interval_over_seeds():
    table = budget_table(ROWS, "dpo", [0.5, 1.0, 3.0])
    expected = [[0.0, 0.0, 0.0], [0.20, 0.21, 0.22], [0.46, 0.48, 0.50]]
    for row, values in zip(table, expected):
        assert list(row["per_seed"]) == [0, 1, 2]
        assert list(row["per_seed"].values()) == pytest.approx(values)
    assert [t["mean"] for t in table] == pytest.approx([0.0, 0.21, 0.48])
    half = T_975_2DF * 0.02 / math.sqrt(3)  # sd of (0.46, 0.48, 0.50) is 0.02
    assert (table[2]["low"], table[2]["high"]) == pytest.approx((0.48 - half, 0.48 + half))
    assert [t["min"] for t in table] == pytest.approx([0.0, 0.20, 0.46])
    assert [t["max"] for t in table] == pytest.approx([0.0, 0.22, 0.50])


def test_verdict_names_each_budget_with_the_interval_of_the_paired_difference():
    budgets = [1.0, 2.0, 3.0]
    mine, theirs = budget_table(ROWS, "tr-dpo", budgets), budget_table(ROWS, "dpo", budgets)
    assert [compare(m, b) for m, b in zip(mine, theirs)] == ["ahead", "ahead", "not separable"]
    spread = difference(mine[2], theirs[2])
    half = T_975_2DF * 0.04 / math.sqrt(3)  # paired differences 0.04, 0, -0.04: sd 0.04
    assert spread.n == 3 and (spread.low, spread.high) == pytest.approx((-half, half))
    line = verdict("tr-dpo", "dpo", mine, theirs)
    assert line.startswith("tr-dpo above dpo on gold reward where they separate (tr-dpo − dpo in the "
                           "best gold reward within each budget, seed mean and 95% t-interval over 3 seeds)")
    assert "tr-dpo ahead at KL <= 1: 0.2 [0.2, 0.2], KL <= 2: 0.2 [0.2, 0.2]" in line
    assert "not separable at KL <= 3: " in line and f"{half:.3g}]" in line
    assert verdict("tr-dpo", "dpo", mine[:2], theirs[:2]).startswith("tr-dpo above dpo")
    assert verdict("dpo", "tr-dpo", theirs, mine).startswith("tr-dpo above dpo on gold reward")
    assert verdict("tr-dpo", "dpo", mine[2:], theirs[2:]).startswith(
        "tr-dpo and dpo are not separable on gold reward at any budget")
    # x: 0.3 at KL 0 on every seed: above dpo within KL <= 1 (0.20-0.22), below it within 3
    mixed = budget_table([r for s in (0, 1, 2) for r in _rows("x", s, [(0.0, 0.3)])], "x", budgets)
    assert verdict("x", "dpo", mixed, theirs).startswith("x vs dpo on gold reward: mixed")


def test_two_seeds_give_no_verdict():
    two = [r for r in ROWS if r["seed"] < 2]
    mine, theirs = budget_table(two, "tr-dpo", [1.0, 3.0]), budget_table(two, "dpo", [1.0, 3.0])
    assert [compare(m, b) for m, b in zip(mine, theirs)] == ["too few seeds", "too few seeds"]
    assert verdict("tr-dpo", "dpo", mine, theirs) == (
        "tr-dpo vs dpo on gold reward: no verdict: 2 seed(s) where a verdict needs 3 "
        "(a 95% t-interval of the seed mean).")


def test_matched_baseline_is_the_base_method_at_the_tr_beta():
    rows = [{"method": "dpo", "knob": "beta", "value": v, "seed": 0, "kl_to_init": 1.0, "gold_reward": v}
            for v in (0.05, 0.1)] + [{"method": "tr-dpo", "knob": "tr_tau", "value": 8, "seed": 0,
                                      "kl_to_init": 1.0, "gold_reward": 0.3}]
    out = with_matched_baselines(rows, {"tr-dpo": ("dpo", "beta", 0.1)})
    assert out[:3] == rows
    assert out[3:] == [{**rows[1], "method": "dpo (beta=0.1)"}]


def test_pairs_and_default_budgets():
    assert method_pairs(["dpo", "tr-dpo", "ipo", "elastic-reset", "rloo", "rloo (no KL)",
                         "rloo (kl_coef=0.05)"]) == [
        ("tr-dpo", "dpo"), ("elastic-reset", "rloo"), ("elastic-reset", "rloo (no KL)"),
        ("elastic-reset", "rloo (kl_coef=0.05)")]
    assert method_pairs(["tr-ipo", "dpo"]) == []
    assert method_pairs(["dpo", "tr-dpo", "dpo (beta=0.1)"]) == [("tr-dpo", "dpo"),
                                                                 ("tr-dpo", "dpo (beta=0.1)")]
    budgets = default_budgets(ROWS, ("tr-dpo", "dpo"))
    assert budgets == sorted(budgets) and budgets[-1] >= 3.0
    (pair,) = compare_pairs(ROWS, [1.0, 3.0], metrics=("gold_reward",))
    assert (pair["method"], pair["baseline"], pair["budgets"]) == ("tr-dpo", "dpo", [1.0, 3.0])
    assert "ahead at KL <= 1: " in pair["verdicts"]["gold_reward"]
