"""`pyalign study`: sweep a strength knob per algorithm over seeds (and model sizes) on the
embedded task, evaluate each run at checkpoints inside and after the first epoch, and give
verdicts with 95% intervals over seeds on over-optimisation, length, scale and the methods'
reward-vs-drift frontiers; writes points.csv, PNGs and report.md.

    pyalign study --preset quick                   # a first look (about 2 min on 2 cores)
    pyalign study                                  # the default study (about 10 min on 2 cores)
    pyalign study --preset elastic-reset --workers 4
    pyalign study --preset lengthy                 # length and model size, variable-length task
    pyalign study --grid my_grid.toml --out runs/my-study
    pyalign study --emit-configs runs/s            # one `pyalign train` config per point
    pyalign study --aggregate runs/s               # collect what the points wrote
    pyalign study --launcher ray [--ray-address auto]

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


def run_study(args: argparse.Namespace) -> int:
    from pyalign.study import runner
    from pyalign.study.grid import GridError, parse_grid
    from pyalign.study.report import write_report
    progress = not args.no_progress
    lock = None
    try:
        if args.aggregate:
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
        if args.grid:
            grid = parse_grid(load_grid_file(args.grid), os.path.splitext(os.path.basename(args.grid))[0])
        else:
            grid = parse_grid(PRESETS[args.preset], args.preset)
        if args.workers is not None and args.workers < 1:
            raise GridError(f"--workers must be >= 1, got {args.workers}")
        out = args.emit_configs or args.out or os.path.join("runs", f"study-{grid.name}")
        lock = runner.lock_study(out)  # before any work: a second study into --out is refused at once
        from pyalign._prepare import prepare_run  # the builds, before the workers and their bars
        prepare_run("cpu", task_seed=grid.spec["task_seed"], task_config=grid.spec["task"],
                    progress=progress)
        _build_task(grid.spec, progress)
        jobs = runner.prepare(grid, out)
        if args.emit_configs:
            print(f"pyalign study: wrote {len(jobs)} point configs under {out}/points; run each line of "
                  f"{out}/commands.txt anywhere that sees {out}, then: pyalign study --aggregate {out}")
            return 0
        workers = args.workers or _cpus()
        load_before = [round(x, 2) for x in os.getloadavg()]
        started = time.perf_counter()
        if args.launcher == "ray":
            code = runner.run_ray(jobs, address=args.ray_address, workers=workers, progress=progress)
        else:
            code = runner.run_pool(jobs, workers, progress=progress)
        info = {"launcher": args.launcher, "workers": workers, "wall_s": time.perf_counter() - started,
                "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
                "cpus": _cpus()}
        from pyalign._utils import atomic_write
        atomic_write(os.path.join(out, "run.json"), json.dumps(info) + "\n")
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
    print(f"pyalign study: {len(rows)} evaluations, {info['wall_s']:.0f} s; "
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
