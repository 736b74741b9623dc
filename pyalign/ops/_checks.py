"""Input validation shared by the ops: clear Python errors before any kernel runs."""
from __future__ import annotations

import math
import numbers

import torch

# check_int: the ops' int checks (_checks.check_int)
from pyalign._utils import check_int, head_logits_dtype  # noqa: F401

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, tensor, *, floating: bool = False, integer: bool = False) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if floating and tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or "
                        f"float64), got {tensor.dtype}")
    if integer and (tensor.dtype.is_floating_point or tensor.dtype.is_complex
                    or tensor.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (int64 token ids), got {tensor.dtype}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_shape(name: str, tensor, expected: tuple, what: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(expected)} ({what})")


def check_positive(name: str, value) -> float:
    """A finite real number > 0 (check_real: not bool, not a string)."""
    return check_finite_range(name, value, low=0.0, low_inclusive=False, what="a finite number > 0")


def check_labels_in_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise if any label other than ignore_index falls outside [0, vocab_size).

    Data-dependent, so it runs inside the custom ops (eagerly, also under torch.compile).
    """
    if labels.numel() == 0:
        return
    invalid = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(invalid.any()):
        position = int(invalid.reshape(-1).nonzero()[0, 0])
        value = int(labels.reshape(-1)[position])
        count = int(invalid.sum())
        raise ValueError(f"labels out of range: {count} label(s) outside [0, {vocab_size}) that are "
                         f"not ignore_index={ignore_index}; first is {value} at flat position "
                         f"{position}")


# ---------------------------------------------------------------------------- scalars and flags
# Python's bool is an int subclass and float() / int() accept strings and truncate: every scalar
# argument of an op goes through one of these instead, so a flag, a count and a real number
# each take exactly the values they mean.

# Below this temperature the gradient, which scales as 1/T, overflows float16 (max 65504; the
# largest |dlogp/dz| is 1/T), and z/T of logits of a few tens reaches 1e5-1e6, where fp32
# rounding alone moves a log-prob by more than 1e-2. Nothing useful is that sharp: T -> 0 is the
# argmax, ask for it directly.
MIN_TEMPERATURE = 1e-4


def check_optional_positive_int(name: str, value) -> int | None:
    """None, or an int >= 1 (within int64)."""
    if value is None:
        return None
    return check_int(name, value, minimum=1, what=">= 1 (an int) or None")


def check_bool(name: str, value) -> bool:
    """A flag: True or False (a NumPy bool or 0-d bool tensor too), not whatever bool() accepts."""
    if isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.bool:
        return bool(value)
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def check_real(name: str, value) -> float:
    """A real number (int, float, NumPy scalar or one-element real tensor): never bool, a string
    or None, which float() would accept or turn into 1.0."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_finite_range(name: str, value, *, low: float | None = None, high: float | None = None,
                       low_inclusive: bool = True, high_inclusive: bool = True,
                       what: str | None = None) -> float:
    """A finite real number (check_real) in the interval from ``low`` to ``high``; returns it as a
    float. The message names the argument, the interval (or ``what``) and the value."""
    number = check_real(name, value)
    below = low is not None and (number < low if low_inclusive else number <= low)
    above = high is not None and (number > high if high_inclusive else number >= high)
    if not math.isfinite(number) or below or above:
        if what is None:
            left = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
            right = "inf)" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
            what = f"in {left}, {right}" + (" and finite" if low is None or high is None else "")
        raise ValueError(f"{name} must be {what}, got {number}")
    return number


def check_temperature(value) -> float:
    """A finite temperature >= MIN_TEMPERATURE."""
    return check_finite_range("temperature", value, low=MIN_TEMPERATURE,
                              what=f"a finite number > 0, at least {MIN_TEMPERATURE:g} (below it the "
                                   f"1/T gradient overflows float16 and fp32 z/T loses the log-prob)")


def check_choice(name: str, value, choices: tuple) -> str:
    """One of the names in ``choices`` (a str: a list or tensor that compares equal is not one)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_mask(name: str, mask) -> torch.Tensor:
    """A mask as a bool tensor, the one place masks are checked: a bool tensor as it is; a tensor
    of any other dtype (integer, float: ``attention_mask.float()``) whose values are exactly 0 and
    1, converted once. Any other value (0.5, 2, NaN) is refused, named with its position: kept
    or not, or a weight, it has no one meaning."""
    check_tensor(name, mask)
    if mask.dtype == torch.bool:
        return mask
    return _mask_to_bool(mask.detach(), name)


@torch.library.custom_op("pyalign::mask_to_bool", mutates_args=())
def _mask_to_bool(mask: torch.Tensor, name: str) -> torch.Tensor:
    """mask != 0 after checking every value is 0 or 1: data-dependent, so an op of its own (it
    runs eagerly, before the kernels that read the mask, also under torch.compile)."""
    other = (mask != 0) & (mask != 1)
    if bool(other.any()):
        flat_position = int(other.reshape(-1).nonzero()[0, 0])
        position = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_position),
                                                             mask.shape))
        value = mask.reshape(-1)[flat_position].item()
        raise ValueError(f"{name} must be bool or hold only 0 and 1, got {value!r} at position "
                         f"{position} ({int(other.sum())} value(s) other than 0 and 1); make it a "
                         f"bool mask explicitly, e.g. {name} > 0.5 or {name} != 0")
    return mask != 0


@_mask_to_bool.register_fake
def _(mask, name):
    return torch.empty_like(mask, dtype=torch.bool)


# ---------------------------------------------------------------------------- the head's dtypes
# The linear ops take hidden and their head (weight, bias) of one dtype, or an fp32 head of a
# bfloat16 / float16 hidden state (TRL's cast_lm_head_to_fp32, vLLM's head_dtype): a float32
# weight, or any kernel dtype upcast by head_dtype=torch.float32 (docs/algorithms.md, "The fp32
# head").
LOW_PRECISION = (torch.bfloat16, torch.float16)
HEAD_DTYPE_CHOICES = "None (the head runs in its weight's dtype) or torch.float32"


def check_head_dtype(value):
    """``head_dtype``: None or torch.float32 (an fp32 head: a bf16 / fp16 weight and bias are
    upcast for the head only)."""
    if value is None or value is torch.float32:
        return value
    if isinstance(value, torch.dtype):
        raise ValueError(f"head_dtype must be {HEAD_DTYPE_CHOICES}, got {value}")
    raise TypeError(f"head_dtype must be {HEAD_DTYPE_CHOICES}, got {type(value).__name__} "
                    f"{value!r}")


def check_head_dtypes(hidden, weight, bias, head_dtype, *, hidden_name="hidden",
                      weight_name="weight", bias_name="bias") -> None:
    """hidden, weight and bias (or None) in a combination the head takes (see above); the
    message names the arguments and what is accepted."""
    head = weight.dtype
    if head_dtype is torch.float32:
        if weight.dtype not in (torch.float32, *LOW_PRECISION):
            raise TypeError(f"head_dtype=torch.float32 upcasts a bfloat16/float16 head (or keeps "
                            f"a float32 one); {weight_name} is {weight.dtype}")
        head = torch.float32
    if hidden.dtype != head and not (head == torch.float32 and hidden.dtype in LOW_PRECISION):
        asked = ", head_dtype=torch.float32" if head_dtype is not None else ""
        raise TypeError(f"{hidden_name} and {weight_name} must share a dtype, or make a float32 "
                        f"head of a bfloat16/float16 {hidden_name} (a float32 {weight_name}, or a "
                        f"bfloat16/float16 one with head_dtype=torch.float32); got {hidden_name} "
                        f"{hidden.dtype} and {weight_name} {weight.dtype}{asked}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"{bias_name} must have {weight_name}'s dtype {weight.dtype} (the "
                        f"head's), got {bias.dtype}")


def logits_dtype(hidden, weight, head_dtype) -> torch.dtype:
    """The dtype the head's logits are formed in for checked inputs (check_head_dtypes)."""
    return torch.float32 if head_dtype is torch.float32 else head_logits_dtype(hidden.dtype,
                                                                                weight.dtype)


def head_hidden(hidden, weight, head_dtype):
    """``hidden`` as the head's primitives take it: they form fp32 logits where exactly one of
    hidden and weight is float32 (pyalign._utils.head_logits_dtype), so an fp32 head asked of a
    bf16 / fp16 pair upcasts the hidden state (N x H, smaller than the weight, which is upcast
    tile by tile; as TRL's cast_lm_head_to_fp32 upcasts it). Its gradient comes back in its
    own dtype through autograd."""
    if head_dtype is torch.float32 and torch.float32 not in (hidden.dtype, weight.dtype):
        return hidden.float()
    return hidden
