"""Pareto frontiers, best-within-budget tables and verdicts on hand-made points."""
import math

import pytest

from pyalign.study.frontiers import (
    best_within,
    budget_table,
    compare_pairs,
    default_budgets,
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


# A beats B at small budgets with seed ranges apart, they overlap at the largest.
ROWS = (_rows("tr-dpo", 0, [(0.0, 0.0), (1.0, 0.40), (3.0, 0.50)])
        + _rows("tr-dpo", 1, [(0.0, 0.0), (1.0, 0.42), (3.0, 0.44)])
        + _rows("dpo", 0, [(0.0, 0.0), (1.0, 0.20), (3.0, 0.45)])
        + _rows("dpo", 1, [(0.0, 0.0), (2.0, 0.25), (3.0, 0.48)]))


def test_budget_table_mean_min_max_over_seeds():
    table = budget_table(ROWS, "dpo", [1.0, 2.0, 3.0])
    assert [t["per_seed"] for t in table] == [{0: 0.20, 1: 0.0}, {0: 0.20, 1: 0.25}, {0: 0.45, 1: 0.48}]
    assert [t["mean"] for t in table] == pytest.approx([0.10, 0.225, 0.465])
    assert [(t["min"], t["max"]) for t in table] == [(0.0, 0.20), (0.20, 0.25), (0.45, 0.48)]


def test_verdict_says_where_each_frontier_is_ahead():
    budgets = [1.0, 2.0, 3.0]
    mine, theirs = budget_table(ROWS, "tr-dpo", budgets), budget_table(ROWS, "dpo", budgets)
    line = verdict("tr-dpo", "dpo", mine, theirs)
    assert line == ("tr-dpo above dpo on gold reward where they separate "
                    "(tr-dpo ahead at KL <= 1, 2; overlapping at KL <= 3).")
    assert verdict("tr-dpo", "dpo", mine[:2], theirs[:2]).startswith("tr-dpo dominates dpo")
    assert verdict("dpo", "tr-dpo", theirs[:2], mine[:2]).startswith("tr-dpo dominates dpo")
    assert verdict("dpo", "tr-dpo", theirs, mine).startswith("tr-dpo above dpo on gold reward")
    assert "not separable" in verdict("tr-dpo", "dpo", mine[2:], theirs[2:])
    # x: 0.3 at KL 0 on both seeds: above dpo's best seed within KL <= 1 and 2 (0.2, 0.25),
    # below its worst within 3 (0.45)
    mixed = budget_table(_rows("x", 0, [(0.0, 0.3)]) + _rows("x", 1, [(0.0, 0.3)]), "x", budgets)
    assert verdict("x", "dpo", mixed, theirs) == ("x vs dpo on gold reward: mixed (x ahead at KL <= 1, 2; "
                                                  "dpo ahead at KL <= 3).")


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
    assert "ahead at KL <= 1" in pair["verdicts"]["gold_reward"]
