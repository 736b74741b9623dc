"""The `pyalign bench` suite: the case builders by name at the default and --quick sizes, the
arguments every benchmark entry point shares, and the loop that builds, runs, prints and saves
each case in turn (`run_cases`, `run_bench` for the subcommand, `script_main` for the scripts in
benchmarks/)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch

from pyalign._prepare import prepare_extension
from pyalign._utils import limited_threads
from pyalign.bench import harness
from pyalign.bench.common import DTYPES
from pyalign.bench.harness import Case
from pyalign.bench.kl import kl_case
from pyalign.bench.kto import linear_kto_case
from pyalign.bench.linear_logprobs import linear_logprobs_case
from pyalign.bench.logprobs import logprobs_case
from pyalign.bench.policy import linear_policy_case, policy_case
from pyalign.bench.preference import linear_orpo_case, linear_preference_case, preference_case
from pyalign.bench.weights import bema_case, weights_case

QUICK_NOTE = ("--quick: tiny sizes, to check that every candidate runs; its times and ratios say "
              "nothing about speed (time without --quick)")
GPU_NOTE = ("GPU rows (the triton and cuda backends, Liger-Kernel kernels, CUDA-event timing) "
            "need a CUDA GPU: not run on this machine")


def suite_builders(args) -> dict[str, Callable[[], Case]]:
    """Case builders for `pyalign bench` by name, at the default or --quick size."""
    device, dtype, compile = args.device, DTYPES[args.dtype], not args.no_compile
    if args.quick:
        return {name: _noted(build, QUICK_NOTE)
                for name, build in _quick_builders(device, dtype, compile).items()}
    # N and H of linear_logprobs below 4096 x 1024: that size is ~1 TFLOP per fwd+bwd, ~20 s a
    # call at the ~50 GFLOP/s of 2 cores; --tokens 4096 --hidden 1024 --vocab 128256 runs it.
    tokens, hidden = _size(args, "tokens", 1024), _size(args, "hidden", 512)
    vocab, pairs, seq_len = _size(args, "vocab", 32000), _size(args, "pairs", 4), _size(args, "seq", 256)
    return {
        "logprobs": lambda: logprobs_case(4096, 32000, dtype, device, compile=compile),
        "linear_logprobs": lambda: linear_logprobs_case(tokens, hidden, vocab, dtype, device,
                                                        compile=compile),
        "kl": lambda: kl_case(1 << 20, device, compile=compile),
        "preference": lambda: preference_case(4096, device, compile=compile),
        "linear_preference": lambda: linear_preference_case(pairs, seq_len, hidden, vocab, dtype,
                                                            device),
        "linear_preference_128k": lambda: linear_preference_case(pairs, seq_len, hidden, 128256,
                                                                 dtype, device),
        "linear_kto": lambda: linear_kto_case(2 * pairs, seq_len, hidden, vocab, dtype, device),
        "linear_orpo": lambda: linear_orpo_case(pairs, seq_len, hidden, vocab, dtype, device),
        "policy": lambda: policy_case(64, 1024, device, compile=compile),
        "linear_policy": lambda: linear_policy_case(8, 256, 512, 32000, dtype, device,
                                                    compile=compile),
        "weights": lambda: weights_case(20_000_000, device),
        "bema": lambda: bema_case(20_000_000, device),
    }


def _quick_builders(device, dtype, compile: bool) -> dict[str, Callable[[], Case]]:
    """The --quick sizes: every case small enough to run in seconds."""
    return {
        "logprobs": lambda: logprobs_case(64, 1000, dtype, device, compile=compile),
        "linear_logprobs": lambda: linear_logprobs_case(64, 32, 1000, dtype, device,
                                                        compile=compile),
        "kl": lambda: kl_case(4096, device, compile=compile),
        "preference": lambda: preference_case(64, device, compile=compile),
        "linear_preference": lambda: linear_preference_case(2, 16, 32, 500, dtype, device),
        "linear_preference_128k": lambda: linear_preference_case(2, 16, 32, 1283, dtype, device),
        "linear_kto": lambda: linear_kto_case(4, 16, 32, 500, dtype, device),
        "linear_orpo": lambda: linear_orpo_case(2, 16, 32, 500, dtype, device),
        "policy": lambda: policy_case(8, 128, device, compile=compile),
        "linear_policy": lambda: linear_policy_case(4, 16, 32, 500, dtype, device, compile=compile),
        "weights": lambda: weights_case(100_000, device, num_tensors=16),
        "bema": lambda: bema_case(100_000, device, num_tensors=16),
    }


def _noted(build: Callable[[], Case], note: str) -> Callable[[], Case]:
    """``build`` with ``note`` added to its case's notes (printed under its table)."""
    def build_noted() -> Case:
        case = build()
        case.notes.append(note)
        return case
    return build_noted


DEFAULT_CASES = ("logprobs", "linear_logprobs")


def _size(args, name: str, default: int) -> int:
    """A size of the head cases from `pyalign bench --tokens/--hidden/--vocab/--pairs/--seq`
    (``add_size_arguments``), or the default where it is not given."""
    value = getattr(args, name, None)
    return default if value is None else value


def add_size_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`pyalign bench`'s sizes of the LM-head cases (the default sizes; not with --quick)."""
    group = parser.add_argument_group("sizes of the LM-head cases (default sizes, not --quick)")
    group.add_argument("--tokens", type=int, help="N of linear_logprobs (default 1024)")
    group.add_argument("--hidden", type=int, help="H of every head case (default 512)")
    group.add_argument("--vocab", type=int,
                       help="V of linear_logprobs, linear_preference, linear_kto (default 32000; "
                            "linear_preference_128k is always 128256)")
    group.add_argument("--pairs", type=int,
                       help="B pairs of linear_preference(_128k); linear_kto takes 2B rows "
                            "(default 4)")
    group.add_argument("--seq", type=int, help="T of the loss cases (default 256)")
    return parser


def case_names() -> tuple[str, ...]:
    """Every case `pyalign bench --cases` accepts (the builders' names; building runs nothing)."""
    defaults = argparse.Namespace(device=torch.device("cpu"), dtype="float32", no_compile=True,
                                  quick=False)
    return tuple(suite_builders(defaults))


def add_common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `pyalign bench` and of every benchmarks/*.py script."""
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="dtype of logits / hidden / weight (default float32)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed calls per candidate (median reported; default 3, 5 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls first, the last one under the memory probe "
                             "(default 1; torch.compile rows get at least 2)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile rows (their warm-up is the slow part)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write the results as CSV")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a loaded machine "
                             "--threads 1 avoids the stalls of OpenMP threads waiting for "
                             "descheduled peers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                        help="skip (and say so) the candidates whose estimated peak memory is "
                             "above this many GiB (default: the memory available when the case "
                             "starts, its inputs allocated)")
    return parser


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pyalign bench: --device cuda, but no CUDA GPU is available")
    return device


def run_cases(builders: list[Callable[[], Case]], args, out=None) -> int:
    """Build, run and print each case in turn (inputs of one case are freed before the next);
    write --json / --csv. Returns the exit code (1 when any candidate failed)."""
    out = out or sys.stdout
    device = _resolve_device(args.device)
    args.device = str(device)
    prepare_extension(device)  # a first build happens here, with its own lines, never in a case
    # the previous thread count comes back after: callers in the same process keep theirs
    with limited_threads(args.threads or torch.get_num_threads()):
        return _run_cases(builders, args, device, out)


def _run_cases(builders, args, device: torch.device, out) -> int:
    reps = args.reps if args.reps is not None else (5 if device.type == "cuda" else 3)
    env = harness.environment(device)
    header = (f"pyalign {env['pyalign']} bench on {env['device']} ({env['device_name']}), "
              f"torch {env['torch']}, {env['cpu_threads']} CPU threads; median of {reps} "
              f"after {args.warmup} warm-up; ratios = reference time / row time (>1 = faster)")
    print(header, file=out)
    probe = env.get("memory_probe")
    if probe is not None:
        verdict = "ok" if probe["ok"] else "FAILED: CPU peak memory numbers are not trustworthy"
        print(f"CPU peak-memory probe: {probe['measured_mib']:.1f} MiB measured for a known "
              f"{probe['expected_mib']:.1f} MiB peak: {verdict}", file=out)
    notes = [QUICK_NOTE] if getattr(args, "quick", False) else []
    if device.type != "cuda":
        notes.append(GPU_NOTE)
    load = env["load_average"]
    if device.type == "cpu" and load is not None and load > (os.cpu_count() or 1):
        notes.append(f"warning: this machine is loaded (1-minute load average {load:.1f} on "
                     f"{os.cpu_count()} cores): CPU timings are noisy, multi-threaded ones can "
                     "stall (try --threads 1)")
    for note in notes:
        print(note, file=out)
    records, failed = [], False
    memory_limit = None if args.memory_limit is None else int(args.memory_limit * harness.GIB)
    for build in builders:
        case = build()
        progress = harness.make_progress(harness.progress_steps(case, reps), case.title,
                                         enabled=not args.no_progress)
        try:
            rows = harness.run_case(case, device, warmup=args.warmup, reps=reps,
                                    measure_memory=not args.no_memory, progress=progress,
                                    memory_limit=memory_limit)
        finally:
            harness.close_progress(progress)
        failed |= any(row.status.startswith("error") for row in rows)
        print("\n" + harness.format_table(case, rows), file=out, flush=True)
        records.append(harness.case_record(case, rows))
        del case, rows
    if args.json:
        harness.write_json(args.json, {"environment": env, "reps": reps,
                                       "warmup": args.warmup, "notes": notes,
                                       "cases": records})
    if args.csv:
        harness.write_csv(args.csv, records)
    return 1 if failed else 0


def run_bench(args) -> int:
    """Run the cases named by ``args.cases`` (or 'all'): the body of `pyalign bench`."""
    args.device = str(_resolve_device(args.device))
    builders = suite_builders(args)
    names = list(builders) if args.cases.strip() == "all" else [
        name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in names if name not in builders]
    if unknown:
        print(f"pyalign bench: unknown case(s) {unknown}; choose from {sorted(builders)} or 'all'",
              file=sys.stderr)
        return 2
    return run_cases([builders[name] for name in names], args)


def script_main(build: Callable[[argparse.Namespace], list[Callable[[], Case]]],
                configure: Callable[[argparse.ArgumentParser], None], description: str,
                argv=None) -> int:
    """The body of a benchmarks/*.py script: common arguments plus the script's own sizes."""
    parser = argparse.ArgumentParser(description=description)
    add_common_arguments(parser)
    configure(parser)
    args = parser.parse_args(argv)
    args.device = str(_resolve_device(args.device))
    return run_cases(build(args), args)
