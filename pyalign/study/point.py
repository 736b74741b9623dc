"""One point of a study: a ``pyalign train`` run whose config has a ``[study]`` table.

The run trains to each of the table's ``eval_steps`` in turn and evaluates there
(``evaluation.Evaluator``), appending one JSON row per evaluation to ``OUT/evals.jsonl``; when
the last evaluation is written, ``OUT/done.json`` marks the point finished (written atomically,
so a point is either done or rerun from scratch) and holds the row count and the SHA-256 of
``evals.jsonl``, which ``check_done`` verifies before a study counts the point's rows.
``pyalign train --config OUT/config.toml`` runs it from any scheduler; a finished point is
skipped. A point trains the embedded task's model, or one's own (``model`` with ``data``:
evaluated by data_evaluation.DataEvaluator on its ``eval_data``, the held-out data).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Optional

from pyalign._utils import atomic_write

EVALS_NAME = "evals.jsonl"
DONE_NAME = "done.json"
STUDY_KEYS = ("point_id", "method", "knob", "value", "eval_steps", "epochs", "prompts", "heldout")


def is_done(out: str) -> bool:
    return os.path.isfile(os.path.join(out, DONE_NAME))


def read_rows(out: str) -> list[dict]:
    """The rows an unfinished point has written so far (progress): a line a kill cut short, or
    one that does not parse, is not counted. A finished point's rows: ``finished_rows``."""
    path = os.path.join(out, EVALS_NAME)
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as handle:
        rows = []
        for line in handle:
            if line.endswith(b"\n"):  # an unterminated last line is a write a kill cut short
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
        return rows


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def finished_rows(out: str) -> tuple[Optional[list[dict]], str]:
    """(rows, "") of a finished point whose evals.jsonl is the one its done.json describes (row
    count and SHA-256), else (None, what is wrong with it). A done.json without a hash (written
    before it had one) is checked by its evaluation count and by every line parsing."""
    evals, done = os.path.join(out, EVALS_NAME), os.path.join(out, DONE_NAME)
    try:
        with open(done, "rb") as handle:
            record = json.loads(handle.read())
        expected = int(record["evaluations"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{done} is unreadable ({type(exc).__name__}: {exc})"
    try:
        with open(evals, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return None, f"{evals} is unreadable ({exc.strerror or exc})"
    if "sha256" in record and record["sha256"] != _digest(data):
        return None, f"{evals} is not the file its {DONE_NAME} describes (its SHA-256 differs)"
    lines = data.split(b"\n")
    if lines[-1]:
        return None, f"{evals}: its last line is cut short"
    rows = []
    for number, line in enumerate(lines[:-1], start=1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            return None, f"{evals}: line {number} is not a JSON row"
    if len(rows) != record.get("rows", expected):
        return None, f"{evals} holds {len(rows)} rows; its {DONE_NAME} says {record.get('rows', expected)}"
    return rows, ""


def _check_study_table(study: dict, steps: int) -> None:
    from pyalign.trainers.settings import ConfigError
    missing = [k for k in STUDY_KEYS if k not in study]
    if missing:
        raise ConfigError(f"[study] table lacks {', '.join(missing)} (written by pyalign study)")
    eval_steps = study["eval_steps"]
    if not isinstance(eval_steps, list) or not eval_steps or sorted(set(eval_steps)) != eval_steps \
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in eval_steps):
        raise ConfigError(f"[study] eval_steps must be increasing ints >= 0, got {eval_steps!r}")
    if eval_steps[-1] != steps or len(study["epochs"]) != len(eval_steps):
        raise ConfigError(f"[study] eval_steps must end at steps ({steps}) and match epochs in length")


def _trainer_and_evaluator(algo: str, run: dict, config):
    """The point's trainer (no output directory: the study writes its rows) and evaluator."""
    import pyalign.tasks
    from pyalign.trainers.build import build_trainer, set_threads
    from pyalign.trainers.presets import ALGOS
    study = run["study"]
    if run["data"]:  # one's own model and data
        from transformers.utils import logging as transformers_logging

        from pyalign.study.data_evaluation import DataEvaluator
        transformers_logging.disable_progress_bar()  # a bar per model load, from every worker
        trainer = build_trainer(algo, {**run, "out": None}, config, progress=False)
        set_threads(run["threads"], trainer.dist.device.type == "cpu", trainer.policy)
        return trainer, DataEvaluator(trainer, run, prompts=study["prompts"], heldout=study["heldout"],
                                      gold=study.get("gold_reward"))
    from pyalign.study.evaluation import Evaluator
    set_threads(run["threads"], on_cpu=True)  # the embedded task's model is tiny
    task_config = pyalign.tasks.TaskConfig(**run["task"]) if run.get("task") else None
    task = pyalign.tasks.make_task(run["task_seed"], cache_dir=run["task_cache_dir"],
                                   progress=False, config=task_config)
    trainer = ALGOS[algo].trainer(task, config, algo=algo, out_dir=None)
    return trainer, Evaluator(trainer, prompts=study["prompts"], heldout=study["heldout"])


def run_point(algo: str, run: dict, config) -> int:
    """Train and evaluate one point into run['out']; 0 when done (or already done), 2 on error."""
    from pyalign.data import DataError
    from pyalign.data.rewards import RewardError
    from pyalign.trainers.lock import LockHeld, RunLock, remove_stale_temporaries
    from pyalign.trainers.settings import ConfigError

    out, study = run["out"], run["study"]
    try:
        _check_study_table(study, run["steps"])
        if (run["model"] and not run["data"]) or config.fsdp:
            raise ConfigError("a study point trains the embedded task's model, or 'model' on 'data', "
                              "in one process: 'model' without 'data', and 'fsdp', do not apply")
    except ConfigError as exc:
        print(f"pyalign train: error: {exc}", file=sys.stderr)
        return 2
    if is_done(out):
        return 0
    try:
        lock = RunLock(out, notice=lambda message: None).acquire()
    except (LockHeld, OSError) as exc:
        print(f"pyalign train: error: {exc}", file=sys.stderr)
        return 2
    try:
        remove_stale_temporaries(out)
        started = time.perf_counter()
        try:
            trainer, evaluator = _trainer_and_evaluator(algo, run, config)
        except (ConfigError, DataError, RewardError) as exc:
            print(f"pyalign train: error: {exc}", file=sys.stderr)
            return 2
        rows_path = os.path.join(out, EVALS_NAME)
        atomic_write(rows_path, "")  # a rerun of an unfinished point starts from scratch
        identity = {"point_id": study["point_id"], "method": study["method"], "algo": algo,
                    "knob": study["knob"], "value": study["value"], "seed": config.seed,
                    **({"size": study["size"]} if study.get("size") else {})}
        last = study["eval_steps"][-1]  # the learning-rate schedule's length, whatever the stop
        for step, epoch in zip(study["eval_steps"], study["epochs"]):
            if step > trainer.step:
                trainer.train(step, progress=False, schedule_steps=last)
            try:
                row = {**identity, "step": step, "epoch": epoch, **evaluator.evaluate(step)}
            except RewardError as exc:  # a gold reward that turned NaN on these samples
                print(f"pyalign train: error: {exc}", file=sys.stderr)
                return 2
            with open(rows_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        with open(rows_path, "rb") as handle:
            written = handle.read()
        atomic_write(os.path.join(out, DONE_NAME),
                     json.dumps({"point_id": study["point_id"], "evaluations": len(study["eval_steps"]),
                                 "rows": written.count(b"\n"), "sha256": _digest(written),
                                 "wall_s": time.perf_counter() - started}) + "\n")
    finally:
        lock.release()
    return 0


__all__ = ["run_point", "is_done", "read_rows", "finished_rows", "EVALS_NAME", "DONE_NAME"]
