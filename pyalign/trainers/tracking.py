"""Experiment tracking (``--report-to tensorboard wandb``): every record metrics.jsonl gets
(``MetricsLog``) goes to the trackers too, the same scalars under the same names, at the same
step; the final evaluation's under ``final/``.

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` event files in OUT/tensorboard
  (``tensorboard --logdir OUT``). A resumed run purges the events past its checkpoint's step,
  as metrics.jsonl drops their lines.
- ``wandb``: a Weights & Biases run (project ``$WANDB_PROJECT``, else ``pyalign``; named after
  OUT) whose config is the run's settings; its id is kept in OUT/wandb-run-id so a resumed run
  logs into the same W&B run. ``WANDB_MODE=offline`` and ``WANDB_DIR`` work as usual.

Both are optional dependencies (``pip install 'pyalign-lm[tensorboard]'`` / ``'pyalign-lm[wandb]'``);
``check_trackers`` refuses a tracker whose package is missing before any work.
"""
from __future__ import annotations

import importlib.util
import math
import os
import secrets
from typing import Optional

from pyalign._utils import atomic_write, pip_extra

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_ID_NAME = "wandb-run-id"


def check_trackers(report_to: list) -> None:
    """ValueError naming the setting for ``none`` among others or a tracker not installed."""
    if "none" in report_to and len(report_to) > 1:
        raise ValueError(f"key 'report_to': 'none' cannot go with {report_to}")
    for name in report_to:
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(f"key 'report_to': {name} needs the {package} package: "
                             f"{pip_extra(name)} (or pip install {package})")


def scalars(record: dict) -> tuple[Optional[int], dict]:
    """(step, {name: float}) of a metrics record: its finite numbers and booleans; the final
    evaluation's under ``final/``."""
    prefix = "final/" if record.get("final") else ""
    values = {f"{prefix}{key}": float(value) for key, value in record.items()
              if key not in ("step", "final") and isinstance(value, (int, float))
              and math.isfinite(float(value))}
    return record.get("step"), values


class TensorBoardTracker:
    def __init__(self, out_dir: str, resume_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"), purge_step=purge)

    def log(self, record: dict) -> None:
        step, values = scalars(record)
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, out_dir: str, settings: dict, resume_step: Optional[int]):
        import wandb
        id_path = os.path.join(out_dir, WANDB_ID_NAME)
        run_id = None
        if resume_step is not None and os.path.isfile(id_path):
            with open(id_path) as handle:
                run_id = handle.read().strip() or None
        run_id = run_id or secrets.token_hex(8)
        atomic_write(id_path, run_id + "\n")
        name = os.path.basename(os.path.abspath(out_dir))
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "pyalign"), name=name, id=run_id,
                              resume="allow", config=settings, dir=os.environ.get("WANDB_DIR", out_dir))

    def log(self, record: dict) -> None:
        step, values = scalars(record)
        if record.get("final"):
            self.run.summary.update(values)
        elif values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(report_to: list, out_dir: str, settings: dict, resume_step: Optional[int]) -> list:
    """The trackers of ``report_to`` (call on the main rank only); ``resume_step``: the step a
    resumed run continues from (None: a fresh run)."""
    trackers = []
    for name in report_to:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(out_dir, resume_step))
        elif name == "wandb":
            trackers.append(WandbTracker(out_dir, settings, resume_step))
    return trackers


__all__ = ["check_trackers", "open_trackers", "scalars", "TensorBoardTracker", "WandbTracker"]
