"""report.md of a study (and summary.json, the same numbers for programs): the grid, the figures,
the fit table, the budget tables and the verdicts."""
from __future__ import annotations

import json
import math
import os

from pyalign._utils import atomic_write
from pyalign.study.fits import fit_table
from pyalign.study.frontiers import compare_pairs, with_matched_baselines
from pyalign.study.grid import format_value
from pyalign.study.plots import write_plots

FIGURES = (("gold_vs_sqrt_kl", "Gold quality against √KL, with the fitted R(d) = d(a − b log d)"),
           ("progress", "Gold and proxy reward over training (the over-optimisation gap)"),
           ("frontiers", "Best gold reward within a KL budget, per method pair"),
           ("length_vs_kl", "Response length against KL"))


def _num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞ (no peak)" if x > 0 else "−∞"
    return f"{x:.{digits}g}"


def _interval(pair) -> str:
    if not pair:
        return "–"
    return f"[{_num(pair[0])}, {_num(pair[1])}]"


def fit_table_markdown(fits) -> str:
    lines = ["| method | R on | a | b | d* = exp(a/b − 1) | R(d*) | R² | evaluations | a 95% | b 95% | "
             "d* 95% | length slope (tokens/nat) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"gold_gain": "gold gain", "gold_win_rate": "win rate − ½"}
    for entry in fits:
        fit, interval = entry["fit"], entry["interval"]
        if fit is None:
            lines.append(f"| {entry['method']} | {names[entry['target']]} | no fit (too few points) |"
                         + " – |" * 9)
            continue
        lines.append(f"| {entry['method']} | {names[entry['target']]} | {_num(fit.a)} | {_num(fit.b)} | "
                     f"{_num(fit.peak_d)} | {_num(fit.peak_value)} | {_num(fit.r2, 2)} | {fit.n} | "
                     f"{_interval(interval.get('a'))} | {_interval(interval.get('b'))} | "
                     f"{_interval(interval.get('peak_d'))} | {_num(entry['length_slope'])} |")
    return "\n".join(lines)


def budget_markdown(pair, metric: str) -> str:
    mine, theirs = pair["tables"][metric]
    from pyalign.study.frontiers import compare
    lines = [f"| KL budget (nats) | {pair['method']}: mean [min, max] | {pair['baseline']}: mean "
             f"[min, max] | {pair['method']} is |", "|---|---|---|---|"]
    for m, b in zip(mine, theirs):
        lines.append(f"| ≤ {m['budget']:g} | {_num(m['mean'])} [{_num(m['min'])}, {_num(m['max'])}] | "
                     f"{_num(b['mean'])} [{_num(b['min'])}, {_num(b['max'])}] | {compare(m, b)} |")
    return "\n".join(lines)


def _grid_markdown(spec: dict) -> str:
    lines = []
    for algo, knobs in spec["algos"].items():
        swept = [k for k, v in knobs.items() if isinstance(v, list)][0]
        fixed = ", ".join(f"{k} = {format_value(v)}" for k, v in knobs.items() if k != swept)
        values = ", ".join(format_value(v) for v in knobs[swept])
        lines.append(f"- **{algo}**: {swept} ∈ {{{values}}}" + (f" ({fixed})" if fixed else ""))
    epochs = ", ".join(format_value(e) for e in spec["epochs"])
    lines.append(f"- seeds {spec['seeds']}; evaluations at {epochs} "
                 f"epochs (and at step 0); {spec['eval']['prompts']} prompts per evaluation, "
                 f"{spec['eval']['heldout']} held-out documents for perplexity")
    for family in ("preference", "rl", "task"):
        if spec.get(family):
            lines.append(f"- {family} settings: " + ", ".join(f"{k} = {v}" for k, v in spec[family].items()))
    return "\n".join(lines)


def _matched(spec: dict) -> dict:
    """method -> (baseline, knob, value): the fixed beta of each trust-region algorithm, the
    fixed KL coefficient of Elastic Reset, where the grid does not sweep them."""
    from pyalign.trainers import PreferenceConfig, RLConfig
    from pyalign.trainers.presets import TUNED_DEFAULTS
    matched = {}
    for algo, knobs in spec["algos"].items():
        if algo.startswith("tr-"):
            family, knob, default = "preference", "beta", PreferenceConfig.beta
            baseline = algo[3:]
        elif algo == "elastic-reset":
            family, knob, default = "rl", "kl_coef", RLConfig.kl_coef
            baseline = "rloo"
        else:
            continue
        if not isinstance(knobs.get(knob), list):
            value = knobs.get(knob, spec[family].get(knob, TUNED_DEFAULTS.get(algo, {}).get(knob, default)))
            matched[algo] = (baseline, knob, float(value))
    return matched


def write_report(out: str, grid, rows: list[dict], missing: list[str], run_info: dict | None = None) -> str:
    """Fits, comparisons, figures and report.md for the rows of a study in ``out``."""
    spec = grid.spec
    fits = fit_table(rows)
    compared = with_matched_baselines(rows, _matched(spec))
    pairs = compare_pairs(compared, spec.get("budgets"))
    figures = write_plots(rows, fits, pairs, out, grid.name, compared=compared)
    parts = [f"# pyalign study `{grid.name}`", "", _grid_markdown(spec), ""]
    n_points = len(grid.points())
    parts.append(f"Points finished: {n_points - len(missing)} of {n_points}"
                 + (f" (not finished: {', '.join(missing)})" if missing else "") + ".")
    if run_info:
        parts.append(f"Last launch: {run_info.get('launcher')} with {run_info.get('workers')} workers, "
                     f"{run_info.get('wall_s', 0):.0f} s wall; load average before "
                     f"{run_info.get('load_before')}, after {run_info.get('load_after')} on "
                     f"{run_info.get('cpus')} CPUs.")
    parts += ["", "KL is KL(policy ‖ initial model) in nats per response, estimated on one policy sample "
              "per evaluation prompt; d = √KL. Gold gain is the policy's mean gold reward minus the SFT "
              "model's on the same prompts; the win rate is against the SFT model's responses to them.", ""]
    parts += ["## Fits", "", fit_table_markdown(fits), ""]
    parts += ["## Method pairs", ""]
    if not pairs:
        parts += ["No method pair in this grid (TR-X with X, Elastic Reset with RLOO).", ""]
    for pair in pairs:
        parts += [f"### {pair['method']} vs {pair['baseline']}", ""]
        for metric, verdict in pair["verdicts"].items():
            parts += [f"**Verdict ({metric.replace('_', ' ')}):** {verdict}", ""]
        parts += ["Best gold reward within each KL budget (per seed: the best evaluation of any run "
                  "at that KL or less):", "", budget_markdown(pair, "gold_reward"), ""]
    parts += ["## Figures", ""]
    for key, caption in FIGURES:
        if figures.get(key):
            parts += [f"### {caption}", "", f"![{caption}]({os.path.basename(figures[key])})", ""]
    path = os.path.join(out, "report.md")
    atomic_write(path, "\n".join(parts))
    summary = {
        "name": grid.name, "points": n_points, "missing": missing, "run": run_info,
        "fits": [{"method": f["method"], "target": f["target"], "length_slope": f["length_slope"],
                  **({"a": f["fit"].a, "b": f["fit"].b, "peak_d": f["fit"].peak_d,
                      "peak_value": f["fit"].peak_value, "r2": f["fit"].r2, "n": f["fit"].n,
                      "interval": f["interval"]} if f["fit"] else {})} for f in fits],
        "pairs": [{"method": p["method"], "baseline": p["baseline"], "budgets": p["budgets"],
                   "verdicts": p["verdicts"],
                   "tables": {m: {"method": t[0], "baseline": t[1]} for m, t in p["tables"].items()}}
                  for p in pairs],
        "figures": figures,
    }
    atomic_write(os.path.join(out, "summary.json"),
                 json.dumps(summary, indent=1, default=lambda x: str(x)) + "\n")
    return path


__all__ = ["write_report", "fit_table_markdown"]
