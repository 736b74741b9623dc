"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, with no GPU needed.

Each kernel module in pyalign/kernels/ lists, in ``compile_configs()``, every (kernel, dtype signature,
constexprs, num_warps) its launch wrappers can pick. For each of them and each target this
module runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and reads the
resources of the result:

* registers, spill bytes and stack: ``ptxas -v`` (the same ptxas Triton used for that target,
  re-run on the kernel's PTX; Triton discards its own log). ``cuobjdump --dump-resource-usage``
  on the cubin reports registers too but not spills, so it serves as a cross-check only.
* shared memory: Triton's ``metadata.shared`` (dynamic shared memory the launch requests).
* vector width of global loads, from the PTX (``ld.global...v4`` = 128-bit loads for fp32).

``@triton.jit`` returns an interpreter object when ``TRITON_INTERPRET=1`` (the test process on
CPU sets it), so the compilation always runs in a subprocess with that variable removed.

    python -m pyalign.compile_check            # prints the table
    python -m pyalign.compile_check --json     # one JSON list (what compile_table() parses)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from pyalign._triton_backend import kernel_modules
from pyalign._utils import available_cores

# The Triton kernel modules, one per op family, in the order the table prints them.
KERNEL_MODULES = tuple(kernel_modules().values())
DEFAULT_CCS = (80, 90)

_VECTOR_LOAD = re.compile(r"\bld\.global(?:\.[\w:]+)*?\.v(\d+)\.")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_CUOBJDUMP_REGISTERS = re.compile(r"REG:(\d+)")


def compile_table(ccs=DEFAULT_CCS, jobs: int | None = None, timeout: float = 900) -> list[dict]:
    """Compile every kernel configuration for each compute capability in ``ccs``.

    Returns one dict per (kernel, config, target): kernel, config, target, num_warps, registers,
    shared_bytes, spill_bytes, stack_bytes, vector_load_width (elements per global load
    instruction, 1 = scalar), seconds, error (None when it compiled). Runs in a subprocess
    without TRITON_INTERPRET.
    """
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated: no warning
    command = [sys.executable, "-m", "pyalign.compile_check", "--json"]
    for cc in ccs:
        command += ["--cc", str(int(cc))]
    if jobs:
        command += ["--jobs", str(int(jobs))]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"compile check subprocess failed (exit {result.returncode}):\n"
                           f"{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_compile_table(ccs=DEFAULT_CCS, jobs: int | None = None, file=None) -> bool:
    """Compile everything (see compile_table), print one line per kernel/config/target, and
    return True when every configuration compiled with zero spills."""
    rows = compile_table(ccs, jobs)
    _print_rows(rows, file or sys.stdout)
    return _all_ok(rows)


def _all_ok(rows) -> bool:
    return all(row["error"] is None and not row["spill_bytes"] for row in rows)


def _print_rows(rows, file):
    header = f"{'kernel':<30} {'config':<40} {'target':<7} {'warps':>5} {'regs':>5} " \
             f"{'shared':>7} {'spill':>6} {'vec':>4}  status"
    print(header, file=file)
    print("-" * len(header), file=file)
    for row in rows:
        status = "ok" if row["error"] is None else f"FAILED: {row['error'].splitlines()[0][:60]}"
        if row["error"] is None and row["spill_bytes"]:
            status = "SPILLS"
        print(f"{row['kernel']:<30} {row['config']:<40} {row['target']:<7} {_fmt(row['num_warps']):>5} "
              f"{_fmt(row['registers']):>5} {_fmt(row['shared_bytes']):>7} "
              f"{_fmt(row['spill_bytes']):>6} {_fmt(row['vector_load_width']):>4}  {status}",
              file=file)
    failed = sum(row["error"] is not None for row in rows)
    spilled = sum(bool(row["spill_bytes"]) for row in rows if row["error"] is None)
    print(f"{len(rows)} compilations, {failed} failed, {spilled} with spills", file=file)


def _fmt(value):
    return "-" if value is None else str(value)


# ----------------------------------------------------------------------- the compiling subprocess

def _jobs_for(ccs):
    import importlib
    jobs = []
    for module_name in KERNEL_MODULES:
        try:
            configs = importlib.import_module(module_name).compile_configs()
        except Exception as exc:  # a kernel module that does not even import is a failed row
            jobs.append((module_name, None, None, f"{type(exc).__name__}: {exc}"))
            continue
        for index in range(len(configs)):
            for cc in ccs:
                jobs.append((module_name, index, cc, None))
    return jobs


def _compile_one(job) -> dict:
    module_name, index, cc, import_error = job
    row = dict(kernel=module_name.rsplit(".", 1)[-1], config="-", target=f"sm_{cc}", num_warps=None,
               registers=None, shared_bytes=None, spill_bytes=None, stack_bytes=None,
               vector_load_width=None, seconds=0.0, error=import_error)
    if import_error is not None:
        return row
    start = time.perf_counter()
    try:
        import importlib

        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
        from triton.compiler import ASTSource

        config = importlib.import_module(module_name).compile_configs()[index]
        kernel = config["kernel"]
        row.update(kernel=config["name"], config=config["label"], num_warps=config["num_warps"])
        arg_names = list(kernel.arg_names)
        signature = {name: config["signature"].get(name, "constexpr") for name in arg_names}
        # Launches with 16-byte aligned pointers and strides (torch allocations, V % 16 == 0 rows)
        # are specialized like this by the JIT too; that is the variant worth checking.
        attrs = {(arg_names.index(name),): [["tt.divisibility", 16]] for name in config["aligned"]}
        source = ASTSource(fn=kernel, signature=signature, constexprs=config["constexprs"],
                           attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": config["num_warps"]})
        ptx = compiled.asm["ptx"]
        widths = [int(width) for width in _VECTOR_LOAD.findall(ptx)]
        row["vector_load_width"] = max(widths, default=1)
        row["shared_bytes"] = int(compiled.metadata.shared)
        arch = sm_arch_from_capability(cc)
        row["target"] = arch
        with tempfile.TemporaryDirectory() as tmp:
            ptx_path = os.path.join(tmp, "kernel.ptx")
            with open(ptx_path, "w") as handle:
                handle.write(ptx)
            ptxas = subprocess.run([get_ptxas(cc).path, "-v", "--regAllocOptLevel=2",
                                    f"--gpu-name={arch}", ptx_path, "-o",
                                    os.path.join(tmp, "ptxas.cubin")],
                                   capture_output=True, text=True, check=True)
            log = ptxas.stdout + ptxas.stderr
            cubin_path = os.path.join(tmp, "kernel.cubin")
            with open(cubin_path, "wb") as handle:
                handle.write(compiled.asm["cubin"])
            cuobjdump = os.path.join(os.path.dirname(get_ptxas(cc).path), "cuobjdump")
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin_path],
                                   capture_output=True, text=True).stdout
        registers = _PTXAS_REGISTERS.search(log)
        spills = _PTXAS_SPILLS.search(log)
        if registers is None or spills is None:
            raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
        row["registers"] = int(registers.group(1))
        row["stack_bytes"] = int(spills.group(1))
        row["spill_bytes"] = int(spills.group(2)) + int(spills.group(3))
        cubin_registers = _CUOBJDUMP_REGISTERS.search(usage)
        if cubin_registers is not None and int(cubin_registers.group(1)) != row["registers"]:
            raise RuntimeError(f"ptxas -v says {row['registers']} registers but the cubin "
                               f"Triton built uses {cubin_registers.group(1)}")
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _compile_all(ccs, jobs=None) -> list[dict]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET to compile (use compile_table(), which does)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated
    work = _jobs_for(ccs)
    workers = max(1, min(jobs or available_cores(), len(work)))
    if workers == 1:
        return [_compile_one(job) for job in work]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_one, work))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, action="append",
                        help="compute capability (repeatable; default 80 and 90)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compilations")
    parser.add_argument("--json", action="store_true", help="print one JSON list")
    args = parser.parse_args(argv)
    ccs = tuple(args.cc or DEFAULT_CCS)
    if os.environ.get("TRITON_INTERPRET") == "1":
        rows = compile_table(ccs, args.jobs)
    else:
        rows = _compile_all(ccs, args.jobs)
    if args.json:
        print(json.dumps(rows))
    else:
        _print_rows(rows, sys.stdout)
    if args.json:
        return 0  # the rows say what failed; the caller judges
    return 0 if _all_ok(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
