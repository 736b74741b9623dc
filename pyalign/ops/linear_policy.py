"""linear_policy_loss: policy_loss (the GRPO-family and RLOO losses) straight from the policy's last
hidden state, in 3 matmuls, never holding the [B·T, V] logits.

The fused-head version of ``policy_loss(linear_token_logprobs(...), ...)``: the same loss, metrics
and gradients (to hidden, weight and bias), computed per chunk of whole sequences by
pyalign/ops/_fused_head.py. Each sequence's loss is a complete contribution because the
normalisers (losses.POLICY_NORMALISATIONS: the batch's row and token counts, B·max_completion_length,
num_items_in_batch) and the entropy bonus's token count come from the whole batch's labels before
the chunk loop (policy.loss_weights); the loss is then the sum of the sequences' losses. The
per-token entropy comes from the same pass over each chunk's logits and, with entropy_coef != 0,
its gradient goes back through the head with the log-probs'. docs/algorithms.md, "Policy loss
from hidden states".
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from pyalign import backends
from pyalign._utils import accumulation_dtype
from pyalign.ops import _checks, _fused_head, _vocab_parallel
from pyalign.ops.linear_logprobs import linear_token_logprobs
from pyalign.ops.policy import (
    PolicyLossFunction,
    PolicyLossOutput,
    check_advantages,
    check_options,
    policy_loss,
)

# The loss options: policy_loss's keyword arguments (and their defaults) but the per-token tensors,
# which come from the head here, and the backend, named once for both.
POLICY_OPTIONS = {name: parameter.default
                  for name, parameter in inspect.signature(policy_loss).parameters.items()
                  if parameter.kind is inspect.Parameter.KEYWORD_ONLY
                  and name not in ("ref_logprobs", "rollout_logprobs", "entropy", "backend")}


def _check_inputs(hidden, weight, bias, labels, advantages, old_logps, ref_logps,
                  rollout_logprobs, head_dtype):
    _checks.check_tensor("hidden", hidden, floating=True)
    if hidden.dim() != 3 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must be [B, T, H] with H > 0, got shape {tuple(hidden.shape)}")
    _checks.check_tensor("weight", weight, floating=True)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, H] with V > 0 and H = hidden.shape[-1] = "
                         f"{hidden.shape[-1]}, got {tuple(weight.shape)}")
    if bias is not None:
        _checks.check_tensor("bias", bias, floating=True)
        _checks.check_shape("bias", bias, (weight.shape[0],), "[V]")
    _checks.check_head_dtypes(hidden, weight, bias, head_dtype)
    _checks.check_tensor("labels", labels, integer=True)
    shape = tuple(hidden.shape[:2])
    _checks.check_shape("labels", labels, shape, "hidden.shape[:2], [B, T]")
    _checks.check_tensor("advantages", advantages, floating=True)
    check_advantages(advantages, shape)
    for name, tensor in (("old_logps", old_logps), ("ref_logps", ref_logps),
                         ("rollout_logprobs", rollout_logprobs)):
        if tensor is not None:
            _checks.check_tensor(name, tensor, floating=True)
            _checks.check_shape(name, tensor, shape, "labels.shape, [B, T] per token")
    _checks.check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels,
                              advantages=advantages, old_logps=old_logps, ref_logps=ref_logps,
                              rollout_logprobs=rollout_logprobs)


def linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       advantages: torch.Tensor, old_logps: Optional[torch.Tensor] = None,
                       ref_logps: Optional[torch.Tensor] = None, *,
                       rollout_logprobs: Optional[torch.Tensor] = None,
                       bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                       temperature: float = 1.0, softcap: Optional[float] = None,
                       logit_scale: float = 1.0, head_dtype: Optional[torch.dtype] = None,
                       chunk_size: Optional[int] = None,
                       backend: str = "auto", process_group=None, **options) -> PolicyLossOutput:
    """The policy-gradient loss of ``policy_loss`` from the last hidden state (a PolicyLossOutput).

    hidden: [B, T, H] at the completion positions; weight: the lm_head [V, H] (+ ``bias`` [V]);
    labels: [B, T], the sampled tokens, ``ignore_index`` where masked (the loss mask is
    labels != ignore_index); advantages: [B] or [B, T]; old_logps: [B, T] per-token log-probs of
    the sampling policy (None: on-policy, ratio 1); ref_logps: [B, T] the reference's (None: no KL
    term; needed for beta > 0); rollout_logprobs: [B, T] the sampler's, for policy_loss's rollout
    correction (its ``vllm_importance_sampling_*`` and ``off_policy_mask_threshold`` options).
    Gradients flow to hidden, weight and bias only. The head: ``temperature``, ``softcap``,
    ``logit_scale`` and ``head_dtype`` (the fp32 head: a float32 ``weight`` with a bf16 / fp16
    ``hidden``, or ``head_dtype=torch.float32``) as in linear_token_logprobs.
    ``process_group``: the vocab-parallel head, as in ``linear_token_logprobs``: ``weight`` and
    ``bias`` are this rank's vocabulary rows, everything else is the same on every rank, and every
    rank returns the same loss and metrics; its weight gradients are its shard's.

    ``options``: every keyword option of policy_loss, by its name and with its default
    (``loss_type`` "grpo", ``beta``, ``epsilon``, ``epsilon_high``, ``delta``,
    ``importance_sampling_level``, ``entropy_coef``, ``top_entropy_quantile``,
    ``max_completion_length``, ``num_items_in_batch``, ...: POLICY_OPTIONS). The per-token
    entropies are always computed (``mean_entropy`` is reported, as TRL logs it); with
    ``entropy_coef`` != 0 the bonus's gradient flows through the head.

    Cost. With a gradient wanted, the loss runs in 3 matmuls of the kept tokens
    (pyalign/ops/_fused_head.py): per chunk of whole sequences (about ``chunk_size`` kept tokens,
    at least one sequence) the logits, the log-probs and entropies, the loss and its gradient are
    computed in the forward; backward scales the stored gradients. Memory: one chunk's logits plus
    gradient buffers of hidden's and W's (fp32) size. ``top_entropy_quantile`` < 1 (its threshold
    is a quantile of the whole batch's entropies), a ``softcap`` or ``logit_scale`` != 1, no-grad
    calls and torch.compile take the recompute path instead: linear_token_logprobs (4 matmuls,
    the logits recomputed in backward) then policy_loss. Both give the same numbers.
    """
    with _vocab_parallel.ShardChecks(process_group, "process_group") as shard_checks:
        unknown = sorted(set(options) - set(POLICY_OPTIONS))
        if unknown:
            raise TypeError(f"linear_policy_loss got unknown option(s) {unknown}; the loss options are "
                            f"policy_loss's: {sorted(POLICY_OPTIONS)}")
        head_dtype = _checks.check_head_dtype(head_dtype)
        _check_inputs(hidden, weight, bias, labels, advantages, old_logps, ref_logps,
                      rollout_logprobs, head_dtype)
        checked = check_options(ref_logps is not None, True, rollout_logprobs is not None,
                                ref_name="ref_logps", **{**POLICY_OPTIONS, **options})
        ignore_index = _checks.check_int("ignore_index", ignore_index)
        temperature = _checks.check_temperature(temperature)
        chunk_size = _checks.check_optional_positive_int("chunk_size", chunk_size)
        backends.check_name(backend)
    fused = (_fused_head.applies("sum", hidden, weight, bias) and checked.top_entropy_quantile == 1
             and softcap is None and logit_scale == 1)
    # everything that decides the collectives a rank runs, or what they exchange
    shard = shard_checks.shard(weight, hidden, labels, ignore_index, agreed=dict(
        op="linear_policy_loss", fused=fused, temperature=temperature, softcap=softcap,
        logit_scale=logit_scale, ignore_index=ignore_index, chunk_size=chunk_size,
        hidden_dtype=hidden.dtype, head_dtype=_checks.logits_dtype(hidden, weight, head_dtype)))
    hidden = _checks.head_hidden(hidden, weight, head_dtype)
    # A backend named for the head (linear_logprobs) need not have a policy kernel: the [B, T]
    # loss then runs on whatever "auto" picks.
    loss_backend = backends.backend_for("policy", backend)
    if fused:
        return _fused_linear_policy(hidden, weight, bias, labels, advantages, old_logps, ref_logps,
                                    rollout_logprobs, checked, ignore_index, temperature,
                                    chunk_size, backend, loss_backend, shard)
    token_logps, entropy = linear_token_logprobs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature,
        entropy=True, softcap=softcap, logit_scale=logit_scale, head_dtype=head_dtype,
        chunk_size=chunk_size, backend=backend, process_group=process_group)
    return policy_loss(token_logps, old_logps, advantages, labels != ignore_index,
                       ref_logprobs=ref_logps, rollout_logprobs=rollout_logprobs, entropy=entropy,
                       backend=loss_backend, **options)


def _fused_linear_policy(hidden, weight, bias, labels, advantages, old_logps, ref_logps,
                         rollout_logps, checked, ignore_index, temperature, chunk_size, backend,
                         loss_backend, shard):
    """linear_policy_loss in 3 matmuls: units are single sequences; each chunk's per-row losses
    come from policy_loss's own PolicyLossFunction with the batch-global weights, its rollout
    correction from the chunk's rows (every piece of it is row-local)."""
    dtype = accumulation_dtype(hidden, old_logps, ref_logps)  # the chunk log-probs' dtype
    mask = labels != ignore_index
    row_weights, entropy_weight = checked.weights(mask, None, dtype)
    config = checked.config(loss_backend)
    advantages = advantages.detach().contiguous()
    old_logps = None if old_logps is None else old_logps.detach()
    ref_logps = None if ref_logps is None else ref_logps.detach()
    rollout_logps = None if rollout_logps is None else rollout_logps.detach()

    def chunk_loss(rows, token_logps, chunk_mask, _ref_tokens, _log_sum_sq, entropy):
        old = token_logps.detach() if old_logps is None else old_logps[rows].contiguous()
        ref = None if ref_logps is None else ref_logps[rows].contiguous()
        chunk_advantages, chunk_mask = advantages[rows].contiguous(), chunk_mask.contiguous()
        *corrections, rollout_stats = checked.corrections(
            token_logps.detach(), old, None if rollout_logps is None else rollout_logps[rows],
            chunk_advantages, chunk_mask)
        row_losses, stats = PolicyLossFunction.apply(
            token_logps, entropy, old, chunk_advantages, chunk_mask, None, ref, tuple(corrections),
            row_weights[rows].contiguous(), entropy_weight, config)
        return row_losses, (stats,) + (() if rollout_stats is None else (rollout_stats,))

    unit_rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    plan = _fused_head.FusedHeadPlan(labels, unit_rows, chunk_loss, "sum", ignore_index,
                                     temperature, chunk_size, backend, with_entropy=True,
                                     vocab_shard=shard)
    loss, stats, *rollout_stats = _fused_head.fused_head_loss(hidden, weight, bias, plan)
    return checked.output(loss, row_weights, stats, advantages, ref_logps is not None, True,
                          rollout_stats[0] if rollout_stats else None)
