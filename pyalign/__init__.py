"""pyalign: fused kernels for aligning language models, and thin trainers on top.

    import pyalign
    logprobs = pyalign.token_logprobs(logits, labels)                      # [..., V] -> [...]
    out = pyalign.preference_loss(pc, pr, rc, rr, loss="sigmoid", beta=0.1)
    pyalign.lerp_(ref_model, policy_model, 0.6)                            # TR-DPO soft update

Every name below is loaded on first use: ``import pyalign`` imports neither torch nor
transformers, so the command line (`pyalign --help`) answers at once and a program pays for the
parts it touches.
"""
import importlib

from pyalign.ops import PUBLIC as _OPS  # the ops' one list (importing it loads no op, no torch)

__version__ = "0.1.0"

__all__ = [*_OPS, "empty_cache", "backends", "refmodel", "__version__"]

# Subpackages reachable as attributes of ``pyalign``; the ops are pyalign.ops's, empty_cache
# pyalign._workspace's.
_SUBMODULES = ("backends", "refmodel", "tasks", "trainers")


def __getattr__(name):
    if name in _SUBMODULES:
        value = importlib.import_module(f"pyalign.{name}")
    elif name == "empty_cache":
        value = importlib.import_module("pyalign._workspace").empty_cache
    elif name in __all__:
        value = getattr(importlib.import_module("pyalign.ops"), name)
    else:
        raise AttributeError(f"module 'pyalign' has no attribute {name!r}")
    globals()[name] = value  # found once: later lookups do not come here
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
