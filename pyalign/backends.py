"""Which backend runs an op: a table of (op family, backend) -> implementation.

Backends are records in ``TABLE`` (name, device types, the module that registers them):
``triton`` (pyalign/kernels/, CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), ``cuda`` and
``cpu`` (csrc/, JIT-built on first use, registered by pyalign/_cpp_backend.py) and ``eager``
(pyalign/eager/, always there). ``BACKENDS``, ``CHOICES``, ``AUTO_ORDER`` and the device checks
derive from the table. ``backend="auto"`` takes the first available entry of ``AUTO_ORDER`` for
the tensors' device; ``PYALIGN_BACKEND`` overrides the choice process-wide. A backend that cannot
load warns once, with the reason, and the op runs on the next one in the order. float64 and empty
inputs run on eager: that rule lives here, in ``resolve_for`` and ``implementation``, and nowhere
else. A backend module that fails to import (other than by being absent) warns once and records
the error as the reason for every family of its backends.

Each op family's implementation is an object (usually a module) with the functions named in
``PRIMITIVES``; the ops layer (pyalign/ops/) calls only those, so a backend plugs in by
registering a loader:

    backends.register("logprobs", "cpu", lambda: importlib.import_module("pyalign._cpu_impl"))

Primitive contracts (all tensors already validated, 2-D row-major where noted):

logprobs
  forward(logits[N,V], labels[N] int64, ignore_index, temperature, with_entropy)
      -> (logprobs[N] f32, entropy[N] f32 or empty[0], stats[N,2] f32)
      stats[n] = (m, L): m = max_v logits[n, v] (raw, before the temperature), L = log sum_v
      exp((logits[n, v] - m) / T), so logsumexp(logits/T) = m/T + L. Every backend computes from
      the shifted (z - m) / T <= 0: logprobs = min((z_y - m)/T - L, 0) keeps fp32 accuracy at any
      common logit offset and never overflows; entropy >= 0. Ignored rows: logprobs and entropy
      exactly 0 (their logits may hold NaN/inf: selected away, never multiplied by 0), stats
      unspecified.
  backward(grad_logprobs[N] f32, grad_entropy[N] f32 | None, logits, labels, stats,
           entropy[N] | None, ignore_index, temperature, inplace) -> grad_logits (logits' dtype;
           when inplace, written into ``logits`` and returned); log p = (z - m)/T - L from stats;
           ignored rows exactly 0 whatever their logits or upstream gradients hold
  backward_columns(..., temperature, column_start)   (optional: the chunked linear path's
           epilogue, pyalign/eager/linear_logprobs.py, needs it) the same gradient, in place, for
           logits[:, c0:c0+W] of a wider vocabulary: stats of whole rows, labels of the whole
           vocabulary (the label term only where it falls in the slice). A vocab shard's
           3-matmul loss (pyalign/ops/_fused_head.py) calls it at column 0 with labels outside
           the shard; a backend without it must take such labels in ``backward`` (no label term)
linear_logprobs
  forward(hidden[N,H], weight[V,H], bias[V] | None, labels, ignore_index, temperature,
          with_entropy, chunk_size, softcap | None, logit_scale, metrics, keep_rows)
      -> (logprobs, entropy, stats[N,2], log_sum_sq_probs, mean_logits, is_top1 (bool), kept)
      the head z = softcap·tanh(logit_scale·(hidden·Wᵀ + b) / softcap) / T (no tanh without a
      softcap); stats as for logprobs, of the head logits before T; metrics = three bools
      (log_sum_sq_probs, mean_logits, is_top1 wanted: [N] each, else empty[0]); kept = the raw
      logits of the first keep_rows tokens, kept for backward ([keep_rows, V]; the ops layer
      asks only the chunked backends, the fused Triton one returns [0, V]). A label outside
      [0, V) that is not ignore_index (a vocab shard's token whose label another rank holds,
      pyalign/ops/_vocab_parallel.py) is no error: that token gets its row's stats, entropy,
      log_sum_sq_probs and mean_logits; its logprobs and is_top1 are unspecified
  backward(grad_logprobs, grad_entropy | None, hidden, weight, bias, labels, stats, entropy | None,
           ignore_index, temperature, chunk_size, softcap | None, logit_scale, kept, *,
           vocab_shard=False)
      -> (grad_hidden, grad_weight, grad_bias | None); may overwrite ``kept``.
      ignored tokens contribute nothing to grad_weight / grad_bias (a NaN/inf hidden row is
      selected away) and get grad_hidden exactly 0. With vocab_shard, weight is a shard of a
      wider vocabulary and stats / entropy are the whole rows' (used as given, never recomputed
      from the shard); a label outside [0, V) adds no label term
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
policy
  forward(logprobs[B,T], old_logprobs[B,T], advantages[B] | [B,T], mask[B,T] bool,
          entropy_mask[B,T] bool | None, ref_logprobs[B,T] | None, entropy[B,T] | None, loss,
          level, params, beta, kl_estimator, bias_correction) -> row_stats[B, S] (f32; f64 for
          f64 inputs), the per-row reductions named by pyalign.losses.POLICY_ROW_STATS
      loss: a name of losses.POLICY_REGISTRY (its policy term, by kernel_id); level "token",
      "sequence" (w = exp of the row's masked mean log-ratio) or "sequence_sum" (exp of the sum);
      params: losses.PolicyParams.as_list(); the KL stat (and term) only with ref_logprobs, times
      the ratio with bias_correction; entropy_mask already within mask. Masked positions: their
      inputs never reach a stat (selected away, NaN included).
  backward(row_weights[B] f32, entropy_weights[B] f32 | None, the forward's inputs)
      -> (grad_logprobs like logprobs, grad_entropy like entropy or None)
      the gradient of Σ_b row_weights[b]·Σ_t m·(em·P + β·kl) + Σ_b entropy_weights[b]·Σ_t m·em·H;
      masked positions exactly 0
weights
  apply_(kind, targets, sources, scalar)   kind in {"lerp", "copy"} (ema_ runs as lerp with
           weight 1 - decay); in place, no autograd
  bema_(targets, emas, params, inits, alpha, beta)   four lists of one length, each index's
           tensors of one shape and device, emas[i] and inits[i] of one dtype; in place:
           ema = lerp(ema, param, beta) stored, then target = ema + alpha * (param - init)
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import threading
import warnings
from typing import Callable

import torch

from pyalign._utils import KERNEL_DTYPES


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend: where it runs and which module registers its implementations."""

    name: str
    # Device types whose tensors it runs, fastest backend first in TABLE; None: any device.
    device_types: tuple[str, ...] | None
    # Also CPU tensors under TRITON_INTERPRET=1 (for tests: "auto" never picks it there).
    interpreter_on_cpu: bool = False
    # Imported at import time to register the implementations (None: registered here).
    module: str | None = None


INTERPRETER_ENV = "TRITON_INTERPRET"

TABLE = (
    Backend("triton", ("cuda",), interpreter_on_cpu=True, module="pyalign._triton_backend"),
    Backend("cuda", ("cuda",), module="pyalign._cpp_backend"),
    Backend("cpu", ("cpu",), module="pyalign._cpp_backend"),
    Backend("eager", None),
)
_BY_NAME = {backend.name: backend for backend in TABLE}

BACKENDS = tuple(_BY_NAME)
CHOICES = ("auto", *BACKENDS)

PRIMITIVES = {
    "logprobs": ("forward", "backward"),
    "linear_logprobs": ("forward", "backward"),
    "kl": ("forward", "backward"),
    "preference": ("forward", "backward", "sequence_preference_forward",
                   "sequence_preference_backward"),
    "policy": ("forward", "backward"),
    "weights": ("apply_", "bema_"),
}


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
    order = list(AUTO_ORDER.get(device_type, _ANY_DEVICE_ORDER))
    forced = os.environ.get("PYALIGN_BACKEND", "auto").strip().lower() or "auto"
    if forced != "auto":
        if forced not in BACKENDS:  # "auto" was handled above
            raise ValueError(f"PYALIGN_BACKEND must be one of {CHOICES}, got {forced!r}")
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
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    return backend


def implementation(family: str, backend: str, tensor: torch.Tensor):
    """The implementation object that runs ``family`` on ``tensor`` for the requested backend.

    Called inside the custom ops, so it runs eagerly even under torch.compile (dynamo never
    traces the table, its lock or a JIT build). Empty inputs need no kernel: eager answers.
    With resolve_for this is the one place of the rule "float64 or empty inputs run eager": the
    kernel backends' implementations never see such inputs.
    """
    if tensor.numel() == 0:
        return load(family, "eager")
    return load(family, resolve_for(family, backend, tensor))


# Built-in registrations. Loaders are lazy: nothing is imported or compiled until first use.
def _eager_loader(family: str):
    def load_eager():
        # Each family module of pyalign/eager/ is the implementation object itself.
        return importlib.import_module(f"pyalign.eager.{family}")
    return load_eager


for _family in PRIMITIVES:
    register(_family, "eager", _eager_loader(_family))


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
        for family in PRIMITIVES:
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
