"""The report says nothing its numbers cannot support: synthetic points with a clear hump get
a fit, a d* and an over-optimisation verdict; points with no hump get neither; two seeds get no
verdict; the length and scale claims print their intervals. The intervals themselves against
independent computations (Student's t from a numeric integration of its density)."""
import json
import math
import os

import pytest
from study_helpers import synthetic_rows

from pyalign.study.grid import parse_grid
from pyalign.study.report import write_report
from pyalign.study.stats import mean_interval, t_quantile, welch_difference


def _t_cdf_975(df: float) -> float:
    """The 97.5% quantile of Student's t by bisection on a Simpson integration of its density."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x, n=4000):
        h = x / n
        f = [math.exp(log_norm - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    low, high = 1.0, 20.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < 0.975 else (low, mid)
    return (low + high) / 2


@pytest.mark.parametrize("df", [1, 2, 4, 9, 29, 30, 31, 45, 200])
def test_t_quantile_matches_a_numeric_integration(df):
    assert t_quantile(df) == pytest.approx(_t_cdf_975(df), abs=2e-3)


def test_mean_and_welch_intervals_by_hand():
    interval = mean_interval([1.0, 2.0, 3.0, math.nan])  # nan (a seed with no evaluation) dropped
    half = t_quantile(2) * 1.0 / math.sqrt(3)
    assert (interval.mean, interval.low, interval.high) == pytest.approx((2.0, 2 - half, 2 + half))
    assert interval.n == 3
    assert math.isnan(mean_interval([4.0]).low)
    # Welch: a = (1, 2, 3), b = (2, 4, 6, 8): variances 1/3 and (20/3)/4; df by Welch-Satterthwaite
    va, vb = 1.0 / 3, (20.0 / 3) / 4
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    diff = welch_difference([1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0])
    assert diff.mean == pytest.approx(-3.0)
    assert diff.high - diff.mean == pytest.approx(t_quantile(math.floor(df)) * math.sqrt(va + vb))


def _report(tmp_path, rows, spec) -> str:
    out = tmp_path / "study"
    os.makedirs(out)
    path = write_report(str(out), parse_grid(spec, "synthetic"), rows, [])
    return open(path).read()


def test_a_clear_hump_gets_its_fit_and_verdict_and_no_hump_gets_neither(tmp_path):
    seeds = [0, 1, 2, 3]
    spec = {"seeds": seeds, "algos": {"dpo": {"beta": [0.05, 0.1, 0.2]}, "ipo": {"beta": [0.05, 0.1, 0.2]}},
            "task": {"variable_length": True}}
    rows = synthetic_rows("dpo", seeds=seeds, hump=True) + synthetic_rows("ipo", seeds=seeds, hump=False)
    report = _report(tmp_path, rows, spec)
    assert "- **Over-optimisation, dpo: shown.**" in report
    assert "- **Over-optimisation, ipo: not shown.**" in report
    dpo_fit = next(line for line in report.splitlines() if line.startswith("| dpo | gold gain |"))
    assert "| 0.3 | 0.2 | 1.65 |" in dpo_fit            # a, b, d* = exp(0.3/0.2 - 1)
    ipo_fit = next(line for line in report.splitlines() if line.startswith("| ipo | gold gain |"))
    assert "not reported: " in ipo_fit and ("does not describe the data" in ipo_fit
                                            or "no hump inside the data" in ipo_fit)
    assert "1.65" not in ipo_fit
    assert "| KL budget (nats) | dpo | ipo |" in report   # the model-free numbers stand alone
    assert "**Length, dpo: not testable**" not in report
    assert "- **Length grows with KL, dpo: not shown.**" in report
    assert ("so it is shown only where the drop's interval lies above the noise floor (2 standard "
            "errors of one evaluation's gold mean") in report   # the guide says the exception


def test_two_seeds_give_no_fit_and_no_verdict(tmp_path):
    spec = {"seeds": [0, 1], "algos": {"dpo": {"beta": [0.05, 0.1, 0.2]}}, "task": {"variable_length": True}}
    report = _report(tmp_path, synthetic_rows("dpo", seeds=[0, 1], hump=True), spec)
    assert "- **Over-optimisation, dpo: too few seeds.**" in report
    assert "2 seed(s), where the bootstrap of b needs 3" in report
    assert "| 0.3 | 0.2 | 1.65 |" not in report


def test_length_and_scale_claims_print_their_intervals(tmp_path):
    seeds = [0, 1, 2]
    spec = {"seeds": seeds, "sizes": ["small", "large"], "algos": {"dpo": {"beta": [0.05, 0.1, 0.2]}},
            "task": {"variable_length": True, "response_len": 32}}
    # the large model drifts half as far per update: it peaks at the same d, so later in training
    # but not at a larger KL, and every run of it ends nearer its peak (a smaller drop)
    rows = (synthetic_rows("dpo", seeds=seeds, hump=True, size="small", length_per_nat=0.3)
            + synthetic_rows("dpo", seeds=seeds, hump=True, size="large", kl_scale=0.5, rng_seed=1))
    report = _report(tmp_path, rows, spec)
    assert ("- **Length grows with KL, dpo [small]: shown.** Slope 0.299 [0.296, 0.302] tokens per "
            "nat over KL 0–120") in report
    assert "- **Length grows with KL, dpo [large]: not shown.**" in report
    claim = "- **Length grows with KL, dpo [{}]"
    small, large = ([line for line in report.splitlines() if line.startswith(claim.format(size))][0]
                    for size in ("small", "large"))
    assert "of the 32-token cap: there the cap, not the policy, sets it" in small  # 10 + 0.3 * 120 tokens
    assert "cap" not in large
    assert "- **dpo: larger models over-optimise less (large vs small): shown.**" in report
    assert "- **dpo: larger models over-optimise later (large vs small): not shown.**" in report
    assert "## Over-optimisation (small)" in report and "## Over-optimisation (large)" in report
    assert "| small | " in report and "![Where each model size peaks" in report
    with open(tmp_path / "study" / "scale.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_fixed_length_task_makes_the_length_claim_not_testable(tmp_path):
    seeds = [0, 1, 2]
    rows = synthetic_rows("dpo", seeds=seeds, hump=True, length_per_nat=0.3)
    report = _report(tmp_path, rows, {"seeds": seeds, "algos": {"dpo": {"beta": [0.05, 0.1, 0.2]}}})
    assert "- **Length, dpo: not testable**: the task's responses have a fixed length" in report
    assert "length_vs_kl.png" not in report


def test_compare_sets_two_runs_verdicts_side_by_side(tmp_path, capsys):
    from pyalign.study.compare import compare_verdicts, main
    first = {"length grows with KL: dpo": "shown", "over-optimisation: dpo": "shown",
             "tr-dpo vs dpo, gold_reward, KL <= 1": "ahead", "tr-dpo vs dpo, gold_reward, KL <= 3": "ahead"}
    second = {"length grows with KL: dpo": "shown", "over-optimisation: dpo": "not shown",
              "tr-dpo vs dpo, gold_reward, KL <= 1": "behind"}
    assert [row[3] for row in compare_verdicts(first, second)] == ["same", "different", "contradicts",
                                                                    "different"]
    for name, verdicts in (("a", first), ("b", second), ("c", first)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"verdicts": verdicts}))
    assert main([str(tmp_path / "a"), str(tmp_path / "c")]) == 0
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "1 of 4 verdicts agree; 2 differ; 1 contradict" in capsys.readouterr().out
