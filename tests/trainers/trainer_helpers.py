"""Helpers of the trainer tests: the tiny embedded task, configs, in-process ``pyalign train``."""
import json
import os

from pyalign._utils import toml_value

# A task small enough to build in seconds: the trainers' behaviour, not the task's quality, is
# under test here (tests/test_tasks.py covers the default task).
TINY_TASK = {"prompt_len": 4, "response_len": 6, "hidden_size": 32, "num_layers": 2,
             "num_heads": 2, "intermediate_size": 64, "sft_steps": 25, "sft_batch": 32,
             "rm_pairs": 200}
# Metrics that measure wall-clock time, not the computation.
TIMING_KEYS = ("tokens_per_s", "step_time_s")


def write_config(path, task_cache_dir, **values):
    """A TOML config with the tiny task; ``values`` are flat keys."""
    lines = [f"task_cache_dir = {json.dumps(task_cache_dir)}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    lines.append("[task]")
    lines += [f"{k} = {toml_value(v)}" for k, v in TINY_TASK.items()]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return str(path)


def run_cli(*argv):
    """``pyalign train ARGV`` in this process: (exit code, captured stderr via capsys)."""
    from pyalign.cli.train import main
    return main([str(a) for a in argv] + ["--no-progress"])


def read_records(out_dir):
    from pyalign.trainers import read_metrics
    return read_metrics(os.path.join(out_dir, "metrics.jsonl"))


def strip_timing(record):
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}
