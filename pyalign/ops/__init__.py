"""Public ops, one module per op family."""
from pyalign.ops.kl import kl_penalty
from pyalign.ops.kto import KTOLossOutput, kto_loss, linear_kto_loss
from pyalign.ops.linear_logprobs import linear_token_logprobs
from pyalign.ops.linear_policy import linear_policy_loss
from pyalign.ops.logprobs import token_logprobs
from pyalign.ops.policy import PolicyLossOutput, policy_loss
from pyalign.ops.preference import (
                                    PreferenceLossOutput,
                                    linear_preference_loss,
                                    preference_loss,
                                    sequence_logprobs,
                                    token_preference_loss,
)
from pyalign.ops.weights import bema_, copy_, ema_, lerp_

__all__ = ["token_logprobs", "linear_token_logprobs", "kl_penalty", "preference_loss", "kto_loss",
           "linear_preference_loss", "token_preference_loss", "linear_kto_loss", "sequence_logprobs",
           "PreferenceLossOutput", "KTOLossOutput", "policy_loss", "linear_policy_loss", "PolicyLossOutput",
           "ema_", "lerp_", "copy_", "bema_"]
