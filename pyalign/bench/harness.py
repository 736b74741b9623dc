"""The benchmark harness behind `pyalign bench` and benchmarks/*.py: candidates, rows and cases,
timing, peak memory, ratio columns, tables, JSON and CSV, progress and the description of the
machine. What is compared lives in the op-family modules of this package.

Method: every candidate of a case runs in this one process on the same
inputs. Each is warmed up, then run once under the memory probe, then the timed repetitions run
round-robin over the candidates (so that load from other processes on a shared machine hits all
of them alike); the median is reported.

Peak memory is the extra memory a call needs above what existed before it (the inputs):
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated before the call.
- CPU: the torch profiler with ``profile_memory=True``; the peak of the running sum of its
  ``[memory]`` allocation/free records, ordered by time. The records are read from the raw
  kineto event list: ``profile.events()`` folds an allocation made inside an op into that op's
  ``cpu_memory_usage`` and keeps only the top-level frees as ``[memory]`` events, so summing
  those gives nonsense. ``cpu_memory_probe()`` checks the method on known allocations.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import gc
import importlib
import io
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import torch

import pyalign
from pyalign._utils import atomic_write

MIB = 1 << 20
KINETO_QUIET = "6"
GIB = 1 << 30

# Third-party baselines: import-guarded, reported as "not installed" when absent.
OPTIONAL_BASELINES = {"liger_kernel": "Liger-Kernel", "trl": "TRL"}


@dataclasses.dataclass
class Candidate:
    """One row of a case. ``run()`` is the timed work (forward and backward where the case says
    so); ``setup()``, when given, runs before every call outside the timing (for example to
    refill a buffer that an in-place backward overwrote). ``status`` other than "ok" means the
    row is reported but not run (not installed, needs a GPU, ...)."""
    name: str
    run: Optional[Callable[[], object]] = None
    setup: Optional[Callable[[], object]] = None
    kind: str = "candidate"  # candidate | baseline | floor
    backend: Optional[str] = None
    bytes_moved: Optional[int] = None  # for a GB/s column
    status: str = "ok"
    compiled: bool = False  # torch.compile: the first call compiles
    # Estimated peak extra bytes of one call (for the candidates whose memory grows with N·V):
    # run_case skips the candidate, saying why, when it is above the memory left.
    memory_need: Optional[int] = None


@dataclasses.dataclass
class Row:
    name: str
    kind: str
    backend: Optional[str]
    status: str
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    times_ms: list = dataclasses.field(default_factory=list)
    first_call_s: Optional[float] = None  # the first call, when not under the memory probe:
    # for a torch.compile row, the compile time
    peak_extra_mib: Optional[float] = None
    gbps: Optional[float] = None
    ratios: dict = dataclasses.field(default_factory=dict)  # label -> reference time / this time
    x_floor: Optional[float] = None  # this time / the floor's time


@dataclasses.dataclass
class Case:
    """A table: candidates on the same inputs. ``ratio_to`` maps a column label to the name of
    the candidate it compares with (reference time / row time: above 1 means faster)."""
    title: str
    params: dict
    candidates: list
    ratio_to: dict = dataclasses.field(default_factory=dict)
    floor: Optional[str] = None
    notes: list = dataclasses.field(default_factory=list)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ memory

def _kineto_memory_records(profile) -> list[tuple[int, int]]:
    """(time ns, bytes; negative for a free) of every CPU allocator record of a profile."""
    records = []
    for event in profile.profiler.kineto_results.events():
        if event.name() != "[memory]":
            continue
        if event.device_type() != torch.autograd.DeviceType.CPU:
            continue
        records.append((event.start_ns(), event.nbytes()))
    records.sort(key=lambda record: record[0])
    return records


def cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by ``fn`` on the CPU allocator above what existed when it started
    (whatever ``fn`` returns is dropped inside the measurement)."""
    from torch.profiler import ProfilerActivity, profile

    # Kineto, the profiler's C++ side, prints a "USDT: ... profiler_start" and a "profiler_stop"
    # line to stderr on every profile at its default log level, into the progress bar; level 6
    # (above its ERROR and USDT levels) keeps it quiet. It reads the level once, at the first
    # profile of the process; a KINETO_LOG_LEVEL the user set wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_QUIET)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for _, nbytes in _kineto_memory_records(prof):
        running += nbytes
        peak = max(peak, running)
    return peak


def cuda_peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    if device.type == "cuda":
        return cuda_peak_extra_bytes(fn, device)
    return cpu_peak_extra_bytes(fn)


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """The memory a call may still take: on CUDA the device's free memory; on CPU the kernel's
    MemAvailable (Linux /proc/meminfo); None where it is unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_skip_status(candidate: Candidate, limit: Optional[int]) -> Optional[str]:
    """Why ``candidate`` must not run under ``limit`` bytes (None: it may run)."""
    if candidate.memory_need is None or limit is None or candidate.memory_need <= limit:
        return None
    return (f"skipped: needs ~{_bytes_text(candidate.memory_need)} (estimated from N, H, V), "
            f"only {_bytes_text(limit)} available (--memory-limit)")


def _bytes_text(nbytes: int) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.1f} MiB"


def cpu_memory_probe() -> dict:
    """Measure a known allocation pattern (peak 12 MiB above the start: 8 MiB, then 4 MiB more,
    the 8 freed, then 2 MiB) and say whether the CPU method reports exactly that."""
    def known_pattern():
        first = torch.empty(8 * MIB, dtype=torch.uint8)
        second = torch.empty(4 * MIB, dtype=torch.uint8)
        del first
        third = torch.empty(2 * MIB, dtype=torch.uint8)
        return second, third

    expected = 12 * MIB
    measured = cpu_peak_extra_bytes(known_pattern)
    return {"expected_mib": expected / MIB, "measured_mib": measured / MIB,
            "ok": measured == expected}


# ------------------------------------------------------------------------------------ timing

def _time_once(candidate: Candidate, device: torch.device) -> float:
    """Seconds of one call of ``candidate.run`` (setup excluded)."""
    if candidate.setup is not None:
        candidate.setup()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        candidate.run()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    candidate.run()
    return time.perf_counter() - begin


def _error_status(exc: Exception) -> str:
    first_line = (str(exc).splitlines() or [""])[0]
    return f"error: {type(exc).__name__}: {first_line[:160]}"


def run_case(case: Case, device: torch.device, *, warmup: int = 1, reps: int = 3,
             measure_memory: bool = True, progress=None,
             memory_limit: Optional[int] = None) -> list[Row]:
    """Run every candidate of ``case``: ``warmup`` untimed calls (at least two for a
    torch.compile candidate, whose first call compiles), the last of them under the memory
    probe, then ``reps`` timed calls round-robin over the candidates. A candidate whose
    ``memory_need`` exceeds ``memory_limit`` bytes (default: the memory available now, with the
    case's inputs allocated) is reported as skipped instead. Returns one Row per candidate,
    ratios filled."""
    rows = {c.name: Row(c.name, c.kind, c.backend, c.status) for c in case.candidates}
    limit = memory_limit if memory_limit is not None else available_memory_bytes(device)
    runnable = []
    for candidate in case.candidates:
        if candidate.status != "ok" or candidate.run is None:
            continue
        row = rows[candidate.name]
        skipped = memory_skip_status(candidate, limit)
        if skipped is not None:
            row.status = skipped
            if progress is not None:
                progress.update(1 + reps)
            continue
        calls = max(warmup, 2 if candidate.compiled else 1)
        try:
            for call in range(calls):
                if candidate.setup is not None:
                    candidate.setup()
                if call == calls - 1 and measure_memory:
                    gc.collect()
                    # buffers pyalign caches between calls are allocated inside the probe
                    pyalign.empty_cache()
                    row.peak_extra_mib = peak_extra_bytes(candidate.run, device) / MIB
                    continue
                begin = time.perf_counter()
                candidate.run()
                synchronize(device)
                if call == 0:
                    row.first_call_s = time.perf_counter() - begin
            runnable.append(candidate)
        except Exception as exc:  # a candidate that fails is reported, the others still run
            row.status = _error_status(exc)
        if progress is not None:
            progress.update(1)
    for _ in range(reps):
        for candidate in list(runnable):
            row = rows[candidate.name]
            try:
                row.times_ms.append(_time_once(candidate, device) * 1e3)
            except Exception as exc:
                row.status = _error_status(exc)
                runnable.remove(candidate)
            if progress is not None:
                progress.update(1)
    for candidate in runnable:
        row = rows[candidate.name]
        if row.times_ms:
            row.median_ms = statistics.median(row.times_ms)
            row.min_ms = min(row.times_ms)
            if candidate.bytes_moved:
                row.gbps = candidate.bytes_moved / (row.median_ms / 1e3) / 1e9
    _fill_ratios(case, rows)
    return [rows[c.name] for c in case.candidates]


def progress_steps(case: Case, reps: int) -> int:
    return sum(1 + reps for c in case.candidates if c.status == "ok" and c.run is not None)


def ratio_columns(candidates: list[Candidate], **columns: str) -> dict:
    """Ratio columns: the given ones, plus "vs TRL" / "vs Liger" when such a row exists."""
    ratio_to = {label.replace("_", " "): name for label, name in columns.items()}
    for prefix in ("TRL", "Liger"):
        row = next((c.name for c in candidates if c.name.startswith(prefix)), None)
        if row is not None:
            ratio_to[f"vs {prefix}"] = row
    return ratio_to


def _fill_ratios(case: Case, rows: dict) -> None:
    floor = rows.get(case.floor) if case.floor else None
    for row in rows.values():
        if row.median_ms is None:
            continue
        for label, reference_name in case.ratio_to.items():
            reference = rows.get(reference_name)
            if reference is not None and reference.median_ms is not None:
                row.ratios[label] = reference.median_ms / row.median_ms
        if floor is not None and floor.median_ms:
            row.x_floor = row.median_ms / floor.median_ms


# ------------------------------------------------------------------------------------ output

def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(case: Case, rows: list[Row]) -> str:
    """The case as a fixed-width text table (rows not run show their status)."""
    params = " ".join(f"{k}={v}" for k, v in case.params.items())
    show_gbps = any(r.gbps is not None for r in rows)
    show_floor = case.floor is not None
    headers = ["candidate", "median ms", "min ms", "peak extra MiB"]
    if show_gbps:
        headers.append("GB/s")
    headers += list(case.ratio_to)
    if show_floor:
        headers.append("x floor")
    lines = []
    body = []
    for row in rows:
        if row.median_ms is None:
            continue
        cells = [row.name, _fmt(row.median_ms, ".2f"), _fmt(row.min_ms, ".2f"),
                 _fmt(row.peak_extra_mib, ".1f")]
        if show_gbps:
            cells.append(_fmt(row.gbps, ".1f"))
        cells += [_fmt(row.ratios.get(label), ".2f", "x") for label in case.ratio_to]
        if show_floor:
            cells.append(_fmt(row.x_floor, ".2f", "x"))
        body.append(cells)
    widths = [max(len(str(cells[i])) for cells in [headers] + body) for i in range(len(headers))]
    lines.append(f"{case.title}  ({params})")

    def render(cells):
        first = f"{cells[0]:<{widths[0]}}"
        return "  ".join([first] + [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True)])

    lines.append(render(headers))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(render(cells) for cells in body)
    for row in rows:
        if row.median_ms is None:
            lines.append(f"  {row.name}: {row.status}")
    lines.extend(f"  note: {note}" for note in case.notes)
    return "\n".join(lines)


def case_record(case: Case, rows: list[Row]) -> dict:
    return {"title": case.title, "params": dict(case.params), "ratio_to": dict(case.ratio_to),
            "floor": case.floor, "notes": list(case.notes),
            "rows": [dataclasses.asdict(row) for row in rows]}


def write_json(path: str, payload: dict) -> None:
    atomic_write(path, json.dumps(payload, indent=2) + "\n")


CSV_FIELDS = ("case", "params", "name", "kind", "backend", "status", "median_ms", "min_ms",
              "first_call_s", "peak_extra_mib", "gbps", "x_floor", "ratios")


def write_csv(path: str, case_records: list[dict]) -> None:
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for record in case_records:
        params = " ".join(f"{k}={v}" for k, v in record["params"].items())
        for row in record["rows"]:
            writer.writerow({
                "case": record["title"], "params": params,
                **{k: row[k] for k in CSV_FIELDS if k in row and k != "ratios"},
                "ratios": ";".join(f"{k}={v:.4f}" for k, v in row["ratios"].items()),
            })
    atomic_write(path, handle.getvalue())


class _SilentProgress:
    """make_progress's bar when there is none to show."""
    n = total = 0

    def update(self, n=1):
        pass

    def close(self):
        pass


def make_progress(total: int, description: str, enabled: bool = True):
    """A tqdm bar on stderr (a no-op object when tqdm is missing or disabled), left on screen
    when closed (close_progress) as the case's record of how long it took."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        enabled = False
    if not enabled:
        return _SilentProgress()
    return tqdm(total=total, desc=description, file=sys.stderr, leave=True, dynamic_ncols=True)


def close_progress(progress) -> None:
    """Close a make_progress bar at 100 %: the steps a candidate did not run (one that failed,
    was skipped or stopped early) are counted as done, so a finished case never shows a bar
    stopped short."""
    if progress.n < progress.total:
        progress.update(progress.total - progress.n)
    progress.close()


# ------------------------------------------------------------------------------- environment

def optional_module(name: str):
    """The module, or None when it is not installed (or fails to import)."""
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def third_party_notes() -> list[str]:
    """A "not installed" note for each optional third-party baseline that is absent."""
    notes = []
    for module, label in OPTIONAL_BASELINES.items():
        if optional_module(module) is None:
            notes.append(f"{label}: not installed")
    return notes


def _cpu_model() -> str:
    try:  # the extension's build key names the CPU model the same way
        from pyalign._build import _cpu_model as build_cpu_model
        return build_cpu_model()
    except ImportError:
        return platform.processor() or platform.machine()


def _load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def environment(device: torch.device) -> dict:
    """Versions, the device and its load, the optional baselines installed and (on CPU) the
    peak-memory probe: the header of a results file."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pyalign": pyalign.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else _cpu_model()),
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average": _load_average(),
        "optional": {label: optional_module(module) is not None
                     for module, label in OPTIONAL_BASELINES.items()},
    }
    if device.type == "cpu":
        info["memory_probe"] = cpu_memory_probe()
    return info
