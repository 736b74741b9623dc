"""linear_preference_loss: the preference losses of pyalign/ops/preference.py straight from the
policy's last hidden state, never holding the [2B·T, V] logits: in 3 matmuls
(pyalign/ops/_fused_head.py) when the loss is a scalar with a gradient to come, else per-token
log-probs (linear_token_logprobs) then token_preference_loss's own tail.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from pyalign import backends, losses
from pyalign._utils import accumulation_dtype
from pyalign.eager.logprobs import log_sum_sq_probs
from pyalign.ops import _checks, _fused_head, _vocab_parallel
from pyalign.ops._loss_options import check_loss_spec, check_reference, check_token_options
from pyalign.ops.linear_logprobs import linear_token_logprobs
from pyalign.ops.preference import PreferenceLossOutput, token_level_loss

# The no-grad log Σ p² pass (WPO's weights on the recompute path): logits per chunk, in
# elements (16 MiB of fp32).
LOG_SUM_SQ_CHUNK_ELEMENTS = 1 << 22


def linear_preference_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                           bias: Optional[torch.Tensor] = None,
                           ref_logps: Optional[torch.Tensor] = None,
                           ref_hidden: Optional[torch.Tensor] = None,
                           ref_weight: Optional[torch.Tensor] = None,
                           ref_bias: Optional[torch.Tensor] = None,
                           loss: Union[str, Sequence[str]] = "sigmoid",
                           loss_weights: Optional[Sequence[float]] = None, beta: float = 0.1,
                           label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
                           f_alpha_divergence_coef: float = 0.5,
                           simpo_gamma: float = losses.SIMPO_GAMMA, ld_alpha: Optional[float] = None,
                           use_weighting: bool = False, ignore_index: int = -100,
                           average_log_prob: bool = False, temperature: float = 1.0,
                           head_dtype: Optional[torch.dtype] = None,
                           reduction: str = "mean", chunk_size: Optional[int] = None,
                           backend: str = "auto", process_group=None) -> PreferenceLossOutput:
    """The fused path from the policy's last hidden state to a preference loss.

    hidden: [2B, T, H], chosen rows first then rejected; weight: the lm_head [V, H]; labels:
    [2B, T], already aligned with hidden (labels[i, t] is the token predicted from hidden[i, t]),
    ``ignore_index`` on prompt and padding positions. The reference is either precomputed
    sequence log-probs ``ref_logps`` [2B] (same order) or ``ref_hidden`` with the reference's
    head ``ref_weight`` (required: pass ``weight`` if the reference shares the policy's head;
    + ``ref_bias``), evaluated without gradient; no gradient flows to the reference. The
    reference-free losses (simpo, cpo, orpo, sft, and lists of them) need neither: then no
    reference is scored at all. Loss options as ``token_preference_loss`` (``use_weighting``
    computes log Σ p² of the policy head itself).
    ``average_log_prob=True`` length-normalises every loss's log-probs. ``chunk_size``: tokens
    whose logits exist at once. No [2B*T, V] logits are ever held. ``head_dtype``: the fp32
    head of ``linear_token_logprobs`` (a float32 ``weight`` with a bf16 / fp16 ``hidden``, or
    ``head_dtype=torch.float32``), for the reference's head too.

    Cost. With ``reduction`` "mean"/"sum" and a gradient wanted, the loss runs in 3 matmuls
    (pyalign/ops/_fused_head.py): per chunk of whole pairs (about ``chunk_size`` kept tokens, at
    least one pair) the logits, the loss and its gradient are computed in the forward, only the
    kept tokens enter the matmuls, and backward just scales the stored gradients; memory is one
    chunk's logits plus gradient buffers of hidden's and W's (fp32) size. sft, a mean over the
    whole batch's chosen tokens, is known up to that token count, so each chunk takes its pairs'
    share (not with ``use_weighting``). The batch-level losses that sort the batch (aot,
    aot_unpaired), sft with WPO weights, ``reduction="none"``, no-grad calls and torch.compile
    take the recompute path instead: per-token log-probs (linear_token_logprobs, which recomputes
    the logits in backward: 4 matmuls) then the loss.

    ``process_group``: the vocab-parallel head, as in ``linear_token_logprobs``: ``weight``,
    ``bias``, ``ref_weight`` and ``ref_bias`` are this rank's vocabulary rows (the reference
    sharded like the policy), everything else is the same on every rank, and every rank returns
    the same loss; its weight gradients are its shard's.
    """
    with _vocab_parallel.ShardChecks(process_group, "process_group") as shard_checks:
        spec = check_loss_spec(loss, loss_weights, beta, label_smoothing, reduction, f_divergence,
                                f_alpha_divergence_coef, simpo_gamma)
        _checks.check_tensor("hidden", hidden, floating=True)
        if hidden.dim() != 3 or hidden.shape[0] % 2 or hidden.shape[-1] == 0:
            raise ValueError(f"hidden must be [2B, T, H] with chosen rows first and H > 0, got shape "
                             f"{tuple(hidden.shape)}")
        if ref_logps is not None and ref_hidden is not None:
            raise ValueError("give exactly one of ref_logps (precomputed [2B]) or ref_hidden")
        check_reference(spec, ref_logps is not None or ref_hidden is not None,
                        "ref_logps (precomputed [2B]) or ref_hidden")
        ignore_index = _checks.check_int("ignore_index", ignore_index)
        temperature = _checks.check_temperature(temperature)
        chunk_size = _checks.check_optional_positive_int("chunk_size", chunk_size)
        average_log_prob = _checks.check_bool("average_log_prob", average_log_prob)
        ld_alpha, use_weighting = check_token_options(spec, ld_alpha, use_weighting, average_log_prob)
        head_dtype = _checks.check_head_dtype(head_dtype)
        _check_linear_inputs(hidden, weight, bias, labels, ref_logps, ref_hidden, ref_weight, ref_bias,
                             head_dtype)
        backends.check_name(backend)
    fused = (_fused_head.applies(reduction, hidden, weight, bias)
             and all(entry.batch_step is None or (entry.chunks and not use_weighting)
                     for entry, _, _ in spec.terms))
    # everything that decides the collectives a rank runs, or what they exchange
    shard = shard_checks.shard(weight, hidden, labels, ignore_index, agreed=dict(
        op="linear_preference_loss", fused=fused, use_weighting=use_weighting,
        reference="hidden" if ref_hidden is not None else "logps" if ref_logps is not None
        else "none", temperature=temperature,
        ignore_index=ignore_index, chunk_size=chunk_size, hidden_dtype=hidden.dtype,
        head_dtype=_checks.logits_dtype(hidden, weight, head_dtype),
        ref_head_dtype=None if ref_hidden is None else _checks.logits_dtype(ref_hidden, ref_weight,
                                                                            head_dtype)))
    hidden = _checks.head_hidden(hidden, weight, head_dtype)
    if ref_hidden is not None:
        ref_hidden = _checks.head_hidden(ref_hidden, ref_weight, head_dtype)
    if ref_logps is not None:
        ref_logps = ref_logps.detach()
    # A backend named for the per-token part (say "cpu") need not have a loss kernel: the tiny
    # [2B, T] reduction then runs on whatever "auto" picks.
    options = dict(ld_alpha=ld_alpha, average=average_log_prob,
                   backend=backends.backend_for("preference", backend))
    if fused:
        return _fused_linear_preference(hidden, weight, bias, labels, ref_logps, ref_hidden,
                                        ref_weight, ref_bias, spec, options, use_weighting,
                                        ignore_index, temperature, reduction, chunk_size, backend,
                                        shard)
    mask = labels != ignore_index
    head = dict(ignore_index=ignore_index, temperature=temperature, head_dtype=head_dtype,
                chunk_size=chunk_size, backend=backend, process_group=process_group)
    token_logps = linear_token_logprobs(hidden, weight, labels, bias=bias, **head)
    if ref_hidden is not None:
        with torch.no_grad():  # per-token [2B, T]: the fused kernel reduces it with the policy's
            ref_logps = linear_token_logprobs(ref_hidden, ref_weight, labels, bias=ref_bias, **head)
    sum_sq = None
    if use_weighting and shard is None:
        sum_sq = linear_log_sum_sq_probs(hidden, weight, bias, mask, temperature, chunk_size)
    elif use_weighting:  # the whole vocabulary's log Σ p²: the head's metric, combined
        with torch.no_grad():
            sum_sq = linear_token_logprobs(hidden, weight, labels, bias=bias,
                                           outputs=("log_sum_sq_probs",), **head).log_sum_sq_probs
    return token_level_loss(token_logps, mask, ref_logps, spec, log_sum_sq_probs=sum_sq,
                             reduction=reduction, **options)


def _fused_linear_preference(hidden, weight, bias, labels, ref_logps, ref_hidden, ref_weight,
                             ref_bias, spec, options, use_weighting, ignore_index, temperature,
                             reduction, chunk_size, backend, shard) -> PreferenceLossOutput:
    """linear_preference_loss in 3 matmuls: chunks of whole pairs, each chunk's per-pair losses by
    ``_token_level_loss`` itself (the recompute path's code), differentiated in the forward; a
    batch mean (sft) takes the whole batch's pairs and chosen tokens."""
    pairs = hidden.shape[0] // 2
    index = torch.arange(pairs, device=hidden.device)
    unit_rows = torch.stack([index, index + pairs], dim=1)  # chunk rows: chosen, then rejected
    chosen_tokens = (labels[:pairs] != ignore_index).sum().to(accumulation_dtype(hidden.dtype))

    def chunk_loss(rows, token_logps, mask, ref_tokens, sum_sq):
        ref = ref_tokens if ref_tokens is not None else (None if ref_logps is None
                                                         else ref_logps[rows])
        out = token_level_loss(token_logps, mask, ref, spec, log_sum_sq_probs=sum_sq,
                                reduction="none", whole_batch=(pairs, chosen_tokens), **options)
        return out.loss, (out.chosen_rewards, out.rejected_rewards)

    reference = None if ref_hidden is None else _fused_head.ReferenceHead(ref_hidden, ref_weight,
                                                                          ref_bias)
    plan = _fused_head.FusedHeadPlan(labels, unit_rows, chunk_loss, reduction, ignore_index,
                                     temperature, chunk_size, backend, reference, use_weighting,
                                     vocab_shard=shard)
    loss, chosen_rewards, rejected_rewards = _fused_head.fused_head_loss(hidden, weight, bias, plan)
    return PreferenceLossOutput(loss, chosen_rewards, rejected_rewards,
                                chosen_rewards - rejected_rewards)


def _check_linear_inputs(hidden, weight, bias, labels, ref_logps, ref_hidden, ref_weight,
                         ref_bias, head_dtype) -> None:
    """Every tensor of linear_preference_loss, named as the caller named it, before the policy's
    forward runs (the inner linear_token_logprobs calls would name the reference's "weight")."""
    _checks.check_tensor("weight", weight, floating=True)
    _checks.check_tensor("labels", labels, integer=True)
    if bias is not None:
        _checks.check_tensor("bias", bias, floating=True)
    _checks.check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    _checks.check_shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1], [2B, T]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    vocab_and_hidden = tuple(weight.shape)
    if bias is not None:
        _checks.check_shape("bias", bias, (weight.shape[0],), "[V]")
    _checks.check_head_dtypes(hidden, weight, bias, head_dtype)
    if ref_logps is not None:
        _checks.check_tensor("ref_logps", ref_logps, floating=True)
        _checks.check_same_device(hidden=hidden, ref_logps=ref_logps)
        _checks.check_shape("ref_logps", ref_logps, (hidden.shape[0],), "[2B], chosen rows first")
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight / ref_bias are given with ref_logps (the precomputed "
                             "reference log-probs need no head); give ref_hidden with them instead")
        return
    if ref_hidden is None:  # a reference-free loss
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight / ref_bias are given without ref_hidden: the reference "
                             "head scores ref_hidden; give it, or neither for a reference-free loss")
        return
    _checks.check_tensor("ref_hidden", ref_hidden, floating=True)
    _checks.check_shape("ref_hidden", ref_hidden, hidden.shape, "hidden.shape")
    if ref_weight is None:
        raise ValueError("ref_hidden given without ref_weight: the reference model's lm_head [V, H] "
                         "is required (pass weight itself if the reference shares the policy's "
                         "head; it is never taken from the policy silently)")
    _checks.check_tensor("ref_weight", ref_weight, floating=True)
    if ref_weight.dim() != 2 or ref_weight.shape != vocab_and_hidden:
        raise ValueError(f"ref_weight must be [V, H] = {vocab_and_hidden} like weight, got "
                         f"{tuple(ref_weight.shape)}")
    if ref_bias is not None:
        _checks.check_tensor("ref_bias", ref_bias, floating=True)
        _checks.check_shape("ref_bias", ref_bias, (ref_weight.shape[0],), "[V]")
    _checks.check_head_dtypes(ref_hidden, ref_weight, ref_bias, head_dtype, hidden_name="ref_hidden",
                              weight_name="ref_weight", bias_name="ref_bias")
    _checks.check_same_device(hidden=hidden, ref_hidden=ref_hidden, ref_weight=ref_weight,
                              ref_bias=ref_bias)


@torch.no_grad()
def linear_log_sum_sq_probs(hidden: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                            temperature: float = 1.0, chunk_size: Optional[int] = None) -> torch.Tensor:
    """``log_sum_sq_probs`` of the head's logits hidden·Wᵀ (+ b) per token [..., ] (fp32; 0 where
    ``mask`` is False), in a no-grad pass over chunks of the kept tokens: at most chunk x V logits
    at a time, never [N, V]. It reads W once more than the log-prob kernel; a later issue fuses
    it into the streaming log-prob kernel."""
    kept = torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device) if mask is None \
        else mask != 0
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    rows = kept.reshape(-1).nonzero().squeeze(-1)
    out = torch.zeros(flat_hidden.shape[0], dtype=torch.float32, device=hidden.device)
    chunk = chunk_size or max(1, LOG_SUM_SQ_CHUNK_ELEMENTS // max(weight.shape[0], 1))
    for start in range(0, rows.numel(), chunk):
        index = rows[start:start + chunk]
        out[index] = log_sum_sq_probs(_fused_head.head_logits(flat_hidden[index], weight, bias),
                                      temperature)
    return out.view(kept.shape)
