"""The R(d) = d(a - b log d) fit recovers known a, b from noisy synthetic points; its peak and
R² agree with independent computations; the seed bootstrap brackets the truth."""
import math

import numpy as np
import pytest

from pyalign.study.fits import bootstrap_hump, fit_hump, fit_table, slope


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


def test_fit_table_per_method_and_length_slope():
    rows = []
    for method, a in (("x", 0.4), ("y", 0.2)):
        for seed in (0, 1):
            for d in (0.0, 0.5, 1.0, 2.0, 3.0):
                rows.append({"method": method, "seed": seed, "sqrt_kl": d, "kl_to_init": d * d,
                             "gold_gain": float(_curve(d, a, 0.2)) if d else 0.0,
                             "gold_win_rate": 0.5 + (float(_curve(d, a / 2, 0.1)) if d else 0.0),
                             "response_length": 10 + 0.5 * d * d})
    table = fit_table(rows)
    assert [(e["method"], e["target"]) for e in table] == [
        ("x", "gold_gain"), ("x", "gold_win_rate"), ("y", "gold_gain"), ("y", "gold_win_rate")]
    assert table[0]["fit"].a == pytest.approx(0.4) and table[0]["fit"].b == pytest.approx(0.2)
    assert table[1]["fit"].a == pytest.approx(0.2) and table[1]["fit"].b == pytest.approx(0.1)
    assert table[0]["length_slope"] == pytest.approx(0.5)
    assert slope([1.0, 1.0], [2.0, 3.0]) != slope([1.0, 1.0], [2.0, 3.0])  # nan: no spread in x
