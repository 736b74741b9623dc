"""Registers the Triton kernels (pyalign/kernels/) in the backend table.

Imported by pyalign/backends.py at import time. Nothing here imports triton: each loader does,
on first use, so the backend is there wherever triton imports (a CUDA build of torch brings it;
pyalign does not depend on it), and a machine without triton imports pyalign fine: the op falls
back and the backend table records why (`pyalign doctor` prints it).
"""
from __future__ import annotations

import importlib

from pyalign import backends

# {family: kernel module}, the one list of the Triton kernel modules (pyalign/compile_check.py
# compiles them in this order).
FAMILY_MODULES = {
    "logprobs": "pyalign.kernels.logprobs",
    "kl": "pyalign.kernels.kl",
    "preference": "pyalign.kernels.preference",
    "linear_logprobs": "pyalign.kernels.linear_logprobs",
    "policy": "pyalign.kernels.policy",
}


def _loader(module_name: str):
    def load_triton_kernels():
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise backends.BackendUnavailable(
                f"triton is not installed ({exc}): a CUDA build of torch brings its own, and on "
                f"CPU it only runs the interpreter tests (the [test] extra)") from exc
        # The kernel module itself is the implementation: its forward/backward follow the
        # primitive contract of its family.
        return importlib.import_module(module_name)
    return load_triton_kernels


for _family, _module_name in FAMILY_MODULES.items():
    backends.register(_family, "triton", _loader(_module_name))
