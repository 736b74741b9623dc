"""Which backend runs an op: a table of (op family, backend) -> implementation.

Backends: ``triton`` (kernels/, CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``),
``cuda`` and ``cpu`` (csrc/, JIT-built on first use) and ``eager`` (pyalign/reference.py,
always there). ``backend="auto"`` takes the first available entry of ``AUTO_ORDER`` for the
tensors' device; ``PYALIGN_BACKEND`` overrides the choice process-wide. A backend that cannot
load warns once, with the reason, and the op runs on the next one in the order.

Each op family's implementation is an object (usually a module) with the functions named in
``PRIMITIVES``; the ops layer (pyalign/ops/) calls only those, so a backend plugs in by
registering a loader:

    backends.register("logprobs", "cpu", lambda: importlib.import_module("pyalign._cpu_impl"))

Primitive contracts (all tensors already validated, 2-D row-major where noted):

logprobs
  forward(logits[N,V], labels[N] int64, ignore_index, temperature, with_entropy)
      -> (logprobs[N] f32, entropy[N] f32 or empty[0], lse[N] f32)   lse = logsumexp(logits/T)
  backward(grad_logprobs[N] f32, grad_entropy[N] f32 | None, logits, labels, lse,
           entropy[N] | None, ignore_index, temperature, inplace) -> grad_logits (logits' dtype;
           when inplace, written into ``logits`` and returned)
linear_logprobs
  forward(hidden[N,H], weight[V,H], bias[V] | None, labels, ignore_index, temperature,
          with_entropy, chunk_size) -> (logprobs, entropy, lse)
  backward(grad_logprobs, grad_entropy | None, hidden, weight, bias, labels, lse, entropy | None,
           ignore_index, temperature, chunk_size) -> (grad_hidden, grad_weight, grad_bias | None)
kl
  forward(logprobs, ref_logprobs, mask | None, estimator) -> kl (f32)
  backward(grad_kl, logprobs, ref_logprobs, mask | None, estimator)
      -> (grad_logprobs, grad_ref_logprobs)
preference
  forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta, label_smoothing)
      -> losses[B] f32
  backward(grad_losses, policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta,
           label_smoothing) -> (grad_pc, grad_pr, grad_rc, grad_rr)
  sequence_preference_forward(token_logprobs[2B,T], mask[2B,T], ref_logps[2B] | [2B,T], loss,
           beta, label_smoothing, average) -> (losses[B], policy_logps[2B], ref_logps[2B])
      masked sum (mean with ``average``) over T, chosen rows first, then the pair loss
  sequence_preference_backward(grad_losses, token_logprobs, mask, ref_logps, policy_logps,
           ref_logps_reduced, loss, beta, label_smoothing, average)
      -> (grad_token_logprobs[2B,T], grad_ref_logps shaped like ref_logps)
weights
  apply_(kind, targets, sources, scalar)   kind in {"ema", "lerp", "copy"}; in place, no autograd
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Callable

import torch

BACKENDS = ("triton", "cuda", "cpu", "eager")
CHOICES = ("auto",) + BACKENDS

PRIMITIVES = {
    "logprobs": ("forward", "backward"),
    "linear_logprobs": ("forward", "backward"),
    "kl": ("forward", "backward"),
    "preference": ("forward", "backward", "sequence_preference_forward",
                   "sequence_preference_backward"),
    "weights": ("apply_",),
}

# Fastest first, per device type. Triton on CPU exists only for testing (the interpreter is
# slow), so "auto" never picks it there; ask for it by name.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "eager"),
    "cpu": ("cpu", "eager"),
}

_loaders: dict[tuple[str, str], Callable[[], object]] = {}
_loaded: dict[tuple[str, str], object] = {}
_failures: dict[tuple[str, str], str] = {}
_warned: set[tuple[str, str]] = set()
_lock = threading.Lock()


class BackendUnavailable(RuntimeError):
    """Raised when a backend asked for by name cannot run an op."""


def register(family: str, backend: str, loader: Callable[[], object]) -> None:
    """Register a lazy loader returning the implementation of ``family`` on ``backend``."""
    if family not in PRIMITIVES:
        raise ValueError(f"unknown op family {family!r}; expected one of {sorted(PRIMITIVES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _loaders[(family, backend)] = loader
    _loaded.pop((family, backend), None)
    _failures.pop((family, backend), None)


def _device_reason(backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot run on ``device_type`` (None when it can)."""
    if backend == "eager":
        return None
    if backend == "triton":
        if device_type == "cuda":
            return None
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {device_type}"
    if backend == "cuda":
        return None if device_type == "cuda" else f"the cuda backend needs CUDA tensors, not {device_type}"
    if backend == "cpu":
        return None if device_type == "cpu" else f"the cpu backend needs CPU tensors, not {device_type}"
    return f"unknown backend {backend!r}"


def load(family: str, backend: str):
    """The implementation object, or raise BackendUnavailable with the reason."""
    key = (family, backend)
    if key in _loaded:
        return _loaded[key]
    if key in _failures:
        raise BackendUnavailable(_failures[key])
    loader = _loaders.get(key)
    if loader is None:
        raise BackendUnavailable(f"no {backend} implementation of {family}")
    with _lock:
        if key in _loaded:
            return _loaded[key]
        try:
            impl = loader()
            missing = [p for p in PRIMITIVES[family] if not hasattr(impl, p)]
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


def resolve(family: str, backend: str, device: torch.device | str) -> str:
    """The backend name that will run ``family`` for tensors on ``device``.

    ``backend`` is a name from BACKENDS or "auto". "auto" (and PYALIGN_BACKEND, which replaces
    "auto") falls through AUTO_ORDER, warning once per unloadable backend. A backend named
    explicitly in the call must run, or BackendUnavailable says why.
    """
    device_type = torch.device(device).type
    check_name(backend)
    if backend != "auto":
        ok, reason = status(family, backend, device_type)
        if not ok:
            raise BackendUnavailable(f"backend {backend!r} cannot run {family} on {device_type}: {reason}")
        return backend
    order = list(AUTO_ORDER.get(device_type, ("eager",)))
    forced = os.environ.get("PYALIGN_BACKEND", "auto").strip().lower() or "auto"
    if forced != "auto":
        if forced not in BACKENDS:
            raise ValueError(f"PYALIGN_BACKEND must be one of {BACKENDS + ('auto',)}, got {forced!r}")
        order = [forced] + [b for b in order if b != forced]
    for i, name in enumerate(order):
        if _device_reason(name, device_type) is not None and name != forced:
            continue
        ok, reason = status(family, name, device_type)
        if ok:
            return name
        if (family, name) in _loaders or name == forced:
            _warn_once(family, name, reason, next((b for b in order[i + 1:]), "eager"))
    return "eager"


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_for(family: str, backend: str, tensor: torch.Tensor) -> str:
    """resolve() for ``tensor``'s device and dtype: float64 inputs run on eager only (the
    kernels take fp32/bf16/fp16); naming another backend for them is an error."""
    if tensor.dtype not in KERNEL_DTYPES:
        if backend in ("auto", "eager"):
            return "eager"
        raise ValueError(f"backend {backend!r} takes float32, bfloat16 or float16 inputs, got "
                         f"{tensor.dtype}; use backend='eager' for {tensor.dtype}")
    return resolve(family, backend, tensor.device)


def has(family: str, backend: str) -> bool:
    """Whether ``backend`` registers an implementation of ``family`` at all."""
    return (family, backend) in _loaders


def check_name(backend: str) -> str:
    """Validate a backend name given to an op (resolution itself happens when the op runs)."""
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    return backend


def implementation(family: str, backend: str, tensor: torch.Tensor):
    """The implementation object that runs ``family`` on ``tensor`` for the requested backend.

    Called inside the custom ops, so it runs eagerly even under torch.compile (dynamo never
    traces the table, its lock or a JIT build). Empty inputs need no kernel: eager answers.
    """
    if tensor.numel() == 0:
        return load(family, "eager")
    return load(family, resolve_for(family, backend, tensor))


# Built-in registrations. Loaders are lazy: nothing is imported or compiled until first use.
def _eager_loader(family: str):
    def load_reference():
        from pyalign import reference
        return getattr(reference, family)
    return load_reference


for _family in PRIMITIVES:
    register(_family, "eager", _eager_loader(_family))


def _register_optional(module: str) -> None:
    # Backends live in their own modules and register themselves; a missing module (a
    # backend not built yet) must not break import.
    import importlib
    try:
        importlib.import_module(module)
    except ImportError:
        pass


for _module in ("pyalign._triton_backend", "pyalign._build"):
    _register_optional(_module)
