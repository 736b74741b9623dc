"""The study's figures (PNG, written atomically): gold vs sqrt(KL) with the fitted curves that
hold, gold and proxy reward over training (the over-optimisation gap), the frontiers of each
method pair with their seed intervals, response length vs KL, and where each model size peaks.
One row of panels per model size where the grid sweeps sizes. Each returns the path it wrote, or
None when there is nothing to plot. "Gold" is the study's quality measure (``measures``).
"""
from __future__ import annotations

import io
import os
from typing import Optional

import numpy as np

from pyalign._utils import atomic_write
from pyalign.study.claims import size_of
from pyalign.study.frontiers import budget_table, pareto_frontier
from pyalign.study.grid import format_value
from pyalign.study.measures import GOLD, Measures

KL_UNIT = "nats per response"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    plt = _pyplot()
    image = io.BytesIO()
    fig.savefig(image, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, image.getvalue())
    return path


def _colors(methods):
    """A colour per method, fixed by the method's name (the same in every figure and study)."""
    plt = _pyplot()
    cycle = plt.get_cmap("tab10")
    order = ["dpo", "ipo", "slic", "tr-dpo", "kto", "tr-ipo", "tr-kto", "rloo", "rloo (no KL)",
             "elastic-reset"]
    colors = {m: cycle(i) for i, m in enumerate(order)}
    extra = [m for m in methods if m not in colors]
    for i, m in enumerate(extra):  # matched baselines and anything else: the remaining colours
        colors[m] = plt.get_cmap("Dark2")(i % 8)
    return colors


def _methods(rows):
    return list(dict.fromkeys(r["method"] for r in rows))


def _title(size: str, text: str) -> str:
    return f"{text} ({size})" if size else text


def plot_gold_vs_sqrt_kl(rows, by_size, path: str, title: str, measures: Measures = GOLD) -> Optional[str]:
    """Per size (rows) and target (columns): every evaluation, and the fitted curve where the fit
    holds (fits.fit_holds)."""
    if not rows:
        return None
    plt = _pyplot()
    colors = _colors(_methods(rows))
    fig, axes = plt.subplots(len(by_size), 2, figsize=(12, 4.6 * len(by_size)), squeeze=False)
    labels, targets = measures.target_axes, measures.targets
    for (size, fits, _, _), row_axes in zip(by_size, axes):
        mine = [r for r in rows if size_of(r) == size]
        d_max = max(r["sqrt_kl"] for r in mine) or 1.0
        grid = np.linspace(0, d_max * 1.05, 200)
        for ax, target in zip(row_axes, targets):
            for method in _methods(mine):
                points = [r for r in mine if r["method"] == method]
                ax.scatter([r["sqrt_kl"] for r in points], [r[target] for r in points], s=12, alpha=0.45,
                           color=colors[method])
                entry = next((f for f in fits if f["method"] == method and f["target"] == target), None)
                label = method
                if entry is not None and entry["holds"]:
                    fit = entry["fit"]
                    ax.plot(grid, fit(grid) + targets[target], color=colors[method], linewidth=1.8)
                    label += f" (a={fit.a:.3g}, b={fit.b:.3g}, R²={fit.r2:.2f})"
                elif entry is not None:
                    label += " (no fit: it does not hold)"
                ax.plot([], [], color=colors[method], marker="o", label=label)
            ax.axhline(targets[target], color="0.5", linewidth=0.8, linestyle=":")
            observed = [r[target] for r in mine]
            margin = 0.08 * (max(observed) - min(observed) or 1.0)
            low, high = min(observed) - margin, max(observed) + margin  # the curves may run past the data
            ax.set_ylim(*((max(low, -0.05), min(high, 1.05)) if targets[target] == 0.5 else (low, high)))
            ax.set_xlabel(f"√KL(policy ‖ initial model), √({KL_UNIT})")
            ax.set_ylabel(labels[target])
            ax.set_title(_title(size, f"{labels[target].split(' over')[0].split(' against')[0]} vs √KL"),
                         fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7.5, loc="best")
    fig.suptitle(f"{title}\n(dots: evaluations; curves: least-squares R(d) = d(a − b log d), "
                 f"where the fit holds)")
    fig.tight_layout()
    return _save(fig, path)


def plot_progress(rows, path: str, title: str, measures: Measures = GOLD) -> Optional[str]:
    """Gold (solid) and proxy (dashed) reward against epochs, per method (and size) and knob
    value, seed means (the proxy where the rows have one)."""
    if not rows:
        return None
    plt = _pyplot()
    panels = list(dict.fromkeys((size_of(r), r["method"]) for r in rows))
    cols = min(len(panels), 3)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (size, method) in zip(axes.flat, panels):
        mine = [r for r in rows if r["method"] == method and size_of(r) == size]
        values = sorted({r["value"] for r in mine})
        knob = mine[0]["knob"]
        for i, value in enumerate(values):
            color = cmap(i / max(len(values) - 1, 1) * 0.9)
            runs = [r for r in mine if r["value"] == value]
            steps = sorted({r["step"] for r in runs})
            epochs = [next(r["epoch"] for r in runs if r["step"] == s) for s in steps]
            for metric, style in ((measures.quality, "-"), (measures.proxy, "--")):
                if metric != measures.quality and not all(measures.has_proxy(r) for r in runs):
                    continue
                means = [np.mean([r[metric] for r in runs if r["step"] == s]) for s in steps]
                ax.plot(epochs, means, style, color=color, marker="o", markersize=3,
                        label=f"{knob}={format_value(value)}" if metric == measures.quality else None)
        ax.plot([], [], "k-", label=measures.noun)
        if all(measures.has_proxy(r) for r in mine):
            ax.plot([], [], "k--", label=measures.proxy_noun)
        ax.set_xscale("symlog", linthresh=0.125)
        ax.set_xlabel("training progress, epochs (symlog scale)")
        ax.set_ylabel(measures.axis)
        ax.set_title(_title(size, method))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_frontiers(by_size, path: str, title: str, measures: Measures = GOLD) -> Optional[str]:
    """Per method pair (and size): every evaluation (dots), the pooled Pareto frontier (steps)
    and the best-within-budget seed mean with its 95% t-interval."""
    metric = measures.quality
    panels = [(size, compared, pair) for size, _, compared, pairs in by_size for pair in pairs]
    if not panels:
        return None
    plt = _pyplot()
    colors = _colors(_methods([r for _, compared, _ in panels for r in compared]))
    cols = min(len(panels), 3)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, 4.4 * nrows), squeeze=False)
    for ax, (size, rows, pair) in zip(axes.flat, panels):
        members = (pair["method"], pair["baseline"])
        kl_max = max(r["kl_to_init"] for r in rows if r["method"] in members) or 1.0
        budgets = np.concatenate([np.linspace(0, 1, 20), np.geomspace(1, max(kl_max * 1.02, 1.01), 120)])
        for method in members:
            mine = [r for r in rows if r["method"] == method]
            kl = [r["kl_to_init"] for r in mine]
            value = [r[metric] for r in mine]
            ax.scatter(kl, value, s=9, alpha=0.3, color=colors[method])
            table = budget_table(rows, method, budgets, metric)
            ax.plot(budgets, [t["mean"] for t in table], color=colors[method], linewidth=1.8,
                    label=f"{method}: best within budget (seed mean)")
            ax.fill_between(budgets, [t["low"] for t in table], [t["high"] for t in table],
                            color=colors[method], alpha=0.18, linewidth=0)
            frontier = pareto_frontier(kl, value)
            ax.step([p[0] for p in frontier], [p[1] for p in frontier], where="post",
                    color=colors[method], linewidth=0.8, linestyle=":")
        for budget in pair["budgets"]:
            ax.axvline(budget, color="0.6", linewidth=0.6, linestyle="--")
        ax.plot([], [], color="0.3", linestyle=":", label="Pareto frontier, seeds pooled")
        ax.plot([], [], color="0.6", linestyle="--", linewidth=0.6, label="budgets of the report's table")
        ax.fill_between([], [], [], color="0.5", alpha=0.2, label="95% t-interval of the seed mean")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel(f"KL budget: KL(policy ‖ initial model), {KL_UNIT} (symlog scale)")
        ax.set_ylabel(measures.label(metric))
        ax.set_title(_title(size, f"{pair['method']} vs {pair['baseline']}"), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_length_vs_kl(rows, lengths, path: str, title: str) -> Optional[str]:
    """Per size: response length against KL, each method with its seed-mean slope; nothing on
    a fixed-length task."""
    if not rows or all(entry["fixed_length"] for entry in lengths):
        return None
    plt = _pyplot()
    colors = _colors(_methods(rows))
    sizes = list(dict.fromkeys(size_of(r) for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.4 * len(sizes), 4.6), squeeze=False)
    for ax, size in zip(axes.flat, sizes):
        for entry in [e for e in lengths if e["size"] == size]:
            mine = [r for r in rows if size_of(r) == size and r["method"] == entry["method"]]
            kl = np.asarray([r["kl_to_init"] for r in mine])
            ax.scatter(kl, [r["response_length"] for r in mine], s=12, alpha=0.45,
                       color=colors[entry["method"]])
            slope, start = entry["slope"], entry["intercept"].mean
            end = kl.max()
            if entry.get("cap") and slope.mean > 0:  # a line past the cap shows no length there is
                end = min(end, max(0.0, (entry["cap"] - start) / slope.mean))
            span = np.linspace(0, end, 50)
            ax.plot(span, start + slope.mean * span, color=colors[entry["method"]], linewidth=1.6,
                    label=f"{entry['method']}: {slope.text()} tokens/nat")
            if entry["at_cap"]:
                ax.axhline(entry["cap"], color="0.5", linewidth=0.8, linestyle=":")
        ax.set_xlabel(f"KL(policy ‖ initial model), {KL_UNIT}")
        ax.set_ylabel("mean response length, tokens (up to the first EOS)")
        ax.set_title(_title(size, "length vs KL; lines: seed-mean least-squares fit, up to the cap (dotted)"),
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_scale(scale, path: str, title: str, measures: Measures = GOLD) -> Optional[str]:
    """Per method run at several sizes: the KL of the best gold evaluation and the drop after
    the peak, seed mean with its 95% t-interval, by size."""
    if not scale:
        return None
    plt = _pyplot()
    colors = _colors([entry["method"] for entry in scale])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, entry in enumerate(scale):
        x = np.arange(len(entry["sizes"])) + (i - (len(scale) - 1) / 2) * 0.08
        for ax, key in zip(axes, ("peak_kl", "drop")):
            stats = [entry["table"][s][key] for s in entry["sizes"]]
            means = np.asarray([s.mean for s in stats])
            errors = np.asarray([[s.mean - s.low, s.high - s.mean] for s in stats]).T
            ax.errorbar(x, means, yerr=np.nan_to_num(errors), marker="o", capsize=3,
                        color=colors[entry["method"]], label=entry["method"])
    for ax, label in zip(axes, (f"KL at the best {measures.short} evaluation, nats",
                                f"{measures.short} drop after each run's peak")):
        ax.set_xticks(range(len(scale[0]["sizes"])), scale[0]["sizes"])
        ax.set_xlabel("model size (pyalign.tasks.MODEL_SIZES)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="best")
    fig.suptitle(f"{title}\n(seed means with their 95% t-intervals)")
    fig.tight_layout()
    return _save(fig, path)


def write_plots(rows, by_size, lengths, scale, out: str, name: str, measures: Measures = GOLD) -> dict:
    """Every figure of a study into ``out``; name -> path (None where there was nothing to plot).
    ``by_size``: (size, fits, rows with the matched baselines, pairs) per model size."""
    return {
        "gold_vs_sqrt_kl": plot_gold_vs_sqrt_kl(rows, by_size, os.path.join(out, "gold_vs_sqrt_kl.png"),
                                                f"study {name}: {measures.phrase} vs drift, every "
                                                f"evaluation", measures),
        "progress": plot_progress(rows, os.path.join(out, "gold_proxy_vs_progress.png"),
                                  f"study {name}: {measures.progress_phrase} over training", measures),
        "frontiers": plot_frontiers(by_size, os.path.join(out, "frontiers.png"),
                                    f"study {name}: best {measures.noun} within a KL budget", measures),
        "length_vs_kl": plot_length_vs_kl(rows, lengths, os.path.join(out, "length_vs_kl.png"),
                                          f"study {name}: response length vs KL"),
        "scale": plot_scale(scale, os.path.join(out, "scale.png"),
                            f"study {name}: where each model size peaks, and how far it falls", measures),
    }


__all__ = ["write_plots", "plot_gold_vs_sqrt_kl", "plot_progress", "plot_frontiers", "plot_length_vs_kl",
           "plot_scale"]
