"""TRL's trainers on pyalign's kernels: one call switches TRL 1.16's own fused LM head over.

    import pyalign.integrations.trl
    pyalign.integrations.trl.enable()          # before building the trainer
    trainer = DPOTrainer(model=model, args=DPOConfig(...), train_dataset=dataset, ...)

TRL's SFT, DPO, KTO, GRPO and RLOO trainers patch their models with ``add_fused_lm_head`` (in
``trl.trainer.utils``), whose forward calls ``trl.kernels.ChunkedLogProbFunction``. ``enable()``
replaces both names where TRL looks them up (``trl.trainer.utils`` and every loaded ``trl``
module that imported ``add_fused_lm_head``): the trainers then get
``pyalign.integrations.transformers``'s fused forward, returning TRL's own
``FusedCausalLMOutput`` with the same fields, so every TRL option (temperature,
``cast_lm_head_to_fp32``: the fp32 head of ``linear_token_logprobs``, its bf16 / fp16 operands
upcast by the kernel; ``shift_labels``, ``num_items_in_batch``, the WPO and entropy outputs)
keeps its meaning. ``disable()`` puts TRL's back; both are idempotent and each logs one line
naming what it replaced or restored (logger "pyalign", shown on stderr by default:
pyalign/_logging.py). ``enabled()`` is the same as a context manager. A trainer built while
enabled keeps pyalign's forward on its model.

TRL is a test dependency, never a runtime one: it is imported when ``enable()`` runs.
The Trainer callbacks (``TrustRegionCallback``, ``ElasticResetCallback``) live in
``pyalign.integrations.callbacks`` and are re-exported here, where a TRL user looks for them.
"""
from __future__ import annotations

import contextlib
import importlib
import sys

import torch

from pyalign._logging import get_logger
from pyalign.integrations import transformers as _hf
from pyalign.integrations.callbacks import ElasticResetCallback, TrustRegionCallback
from pyalign.ops.linear_logprobs import linear_token_logprobs

__all__ = ["enable", "disable", "is_enabled", "enabled", "TrustRegionCallback", "ElasticResetCallback"]

# The trainer modules that import add_fused_lm_head at their top level.
_TRAINER_MODULES = ("trl.trainer.sft_trainer", "trl.trainer.dpo_trainer", "trl.trainer.kto_trainer",
                    "trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer")
# (module, attribute) -> TRL's original object, while enabled.
_replaced: dict = {}
_log = get_logger(__name__)


def _import_trl():
    try:
        return importlib.import_module("trl.trainer.utils")
    except ImportError as error:
        raise ImportError("pyalign.integrations.trl needs TRL (pip install trl==1.16.0); "
                          f"importing it failed: {error}") from error


class ChunkedLogProbFunction:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction`` (same ``apply`` arguments and
    5-tuple result) on ``pyalign.linear_token_logprobs``; ``chunk_size`` (TRL's vocabulary
    tile) is not needed by pyalign's kernels and is ignored. As TRL's, the head runs in the
    autocast dtype when autocast is on, else in hidden's dtype; in float32 (TRL's
    ``cast_lm_head_to_fp32`` passes an fp32 hidden state) a bf16 / fp16 head is upcast by the
    kernel (``head_dtype=torch.float32``), not copied whole as TRL's slices are."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits",
                                        "is_top1")):
        del chunk_size
        device = hidden.device.type
        dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                 else hidden.dtype)
        head_dtype = None
        if (dtype == torch.float32 and weight.dtype in (torch.bfloat16, torch.float16)
                and (bias is None or bias.dtype == weight.dtype)):
            head_dtype = torch.float32
        else:
            weight = weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        extra = tuple(name for name in outputs if name != "log_probs")
        return tuple(linear_token_logprobs(hidden.to(dtype), weight, targets, bias=bias,
                                           temperature=temperature,
                                           softcap=final_logit_softcapping,
                                           logit_scale=logit_scale, head_dtype=head_dtype,
                                           outputs=extra))


def _fused_head_installer(output_class):
    def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                          outputs: tuple[str, ...] = ("log_probs",)) -> None:
        """TRL's ``add_fused_lm_head`` on pyalign's kernels (``pyalign.integrations.trl``)."""
        _hf._patch_forward(model, temperature=temperature,
                           cast_lm_head_to_fp32=cast_lm_head_to_fp32, outputs=outputs,
                           backend="auto", output_class=output_class)
    return add_fused_lm_head


def enable() -> None:
    """Make TRL's fused LM head (``add_fused_lm_head`` and its kernel) run on pyalign's kernels,
    for every trainer built from now on. Idempotent."""
    if _replaced:
        return
    utils = _import_trl()
    for name in _TRAINER_MODULES:
        importlib.import_module(name)
    original = utils.add_fused_lm_head
    ours = _fused_head_installer(utils.FusedCausalLMOutput)
    for module in [m for key, m in list(sys.modules.items())
                   if m is not None and (key == "trl" or key.startswith("trl."))]:
        if module.__dict__.get("add_fused_lm_head") is original:
            _replaced[(module, "add_fused_lm_head")] = original
            module.add_fused_lm_head = ours
    _replaced[(utils, "_ChunkedLogProbFunction")] = utils._ChunkedLogProbFunction
    utils._ChunkedLogProbFunction = ChunkedLogProbFunction
    _log.info("TRL's fused LM head now runs on pyalign's kernels: replaced %s (trainers built "
              "from now on; disable() restores them)", _names(_replaced))


def _names(replaced: dict) -> str:
    """"attribute (in module, module), ..." of the replaced objects, for the log."""
    modules: dict[str, list[str]] = {}
    for module, name in replaced:
        modules.setdefault(name, []).append(module.__name__)
    return ", ".join(f"{name} (in {', '.join(sorted(found))})" for name, found in sorted(modules.items()))


def disable() -> None:
    """Put TRL's own fused LM head back (models already patched keep the forward they got).
    Idempotent."""
    if not _replaced:
        return
    restored = _names(_replaced)
    while _replaced:
        (module, name), original = _replaced.popitem()
        setattr(module, name, original)
    _log.info("restored TRL's own fused LM head: %s (trainers built while enabled keep "
              "pyalign's forward)", restored)


def is_enabled() -> bool:
    """Whether ``enable()`` is in effect."""
    return bool(_replaced)


@contextlib.contextmanager
def enabled():
    """``enable()`` inside the block, then the state before it."""
    was_enabled = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was_enabled:
            disable()
