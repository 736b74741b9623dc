"""The C++/CUDA extension in csrc/: located beside the package, JIT-built on first use, cached.

This module only finds the sources and builds/loads the extension; pyalign/_cpp_backend.py
registers the ``cpu`` and ``cuda`` backends that use it. The first op that needs one calls
``load_cpu_ops()`` / ``load_cuda_ops()``, which build the extension with
``torch.utils.cpp_extension.load`` (ninja) into ``~/.cache/pyalign/<kind>-<hash>`` (or
``$PYALIGN_CACHE_DIR``, see ``pyalign._utils.cache_root``), keyed by the sources, the flags and
the torch/python versions, so later processes only load the cached library. A missing compiler or
a failed build raises, and the backend table falls back to eager with one warning.
``PYALIGN_DISABLE_EXT=1`` makes the extension unavailable (tests of the fallback).
``build_status()`` reports all of this for ``pyalign doctor``.

Compiler flags: ``-O3 -march=native``. The build runs on the user's own machine at first use, so
targeting the host CPU is safe (a cache built on one CPU model is keyed by that model's name and
never reused on another); it lets the ``omp simd`` loops use AVX2/AVX-512.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from pyalign._utils import cache_root


def _locate_sources() -> Path:
    """csrc/ as installed inside the package (pyalign/_csrc, a wheel or `pip install .`), or
    beside it in a source checkout (editable installs)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    return here.parent / "csrc"


CSRC = _locate_sources()
DISABLE_ENV = "PYALIGN_DISABLE_EXT"
VERBOSE_ENV = "PYALIGN_BUILD_VERBOSE"

# -fopenmp: at::parallel_for is an inline `omp parallel` region that must be compiled with
# OpenMP to run on several threads; it resolves against the libgomp torch already loaded.
CPU_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-DNDEBUG"]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3", "-DNDEBUG", "-std=c++17"]

_lock = threading.Lock()
_status: dict[str, dict] = {
    kind: {"built": False, "error": None, "build_dir": None, "seconds": None}
    for kind in ("cpu", "cuda")
}


def _cpu_sources() -> list[Path]:
    return [CSRC / "bindings.cpp"] + sorted((CSRC / "cpu").glob("*.cpp"))


def _cuda_sources() -> list[Path]:
    return sorted((CSRC / "cuda").glob("*.cu"))


def _headers() -> list[Path]:
    return sorted((CSRC / "common").glob("*.h"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_key(files: list[Path], flags: list[str]) -> str:
    digest = hashlib.sha256()
    for path in files + _headers():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for part in (torch.__version__, sys.version, _cpu_model(), " ".join(flags)):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def compiler() -> str | None:
    """Path of the C++ compiler torch.utils.cpp_extension will use, or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip() not in ("", "0")


def _build(kind: str, sources: list[Path], **load_kwargs) -> None:
    """Build (or load from the cache) one extension library; record how it went."""
    from torch.utils import cpp_extension

    state = _status[kind]
    if state["built"]:
        return
    if state["error"] is not None:
        raise RuntimeError(state["error"])
    try:
        if disabled():
            raise RuntimeError(f"the C++ extension is disabled by {DISABLE_ENV}=1")
        if not CSRC.is_dir():
            raise RuntimeError(f"C++ sources not found at {CSRC} (neither pyalign/_csrc nor a "
                               f"source checkout's csrc/)")
        if compiler() is None:
            raise RuntimeError(f"no C++ compiler found ({os.environ.get('CXX', 'c++')} is not on PATH)")
        if not cpp_extension.is_ninja_available():
            raise RuntimeError("ninja is not installed (pip install ninja)")
        flags = [str(v) for v in load_kwargs.values()]
        key = _build_key(sources, flags)
        build_dir = cache_root(f"{kind}-{key}")
        build_dir.mkdir(parents=True, exist_ok=True)
        state["build_dir"] = str(build_dir)
        start = time.perf_counter()
        cpp_extension.load(name=f"pyalign_C_{kind}_{key}", sources=[str(s) for s in sources],
                           build_directory=str(build_dir), is_python_module=False,
                           verbose=os.environ.get(VERBOSE_ENV) == "1", **load_kwargs)
        state["seconds"] = round(time.perf_counter() - start, 2)
        state["built"] = True
    except Exception as exc:  # remember why; the backend table falls back to eager
        state["error"] = f"{type(exc).__name__}: {exc}".strip()
        raise RuntimeError(f"pyalign C++ extension ({kind}) unavailable: {state['error']}") from exc


def load_cpu_ops():
    """torch.ops.pyalign_C with the CPU kernels registered (building them if needed)."""
    with _lock:
        _build("cpu", _cpu_sources(), extra_cflags=CPU_CFLAGS, extra_ldflags=CPU_LDFLAGS)
    return torch.ops.pyalign_C


def load_cuda_ops():
    """torch.ops.pyalign_C with the CUDA kernels registered too."""
    if not torch.cuda.is_available():
        reason = ("torch was built without CUDA" if torch.version.cuda is None
                  else "no CUDA device is visible")
        raise RuntimeError(f"the cuda extension needs a GPU: {reason}")
    ops = load_cpu_ops()  # declares the schemas the CUDA kernels implement
    with _lock:
        _build("cuda", _cuda_sources(), extra_cflags=CPU_CFLAGS, extra_cuda_cflags=CUDA_CFLAGS)
    return ops


def build_status(build: bool = False) -> dict:
    """What `pyalign doctor` prints: compiler, whether built, the error, build dir, seconds.

    With ``build=True`` the CPU extension is built (or loaded) first.
    """
    if build:
        try:
            load_cpu_ops()
        except RuntimeError:
            pass
    from torch.utils import cpp_extension
    return {
        "sources": str(CSRC),
        "sources_found": CSRC.is_dir(),
        "compiler": compiler(),
        "compiler_found": compiler() is not None,
        "ninja_found": cpp_extension.is_ninja_available(),
        "disabled": disabled(),
        "cache_root": str(cache_root()),
        **{f"cpu_{k}": v for k, v in _status["cpu"].items()},
        "cuda": dict(_status["cuda"]),
    }
