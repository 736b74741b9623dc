"""Public ops, one module per op family. The names imported here are the public API:
``__all__`` (and ``pyalign.__all__``) derive from them."""
# ruff: noqa: F401  (imported to be exported: __all__ is built from them below)
import types as _types

from pyalign.ops.kl import kl_penalty
from pyalign.ops.kto import KTOLossOutput, kto_loss, linear_kto_loss
from pyalign.ops.linear_logprobs import linear_token_logprobs
from pyalign.ops.linear_policy import linear_policy_loss
from pyalign.ops.linear_preference import linear_preference_loss
from pyalign.ops.logprobs import token_logprobs
from pyalign.ops.policy import PolicyLossOutput, policy_loss
from pyalign.ops.preference import (
    PreferenceLossOutput,
    preference_loss,
    sequence_logprobs,
    token_preference_loss,
)
from pyalign.ops.weights import copy_, ema_, lerp_

__all__ = [_name for _name, _value in list(globals().items())
           if not _name.startswith("_") and not isinstance(_value, _types.ModuleType)]
