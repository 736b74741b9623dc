"""Which backend runs an op: the one place that decides.

Backends are records in ``TABLE`` (name, device types, the module that registers them):
``triton`` (pyalign/kernels/, CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), ``cuda`` and
``cpu`` (csrc/, JIT-built on first use, registered by pyalign/_cpp_backend.py) and ``eager``
(pyalign/eager/, always there). ``BACKENDS``, ``CHOICES``, ``AUTO_ORDER`` and the device checks
derive from the table.

Op families. A family is a module of pyalign/eager/ (``families()``): its eager implementation,
which every family has, names in ``PRIMITIVES`` the functions every backend of the family
implements and states their contract in its docstring. The ops layer (pyalign/ops/) calls only
those functions, on the object ``implementation()`` returns. A backend implements a family by
registering a lazy loader (``register``): the Triton backend registers each module of
pyalign/kernels/ under its name, the C++ backends one adapter factory per family.

The decision, ``resolved_name(family, backend, *inputs, primitive=..., **args)``:

1. inputs without an element: eager (no kernel needed);
2. inputs the kernel backends do not take (float64; with ``contiguous=True`` also a strided
   tensor): eager for "auto" and "eager", ValueError for another named backend;
3. ``resolve``: the device and what loads. "auto" takes the first loadable backend of
   ``AUTO_ORDER`` for the device, ``PYALIGN_BACKEND`` replacing "auto" process-wide; a backend
   that cannot load warns once, with the reason, and the next one runs. A backend named in the
   call must run, or BackendUnavailable says why;
4. the arguments: a backend's module may define the capability hook
   ``unsupported(backend, family, primitive, args) -> reason | None`` (see
   pyalign/_triton_backend.py). A backend that cannot do these arguments is passed over without
   a warning (nothing is broken): "auto" takes the next backend of the order that can, a named
   backend hands the call to eager.

A backend module that fails to import (other than by being absent) warns once and records the
error as the reason for every family of its backends.

The fused head (family linear_logprobs) has two strategies on the triton backend, "fused" and
"chunked", and two modes (deterministic, batch-invariant): ``head_implementation`` picks the
object that runs a call, by the rules of ``_head_plan`` and, for "auto" on a GPU, a measurement
(pyalign/_head_autotune.py; docs/gpu.md).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import sys
import threading
import warnings
from typing import Callable, Optional

import torch

from pyalign import _head_autotune, _head_strategy
from pyalign._utils import KERNEL_DTYPES


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend: where it runs and which module registers its implementations."""

    name: str
    # Device types whose tensors it runs, fastest backend first in TABLE; None: any device.
    device_types: tuple[str, ...] | None
    # Also CPU tensors under TRITON_INTERPRET=1 (for tests: "auto" never picks it there).
    interpreter_on_cpu: bool = False
    # Imported at import time to register the implementations and define the capability hook
    # (None: the eager backend, found by family name in EAGER_PACKAGE).
    module: str | None = None


INTERPRETER_ENV = "TRITON_INTERPRET"
EAGER_PACKAGE = "pyalign.eager"

TABLE = (
    Backend("triton", ("cuda",), interpreter_on_cpu=True, module="pyalign._triton_backend"),
    Backend("cuda", ("cuda",), module="pyalign._cpp_backend"),
    Backend("cpu", ("cpu",), module="pyalign._cpp_backend"),
    Backend("eager", None),
)
_BY_NAME = {backend.name: backend for backend in TABLE}

BACKENDS = tuple(_BY_NAME)
CHOICES = ("auto", *BACKENDS)
EAGER = "eager"


def _auto_order(device_type: str | None) -> tuple[str, ...]:
    return tuple(b.name for b in TABLE
                 if b.device_types is None or device_type in b.device_types)


# Fastest first, per device type (other device types: the any-device backends). Triton on CPU
# exists only for testing (the interpreter is slow), so "auto" never picks it there; ask for it
# by name.
AUTO_ORDER = {device_type: _auto_order(device_type)
              for device_type in dict.fromkeys(d for b in TABLE for d in b.device_types or ())}
_ANY_DEVICE_ORDER = _auto_order(None)

_loaders: dict[tuple[str, str], Callable[[], object]] = {}
_loaded: dict[tuple[str, str], object] = {}
_failures: dict[tuple[str, str], str] = {}
_warned: set[tuple[str, str]] = set()
_lock = threading.Lock()


class BackendUnavailable(RuntimeError):
    """Raised when a backend asked for by name cannot run an op."""


def package_modules(package: str) -> tuple[str, ...]:
    """The public modules (no leading underscore) of ``package``, by name: how the eager and
    Triton backends find their families without a table."""
    path = importlib.import_module(package).__path__
    return tuple(sorted(info.name for info in pkgutil.iter_modules(path)
                        if not info.name.startswith("_")))


def families() -> tuple[str, ...]:
    """The op families: one per module of pyalign/eager/."""
    return package_modules(EAGER_PACKAGE)


def primitives(family: str) -> tuple[str, ...]:
    """The functions every backend of ``family`` implements: its eager module's PRIMITIVES."""
    return importlib.import_module(f"{EAGER_PACKAGE}.{family}").PRIMITIVES


def register(family: str, backend: str, loader: Callable[[], object]) -> None:
    """Register a lazy loader returning the implementation of ``family`` on ``backend``."""
    if family not in families():
        raise ValueError(f"unknown op family {family!r}; expected one of {families()} (a family "
                         f"is a module of {EAGER_PACKAGE}, its eager implementation)")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _loaders[(family, backend)] = loader
    _loaded.pop((family, backend), None)
    _failures.pop((family, backend), None)


def _loader(family: str, backend: str) -> Optional[Callable[[], object]]:
    loader = _loaders.get((family, backend))
    if loader is None and backend == EAGER and family in families():
        # the eager module of a family is its implementation object
        return lambda: importlib.import_module(f"{EAGER_PACKAGE}.{family}")
    return loader


def has(family: str, backend: str) -> bool:
    """Whether ``backend`` implements ``family`` at all."""
    return _loader(family, backend) is not None


def _device_reason(backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot run on ``device_type`` (None when it can)."""
    record = _BY_NAME.get(backend)
    if record is None:
        return f"unknown backend {backend!r}"
    if record.device_types is None or device_type in record.device_types:
        return None
    tensors = " or ".join(f"{d.upper()} tensors" for d in record.device_types)
    if record.interpreter_on_cpu:
        if device_type == "cpu" and os.environ.get(INTERPRETER_ENV) == "1":
            return None
        return (f"{backend} runs on {tensors} (or CPU tensors with {INTERPRETER_ENV}=1), "
                f"not {device_type}")
    return f"the {backend} backend needs {tensors}, not {device_type}"


def load(family: str, backend: str):
    """The implementation object, or raise BackendUnavailable with the reason."""
    key = (family, backend)
    if key in _loaded:
        return _loaded[key]
    if key in _failures:
        raise BackendUnavailable(_failures[key])
    loader = _loader(family, backend)
    if loader is None:
        raise BackendUnavailable(f"no {backend} implementation of {family}")
    with _lock:
        if key in _loaded:
            return _loaded[key]
        try:
            impl = loader()
            missing = [p for p in primitives(family) if not hasattr(impl, p)]
            if missing:
                raise RuntimeError(f"implementation lacks {missing}")
        except BackendUnavailable as exc:
            _failures[key] = str(exc)
            raise
        except Exception as exc:  # a failed build or import: remember why, fall back
            _failures[key] = f"{type(exc).__name__}: {exc}"
            raise BackendUnavailable(_failures[key]) from exc
        _loaded[key] = impl
        return impl


def status(family: str, backend: str, device_type: str) -> tuple[bool, str]:
    """(available, reason) for one backend of one op family on one device type."""
    reason = _device_reason(backend, device_type)
    if reason is not None:
        return False, reason
    try:
        load(family, backend)
    except BackendUnavailable as exc:
        return False, str(exc)
    return True, "ok"


def available(family: str, device_type: str) -> list[str]:
    """Backends that can run ``family`` on ``device_type`` (loading them if needed)."""
    return [b for b in BACKENDS if status(family, b, device_type)[0]]


def _warn_once(family: str, backend: str, reason: str, fallback: str) -> None:
    if (family, backend) in _warned:
        return
    _warned.add((family, backend))
    warnings.warn(f"pyalign: the {backend} backend is unavailable for {family} ({reason}); "
                  f"using {fallback}", RuntimeWarning, stacklevel=4)


def _auto_candidates(device_type: str) -> tuple[list[str], str | None]:
    """(the order "auto" tries on ``device_type``, the backend PYALIGN_BACKEND puts first or
    None)."""
    order = list(AUTO_ORDER.get(device_type, _ANY_DEVICE_ORDER))
    forced = os.environ.get("PYALIGN_BACKEND", "auto").strip().lower() or "auto"
    if forced == "auto":
        return order, None
    if forced not in BACKENDS:
        raise ValueError(f"PYALIGN_BACKEND must be one of {CHOICES}, got {forced!r}")
    return [forced] + [b for b in order if b != forced], forced


def resolve(family: str, backend: str, device: torch.device | str) -> str:
    """The backend name that will run ``family`` for tensors on ``device`` (step 3 of the
    module docstring: the device and what loads)."""
    device_type = torch.device(device).type
    check_name(backend)
    if backend != "auto":
        ok, reason = status(family, backend, device_type)
        if not ok:
            raise BackendUnavailable(f"backend {backend!r} cannot run {family} on {device_type}: {reason}")
        return backend
    order, forced = _auto_candidates(device_type)
    for i, name in enumerate(order):
        if _device_reason(name, device_type) is not None and name != forced:
            continue
        ok, reason = status(family, name, device_type)
        if ok:
            return name
        if has(family, name) or name == forced:
            _warn_once(family, name, reason, next((b for b in order[i + 1:]), EAGER))
    return EAGER


def unsupported(backend: str, family: str, primitive: str | None, args: dict) -> str | None:
    """Why ``backend`` cannot run ``primitive`` of ``family`` (None: any of them) with ``args``,
    from its module's capability hook; None when it can (eager can do everything)."""
    module = _BY_NAME[backend].module
    hook = getattr(sys.modules.get(module), "unsupported", None) if module else None
    return None if hook is None else hook(backend, family, primitive, args)


def _kernel_input_reason(tensors, contiguous: bool) -> str | None:
    """What the kernel backends do not take among ``tensors`` (None: they take all of them)."""
    for tensor in tensors:
        if tensor.dtype.is_floating_point and tensor.dtype not in KERNEL_DTYPES:
            return f"{tensor.dtype}"
        if contiguous and not tensor.is_contiguous():
            return "a non-contiguous tensor"
    return None


def resolved_name(family: str, backend: str, *inputs: torch.Tensor | None,
                  primitive: str | None = None, contiguous: bool = False, **args) -> str:
    """The backend that runs ``family`` (``primitive`` of it, when given) on ``inputs`` (the
    tensors whose device, dtypes and sizes decide; None entries are skipped) for the requested
    ``backend``, with ``args`` for the capability hooks (the four steps of the module
    docstring). ``contiguous``: the family's kernels take contiguous tensors only."""
    tensors = [t for t in inputs if t is not None]
    if all(t.numel() == 0 for t in tensors):
        return EAGER
    check_name(backend)
    refused = _kernel_input_reason(tensors, contiguous)
    if refused is not None:
        if backend in ("auto", EAGER):
            return EAGER
        layout = "contiguous " if contiguous else ""
        raise ValueError(f"backend {backend!r} takes {layout}float32, bfloat16 or float16 inputs, "
                         f"got {refused}; use backend='eager' for {refused}")
    device = tensors[0].device
    name = resolve(family, backend, device)
    if unsupported(name, family, primitive, args) is None:
        return name
    if backend != "auto":
        return EAGER
    order, _ = _auto_candidates(device.type)
    for later in order[order.index(name) + 1:] if name in order else ():
        if (status(family, later, device.type)[0]
                and unsupported(later, family, primitive, args) is None):
            return later
    return EAGER


def implementation(family: str, backend: str, *inputs: torch.Tensor | None,
                   primitive: str | None = None, contiguous: bool = False, **args):
    """The implementation object that runs ``family`` on ``inputs`` (``resolved_name``).

    Called inside the custom ops, so it runs eagerly even under torch.compile (dynamo never
    traces the table, its lock or a JIT build)."""
    return load(family, resolved_name(family, backend, *inputs, primitive=primitive,
                                      contiguous=contiguous, **args))


def backend_for(family: str, backend: str) -> str:
    """The backend to ask for ``family`` inside an op given ``backend`` for another family (a
    head's log-probs, then its loss): ``backend`` where it implements ``family``, else "auto"."""
    return backend if backend == "auto" or has(family, backend) else "auto"


def check_name(backend: str) -> str:
    """Validate a backend name given to an op (resolution itself happens when the op runs)."""
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    return backend


# ---------------------------------------------------------------- the fused head's strategies
# linear_logprobs on the triton backend has two strategies (docs/gpu.md; the implementation
# objects: pyalign/_head_strategy.py): "fused" (the Triton tile kernels, pyalign/kernels/
# linear_logprobs.py) and "chunked" (cuBLAS matmuls with the Triton logprobs epilogue). The other
# backends are chunked by nature: the strategy leaves them as they are.

HEAD_FAMILY = "linear_logprobs"


def check_head_strategy(strategy: str) -> str:
    """Validate a ``strategy`` argument of the head."""
    if strategy not in _head_strategy.STRATEGIES:
        raise ValueError(f"strategy must be one of {_head_strategy.STRATEGIES}, got {strategy!r}")
    return strategy


def _requested_strategy(strategy: str) -> str:
    """``strategy``, with PYALIGN_HEAD_STRATEGY replacing "auto" process-wide."""
    forced = os.environ.get(_head_strategy.STRATEGY_ENV, "auto").strip().lower() or "auto"
    if forced not in _head_strategy.STRATEGIES:
        raise ValueError(f"{_head_strategy.STRATEGY_ENV} must be one of "
                         f"{_head_strategy.STRATEGIES}, got {forced!r}")
    return forced if strategy == "auto" else strategy


def _deterministic(mode) -> bool:
    return mode.deterministic or torch.are_deterministic_algorithms_enabled()


def _head_plan(hidden, weight, mode, keeps: bool) -> tuple[str, str]:
    """(forward strategy, backward strategy) of the triton backend for this call. "auto" is
    "chunked" where determinism is asked (the fused backward adds with atomics) or logits are
    kept (only chunked can use them), the faster of both by measurement on a GPU
    (pyalign/_head_autotune.py, cached), "fused" on CPU tensors (the interpreter: no timing).
    ``batch_invariant`` takes the forward from the fused kernel (per-row programs of one tile
    shape) whatever the strategy."""
    strategy = _requested_strategy(mode.strategy)
    if strategy == "fused" and _deterministic(mode):
        message = ("strategy 'fused' is not deterministic (its backward adds into the gradients "
                   "with atomics); use strategy 'chunked' or 'auto' with deterministic=True or "
                   "torch.use_deterministic_algorithms(True)")
        if mode.deterministic or not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message, UserWarning, stacklevel=4)
    if strategy == "auto":
        if _deterministic(mode) or keeps:
            strategy = "chunked"
        elif _measures_strategy(hidden.device):
            strategy = _head_autotune.choose(hidden, weight, {
                "chunked": _head_strategy.chunked_triton(), "fused": load(HEAD_FAMILY, "triton")})
        else:
            strategy = "fused"
    return ("fused" if mode.batch_invariant else strategy), strategy


def _measures_strategy(device: torch.device) -> bool:
    """Whether "auto" times the strategies on ``device``'s tensors: on a GPU only."""
    return device.type == "cuda"


def head_implementation(backend: str, hidden: torch.Tensor, weight: torch.Tensor, mode, *,
                        primitive: str | None = None, keeps: bool = False, **args):
    """The implementation of the linear_logprobs family that runs this call (``implementation``
    for the backend, then the strategy and modes of ``mode``, a pyalign._head_strategy.HeadMode).
    ``keeps``: the call keeps logits from forward to backward (they tie both to chunked)."""
    name = resolved_name(HEAD_FAMILY, backend, hidden, primitive=primitive, hidden=hidden,
                         weight=weight, **args)
    if name != "triton":
        implementation = load(HEAD_FAMILY, name)
        if mode.batch_invariant and implementation.KEEPS_LOGITS:  # a chunked head: fixed blocks
            return _head_strategy.BlockwiseHead(implementation)
        return implementation
    forward, backward = _head_plan(hidden, weight, mode, keeps)
    fused = load(HEAD_FAMILY, "triton")
    if forward == backward:
        return fused if forward == "fused" else _head_strategy.chunked_triton()
    return _head_strategy.SplitHead(fused, _head_strategy.chunked_triton())


def head_keeps_logits(backend: str, hidden: torch.Tensor, weight: torch.Tensor, mode) -> bool:
    """Whether the implementation this call would get keeps logits for backward (a memory_budget
    is worth spending): decided by the rules alone, never by a measurement."""
    if mode.batch_invariant:
        return False
    name = resolved_name(HEAD_FAMILY, backend, hidden, hidden=hidden, weight=weight)
    if name != "triton":
        return bool(load(HEAD_FAMILY, name).KEEPS_LOGITS)
    return _head_plan(hidden, weight, mode, keeps=True)[0] == "chunked"


def default_head_chunk(device: torch.device, vocab: int, itemsize: int) -> int | None:
    """The chunk (tokens' worth of logits) of a chunked head or 3-matmul loss whose caller named
    none: a GPU's (pyalign/_head_strategy.py, docs/gpu.md), or None for the CPU defaults."""
    if device.type == "cuda":
        return _head_strategy.gpu_chunk_tokens(vocab, itemsize)
    return None


def chosen_head_strategy(hidden: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> str:
    """The strategy ``strategy="auto"`` uses for these tensors (measuring it on a GPU if no call
    has yet): "fused", "chunked", or "fused forward, chunked backward"; "chunked" on a backend
    other than triton (chunked by nature)."""
    name = resolved_name(HEAD_FAMILY, backend, hidden, weight=weight)
    if name != "triton":
        return "chunked"
    forward, backward = _head_plan(hidden, weight, _head_strategy.HeadMode(), keeps=False)
    return forward if forward == backward else f"{forward} forward, {backward} backward"


_import_warned: set[str] = set()


def _register_optional(module: str, names: tuple[str, ...]) -> None:
    """Import the module that registers the backends ``names``.

    The module itself missing (a backend not shipped) is silently fine. Any other error while
    importing it (a dependency it imports, a bug) warns once and becomes the reason every family
    of those backends reports (``status``, ``pyalign doctor``).
    """
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return
        _record_import_failure(module, names, exc)
    except Exception as exc:  # a broken backend module: report it, never break import
        _record_import_failure(module, names, exc)


def _record_import_failure(module: str, names: tuple[str, ...], exc: BaseException) -> None:
    reason = f"importing {module} failed: {type(exc).__name__}: {exc}"
    for name in names:
        for family in families():
            _loaded.pop((family, name), None)
            _failures[(family, name)] = reason
    if module not in _import_warned:
        _import_warned.add(module)
        warnings.warn(f"pyalign: {reason}; the {', '.join(names)} backend(s) are unavailable",
                      RuntimeWarning, stacklevel=2)


OPTIONAL_MODULES = {module: tuple(b.name for b in TABLE if b.module == module)
                    for module in dict.fromkeys(b.module for b in TABLE if b.module)}

for _module, _names in OPTIONAL_MODULES.items():
    _register_optional(_module, _names)
