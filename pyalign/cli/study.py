"""`pyalign study`: sweep a strength knob per algorithm over seeds (and model sizes) on the
embedded task or on one's own model and data, evaluate each run at checkpoints inside and after
the first epoch, and give verdicts with 95% intervals over seeds on over-optimisation, length,
scale and the methods' reward-vs-drift frontiers; writes points.csv, PNGs and report.md.

    pyalign study --preset quick                   # a first look (about 2 min on 2 cores)
    pyalign study                                  # the default study (about 10 min on 2 cores)
    pyalign study --preset elastic-reset --workers 4
    pyalign study --preset lengthy                 # length and model size, variable-length task
    pyalign study --grid my_grid.toml --out runs/my-study
    pyalign study --emit-configs runs/s            # one `pyalign train` config per point
    pyalign study --aggregate runs/s               # collect what the points wrote
    pyalign study --launcher ray [--ray-address auto]
    pyalign study --preset quick --model DIR --data prefs.jsonl --gold-reward gold.py:score
    pyalign study --grid rl.toml --model DIR --data prompts.jsonl --reward rm.py:score --gold-reward GOLD_RM

On one's own model (--model, --data) the points train with `pyalign train --model`'s settings
(TRL's defaults, and any setting in the grid's tables); quality is --gold-reward's score (used
only to evaluate) or, without one, the held-out preference accuracy on --eval-data or on a
held-out tenth of --data (pyalign/study/userdata.py, measures.py).

A rerun into the same --out skips finished points (and reruns one whose files were damaged);
one study at a time uses an --out (OUT/.lock). The grid file format and the presets:
pyalign/study/grid.py and pyalign/study/presets.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

from pyalign.study.presets import PRESETS


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_grid_file(path: str) -> dict:
    from pyalign.study.grid import GridError
    if not os.path.isfile(path):
        raise GridError(f"grid file {path} does not exist")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise GridError(f"{path}: invalid TOML: {exc}") from exc


def _build_task(spec: dict, progress: bool) -> None:
    """Build (or load) each task of the grid (one per model size) once here, before the workers
    all want it."""
    import pyalign.tasks
    from pyalign.study.grid import Grid, task_settings
    settings = {json.dumps(task_settings(p, spec), sort_keys=True) for p in Grid(spec).points()}
    for fields in sorted(settings):
        pyalign.tasks.make_task(spec["task_seed"], progress=progress,
                                config=pyalign.tasks.TaskConfig(**json.loads(fields)))


def _report_damaged(damaged: dict) -> None:
    for point_id, damage in damaged.items():
        print(f"pyalign study: error: point {point_id} is damaged ({damage}); its rows are left out: "
              f"rerun the study into this --out to run it again", file=sys.stderr)


USER_FLAGS = ("model", "data", "eval_data", "gold_reward", "reward")


def _grid_spec(args: argparse.Namespace) -> tuple[dict, str]:
    """(the raw grid, its name) of --grid or --preset, with the user flags (--model, ...)."""
    from pyalign.study import userdata
    user = {key: getattr(args, key) for key in USER_FLAGS if getattr(args, key) is not None}
    if args.grid:
        return {**load_grid_file(args.grid), **user}, os.path.splitext(os.path.basename(args.grid))[0]
    if user.get("model") and user.get("data"):
        return userdata.from_preset(args.preset, PRESETS[args.preset], user), args.preset
    return {**PRESETS[args.preset], **user}, args.preset  # parse_grid names what is missing


def _default_workers(spec: dict) -> int:
    """The usable cores (one single-threaded point each), but one point at a time for one's own
    model where it runs on a GPU or is too big for one thread (trainers.build.SMALL_MODEL_PARAMS)."""
    if not spec.get("model"):
        return _cpus()
    import torch

    from pyalign.trainers.build import SMALL_MODEL_PARAMS
    weights = sum(os.path.getsize(os.path.join(spec["model"], name)) for name in os.listdir(spec["model"])
                  if name.endswith((".safetensors", ".bin", ".pt")))
    small = weights < 4 * SMALL_MODEL_PARAMS  # fp32 bytes
    return _cpus() if small and not torch.cuda.is_available() else 1


def _prepare_builds(spec: dict, progress: bool) -> None:
    """What the points need built before the workers start: the C++ extension, and the
    embedded task's model (one per size); on one's own model, every check of its files."""
    from pyalign._prepare import prepare_run
    from pyalign.study import userdata
    if userdata.is_user(spec):
        import torch
        prepare_run("cuda" if torch.cuda.is_available() else "cpu", progress=progress)
        return
    prepare_run("cpu", task_seed=spec["task_seed"], task_config=spec["task"], progress=progress)
    _build_task(spec, progress)


def run_study(args: argparse.Namespace) -> int:
    from pyalign.study import runner, userdata
    from pyalign.study.grid import GridError, parse_grid
    from pyalign.study.report import write_report
    progress = not args.no_progress
    lock = None
    try:
        if args.aggregate:
            given = [f"--{key.replace('_', '-')}" for key in USER_FLAGS if getattr(args, key) is not None]
            if given:
                raise GridError(f"--aggregate reads the study's grid from {args.aggregate}; "
                                f"{', '.join(given)} do(es) not apply")
            if not os.path.isdir(args.aggregate):
                raise GridError(f"{args.aggregate} is not a study directory (it does not exist)")
            lock = runner.lock_study(args.aggregate)
            grid, rows, missing, damaged = runner.aggregate(args.aggregate)
            info = _run_info(args.aggregate)
            report = write_report(args.aggregate, grid, rows, missing, info, damaged)
            _report_damaged(damaged)
            print(f"pyalign study: {len(rows)} evaluations of "
                  f"{len(grid.points()) - len(missing) - len(damaged)} finished points; report={report}")
            return 1 if damaged else 0
        grid = parse_grid(*_grid_spec(args))
        if args.workers is not None and args.workers < 1:
            raise GridError(f"--workers must be >= 1, got {args.workers}")
        out = args.emit_configs or args.out or os.path.join("runs", f"study-{grid.name}")
        lock = runner.lock_study(out)  # before any work: a second study into --out is refused at once
        if userdata.is_user(grid.spec):
            userdata.check_inputs(grid)  # the model, data and rewards, before any point runs
        _prepare_builds(grid.spec, progress)  # before the workers and their bars
        jobs = runner.prepare(grid, out)
        if args.emit_configs:
            print(f"pyalign study: wrote {len(jobs)} point configs under {out}/points; run each line of "
                  f"{out}/commands.txt anywhere that sees {out}, then: pyalign study --aggregate {out}")
            return 0
        workers = args.workers or _default_workers(grid.spec)
        pending = runner.pending_jobs(jobs)  # damaged points are named (once) here
        load_before = [round(x, 2) for x in os.getloadavg()]
        started = time.perf_counter()
        if args.launcher == "ray":
            code = runner.run_ray(jobs, address=args.ray_address, workers=workers, progress=progress,
                                  pending=pending)
        else:
            code = runner.run_pool(jobs, workers, progress=progress, pending=pending)
        wall_s = time.perf_counter() - started
        info = {"launcher": args.launcher, "workers": workers, "wall_s": wall_s,
                "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
                "cpus": _cpus()}
        if pending:  # a rerun of a finished study keeps the record of the launch that ran it
            from pyalign._utils import atomic_write
            atomic_write(os.path.join(out, "run.json"), json.dumps(info) + "\n")
        else:
            info = _run_info(out) or info
        grid, rows, missing, damaged = runner.aggregate(out)
        report = write_report(out, grid, rows, missing, info, damaged)
        _report_damaged(damaged)
        code = code or (1 if damaged else 0)
    except GridError as exc:
        print(f"pyalign study: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()
    print(f"pyalign study: {len(rows)} evaluations, {wall_s:.0f} s; "
          f"csv={os.path.join(out, runner.CSV_NAME)} report={report}")
    return code


def _run_info(out: str) -> Optional[dict]:
    path = os.path.join(out, "run.json")
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # a damaged launch record only loses the report's launch line
        print(f"pyalign study: warning: {path} is unreadable; the report omits the launch line",
              file=sys.stderr)
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=list(PRESETS), default="default",
                        help="a built-in grid (default: default)")
    source.add_argument("--grid", help="a TOML grid file (format: pyalign/study/grid.py)")
    source.add_argument("--aggregate", metavar="DIR", help="collect the finished points of the study "
                        "in DIR into points.csv and report.md; runs nothing")
    parser.add_argument("--out", help="study directory (default: runs/study-<name>)")
    parser.add_argument("--model", help="study one's own model: a local Hugging Face causal-LM "
                        "directory with its tokenizer (needs --data)")
    parser.add_argument("--data", help="its training data, in `pyalign train --data`'s formats")
    parser.add_argument("--eval-data", dest="eval_data", help="held-out data (default: a held-out "
                        "tenth of --data, grid key heldout_fraction)")
    parser.add_argument("--gold-reward", dest="gold_reward", metavar="SPEC",
                        help="the gold reward, for evaluation only: path/to/file.py:function, "
                        "module:function or a sequence-classification reward-model directory "
                        "(default: quality is the held-out preference accuracy)")
    parser.add_argument("--reward", metavar="SPEC", help="what the RL algorithms train on (the proxy), "
                        "as `pyalign train --reward`")
    parser.add_argument("--workers", type=int, help="parallel points (default: the usable CPUs)")
    parser.add_argument("--launcher", choices=("pool", "ray"), default="pool",
                        help="worker processes on this machine, or Ray tasks (pip install 'pyalign-lm[ray]')")
    parser.add_argument("--ray-address", dest="ray_address",
                        help="an existing Ray cluster (e.g. auto); default: a local Ray instance")
    parser.add_argument("--emit-configs", dest="emit_configs", metavar="DIR",
                        help="write one `pyalign train` config per point under DIR and exit")
    parser.add_argument("--no-progress", action="store_true", dest="no_progress", help="no tqdm bar")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``study`` subcommand of ``pyalign``."""
    parser = subparsers.add_parser("study", help="KL-budget study: sweeps, fits, frontiers, report",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run_study)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pyalign study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_study(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
