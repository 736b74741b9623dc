"""Public ops, one module per op family.

``PUBLIC`` names each public op (and output type) with the module of pyalign/ops/ that defines
it: the one list ``__all__`` and ``pyalign.__all__`` derive from. A name loads its module on
first use, so importing this package imports neither torch nor the ops (``from pyalign.ops
import *`` and ``import pyalign`` load them all).
"""
import importlib

PUBLIC = {
    "token_logprobs": "logprobs",
    "linear_token_logprobs": "linear_logprobs",
    "kl_penalty": "kl",
    "preference_loss": "preference",
    "token_preference_loss": "preference",
    "sequence_logprobs": "preference",
    "PreferenceLossOutput": "preference",
    "linear_preference_loss": "linear_preference",
    "kto_loss": "kto",
    "linear_kto_loss": "kto",
    "KTOLossOutput": "kto",
    "policy_loss": "policy",
    "linear_policy_loss": "linear_policy",
    "PolicyLossOutput": "policy",
    "ema_": "weights",
    "lerp_": "weights",
    "copy_": "weights",
    "bema_": "weights",
}

__all__ = list(PUBLIC)


def __getattr__(name):
    if name in PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{PUBLIC[name]}"), name)
    elif name in set(PUBLIC.values()):  # a family's module, e.g. pyalign.ops.preference
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # found once: later lookups do not come here
    return value


def __dir__():
    return sorted(set(globals()) | set(PUBLIC) | set(PUBLIC.values()))
