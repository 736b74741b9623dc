"""Input validation shared by the ops: clear Python errors before any kernel runs."""
from __future__ import annotations

import math

import torch

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
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


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
