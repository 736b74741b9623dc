"""Per-token log-probs from any Hugging Face causal LM through pyalign's fused head.

    from pyalign.integrations.transformers import causal_lm_logprobs
    out = causal_lm_logprobs(model, input_ids, attention_mask=attention_mask, entropy=True)
    out.logprobs, out.entropy, out.mask                                  # each [B, T-1]

The model's decoder runs as usual; its last hidden state and the output embedding's weight go to
``pyalign.linear_token_logprobs``, so the ``[B, T, V]`` logits are never built. Everything is
found generically (``base_model`` for the decoder, ``get_output_embeddings()`` for the head, the
config for the head's options), never per architecture:

- ``final_logit_softcapping`` (Gemma 2/3) is the soft-cap; ``logit_scale`` (Cohere),
  ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1) multiply the logits and
  ``logits_scaling`` (Granite, MiniCPM3) divides them (HyperCLOVA X multiplies): TRL 1.16's
  ``add_fused_lm_head`` reads the same attributes in the same order; the head's bias is used;
- a PEFT model works (LoRA on the head too: its delta ``B @ A * scaling`` is added to the weight,
  so the gradient reaches the adapter); prompt-learning adapters, DoRA and a head adapter with
  active dropout in training are refused;
- packed rows (``position_ids`` restarting at 0 at each sequence) score each sequence as if
  alone (pyalign/integrations/packing.py);
- FSDP2 (``fully_shard``): the model is called through its own ``__call__`` so the FSDP hooks
  unshard and reshard as in a normal forward; a head weight still sharded as a ``DTensor`` is
  gathered with ``full_tensor()`` (its gradient is reduce-scattered back).

A head the fused kernel cannot reproduce exactly (a head module that is not ``nn.Linear``, or a
config attribute known to change the logits that it cannot express) raises
``UnsupportedHeadError`` instead of returning a different number.

``add_fused_lm_head(model)`` patches ``model.forward`` so ``model(..., labels=labels,
fused_lm_head=True)`` returns a ``FusedCausalLMOutput`` with the fields of TRL 1.16's, computed
on pyalign's kernels (``pyalign.integrations.trl.enable()`` installs it inside TRL).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from typing import NamedTuple, Optional

import torch
from torch import nn
from transformers.utils import ModelOutput

from pyalign import backends
from pyalign.integrations import packing
from pyalign.ops import _checks
from pyalign.ops.linear_logprobs import linear_token_logprobs

# Config attributes that change the logits in a way no option here expresses: refuse them.
# MiniCPM (remote code) divides the hidden state by hidden_size / dim_model_base before the head.
_UNSUPPORTED_HEAD_ATTRIBUTES = ("dim_model_base",)
_OUTPUT_NAMES = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


class UnsupportedHeadError(ValueError):
    """The model's output head is one the fused kernel cannot reproduce exactly."""


class CausalLMLogprobs(NamedTuple):
    """What ``causal_lm_logprobs`` returns, each ``[B, T-1]``: ``logprobs`` of the next-token
    labels (0 where masked), ``entropy`` of the next-token distribution (None unless asked for,
    0 where masked) and ``mask`` (bool: the label is not ``ignore_index``)."""

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]
    mask: torch.Tensor


@dataclasses.dataclass
class FusedCausalLMOutput(ModelOutput):
    """The fields of TRL 1.16's ``FusedCausalLMOutput`` (same names and meaning): ``loss`` (the
    mean NLL over labelled tokens, or summed / ``num_items_in_batch``, plus the MoE aux loss),
    per-token ``log_probs``, ``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1`` (0 /
    False where the label is ``-100``, None when not asked for), ``label_mask`` and ``aux_loss``."""

    loss: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None


class HeadOptions(NamedTuple):
    """The head's transform read from the config: softcap (None or > 0) and logit_scale."""

    softcap: Optional[float]
    logit_scale: float


def head_options(config) -> HeadOptions:
    """The soft-cap and logit scale a model's config asks for (TRL 1.16's reading of it)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _UNSUPPORTED_HEAD_ATTRIBUTES:
        if getattr(text_config, name, None) is not None:
            raise UnsupportedHeadError(
                f"the model's config sets {name}={getattr(text_config, name)!r}, which changes the "
                "logits in a way the fused head cannot reproduce")
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text_config, name, None)
        if scale is not None:
            break
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        divisor = text_config.logits_scaling
        # HyperCLOVA X multiplies by logits_scaling; Granite and MiniCPM3 divide by it.
        scale = divisor if getattr(text_config, "model_type", None) == "hyperclovax" else 1 / divisor
    scale = 1.0 if scale is None else float(scale)
    if not scale > 0 or scale == float("inf"):
        raise UnsupportedHeadError(f"the model's logit scale is {scale}; the fused head takes a "
                                   "finite scale > 0")
    if softcap is not None and not softcap > 0:
        raise UnsupportedHeadError(f"the model's final_logit_softcapping is {softcap}; the fused "
                                   "head takes None or a finite number > 0")
    return HeadOptions(None if softcap is None else float(softcap), scale)


def _full(tensor):
    """A DTensor (an FSDP2 shard) gathered whole, differentiably; anything else unchanged."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return tensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _lora_head_weight(head, training: bool):
    """weight, bias of a peft LoRA ``Linear`` head: the base weight plus each active adapter's
    delta (through peft's own ``get_delta_weight``, so the adapter gets its gradient)."""
    base = head.get_base_layer()
    if type(base) is not nn.Linear:
        raise UnsupportedHeadError(f"the LoRA head wraps a {type(base).__name__}, not nn.Linear")
    weight = _full(base.weight)
    if getattr(head, "merged", False):  # the adapters are already inside base.weight
        return weight, (None if base.bias is None else _full(base.bias))
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if head.use_dora.get(name, False):
            raise UnsupportedHeadError(f"the head's adapter {name!r} uses DoRA, which the fused "
                                       "head does not reproduce")
        if getattr(head, "lora_bias", {}).get(name, False):
            raise UnsupportedHeadError(f"the head's adapter {name!r} has a LoRA bias, which the "
                                       "fused head does not reproduce")
        dropout = head.lora_dropout[name]
        if training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            raise UnsupportedHeadError(
                f"the head's adapter {name!r} has lora_dropout={dropout.p} and the model is "
                "training: dropout on the head's input cannot go through the fused head (use "
                "lora_dropout=0 for the head, or leave lm_head out of target_modules)")
        weight = weight + head.get_delta_weight(name).to(weight.dtype)
    return weight, (None if base.bias is None else _full(base.bias))


def head_weight(model):
    """(weight [V, H], bias [V] or None) of ``model``'s output embedding, or UnsupportedHeadError."""
    head = model.get_output_embeddings()
    if head is None:
        raise UnsupportedHeadError(f"{type(model).__name__}.get_output_embeddings() is None: the "
                                   "model has no output head to fuse")
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # peft is optional
        LoraLinear = ()
    if LoraLinear and isinstance(head, LoraLinear):
        return _lora_head_weight(head, model.training)
    # Exactly nn.Linear: a subclass may override forward with anything.
    if type(head) is not nn.Linear:
        raise UnsupportedHeadError(
            f"the model's output head is a {type(head).__module__}.{type(head).__name__}, not "
            "torch.nn.Linear: the fused head reproduces only a linear head")
    return _full(head.weight), (None if head.bias is None else _full(head.bias))


def _unwrap_peft(model):
    """The transformers model inside a PEFT wrapper (its modules carry the adapters)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        config = model.peft_config.get(getattr(model, "active_adapter", None))
        if config is not None and getattr(config, "is_prompt_learning", False):
            raise UnsupportedHeadError(f"prompt-learning PEFT adapters ({config.peft_type}) change "
                                       "the inputs; causal_lm_logprobs supports LoRA-style adapters")
        return model.get_base_model()
    return model


def backbone(model):
    """The decoder of a causal LM: ``base_model`` (the module named by base_model_prefix)."""
    decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        raise UnsupportedHeadError(f"{type(model).__name__} exposes no decoder through base_model "
                                   f"(base_model_prefix={getattr(model, 'base_model_prefix', None)!r})")
    return decoder


def check_head(model) -> None:
    """Raise UnsupportedHeadError unless the fused head reproduces the causal LM ``model``'s
    logits exactly (its config's head options, a linear head, a decoder behind base_model)."""
    head_options(model.config)
    head_weight(model)
    backbone(model)


_FP32_HEAD_OPERANDS = (torch.float32, torch.bfloat16, torch.float16)


def _match_dtypes(hidden, weight, bias, head_dtype):
    """hidden, weight and bias as the model's own head matmul would run them: with
    ``head_dtype=torch.float32`` (TRL's cast_lm_head_to_fp32) in fp32, the op upcasting a bf16 /
    fp16 operand itself (no fp32 copy of the weight); under autocast in its dtype; else a float32
    head (TRL's cast) keeps a bf16 / fp16 hidden state as it is, and any other head takes the
    hidden state in its weight's dtype."""
    if head_dtype is torch.float32:
        def fp32_operand(tensor):
            return tensor if tensor is None or tensor.dtype in _FP32_HEAD_OPERANDS else tensor.float()
        return fp32_operand(hidden), fp32_operand(weight), fp32_operand(bias)
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    elif weight.dtype == torch.float32 and hidden.dtype in (torch.bfloat16, torch.float16):
        return hidden, weight, None if bias is None else bias.float()
    else:
        dtype = weight.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def score_hidden(model, hidden, labels, mask, *, temperature, outputs, backend, head_dtype=None):
    """Per-token outputs (``_OUTPUT_NAMES`` order, None where not in ``outputs``) of the
    causal LM ``model``'s head on ``hidden`` [B, T', H] against ``labels`` [B, T'] where ``mask``
    (0 elsewhere); only the masked-in positions reach the kernel. ``head_dtype=torch.float32``:
    the head in fp32, outside autocast (linear_token_logprobs's fp32 head). The one place the
    head's weight and options are read (causal_lm_logprobs, add_fused_lm_head, pyalign's
    trainers)."""
    options = head_options(model.config)
    weight, bias = head_weight(model)
    hidden = hidden.to(weight.device)
    mask = mask.to(weight.device)
    autocast = (torch.autocast(hidden.device.type, enabled=False) if head_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        hidden, weight, bias = _match_dtypes(hidden, weight, bias, head_dtype)
        result = linear_token_logprobs(
            hidden[mask], weight, labels.to(weight.device)[mask], bias=bias,
            temperature=temperature, softcap=options.softcap, logit_scale=options.logit_scale,
            head_dtype=head_dtype,
            outputs=tuple(name for name in outputs if name != "log_probs"), backend=backend)
    # masked_scatter keeps the graph connected when no position is labelled (a zero gradient).
    return tuple(None if value is None else value.new_zeros(mask.shape).masked_scatter(mask, value)
                 for value in result)


@contextlib.contextmanager
def _forward_replaced(module, forward):
    """``module.forward`` is ``forward`` inside the block (so ``module(...)`` runs the hooks FSDP,
    accelerate and peft put on the module around it), restored after."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


def causal_lm_logprobs(model, input_ids: torch.Tensor, *, labels: Optional[torch.Tensor] = None,
                       attention_mask: Optional[torch.Tensor] = None,
                       position_ids: Optional[torch.Tensor] = None, entropy: bool = False,
                       temperature: float = 1.0, ignore_index: int = -100,
                       head_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                       **model_kwargs) -> CausalLMLogprobs:
    """Next-token log-probs ``[B, T-1]`` of a Hugging Face causal LM, through the fused head.

    ``input_ids`` [B, T]. ``labels`` [B, T] in the transformers convention (unshifted: position t
    labels the prediction made at t-1; ``ignore_index`` masks); by default ``input_ids`` with the
    padding (``attention_mask == 0``) masked. Given labels are used as given, except where
    ``position_ids`` is 0. ``temperature`` divides the logits (after the model's own soft-cap and
    scale), as TRL's trainers do. ``model_kwargs`` go to the model's decoder. Returns
    ``CausalLMLogprobs(logprobs, entropy, mask)``; log-probs and entropy carry gradients to the
    model's parameters. Equals ``log_softmax(model(...).logits[:, :-1] / temperature)`` gathered
    at the labels, without ever holding those logits.

    ``head_dtype=torch.float32``: the head in fp32 for this call, outside autocast (TRL's
    ``cast_lm_head_to_fp32``; the model's parameters stay as they are): every logit is an fp32
    product of the upcast hidden state and head (``linear_token_logprobs``'s fp32 head), the
    gradients reach hidden state and head in their own dtypes. A head already cast to float32
    (as TRL's trainers cast it) runs as an fp32 head of the model's bf16 / fp16 hidden states
    without it, unless autocast is on.

    ``position_ids`` [B, T] (or [1, T]) may pack several sequences into a row, each starting at
    position 0 (TRL's padding-free batches): a token at position 0 is never a label, and each
    sequence's log-probs are those it has alone in its own row. The attention is kept inside each
    sequence by the model's attention implementation (pyalign/integrations/packing.py, read
    against transformers 5.25): sdpa and eager get a block-diagonal causal mask built here from
    ``position_ids`` (transformers' own packed detection, which 5.x applies only without an
    attention mask and a cache, is not relied on); flash attention gets the rows flattened into
    one, whose varlen kernel (transformers >= 4.44) starts a sequence at each position 0; any
    other implementation raises ValueError, as do recurrent / linear-attention layer types and,
    on sdpa / eager, a sliding window shorter than a sequence.
    """
    _checks.check_tensor("input_ids", input_ids, integer=True)
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, T] with T >= 2, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        _checks.check_shape("attention_mask", attention_mask, input_ids.shape, "input_ids.shape")
    ignore_index = _checks.check_int("ignore_index", ignore_index)
    entropy = _checks.check_bool("entropy", entropy)
    temperature = _checks.check_temperature(temperature)
    head_dtype = _checks.check_head_dtype(head_dtype)
    backends.check_name(backend)
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(
            attention_mask == 0, ignore_index)
    else:
        _checks.check_tensor("labels", labels, integer=True)
        _checks.check_shape("labels", labels, input_ids.shape, "input_ids.shape")
    if position_ids is not None:
        position_ids = packing.check_position_ids(position_ids, input_ids)
        labels = packing.boundary_labels(labels, position_ids, ignore_index)
    next_labels = labels[:, 1:]
    mask = next_labels != ignore_index
    inner = _unwrap_peft(model)
    check_head(inner)  # refuse an unsupported head before the decoder runs
    decoder = packing.decoder_inputs(backbone(inner).config, input_ids, attention_mask, position_ids)
    outputs = ("log_probs", "entropy") if entropy else ("log_probs",)

    def fused_forward(*args, **kwargs):
        kwargs.pop("labels", None)  # peft's forward passes labels=None through
        hidden = decoder.restore(backbone(inner)(*args, **kwargs).last_hidden_state)[:, :-1]
        return score_hidden(inner, hidden, next_labels, mask, temperature=temperature, outputs=outputs,
                            backend=backend, head_dtype=head_dtype)

    with _forward_replaced(inner, fused_forward):
        result = model(**decoder.kwargs, use_cache=False, **model_kwargs)
    return CausalLMLogprobs(result[0], result[1], mask.to(result[0].device))


def _moe_aux_loss(text_config, backbone_outputs, attention_mask):
    """The MoE load-balancing loss the model's own forward adds (Mixtral's, which every MoE
    family in transformers uses)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or text_config.num_local_experts
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts,
                                    text_config.num_experts_per_tok, attention_mask)


def _patch_forward(model, *, temperature: float, cast_lm_head_to_fp32: bool,
                   outputs: tuple[str, ...], backend: str, output_class) -> None:
    """Install the fused forward on ``model`` (see ``add_fused_lm_head``), returning
    ``output_class`` (ours, or TRL's own class when installed from ``pyalign.integrations.trl``)."""
    temperature = _checks.check_temperature(temperature)
    backends.check_name(backend)
    outputs = tuple(outputs)
    unknown = [name for name in outputs if name not in _OUTPUT_NAMES]
    if unknown:
        raise ValueError(f"outputs must name fields among {_OUTPUT_NAMES}, got {unknown}")
    original_forward = model.forward
    text_config = model.config.get_text_config()
    head_options(model.config)  # refuse an unsupported head now, not at the first step

    # The original signature: generate() validates its model kwargs against it.
    @functools.wraps(type(model).forward)
    def fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                      num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        # Looked up on each call: FSDP and PEFT replace the decoder and the head after patching.
        backbone_outputs = backbone(self)(*args, **kwargs)
        hidden = backbone_outputs.last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = score_hidden(
            self, hidden, labels, mask, temperature=temperature, outputs=outputs, backend=backend,
            head_dtype=torch.float32 if cast_lm_head_to_fp32 else None)
        mask = mask.to(log_probs.device)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _moe_aux_loss(text_config, backbone_outputs, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return output_class(loss=loss, log_probs=log_probs, entropy=entropy,
                            log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits,
                            is_top1=is_top1,
                            label_mask=mask, aux_loss=aux_loss)

    # What remove_fused_lm_head restores: the instance's own forward, or None for the class's.
    model._pyalign_replaced_forward = (model.__dict__.get("forward"),)
    model.forward = types.MethodType(fused_forward, model)


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",), backend: str = "auto") -> None:
    """Patch ``model`` so ``model(..., labels=labels, fused_lm_head=True)`` returns a
    ``FusedCausalLMOutput`` computed by pyalign's fused head; without ``fused_lm_head`` the
    forward is the original (generation is unchanged). TRL 1.16's ``add_fused_lm_head``
    signature and semantics: ``temperature`` divides the logits, ``cast_lm_head_to_fp32`` runs
    the head in fp32 outside autocast (``head_dtype=torch.float32`` of ``causal_lm_logprobs``: a
    bf16 / fp16 hidden state and head are upcast by the kernel, never copied whole), ``outputs``
    names the per-token fields computed (among
    "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"; the rest are None);
    pre-shifted ``shift_labels`` are scored without shifting; ``num_items_in_batch`` divides the
    summed NLL. Add it before wrapping the model with PEFT. ``remove_fused_lm_head`` undoes it."""
    _patch_forward(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                   outputs=outputs, backend=backend, output_class=FusedCausalLMOutput)


def remove_fused_lm_head(model) -> None:
    """Restore the forward ``add_fused_lm_head`` replaced (a no-op on an unpatched model)."""
    replaced = model.__dict__.pop("_pyalign_replaced_forward", None)
    if replaced is None:
        return
    if replaced[0] is None:
        del model.forward
    else:
        model.forward = replaced[0]
