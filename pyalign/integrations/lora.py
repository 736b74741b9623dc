"""LoRA adapters through peft: the ``--lora`` spec of ``pyalign train`` and ``pyalign export``.

A spec is a comma-separated ``key=value`` list, e.g. ``r=16,alpha=32,dropout=0.05`` or
``r=8,target_modules=q_proj+v_proj``; ``parse_lora_spec`` turns it into a plain dict (what run
configs and checkpoints store) and ``apply_lora`` wraps a model with the peft adapter it names.
Keys (peft's ``LoraConfig`` names in brackets): ``r`` (rank, int >= 1), ``alpha``
(``lora_alpha``, > 0; default 2·r), ``dropout`` (``lora_dropout``, in [0, 1); default 0),
``target_modules`` (``+``-separated module names, or ``all-linear``, the default: every linear
layer but the output head) and ``bias`` (``none``, ``all`` or ``lora_only``; default ``none``).
"""
from __future__ import annotations

import math

LORA_DEFAULTS = {"alpha": None, "dropout": 0.0, "target_modules": "all-linear", "bias": "none"}
_BIAS_CHOICES = ("none", "all", "lora_only")


class LoraSpecError(ValueError):
    """A malformed ``--lora`` spec."""


def _number(key: str, text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise LoraSpecError(f"--lora: {key} must be {'an int' if kind is int else 'a number'}, "
                            f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise LoraSpecError(f"--lora: {key} must be finite, got {text!r}")
    return value


def parse_lora_spec(text) -> dict:
    """``"r=16,alpha=32"`` (or an already parsed dict) -> the full spec dict with defaults."""
    if isinstance(text, dict):
        items = {str(k): str(v) for k, v in text.items()}
    elif isinstance(text, str) and text.strip():
        items = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise LoraSpecError(f"--lora: {part.strip()!r} is not key=value (e.g. r=16,alpha=32)")
            if key in items:
                raise LoraSpecError(f"--lora: {key} is given twice")
            items[key] = value
    else:
        raise LoraSpecError(f"--lora must be a non-empty key=value list such as r=16,alpha=32, "
                            f"got {text!r}")
    known = {"r", *LORA_DEFAULTS}
    unknown = sorted(set(items) - known)
    if unknown:
        raise LoraSpecError(f"--lora: unknown key(s) {unknown}; accepted: {sorted(known)}")
    if "r" not in items:
        raise LoraSpecError("--lora: r (the adapter rank) is required, e.g. r=16")
    rank = _number("r", items["r"], int)
    if rank < 1:
        raise LoraSpecError(f"--lora: r must be >= 1, got {rank}")
    alpha = _number("alpha", items["alpha"], float) if "alpha" in items else 2.0 * rank
    if alpha <= 0:
        raise LoraSpecError(f"--lora: alpha must be > 0, got {alpha}")
    dropout = _number("dropout", items["dropout"], float) if "dropout" in items else 0.0
    if not 0.0 <= dropout < 1.0:
        raise LoraSpecError(f"--lora: dropout must be in [0, 1), got {dropout}")
    bias = items.get("bias", "none")
    if bias not in _BIAS_CHOICES:
        raise LoraSpecError(f"--lora: bias must be one of {_BIAS_CHOICES}, got {bias!r}")
    targets = items.get("target_modules", "all-linear")
    names = [name.strip() for name in targets.split("+")]
    if not all(names):
        raise LoraSpecError(f"--lora: target_modules must be +-separated module names, got {targets!r}")
    return {"r": rank, "alpha": alpha, "dropout": dropout, "target_modules": "+".join(names),
            "bias": bias}


def format_lora_spec(spec: dict) -> str:
    """The ``key=value`` text of a parsed spec (``parse_lora_spec`` reads it back the same)."""
    return ",".join(f"{key}={spec[key]}" for key in ("r", *LORA_DEFAULTS))


def lora_config(spec):
    """The peft ``LoraConfig`` (task CAUSAL_LM) of a spec."""
    try:
        from peft import LoraConfig
    except ImportError as exc:
        from pyalign._utils import pip_extra
        raise ImportError(f"LoRA needs peft: {pip_extra('lora')} (or pip install peft)") from exc
    spec = parse_lora_spec(spec)
    names = spec["target_modules"].split("+")
    targets = "all-linear" if names == ["all-linear"] else names
    return LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                      target_modules=targets, bias=spec["bias"], task_type="CAUSAL_LM")


def apply_lora(model, spec):
    """``model`` wrapped as a peft model with a fresh adapter of ``spec`` (only it trains)."""
    from peft import get_peft_model
    return get_peft_model(model, lora_config(spec))
