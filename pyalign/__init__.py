"""pyalign: fused kernels for aligning language models, and thin trainers on top.

    import pyalign
    logprobs = pyalign.token_logprobs(logits, labels)                      # [..., V] -> [...]
    out = pyalign.preference_loss(pc, pr, rc, rr, loss="sigmoid", beta=0.1)
    pyalign.lerp_(ref_model, policy_model, 0.6)                            # TR-DPO soft update
"""
from pyalign import backends, ops
from pyalign._workspace import empty_cache
from pyalign.ops import *  # noqa: F403  (the public ops, ops.__all__: loads them all)

__version__ = "0.1.0"

__all__ = ["empty_cache", "backends", "refmodel", "__version__"]  # noqa: F405 (refmodel: __getattr__)
__all__ += ops.__all__


def __getattr__(name):
    # refmodel, tasks, trainers import transformers: load them on first use only.
    if name in ("refmodel", "tasks", "trainers"):
        import importlib
        return importlib.import_module(f"pyalign.{name}")
    raise AttributeError(f"module 'pyalign' has no attribute {name!r}")
