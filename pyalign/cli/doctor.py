"""`pyalign doctor`: the versions of pyalign's dependencies, the state of the C++ extension, and
for every op family and device which backends load (and why the others do not) and which one
"auto" picks, and the fused head's measured strategies. Imports nothing heavy until it runs, so
it can report a broken environment."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # absent, or broken: say which
        return f"not available ({type(exc).__name__}: {exc})"


def run_doctor(args) -> int:
    import torch

    from pyalign import backends

    print(f"python       {platform.python_version()} ({sys.executable})")
    for module in ("torch", "triton", "transformers", "numpy"):
        print(f"{module:<12} {_version(module)}")
    has_cuda = torch.cuda.is_available()
    print(f"cuda         {'available: ' + torch.cuda.get_device_name(0) if has_cuda else 'no GPU'}")
    devices = ["cpu"] + (["cuda"] if has_cuda else [])
    # The table first: it loads (or builds) the extension, and the status printed above it must
    # describe that load, not the state before it.
    table = []
    for family in backends.families():
        for device in devices:
            for backend in backends.BACKENDS:
                ok, reason = backends.status(family, backend, device)
                table.append(f"  {family:<16} {device:<5} {backend:<7} {'ok' if ok else 'no: ' + reason}")
            chosen = backends.resolve(family, "auto", device)
            table.append(f"  {family:<16} {device:<5} auto -> {chosen}")
    try:
        from pyalign import _build
        for kind in ("cpu", "cuda"):
            print(f"extension    {kind}: {_build.describe(kind)}")
        for key, value in _build.build_status().items():
            if isinstance(value, dict):  # cuda: flat, like cpu_*, under the summary line above
                for sub, sub_value in value.items():
                    print(f"extension    {key}_{sub}: {sub_value}")
            else:
                print(f"extension    {key}: {value}")
    except ImportError:
        print("extension    pyalign._build is not present")
    print("\nbackends (family / device: backend -> status)")
    print("\n".join(table))
    from pyalign import _head_autotune
    print("\nlinear_logprobs on triton, strategy=\"auto\": the measured choices (docs/gpu.md)")
    print("\n".join(_head_autotune.describe()))
    if args.compile:
        print()
        try:
            from pyalign import compile_check
        except ImportError as exc:
            print(f"compile check unavailable: {exc}")
            return 1
        return 0 if compile_check.print_compile_table() else 1
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``doctor`` subcommand of ``pyalign``."""
    parser = subparsers.add_parser("doctor", description="The versions of pyalign's dependencies, the "
                                   "C++ extension, and which backend runs each op on each device "
                                   "(and why the others cannot).")
    parser.add_argument("--compile", action="store_true",
                        help="also compile every Triton kernel ahead of time for sm_80 and sm_90 "
                             "and print registers, shared memory and spills")
    parser.set_defaults(func=run_doctor)
    return parser
