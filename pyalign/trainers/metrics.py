"""What a training run reports: ``metrics.jsonl`` (``MetricsLog``, one JSON object per logged
step, also handed to the run's trackers: TensorBoard, W&B; ``read_metrics``), the
reward-vs-KL plot (``plot_reward_vs_kl``) and the one-line summary the CLI prints
(``format_summary``).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Optional

from pyalign._utils import atomic_write


class MetricsLog:
    """metrics.jsonl: one JSON object per line. On resume, lines after the checkpoint's step
    (logged by the interrupted run after its last checkpoint) are dropped, so the file reads as
    one uninterrupted run."""

    def __init__(self, path: Optional[str], *, resume_step: Optional[int] = None, trackers=()):
        self.path = path
        self.trackers = tuple(trackers)
        if path is None:
            return
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as handle:
                for line in handle:
                    # an unterminated last line is a write the kill cut short: dropped
                    with contextlib.suppress(ValueError):
                        record = json.loads(line)
                        if isinstance(record, dict) and line.endswith("\n") and \
                                record.get("step", 0) <= resume_step and not record.get("final"):
                            kept.append(line)
        atomic_write(path, "".join(kept))

    def write(self, record: dict) -> None:
        for tracker in self.trackers:
            tracker.log(record)
        if self.path is None:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_reward_vs_kl(records: list[dict], path: str, algo: str, labels: dict) -> Optional[str]:
    """Gold (else proxy) reward against KL to the initial model, one point per evaluation, its
    title and axis naming the reward by ``labels`` (metric key -> what it is: the task's gold
    reward, its reward model, the user's --reward). Written atomically: a reader never sees half
    an image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reward_key = "gold_reward" if any("gold_reward" in r for r in records) else "proxy_reward"
    points = [(r["kl_to_init"], r[reward_key], r["step"]) for r in records
              if "kl_to_init" in r and reward_key in r and not r.get("final")]
    if not points:
        return None
    kls, rewards, steps = zip(*points, strict=True)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(kls, rewards, color="0.7", linewidth=0.8, zorder=1)
    scatter = ax.scatter(kls, rewards, c=steps, cmap="viridis", s=14, zorder=2)
    fig.colorbar(scatter, ax=ax, label="step")
    final = [r for r in records if r.get("final") and "kl_to_init" in r and reward_key in r]
    if final:
        ax.scatter([final[-1]["kl_to_init"]], [final[-1][reward_key]], marker="*", s=120,
                   color="crimson", zorder=3, label="final evaluation")
        ax.legend(loc="best")
    x_label = "KL(policy || initial model), nats per response"
    y_label = labels.get(reward_key, reward_key.replace("_", " "))
    title = f"{algo}: {y_label.split(' (')[0]} vs KL to the initial model"
    ax.set(xlabel=x_label, ylabel=y_label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    # the format savefig(path) would infer from the extension (else matplotlib's default, png)
    image_format = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    # a PNG names what it plots in its text chunks too (what a reader or a test can check)
    metadata = {"Title": title, "Description": f"y: {y_label}; x: {x_label}"} \
        if image_format == "png" else None
    fig.savefig(image, dpi=110, format=image_format, metadata=metadata)
    plt.close(fig)
    atomic_write(path, image.getvalue())
    return path


def format_summary(summary: dict) -> str:
    parts = [f"pyalign train: algo={summary['algo']} steps={summary['steps']}"]
    for key in ("gold_reward", "proxy_reward", "kl_to_init"):
        if key in summary:
            parts.append(f"{key}={summary[key]:.4f}")
    if summary.get("metrics"):
        parts.append(f"metrics={summary['metrics']}")
    if summary.get("plot"):
        parts.append(f"plot={summary['plot']}")
    if summary.get("checkpoint"):
        parts.append(f"checkpoint={summary['checkpoint']}")
    return " ".join(parts)


__all__ = ["MetricsLog", "read_metrics", "plot_reward_vs_kl", "format_summary"]
