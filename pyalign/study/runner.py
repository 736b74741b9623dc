"""Running a study's points where the compute is, and collecting them.

Layout of a study directory::

    OUT/.lock                      held by the one ``pyalign study`` that uses OUT (``StudyLock``)
    OUT/study.json                 the grid (what --aggregate reads back)
    OUT/data/train.jsonl, heldout.jsonl   on one's own model: the split of --data (userdata.py)
    OUT/points/<point_id>/config.toml   a `pyalign train --config` file per point
    OUT/points/<point_id>/evals.jsonl   one row per evaluation (written by the point)
    OUT/points/<point_id>/done.json     the point finished
    OUT/commands.txt               one `pyalign train --config ...` line per point
    OUT/evals.jsonl, OUT/points.csv     every finished point's evaluations (``aggregate``)

``prepare`` writes the layout (``--emit-configs`` stops there); ``run_pool`` runs the unfinished
points in worker processes, which die with the study (``_die_with_parent``), ``run_ray`` as Ray
tasks; both skip finished points whose files check out against their done.json, and rerun a
damaged one, so a rerun resumes. Progress is read from the points' files, the same for every
launcher.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from typing import Optional

from pyalign._utils import atomic_write, pip_extra, toml_value
from pyalign.study import userdata
from pyalign.study.grid import Grid, GridError, Point, parse_grid, train_config
from pyalign.study.point import DONE_NAME, finished_rows, is_done, read_rows
from pyalign.trainers.lock import LockHeld, RunLock

STUDY_NAME = "study.json"
CSV_NAME = "points.csv"
IDENTITY = ("point_id", "method", "algo", "knob", "value", "size", "seed", "step", "epoch")
METRICS = ("kl_to_init", "kl_to_init_se", "kl_to_ref", "sqrt_kl", "gold_reward", "gold_reward_se",
           "gold_gain", "gold_win_rate", "proxy_reward", "response_length", "perplexity")
# on one's own model (evaluation.DataEvaluator): the held-out preference accuracy and its kin
DATA_METRICS = ("preference_accuracy", "preference_accuracy_se", "preference_margin",
                "train_preference_accuracy")


class StudyLock(RunLock):
    """OUT/.lock, held by the one ``pyalign study`` that writes into OUT (from before it writes
    the layout until its report is written): a second study into OUT is refused at once, naming
    the holder, and cannot take the point locks of the first. An flock, freed when its holder
    dies however it dies (pyalign.trainers.lock)."""

    def _held_message(self, text: str) -> str:
        holder = text.split() or ["?"]  # "<pid> <host>", as RunLock writes it
        who = f"pid {holder[0]} on {holder[1] if len(holder) > 1 else 'this host'}"
        return (f"{self.directory} is in use by another pyalign study ({who}, lock {self.path}); "
                f"wait for it to finish, or pass another --out")


def lock_study(out: str) -> StudyLock:
    """Take OUT's study lock, or raise GridError naming the study that holds it."""
    try:
        return StudyLock(out, notice=lambda message: None).acquire()
    except LockHeld as exc:
        raise GridError(str(exc)) from None
    except OSError as exc:
        raise GridError(f"--out {out} must be a writable directory: {exc}") from None


def _read_study_file(path: str) -> dict:
    """OUT/study.json, or a GridError naming it when it is damaged."""
    try:
        with open(path, "rb") as handle:
            spec = json.loads(handle.read())
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise GridError(f"{path} is damaged ({type(exc).__name__}: {exc}); it records the study's "
                        f"grid: restore it, or remove it to start this directory over with the grid "
                        f"you pass") from None
    if not isinstance(spec, dict):
        raise GridError(f"{path} is damaged (not a grid mapping); restore it, or remove it to start "
                        f"this directory over with the grid you pass")
    return spec


def to_toml(values: dict) -> str:
    flat = [f"{k} = {toml_value(v)}" for k, v in values.items() if not isinstance(v, dict) and v is not None]
    tables = [f"\n[{k}]\n" + "".join(f"{kk} = {toml_value(vv)}\n" for kk, vv in v.items() if vv is not None)
              for k, v in values.items() if isinstance(v, dict)]
    return "\n".join(flat) + "\n" + "".join(tables)


def point_dir(out: str, point: Point) -> str:
    return os.path.join(os.path.abspath(out), "points", point.point_id)


def prepare(grid: Grid, out: str) -> list[tuple[Point, str]]:
    """Write OUT/study.json and every point's config; return (point, config path) pairs. An
    OUT that holds another grid is an error (resuming means the same grid)."""
    study_path = os.path.join(out, STUDY_NAME)
    if os.path.isfile(study_path):
        existing = _read_study_file(study_path)
        if existing != json.loads(json.dumps(grid.spec)):
            raise GridError(f"{out} holds a study of another grid ({study_path}); use another --out "
                            f"or the same grid to resume it")
    os.makedirs(os.path.join(out, "points"), exist_ok=True)
    files = None
    if userdata.is_user(grid.spec):
        files = userdata.write_split(grid.spec, out)
    atomic_write(study_path, json.dumps(grid.spec, indent=1) + "\n")
    jobs, commands = [], []
    for point in grid.points():
        directory = point_dir(out, point)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.toml")
        atomic_write(path, to_toml(train_config(point, grid.spec, directory, files)))
        jobs.append((point, path))
        commands.append(f"pyalign train --config {path} --no-progress")
    atomic_write(os.path.join(out, "commands.txt"), "\n".join(commands) + "\n")
    return jobs


def load_grid(out: str) -> Grid:
    path = os.path.join(out, STUDY_NAME)
    if not os.path.isfile(path):
        raise GridError(f"{out} is not a study directory (no {STUDY_NAME}; write one with "
                        f"pyalign study --emit-configs {out})")
    spec = _read_study_file(path)
    try:
        return parse_grid(spec, spec.get("name", "custom"))
    except GridError as exc:
        raise GridError(f"{path}: {exc}") from None


def run_config(path: str) -> int:
    """Run one point's config in this process (what a pool worker and a Ray task call)."""
    from pyalign.study.point import run_point
    from pyalign.trainers.resolve import resolve_config_values
    from pyalign.trainers.settings import ConfigError, load_config_file
    try:
        algo, run, config = resolve_config_values(load_config_file(path), path)
    except ConfigError as exc:
        print(f"pyalign train: error: {exc}", file=sys.stderr)
        return 2
    config.progress = False
    return run_point(algo, run, config)


class _Progress:
    """A tqdm bar over every evaluation of every point, read from the points' files."""

    def __init__(self, jobs, show: bool):
        from tqdm.auto import tqdm
        self.jobs = jobs
        total = sum(len(point.eval_steps) for point, _ in jobs)
        self.bar = tqdm(total=total, desc="pyalign study: evaluations", unit="eval", file=sys.stderr,
                        disable=not show, dynamic_ncols=True)

    def refresh(self) -> None:
        done_points, evaluations = 0, 0
        for point, path in self.jobs:
            directory = os.path.dirname(path)
            finished = is_done(directory)
            done_points += finished
            evaluations += len(point.eval_steps) if finished else len(read_rows(directory))
        self.bar.set_postfix_str(f"points {done_points}/{len(self.jobs)}")
        self.bar.update(evaluations - self.bar.n)

    def close(self) -> None:
        self.refresh()
        self.bar.close()


def pending_jobs(jobs):
    """The points to run: the unfinished ones, and the finished ones whose files do not check out
    against their done.json (named on stderr, their done.json removed, so they rerun from
    scratch)."""
    pending = []
    for point, path in jobs:
        directory = os.path.dirname(path)
        if is_done(directory):
            rows, damage = finished_rows(directory)
            if rows is not None:
                continue
            print(f"pyalign study: point {point.point_id} is damaged ({damage}): running it again",
                  file=sys.stderr)
            os.remove(os.path.join(directory, DONE_NAME))
        pending.append((point, path))
    return pending


def _die_with_parent(parent: int) -> None:
    """A pool worker's initializer: the worker dies with the study process, however that dies
    (kill -9 included), instead of running on with no one to collect its points. Linux: the
    kernel's parent-death signal; elsewhere a thread that watches the parent's pid."""
    import signal
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        set_death_signal = libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        set_death_signal = False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    if not set_death_signal:
        import threading
        import time

        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)
        threading.Thread(target=watch, daemon=True, name="pyalign-parent-watch").start()


def _report_failures(failed: list[str]) -> int:
    for message in failed:
        print(f"pyalign study: error: {message}", file=sys.stderr)
    return 1 if failed else 0


def run_pool(jobs, workers: int, *, progress: bool = True, pending=None) -> int:
    """Run the unfinished points in ``workers`` processes (spawned: a fresh interpreter each,
    one intra-op thread per point). Returns 0 when every point finished. ``pending``:
    pending_jobs(jobs) where the caller has it already (the bar still counts every job)."""
    import concurrent.futures
    import multiprocessing

    pending = pending_jobs(jobs) if pending is None else pending
    bar = _Progress(jobs, progress)
    failed = []
    try:
        if pending:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                                        initializer=_die_with_parent,
                                                        initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(run_config, path): point for point, path in pending}
                waiting = set(futures)
                while waiting:
                    finished, waiting = concurrent.futures.wait(waiting, timeout=1.0)
                    for future in finished:
                        try:
                            code = future.result()
                        except Exception as exc:  # a worker that died or raised
                            code = f"{type(exc).__name__}: {exc}"
                        if code != 0:
                            failed.append(f"point {futures[future].point_id} failed ({code})")
                    bar.refresh()
    finally:
        bar.close()
    return _report_failures(failed)


def run_ray(jobs, *, address: Optional[str] = None, workers: Optional[int] = None,
            progress: bool = True, pending=None) -> int:
    """Run the unfinished points as Ray tasks (one CPU each) on the cluster at ``address``, or on
    a local Ray instance of ``workers`` CPUs. The points' directories must be on a filesystem
    every Ray worker sees. ``pending`` as in run_pool."""
    try:
        import ray
    except ImportError as exc:
        raise GridError(f"--launcher ray needs ray: {pip_extra('ray')}") from exc
    pending = pending_jobs(jobs) if pending is None else pending
    bar = _Progress(jobs, progress)
    failed = []
    started_here = not ray.is_initialized()
    try:
        if pending:
            if started_here:
                # a local instance's workers import pyalign from the driver's environment; a
                # cluster's workers must have pyalign installed (and see the study directory)
                kwargs = {"address": address} if address else \
                    {"num_cpus": workers, "runtime_env": {"env_vars": _worker_env()}}
                ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", **kwargs)
            task = ray.remote(num_cpus=1, max_retries=0)(run_config)
            refs = {task.remote(path): point for point, path in pending}
            waiting = list(refs)
            while waiting:
                finished, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=1.0)
                for ref in finished:
                    try:
                        code = ray.get(ref)
                    except Exception as exc:
                        code = f"{type(exc).__name__}: {exc}"
                    if code != 0:
                        failed.append(f"point {refs[ref].point_id} failed ({code})")
                bar.refresh()
    finally:
        bar.close()
        if started_here and ray.is_initialized():
            ray.shutdown()
    return _report_failures(failed)


def _worker_env() -> dict:
    keep = ("PYALIGN_CACHE_DIR", "PYALIGN_BACKEND", "PYALIGN_DISABLE_EXT", "TRITON_INTERPRET")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
    return env


def aggregate(out: str) -> tuple[Grid, list[dict], list[str], dict]:
    """(grid, every finished point's rows in grid order, ids of the unfinished points, id ->
    what is wrong for the finished points whose files do not check out against their
    done.json: their rows are left out); writes OUT/evals.jsonl and OUT/points.csv."""
    grid = load_grid(out)
    rows, missing, damaged = [], [], {}
    for point in grid.points():
        directory = point_dir(out, point)
        if not os.path.isfile(os.path.join(directory, DONE_NAME)):
            missing.append(point.point_id)
            continue
        mine, damage = finished_rows(directory)
        if mine is None:
            damaged[point.point_id] = damage
        else:
            rows.extend(mine)
    atomic_write(os.path.join(out, "evals.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    buffer = io.StringIO()
    columns = IDENTITY + METRICS + (DATA_METRICS if userdata.is_user(grid.spec) else ())
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write(os.path.join(out, CSV_NAME), buffer.getvalue())
    return grid, rows, missing, damaged


__all__ = ["prepare", "run_pool", "run_ray", "aggregate", "load_grid", "run_config", "to_toml",
           "lock_study", "StudyLock", "STUDY_NAME", "CSV_NAME"]
