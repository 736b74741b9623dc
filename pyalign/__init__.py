"""pyalign: fused kernels for aligning language models, and thin trainers on top.

    import pyalign
    logprobs = pyalign.token_logprobs(logits, labels)                      # [..., V] -> [...]
    out = pyalign.preference_loss(pc, pr, rc, rr, loss="sigmoid", beta=0.1)
    pyalign.lerp_(ref_model, policy_model, 0.6)                            # TR-DPO soft update
"""
from pyalign import backends
from pyalign._workspace import empty_cache
from pyalign.ops import (
    KTOLossOutput,
    PolicyLossOutput,
    PreferenceLossOutput,
    bema_,
    copy_,
    ema_,
    kl_penalty,
    kto_loss,
    lerp_,
    linear_kto_loss,
    linear_policy_loss,
    linear_preference_loss,
    linear_token_logprobs,
    policy_loss,
    preference_loss,
    sequence_logprobs,
    token_logprobs,
    token_preference_loss,
)

__version__ = "0.1.0"

__all__ = ["token_logprobs", "linear_token_logprobs", "kl_penalty", "preference_loss", "kto_loss",
           "linear_preference_loss", "token_preference_loss", "linear_kto_loss", "sequence_logprobs",
           "PreferenceLossOutput", "KTOLossOutput", "policy_loss", "linear_policy_loss", "PolicyLossOutput",
           "ema_", "lerp_", "copy_", "bema_", "empty_cache", "backends", "refmodel", "__version__"]


def __getattr__(name):
    # refmodel, tasks, trainers import transformers: load them on first use only.
    if name in ("refmodel", "tasks", "trainers"):
        import importlib
        return importlib.import_module(f"pyalign.{name}")
    raise AttributeError(f"module 'pyalign' has no attribute {name!r}")
