"""Registers the Triton kernels (pyalign/kernels/) in the backend table, and says what they cannot
do.

Imported by pyalign/backends.py at import time. Each module of pyalign/kernels/ is the Triton
implementation of the op family it is named after (its functions follow the family's contract,
pyalign/eager/<family>.py): adding one registers it. Nothing here imports triton: each loader
does, on first use, so the backend is there wherever triton imports (a CUDA build of torch brings
it; pyalign does not depend on it), and a machine without triton imports pyalign fine: the op
falls back and the backend table records why (`pyalign doctor` prints it).

``unsupported`` is the backend's capability hook (pyalign/backends.py, step 4): the calls its
kernels cannot run, which the table hands to the next backend without a warning. A new rule is
one more entry of ``_RULES``: a function of (primitive, args) returning the reason or None, with
the arguments the op passes to ``backends.implementation`` (documented at the rule).
"""
from __future__ import annotations

import importlib

from pyalign import backends

KERNEL_PACKAGE = "pyalign.kernels"


def kernel_modules() -> dict[str, str]:
    """{family: module} of the Triton kernels, one module of pyalign/kernels/ per family."""
    return {family: f"{KERNEL_PACKAGE}.{family}"
            for family in backends.package_modules(KERNEL_PACKAGE)}


def _loader(module_name: str):
    def load_triton_kernels():
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise backends.BackendUnavailable(
                f"triton is not installed ({exc}): a CUDA build of torch brings its own, and on "
                f"CPU it only runs the interpreter tests (the [test] extra)") from exc
        # The kernel module itself is the implementation: its functions follow the primitive
        # contract of its family.
        return importlib.import_module(module_name)
    return load_triton_kernels


def register_kernels() -> None:
    """Register every kernel module (what importing this module does)."""
    for family, module_name in kernel_modules().items():
        backends.register(family, "triton", _loader(module_name))


def _preference_rule(primitive, args):
    """args: ``loss``, the name of the pair math. The kernel has a branch per registry entry with
    a ``kernel_id`` (pyalign/losses.py); the others (and unknown names, which eager refuses with
    the registry's message) run on eager."""
    from pyalign import losses

    if "loss" not in args:
        return None
    entry = losses.REGISTRY.get(args["loss"])
    if entry is None or entry.kernel_id is None:
        return f"the preference kernels have no branch for loss {args['loss']!r}"
    return None


def _linear_logprobs_rule(primitive, args):
    """args: ``hidden``, ``weight`` and, for the backward, ``vocab_shard``. A vocab shard that
    fits in one backward tile (the tiles of the hidden and weight dtypes): the kernel would take the row's
    stats from its own tile (V <= BLOCK_V: the whole row), and a flag to skip that made it spill
    on sm_80."""
    weight = args.get("weight")
    if primitive != "backward" or not args.get("vocab_shard") or weight is None:
        return None
    from pyalign.kernels.linear_logprobs import BACKWARD_TILES, tile_key

    hidden_dtype = args["hidden"].dtype if args.get("hidden") is not None else weight.dtype
    block_v = BACKWARD_TILES[tile_key(hidden_dtype, weight.dtype)][1]
    if weight.shape[0] <= block_v:
        return f"a vocab shard of {weight.shape[0]} rows fits in one backward tile ({block_v})"
    return None


_RULES = {"preference": _preference_rule, "linear_logprobs": _linear_logprobs_rule}


def unsupported(backend: str, family: str, primitive: str | None, args: dict) -> str | None:
    """The capability hook: why the Triton kernels cannot run this call (None: they can)."""
    rule = _RULES.get(family)
    return None if rule is None else rule(primitive, args)


register_kernels()
