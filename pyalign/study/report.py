"""report.md of a study (and summary.json, the same numbers for programs): the grid, the claims
with their verdicts, the fits that hold, the model-free tables, the method pairs, the figures.

Every verdict names the KL range or budgets it rests on and the 95% interval over seeds behind
it (stats.py); a fit's parameters appear only where the fit holds (fits.py). Its words for
quality are those of the study's measure (measures.py): "gold" on the embedded task and with a
gold reward, "held-out accuracy" without one."""
from __future__ import annotations

import json
import math
import os

from pyalign._utils import atomic_write
from pyalign.study import claims
from pyalign.study.fits import R2_MIN, fit_table
from pyalign.study.frontiers import (
    budget_table,
    compare,
    compare_pairs,
    default_budgets,
    difference,
    with_matched_baselines,
)
from pyalign.study.grid import format_value
from pyalign.study.measures import GOLD, Measures, measures_of
from pyalign.study.plots import write_plots
from pyalign.study.stats import MIN_SEEDS
from pyalign.tasks import TaskConfig


def figures_of(m: Measures) -> tuple:
    """(figure, caption) of every figure a report may embed."""
    return (("gold_vs_sqrt_kl", f"{m.sentence(m.phrase)} against √KL, with R(d) = d(a − b log d) where "
                                f"the fit holds"),
            ("progress", f"{m.sentence(m.progress_phrase)} over training (the over-optimisation gap)"),
            ("frontiers", f"Best {m.noun} within a KL budget, per method pair"),
            ("length_vs_kl", "Response length against KL"),
            ("scale", "Where each model size peaks, and how far it falls"))


def _num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞ (no peak)" if x > 0 else "−∞"
    return f"{x:.{digits}g}"


def _interval(pair) -> str:
    return f"[{_num(pair[0])}, {_num(pair[1])}]" if pair else "–"


def _label(size: str, method: str) -> str:
    return f"{method} [{size}]" if size else method


def fit_table_markdown(fits, m: Measures = GOLD) -> str:
    lines = ["| method | R on | a | b | d* = exp(a/b − 1) | R(d*) | R² | seeds | b 95% | d* 95% |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in fits:
        fit, interval, name = entry["fit"], entry["interval"], m.target_names[entry["target"]]
        if not entry["holds"]:
            lines.append(f"| {entry['method']} | {name} | not reported: {entry['why_not']} |" + " – |" * 7)
            continue
        lines.append(f"| {entry['method']} | {name} | {_num(fit.a)} | {_num(fit.b)} | {_num(fit.peak_d)} | "
                     f"{_num(fit.peak_value)} | {_num(fit.r2, 2)} | {entry['seeds']} | "
                     f"{_interval(interval.get('b'))} | {_interval(interval.get('peak_d'))} |")
    return "\n".join(lines)


def budgets_markdown(rows, methods, budgets, metric: str = GOLD.quality) -> str:
    """Best ``metric`` within each budget, per method: seed mean [95% t-interval]."""
    lines = ["| KL budget (nats) | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    tables = {m: budget_table(rows, m, budgets, metric) for m in methods}
    for i, budget in enumerate(budgets):
        cells = " | ".join(tables[m][i]["interval"].text() for m in methods)
        lines.append(f"| ≤ {budget:g} | {cells} |")
    return "\n".join(lines)


def pair_markdown(pair, metric: str = GOLD.quality) -> str:
    mine, theirs = pair["tables"][metric]
    method = pair["method"]
    lines = [f"| KL budget (nats) | {method} | {pair['baseline']} | difference | {method} is |",
             "|---|---|---|---|---|"]
    for m, b in zip(mine, theirs):
        lines.append(f"| ≤ {m['budget']:g} | {m['interval'].text()} | {b['interval'].text()} | "
                     f"{difference(m, b).text()} | {compare(m, b)} |")
    return "\n".join(lines)


def _grid_markdown(spec: dict) -> str:
    lines = _data_markdown(spec)
    for algo, knobs in spec["algos"].items():
        swept = [k for k, v in knobs.items() if isinstance(v, list)][0]
        fixed = ", ".join(f"{k} = {format_value(v)}" for k, v in knobs.items() if k != swept)
        values = ", ".join(format_value(v) for v in knobs[swept])
        lines.append(f"- **{algo}**: {swept} ∈ {{{values}}}" + (f" ({fixed})" if fixed else ""))
    epochs = ", ".join(format_value(e) for e in spec["epochs"])
    prompts, heldout = spec["eval"]["prompts"], f"{spec['eval']['heldout']} held-out documents for perplexity"
    if spec.get("data"):  # as many as the held-out data hold
        prompts = min(prompts, spec["data_split"]["heldout_rows"])
        pairs = min(spec["eval"]["heldout"], spec["data_split"]["heldout_rows"])
        heldout = (f"{pairs} held-out pairs for accuracy and perplexity"
                   if spec["data_split"]["heldout_format"] == "preference" else "no held-out pairs")
    lines.append(f"- seeds {spec['seeds']}; evaluations at {epochs} "
                 f"epochs (and at step 0); {prompts} prompts per evaluation, {heldout}")
    if spec.get("sizes"):
        lines.append(f"- model sizes {', '.join(spec['sizes'])} (pyalign.tasks.MODEL_SIZES)")
    for family in ("preference", "rl", "task"):
        if spec.get(family):
            lines.append(f"- {family} settings: " + ", ".join(f"{k} = {v}" for k, v in spec[family].items()))
    return "\n".join(lines)


def _data_markdown(spec: dict) -> list[str]:
    """On one's own model: the model, the data and its split, the rewards (userdata.py)."""
    if not spec.get("data"):
        return []
    split = spec["data_split"]
    if spec.get("eval_data"):
        held = f"held-out data `{spec['eval_data']}` ({split['heldout_rows']} rows)"
    else:
        held = (f"{split['heldout_rows']} of its {split['rows']} rows held out "
                f"({spec['heldout_fraction']:g}, drawn by a fixed seed: OUT/data/heldout.jsonl), the "
                f"points train on the other {split['train_rows']} (OUT/data/train.jsonl)")
    lines = [f"- model `{spec['model']}`, data `{spec['data']}`: {held}"]
    if spec.get("reward"):
        lines.append(f"- RL reward (the proxy): `{spec['reward']}`")
    lines.append(f"- gold reward, for evaluation only: `{spec['gold_reward']}`" if spec.get("gold_reward")
                 else "- no gold reward: quality is the held-out preference accuracy")
    return lines


def _definitions(spec: dict, m: Measures) -> str:
    """What the report's KL and quality are."""
    kl = ("KL is KL(policy ‖ initial model) in nats per response, estimated on one policy sample "
          "per evaluation prompt; d = √KL. ")
    if m is GOLD:
        return (kl + "Gold gain is the policy's mean gold reward minus the SFT "
                "model's on the same prompts; the win rate is against the SFT model's responses to them.")
    return (kl + "**No gold reward was given (--gold-reward), so quality here is the held-out "
            "preference accuracy**: on the held-out pairs, the fraction whose implicit reward margin "
            "[log π(chosen) − log π0(chosen)] − [log π(rejected) − log π0(rejected)] is positive (ties "
            "½; ½ at the initial model π0), and the held-out margin is that margin's mean in nats. It "
            "measures agreement with the held-out labels, not the quality of the samples: every "
            "verdict below is on it. The proxy is the same accuracy on training pairs.")


def _matched(spec: dict) -> dict:
    """method -> (baseline, knob, value): the fixed beta of each trust-region algorithm, the
    fixed KL coefficient of Elastic Reset, where the grid does not sweep them."""
    from pyalign.trainers import PreferenceConfig, RLConfig
    from pyalign.trainers.presets import ALGOS, TUNED_DEFAULTS
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
        defaults = ALGOS[algo].trl if spec.get("data") else TUNED_DEFAULTS.get(algo, {})
        if not isinstance(knobs.get(knob), list):
            value = knobs.get(knob, spec[family].get(knob, defaults.get(knob, default)))
            matched[algo] = (baseline, knob, float(value))
    return matched


def _reading_guide(seeds: int, m: Measures) -> list[str]:
    return ["## How to read the verdicts", "",
            f"The unit of replication is the seed ({seeds} here). Every interval is the 95% Student-t "
            f"interval of a mean over seeds (of a paired difference where two methods ran the same "
            f"seeds; Welch's for two model sizes); a verdict needs at least {MIN_SEEDS} seeds. "
            f"**shown**: the interval excludes 0 in the claimed direction; **not shown**: it holds 0 "
            f"(the data do not separate); **opposite**: it excludes 0 the other way. Over-"
            f"optimisation is the exception: taking each run's best of several noisy evaluations "
            f"makes a drop after the peak out of noise alone, so it is shown only where the drop's "
            f"interval lies above the noise floor ({claims.DROP_NOISE:g} standard errors of one "
            f"evaluation's {m.short} mean, printed with each verdict). A fit of "
            f"R(d) = d(a − b log d) is reported only where it holds: R² ≥ {R2_MIN} and b's 95% seed-"
            f"bootstrap interval above 0; elsewhere the model-free numbers stand alone.", ""]


def _claims_markdown(over, lengths, scale, m: Measures = GOLD) -> list[str]:
    lines = ["## Verdicts", ""]
    for entry in over:
        where = _label(entry["size"], entry["method"])
        proxy = (f" while the {m.proxy_short} changes by {entry['proxy_change'].text()}"
                 if entry["proxy_change"].n else f" (no {m.proxy_noun} for this method)")
        lines.append(f"- **Over-optimisation, {where}: {entry['verdict']}.** "
                     f"Over KL 0–{_num(entry['kl_max'])}, {m.short} falls from each run's best evaluation "
                     f"to its last by {entry['drop'].text()} (seed mean [95% interval]; noise floor "
                     f"{entry['floor']:.3g}){proxy}.")
    for entry in lengths:
        where = f"{_label(entry['size'], entry['method'])}"
        if entry["fixed_length"]:
            lines.append(f"- **Length, {where}: not testable**: the task's responses have a fixed "
                         f"length ({_num(entry['longest'])} tokens at most).")
            continue
        saturation = (f" The mean length reaches {_num(entry['longest'])} of the {entry['cap']}-token "
                      f"cap: there the cap, not the policy, sets it, and the slope understates the "
                      f"growth." if entry["at_cap"] else "")
        lines.append(f"- **Length grows with KL, {where}: {entry['verdict']}.** Slope "
                     f"{entry['slope'].text()} tokens per nat over KL 0–{_num(entry['kl_max'])} "
                     f"(initial length {entry['initial'].text()} tokens).{saturation}")
    for entry in scale:
        lines.append(f"- **{entry['method']}: larger models over-optimise later "
                     f"({entry['largest']} vs {entry['smallest']}): {entry['later_verdict']}.** "
                     f"Peak-KL difference {entry['later'].text()} nats (Welch).")
        lines.append(f"- **{entry['method']}: larger models over-optimise less "
                     f"({entry['largest']} vs {entry['smallest']}): {entry['less_verdict']}.** "
                     f"Drop of {entry['smallest']} minus drop of {entry['largest']}: "
                     f"{entry['less'].text()} {m.short} (Welch).")
    return lines + [""]


def _scale_markdown(scale, m: Measures = GOLD) -> list[str]:
    lines = []
    for entry in scale:
        lines += [f"### {entry['method']} by model size", "",
                  f"| size | KL at the best {m.short} (nats) | best {m.short} | drop after the peak |",
                  "|---|---|---|---|"]
        for size, table in entry["table"].items():
            lines.append(f"| {size} | {table['peak_kl'].text()} | {table['best_gold'].text()} | "
                         f"{table['drop'].text()} |")
        lines.append("")
    return lines


def _size_sections(rows, spec, budgets_spec, m: Measures = GOLD) -> tuple[list[str], list, list, list]:
    """Per model size: the fits, the model-free budget table and the method pairs."""
    parts, all_fits, all_pairs, fits_by_size = [], [], [], []
    for size in list(dict.fromkeys(claims.size_of(r) for r in rows)):
        mine = [r for r in rows if claims.size_of(r) == size]
        fits = fit_table(mine, m)
        compared = with_matched_baselines(mine, _matched(spec))
        pairs = compare_pairs(compared, budgets_spec, m.pair_metrics,
                              {metric: m.label(metric) for metric in m.pair_metrics})
        methods = list(dict.fromkeys(r["method"] for r in mine))
        budgets = list(budgets_spec) if budgets_spec else default_budgets(mine, methods)
        title = f" ({size})" if size else ""
        parts += [f"## Over-optimisation{title}", "", fit_table_markdown(fits, m), "",
                  f"Best {m.noun} within each KL budget (per seed: the best evaluation of any run at "
                  "that KL or less), seed mean [95% t-interval]:", "",
                  budgets_markdown(mine, methods, budgets, m.quality), ""]
        parts += [f"## Method pairs{title}", ""]
        if not pairs:
            parts += ["No method pair in this grid (TR-X with X, Elastic Reset with RLOO).", ""]
        for pair in pairs:
            parts += [f"### {pair['method']} vs {pair['baseline']}{title}", ""]
            for metric, line in pair["verdicts"].items():
                parts += [f"**Verdict ({m.label(metric)}):** {line}", ""]
            parts += [pair_markdown(pair, m.quality), ""]
        all_fits += [{**f, "size": size} for f in fits]
        all_pairs += [{**p, "size": size} for p in pairs]
        fits_by_size.append((size, fits, compared, pairs))
    return parts, all_fits, all_pairs, fits_by_size


def write_report(out: str, grid, rows: list[dict], missing: list[str], run_info: dict | None = None,
                 damaged: dict | None = None) -> str:
    """Claims, fits, comparisons, figures and report.md for the rows of a study in ``out``."""
    spec, damaged = grid.spec, damaged or {}
    missing = list(dict.fromkeys([*missing, *damaged]))  # a damaged point is not finished
    fixed_length = not spec["task"].get("variable_length", False) and not spec.get("data")
    cap = spec["task"].get("response_len", TaskConfig.response_len)
    if spec.get("data"):  # one's own model samples up to its run's max_completion_length
        cap = max((r.get("response_cap", 0) for r in rows), default=0) or math.inf
    m = measures_of(spec)
    over, lengths = claims.overoptimisation(rows, m), claims.length_claims(rows, fixed_length, cap)
    scale = claims.scale_claims(rows, spec.get("sizes", []), m)
    sections, fits, pairs, by_size = _size_sections(rows, spec, spec.get("budgets"), m)
    figures = write_plots(rows, by_size, lengths, scale, out, grid.name, m)
    n_points = len(grid.points())
    parts = [f"# pyalign study `{grid.name}`", "", _grid_markdown(spec), "",
             f"Points finished: {n_points - len(missing)} of {n_points}"
             + (f" (not finished: {', '.join(p for p in missing if p not in damaged)})"
                if len(missing) > len(damaged) else "") + "."]
    for point_id, damage in damaged.items():
        parts.append(f"**Damaged point {point_id}: {damage}; its rows are left out** (a rerun into this "
                     f"directory runs it again).")
    if run_info:
        load = (f"; load average before {run_info['load_before']}, after {run_info.get('load_after')}"
                if run_info.get("load_before") is not None else "")
        parts.append(f"Last launch: {run_info.get('launcher')} with {run_info.get('workers')} workers, "
                     f"{run_info.get('wall_s', 0):.0f} s wall{load} on {run_info.get('cpus')} CPUs.")
    parts += ["", _definitions(spec, m), ""]
    parts += _reading_guide(len(spec["seeds"]), m) + _claims_markdown(over, lengths, scale, m) + sections
    if scale:
        parts += ["## Model size", ""] + _scale_markdown(scale, m)
    parts += ["## Figures", ""]
    for key, caption in figures_of(m):
        if figures.get(key):
            parts += [f"### {caption}", "", f"![{caption}]({os.path.basename(figures[key])})", ""]
    path = os.path.join(out, "report.md")
    atomic_write(path, "\n".join(parts))
    atomic_write(os.path.join(out, "summary.json"), json.dumps(
        _summary(grid, n_points, missing, damaged, run_info, fits, pairs, over, lengths, scale, figures),
        indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if hasattr(value, "__dataclass_fields__"):
        return {k: getattr(value, k) for k in value.__dataclass_fields__}
    return str(value)


def flat_verdicts(over, lengths, scale, pairs) -> dict:
    """Every verdict of a report as claim -> word (``shown``, ``ahead``, ...): what
    pyalign.study.compare sets side by side for two runs of one grid."""
    out = {}
    for entry in over:
        out[f"over-optimisation: {_label(entry['size'], entry['method'])}"] = entry["verdict"]
    for entry in lengths:
        out[f"length grows with KL: {_label(entry['size'], entry['method'])}"] = entry["verdict"]
    for entry in scale:
        out[f"larger over-optimise later: {entry['method']}"] = entry["later_verdict"]
        out[f"larger over-optimise less: {entry['method']}"] = entry["less_verdict"]
    for pair in pairs:
        name = f"{_label(pair['size'], pair['method'])} vs {pair['baseline']}"
        for metric, (mine, theirs) in pair["tables"].items():
            for m, b in zip(mine, theirs):
                out[f"{name}, {metric}, KL <= {m['budget']:g}"] = compare(m, b)
    return out


def _summary(grid, n_points, missing, damaged, run_info, fits, pairs, over, lengths, scale, figures) -> dict:
    return {
        "name": grid.name, "points": n_points, "missing": missing, "damaged": damaged, "run": run_info,
        "verdicts": flat_verdicts(over, lengths, scale, pairs),
        "fits": [{"method": f["method"], "size": f["size"], "target": f["target"], "holds": f["holds"],
                  "why_not": f["why_not"], "seeds": f["seeds"],
                  **({"a": f["fit"].a, "b": f["fit"].b, "peak_d": f["fit"].peak_d,
                      "peak_value": f["fit"].peak_value, "r2": f["fit"].r2, "n": f["fit"].n,
                      "interval": f["interval"]} if f["holds"] else {})} for f in fits],
        "overoptimisation": over, "length": lengths, "scale": scale,
        "pairs": [{"method": p["method"], "baseline": p["baseline"], "size": p["size"],
                   "budgets": p["budgets"], "verdicts": p["verdicts"],
                   "tables": {m: {"method": t[0], "baseline": t[1]} for m, t in p["tables"].items()}}
                  for p in pairs],
        "figures": figures,
    }


__all__ = ["write_report", "fit_table_markdown"]
