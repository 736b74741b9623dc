"""Small facts that several parts of pyalign need, each written once.

- ``KERNEL_DTYPES`` / ``accumulation_dtype``: which float dtypes the kernel backends take, and the
  dtype every backend does its math in.
- ``head_logits_dtype``: the dtype a linear head forms its logits in (the fp32 head of a bf16 /
  fp16 hidden state).
- ``check_int``: the one "an int in [minimum, maximum]" check (never bool, never a float).
- ``available_cores``: the CPU cores this process may run on.
- ``canonical_param_name`` / ``named_tensors`` / ``local_shard``: how a parameter is named, how
  two models pair by name, and which storage a rank updates, whatever wraps the model (DDP,
  torch.compile, FSDP2).
- ``limited_threads``: run a block under a given intra-op thread count.
- ``cache_root``: where pyalign caches builds and tasks.
- ``atomic_write``: the one way pyalign writes a file that must never be seen half-written.
- ``toml_value``: a value as TOML text (config files pyalign writes for itself and for users).
- ``check_int``: the one "an int >= n" check, naming the argument.
- ``DISTRIBUTION`` / ``pip_extra``: the name pyalign is published under on PyPI, and the install
  command of one of its extras (error messages name it).
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import stat
import tempfile
from pathlib import Path

import torch

# Float dtypes the Triton and C++ kernels take. float64 runs on the eager backend only (gradcheck).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

CACHE_ENV = "PYALIGN_CACHE_DIR"

# The distribution name on PyPI ("pyalign" there is an unrelated project); the import name is pyalign.
DISTRIBUTION = "pyalign-lm"


def pip_extra(extra: str) -> str:
    """The command that installs one of pyalign's optional extras, e.g. "lora"."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"

# Prefixes that wrappers add to parameter names without changing the weight they name:
# DDP ("module.x") and torch.compile ("_orig_mod.x").
_WRAPPER_PREFIXES = ("module", "_orig_mod")


def accumulation_dtype(*inputs) -> torch.dtype:
    """The dtype math runs in for ``inputs`` (dtypes, tensors, None skipped): fp64 when one of
    them is fp64 (gradcheck), else fp32 (fp32/bf16/fp16 inputs)."""
    dtypes = [getattr(given, "dtype", given) for given in inputs if given is not None]
    return torch.float64 if torch.float64 in dtypes else torch.float32


def head_logits_dtype(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the logits hidden @ weight.T are formed in: the dtype hidden and weight share,
    or float32 where they differ (the ops pass only pairs with one of them float32 and the other
    bfloat16 / float16: an fp32 head, docs/algorithms.md "The fp32 head"), the narrower one
    upcast."""
    return hidden_dtype if hidden_dtype == weight_dtype else torch.float32


INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def check_int(name: str, value, *, minimum: int = INT64_MIN, maximum: int = INT64_MAX,
              what: str | None = None, error: type[Exception] | None = None) -> int:
    """An integer (Python int, NumPy integer or 0-d integer tensor; never bool) in [minimum,
    maximum] (by default the int64 range), returned as a Python int. Refused: TypeError for
    another type, ValueError out of range, or ``error`` for both (a config file's own error)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype.is_floating_point or value.dtype.is_complex \
                or value.dtype == torch.bool:
            raise (error or TypeError)(
                f"{name} must be an int (or a 0-d integer tensor), got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}")
    elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise (error or TypeError)(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if not minimum <= value <= maximum:
        raise (error or ValueError)(
            f"{name} must be {what or f'an int in [{minimum}, {maximum}]'}, got {value}")
    return value


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gradients_wanted(*tensors) -> bool:
    """Whether a backward can reach any of ``tensors`` (None allowed): grad mode on and one of
    them requiring grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def canonical_param_name(name: str) -> str:
    """``name`` without the wrapper components (``module.``, ``_orig_mod.``)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PREFIXES)


def named_tensors(module: torch.nn.Module, what: str, *, include_buffers: bool = False) -> dict:
    """canonical name -> parameter (then floating buffer, with ``include_buffers``) of ``module``,
    in registration order: how two modules are paired, whatever wraps them. Two tensors whose
    names differ only by wrapper prefixes raise."""
    items = list(module.named_parameters())
    if include_buffers:
        items += [(n, b) for n, b in module.named_buffers() if b.dtype.is_floating_point]
    named: dict = {}
    for raw, tensor in items:
        key = canonical_param_name(raw)
        if key in named:
            raise ValueError(f"{what}: two tensors share the name {key!r} once wrapper prefixes "
                             f"(module., _orig_mod.) are removed")
        named[key] = tensor
    return named


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The storage a rank updates in place: the detached tensor (``param.data``), or the local
    shard of a DTensor (FSDP2), so weight updates run shard-local with no communication."""
    # .data, not .detach(): an in-place update must not bump the autograd version counter of a
    # parameter that a live graph may have saved.
    data = tensor.data
    to_local = getattr(data, "to_local", None)
    return to_local() if callable(to_local) else data


@contextlib.contextmanager
def limited_threads(count: int):
    """Run a block under ``count`` intra-op threads, restoring the previous setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cache_root(*parts: str) -> Path:
    """``$PYALIGN_CACHE_DIR/<parts>``, else ``~/.cache/pyalign/<parts>``; a per-user temporary
    directory when the home cache cannot be written (read-only homes on some CI runners)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env, *parts)
    home_cache = Path.home() / ".cache" / "pyalign"
    try:
        home_cache.mkdir(parents=True, exist_ok=True)
        if os.access(home_cache, os.W_OK):
            return home_cache.joinpath(*parts)
    except OSError:
        pass
    return user_cache(*parts)


def user_cache(*parts: str) -> Path:
    """This user's own cache in the temporary directory: where a cache that cannot be written
    (a read-only home, a shared ``$PYALIGN_CACHE_DIR`` written by someone else) moves to."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir(), f"pyalign-cache-{user}", *parts)


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory, fsync,
    ``os.replace``. A crash at any point leaves the old file or the complete new one, never a
    partial file under ``path``, and no temporary file behind."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; the result gets the mode a plain open() would give it
        # (an existing file keeps its own), so metrics and plots stay readable by others.
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    _fsync_dir(directory)


def toml_value(value) -> str:
    """``value`` (bool, int, float, str, list/tuple, dict) as TOML text that tomllib reads back
    to the same value (a dict as an inline table; inf and nan as TOML writes them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ("-" if value < 0 else "") + ("nan" if math.isnan(value) else "inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string: the same escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")
