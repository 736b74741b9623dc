"""The R(d) = d(a - b log d) fit recovers known a, b from noisy synthetic points; its peak and
R² agree with independent computations; the seed bootstrap brackets the truth; a fit holds only
with R² >= 0.9, b above 0 across the bootstrap of at least 3 seeds and its peak inside the data."""
import math

import numpy as np
import pytest

from pyalign.study.fits import R2_MIN, bootstrap_hump, fit_hump, fit_table, slope


def _curve(d, a, b):
    return d * (a - b * np.log(d))


@pytest.mark.parametrize("a, b", [(0.3, 0.2), (1.0, 0.5), (0.05, 0.08)])
def test_fit_recovers_known_a_b_from_noisy_points(a, b):
    rng = np.random.default_rng(7)
    d = rng.uniform(0.05, 5.0, size=400)
    r = _curve(d, a, b) + rng.normal(0, 0.01, size=d.size)
    fit = fit_hump(d, r)
    assert fit.a == pytest.approx(a, abs=0.01)
    assert fit.b == pytest.approx(b, abs=0.01)
    assert fit.r2 > 0.95


def test_peak_matches_a_numeric_maximum_of_the_fitted_curve():
    rng = np.random.default_rng(3)
    d = rng.uniform(0.1, 6.0, size=200)
    fit = fit_hump(d, _curve(d, 0.6, 0.4) + rng.normal(0, 0.02, size=d.size))
    grid = np.linspace(0.01, 20, 200_001)
    values = grid * (fit.a - fit.b * np.log(grid))  # the curve, written out here
    assert fit.peak_d == pytest.approx(grid[values.argmax()], rel=1e-3)
    assert fit.peak_value == pytest.approx(values.max(), rel=1e-6)
    assert fit.peak_d == pytest.approx(math.exp(0.6 / 0.4 - 1), rel=0.05)


def test_r2_is_one_minus_residual_over_total_and_d0_points_are_ignored():
    d = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    r = np.array([0.0, 0.21, 0.33, 0.36, 0.31, 0.18])
    fit = fit_hump(d, r)
    keep = d > 0
    # an independent solve of the 2x2 normal equations
    x1, x2 = d[keep], -d[keep] * np.log(d[keep])
    gram = np.array([[x1 @ x1, x1 @ x2], [x2 @ x1, x2 @ x2]])
    a, b = np.linalg.solve(gram, [x1 @ r[keep], x2 @ r[keep]])
    assert (fit.a, fit.b) == pytest.approx((a, b), rel=1e-9)
    pred = x1 * a + x2 * b
    r2 = 1 - ((r[keep] - pred) ** 2).sum() / ((r[keep] - r[keep].mean()) ** 2).sum()
    assert fit.r2 == pytest.approx(r2, rel=1e-9)
    assert fit.n == 5


def test_monotone_data_has_no_peak_and_too_few_points_no_fit():
    d = np.linspace(0.1, 3, 30)
    fit = fit_hump(d, 0.2 * d + 0.05 * d * np.log(d))  # b = -0.05: never turns down
    assert fit.b < 0 and math.isinf(fit.peak_d) and math.isinf(fit.peak_value)
    assert fit_hump([0.0, 1.0], [0.0, 0.3]) is None  # one point with d > 0
    nearly_flat = fit_hump(d, 0.2 * d - 1e-6 * d * np.log(d))  # a peak past float64's range
    assert nearly_flat.b > 0 and math.isinf(nearly_flat.peak_d)
    assert fit_hump([], []) is None


def test_bootstrap_over_seeds_brackets_the_truth():
    rng = np.random.default_rng(11)
    d, r, seeds = [], [], []
    for seed in range(8):
        shift = rng.normal(0, 0.01)  # a per-seed offset: seeds are the resampled unit
        ds = rng.uniform(0.1, 4.0, size=30)
        d.append(ds)
        r.append(_curve(ds, 0.5 + shift, 0.3) + rng.normal(0, 0.01, size=ds.size))
        seeds.append(np.full(ds.size, seed))
    d, r, seeds = map(np.concatenate, (d, r, seeds))
    interval = bootstrap_hump(d, r, seeds, samples=200)
    assert interval["a"][0] < 0.5 < interval["a"][1]
    assert interval["b"][0] < 0.3 < interval["b"][1]
    assert interval["a"][1] - interval["a"][0] < 0.1


def _table_rows(seeds, curves, noise=0.0, d_values=(0.0, 0.5, 1.0, 2.0, 3.0)):
    rng = np.random.default_rng(5)
    rows = []
    for method, (a, b) in curves.items():
        for seed in seeds:
            for d in d_values:
                gain = float(_curve(d, a, b)) + rng.normal(0, noise) if d else 0.0
                rows.append({"method": method, "seed": seed, "sqrt_kl": d, "kl_to_init": d * d,
                             "gold_gain": gain, "gold_win_rate": 0.5 + gain / 2})
    return rows


def test_fit_table_per_method_and_target():
    table = fit_table(_table_rows([0, 1, 2], {"x": (0.4, 0.2), "y": (0.2, 0.2)}, noise=0.002))
    assert [(e["method"], e["target"]) for e in table] == [
        ("x", "gold_gain"), ("x", "gold_win_rate"), ("y", "gold_gain"), ("y", "gold_win_rate")]
    assert (table[0]["fit"].a, table[0]["fit"].b) == pytest.approx((0.4, 0.2), abs=0.01)
    assert (table[1]["fit"].a, table[1]["fit"].b) == pytest.approx((0.2, 0.1), abs=0.01)
    assert table[0]["seeds"] == 3 and table[0]["n"] == 15
    assert slope([1.0, 1.0], [2.0, 3.0]) != slope([1.0, 1.0], [2.0, 3.0])  # nan: no spread in x


def test_a_fit_holds_only_with_r2_a_turn_down_across_seeds_and_a_peak_inside_the_data():
    # x peaks at d* = exp(0.4/0.2 - 1) = 2.7 inside [0, 3]; y at exp(0) = 1
    clean = fit_table(_table_rows([0, 1, 2], {"x": (0.4, 0.2), "y": (0.2, 0.2)}, noise=0.002))
    assert all(e["holds"] and e["why_not"] == "" for e in clean)
    two_seeds = fit_table(_table_rows([0, 1], {"x": (0.4, 0.2)}, noise=0.002))
    assert not two_seeds[0]["holds"] and "2 seed(s)" in two_seeds[0]["why_not"]
    noisy = fit_table(_table_rows([0, 1, 2], {"x": (0.4, 0.2)}, noise=0.3))
    assert not noisy[0]["holds"] and f"< {R2_MIN}" in noisy[0]["why_not"]
    # a turn-down past the data: d* = exp(0.5/0.05 - 1) = 8103 >> 3
    beyond = fit_table(_table_rows([0, 1, 2], {"x": (0.5, 0.05)}, noise=0.001))
    assert not beyond[0]["holds"] and "no hump inside the data" in beyond[0]["why_not"]
    rising = fit_table(_table_rows([0, 1, 2], {"x": (0.2, -0.05)}, noise=0.001))
    assert not rising[0]["holds"] and "is not above 0" in rising[0]["why_not"]
