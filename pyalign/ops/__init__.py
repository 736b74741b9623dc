"""Public ops, one module per op family."""
from pyalign.ops.kl import kl_penalty
from pyalign.ops.linear_logprobs import linear_token_logprobs
from pyalign.ops.logprobs import token_logprobs
from pyalign.ops.policy import PolicyLossOutput, policy_loss
from pyalign.ops.preference import (
                                    KTOLossOutput,
                                    PreferenceLossOutput,
                                    kto_loss,
                                    linear_preference_loss,
                                    preference_loss,
                                    sequence_logprobs,
)
from pyalign.ops.weights import copy_, ema_, lerp_

__all__ = ["token_logprobs", "linear_token_logprobs", "kl_penalty", "preference_loss", "kto_loss",
           "linear_preference_loss", "sequence_logprobs", "PreferenceLossOutput", "KTOLossOutput",
           "ema_", "lerp_", "copy_", "policy_loss", "PolicyLossOutput"]
