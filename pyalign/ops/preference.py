"""Preference losses: DPO and its relatives (names and numbers follow TRL 1.16's DPOTrainer), and
the reference-free SimPO, CPO and ORPO (its CPOTrainer and ORPOTrainer), which need no reference
log-probs. The path from the policy's last hidden state lives in
pyalign/ops/linear_preference.py, KTO (unpaired) in pyalign/ops/kto.py, the options every entry
point checks in pyalign/ops/_loss_options.py.

Per pair, with r_w = policy_chosen - ref_chosen, r_l = policy_rejected - ref_rejected and
h = r_w - r_l, the loss table of docs/algorithms.md. Implicit rewards reported: beta*r_w, beta*r_l
and the margin beta*h (detached: they are metrics). Family "preference" of pyalign/backends.py.

Every loss runs the same way (``_combined_losses``): the registry's ``pair_inputs`` (torch,
autograd: f-divergence scores, length normalisation, aot's sort, sft's token mean; the log-probs
as they are for a plain loss) feeds the backend's pair primitive with the entry's pair math; a
list of losses is the weighted sum of their per-pair losses. Entry points: ``preference_loss``
(sequence log-probs [B]) and ``token_preference_loss`` (per-token log-probs [2B, T]: ld_alpha and
WPO weighting), whose tail ``token_level_loss`` linear_preference_loss shares.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from pyalign import backends, losses
from pyalign._utils import accumulation_dtype
from pyalign.ops import _checks
from pyalign.ops._loss_options import (
    LossSpec,
    check_lengths,
    check_loss_spec,
    check_needs,
    check_reference,
    check_token_options,
    reduced,
)


class PreferenceLossOutput(NamedTuple):
    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor


@torch.library.custom_op("pyalign::preference_loss_fwd", mutates_args=())
def _preference_fwd(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, loss: str, beta: float,
                    label_smoothing: float, backend: str) -> torch.Tensor:
    impl = backends.implementation("preference", backend, policy_chosen, loss=loss)
    return impl.forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta,
                        label_smoothing)


@_preference_fwd.register_fake
def _(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta, label_smoothing, backend):
    acc = accumulation_dtype(policy_chosen.dtype)
    return policy_chosen.new_empty(policy_chosen.shape, dtype=acc)


@torch.library.custom_op("pyalign::preference_loss_bwd", mutates_args=())
def _preference_bwd(grad_losses: torch.Tensor, policy_chosen: torch.Tensor,
                    policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, loss: str, beta: float, label_smoothing: float,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = backends.implementation("preference", backend, policy_chosen, loss=loss)
    return tuple(impl.backward(grad_losses, policy_chosen, policy_rejected, ref_chosen,
                               ref_rejected, loss, beta, label_smoothing))


@_preference_bwd.register_fake
def _(grad_losses, policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta,
      label_smoothing, backend):
    return tuple(torch.empty_like(t) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))


class PreferenceLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta,
                label_smoothing, backend):
        ctx.save_for_backward(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        ctx.config = (loss, beta, label_smoothing, backend)
        return _preference_fwd(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss,
                               beta, label_smoothing, backend)

    @staticmethod
    def backward(ctx, grad_losses):
        loss, beta, label_smoothing, backend = ctx.config
        grads = _preference_bwd(grad_losses.contiguous(), *ctx.saved_tensors, loss, beta,
                                label_smoothing, backend)
        return (*grads, None, None, None, None)


def _combined_losses(batch: losses.PairBatch, spec: LossSpec, backend: str,
                     pair_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_k weight_k * loss_k per pair [B]: the pair primitive of each term's pair math on its
    inputs (losses.pair_inputs: the log-probs, or the prepared ratios against a zero
    reference), times the WPO pair weights when given."""
    total = None
    for entry, weight, label_smoothing in spec.terms:
        inputs = losses.pair_inputs(entry, batch, spec)
        per_pair = PreferenceLossFunction.apply(*inputs, entry.math.name, spec.beta,
                                                label_smoothing, backend)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        if weight != 1.0:
            per_pair = weight * per_pair
        total = per_pair if total is None else total + per_pair
    return total


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: Optional[torch.Tensor] = None,
                    ref_rejected: Optional[torch.Tensor] = None, *,
                    loss: Union[str, Sequence[str]] = "sigmoid",
                    loss_weights: Optional[Sequence[float]] = None, beta: float = 0.1,
                    label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
                    f_alpha_divergence_coef: float = 0.5, simpo_gamma: float = losses.SIMPO_GAMMA,
                    chosen_lengths: Optional[torch.Tensor] = None,
                    rejected_lengths: Optional[torch.Tensor] = None, reduction: str = "mean",
                    backend: str = "auto") -> PreferenceLossOutput:
    """A DPO-family loss from sequence log-probs [B] of the policy and the reference.

    ``loss``: a name of ``losses.PAIRWISE_NAMES`` (the pairwise entries of the loss registry,
    pyalign/losses.py, each with its paper and equation; TRL's ``loss_type`` names), or a list of
    them combined as ``sum_k loss_weights[k] * loss_k`` (default weights 1; the MPO recipe is
    ``["sigmoid", "bco_pair", "sft"]`` with ``[0.8, 0.2, 1.0]``; TRL's CPO is ``["cpo", "sft"]``
    with ``[1, cpo_alpha]``, SimPO ``"simpo"``, CPO-SimPO ``["simpo", "sft"]`` and ORPO
    ``["orpo", "sft"]``). The reference-free losses (``losses.REFERENCE_FREE_NAMES``: simpo, cpo,
    orpo, sft) run on the policy's log-probs alone: without any other loss the reference may be
    left out (None), and a given one enters only the reported rewards. ``simpo_gamma``: SimPO's
    target margin γ (TRL's default 0.5), for simpo only. ``f_divergence``: TRL's
    ``f_divergence_type`` (with ``f_alpha_divergence_coef``, TRL's default 0.5), only for the
    losses of ``losses.F_DIVERGENCE_LOSSES``. ``chosen_lengths``/``rejected_lengths`` [B]: the
    completion token counts the log-probs sum over; sigmoid_norm and sft need them and ipo, simpo
    and orpo, given them, length-normalise as TRL does (without them they run on the log-probs as
    given, e.g. per-token means). sigmoid (and sigmoid_norm) apply cDPO smoothing for label_smoothing > 0
    (TRL ignores it there); exo_pair with label_smoothing 0 uses 1e-3.
    Returns loss (reduced per ``reduction``; "none": the weighted per-pair sum), chosen_rewards,
    rejected_rewards and margins (detached, per pair).
    """
    spec = check_loss_spec(loss, loss_weights, beta, label_smoothing, reduction, f_divergence,
                            f_alpha_divergence_coef, simpo_gamma)
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError("give both ref_chosen and ref_rejected, or neither (a reference-free loss)")
    check_reference(spec, ref_chosen is not None, "ref_chosen and ref_rejected")
    tensors = dict(policy_chosen=policy_chosen, policy_rejected=policy_rejected)
    if ref_chosen is not None:
        tensors.update(ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    for name, tensor in tensors.items():
        _checks.check_tensor(name, tensor, floating=True)
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D [B] sequence log-probs, got shape {tuple(tensor.shape)}")
        _checks.check_shape(name, tensor, policy_chosen.shape, "policy_chosen.shape")
    _checks.check_same_device(**tensors)
    lengths = dict(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    check_needs(spec, lengths, "pass them, or call token_preference_loss / linear_preference_loss, "
                                "which count them from the mask")
    for name, value in lengths.items():
        if value is not None:
            check_lengths(name, value, policy_chosen.shape[0], policy_chosen.device)
    backends.check_name(backend)
    dtype = accumulation_dtype(*tensors.values())
    if ref_chosen is None:  # distinct zeros: pair_inputs passes each to an autograd.Function
        ref_chosen, ref_rejected = (torch.zeros_like(policy_chosen, dtype=dtype) for _ in range(2))
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (
        t.to(dtype) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    chosen_lengths, rejected_lengths = (None if t is None else t.to(dtype)
                                        for t in (chosen_lengths, rejected_lengths))
    batch = losses.PairBatch(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                               chosen_lengths, rejected_lengths)
    per_pair = _combined_losses(batch, spec, backend)
    with torch.no_grad():
        chosen_rewards = spec.beta * (policy_chosen - ref_chosen)
        rejected_rewards = spec.beta * (policy_rejected - ref_rejected)
    return PreferenceLossOutput(reduced(per_pair, reduction), chosen_rewards, rejected_rewards,
                                chosen_rewards - rejected_rewards)


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """Masked sum (or mean, ``average=True``) of per-token log-probs over the last dimension.

    ``token_logprobs`` [..., T] floating and ``mask`` of exactly that shape (no broadcasting: a
    [B, 1] against a [B, T] mask would count one token T times), bool or of any dtype holding
    only 0 and 1 (an ``attention_mask.float()``; any other value, 0.5, 2 or NaN, is refused,
    named). Masked positions are skipped, not multiplied by 0: a NaN or inf there changes neither
    the result nor the gradient (which is 0 there). A row with nothing kept gives 0, also for the
    mean (its count clamps to 1).
    """
    _checks.check_tensor("token_logprobs", token_logprobs, floating=True)
    mask = _checks.check_mask("mask", mask)
    _checks.check_same_device(token_logprobs=token_logprobs, mask=mask)
    if token_logprobs.dim() < 1:
        raise ValueError("token_logprobs must have a last (token) dimension, got a 0-d tensor")
    _checks.check_shape("mask", mask, token_logprobs.shape, "token_logprobs.shape")
    average = _checks.check_bool("average", average)
    kept = mask
    # selection, not 0 * value: 0 * NaN and 0 * inf are NaN
    summed = torch.where(kept, token_logprobs, 0.0).sum(-1)
    if not average:
        return summed
    return summed / kept.sum(-1).clamp(min=1).to(summed.dtype)


@torch.library.custom_op("pyalign::sequence_preference_fwd", mutates_args=())
def _sequence_preference_fwd(token_logprobs: torch.Tensor, mask: torch.Tensor,
                             ref_logps: torch.Tensor, loss: str, beta: float,
                             label_smoothing: float, average: bool, backend: str
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = backends.implementation("preference", backend, token_logprobs, loss=loss)
    return impl.sequence_preference_forward(token_logprobs, mask, ref_logps, loss, beta,
                                            label_smoothing, average)


@_sequence_preference_fwd.register_fake
def _(token_logprobs, mask, ref_logps, loss, beta, label_smoothing, average, backend):
    acc = accumulation_dtype(token_logprobs.dtype)
    rows = token_logprobs.shape[0]
    return (token_logprobs.new_empty(rows // 2, dtype=acc), token_logprobs.new_empty(rows, dtype=acc),
            token_logprobs.new_empty(rows, dtype=acc))


@torch.library.custom_op("pyalign::sequence_preference_bwd", mutates_args=())
def _sequence_preference_bwd(grad_losses: torch.Tensor, token_logprobs: torch.Tensor,
                             mask: torch.Tensor, ref_logps: torch.Tensor, policy_seq: torch.Tensor,
                             ref_seq: torch.Tensor, loss: str, beta: float, label_smoothing: float,
                             average: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = backends.implementation("preference", backend, token_logprobs, loss=loss)
    grad_tokens, grad_ref = impl.sequence_preference_backward(
        grad_losses, token_logprobs, mask, ref_logps, policy_seq, ref_seq, loss, beta,
        label_smoothing, average)
    return grad_tokens.to(token_logprobs.dtype), grad_ref.to(ref_logps.dtype)


@_sequence_preference_bwd.register_fake
def _(grad_losses, token_logprobs, mask, ref_logps, policy_seq, ref_seq, loss, beta,
      label_smoothing, average, backend):
    return torch.empty_like(token_logprobs), torch.empty_like(ref_logps)


class SequencePreferenceFunction(torch.autograd.Function):
    """token log-probs [2B, T] + mask -> (losses [B], policy_logps [2B], ref_logps [2B])."""

    @staticmethod
    def forward(ctx, token_logprobs, mask, ref_logps, loss, beta, label_smoothing, average, backend):
        per_pair, policy_seq, ref_seq = _sequence_preference_fwd(
            token_logprobs, mask, ref_logps, loss, beta, label_smoothing, average, backend)
        ctx.save_for_backward(token_logprobs, mask, ref_logps, policy_seq, ref_seq)
        ctx.config = (loss, beta, label_smoothing, average, backend)
        ctx.mark_non_differentiable(policy_seq, ref_seq)
        return per_pair, policy_seq, ref_seq

    @staticmethod
    def backward(ctx, grad_losses, _grad_policy_seq, _grad_ref_seq):
        loss, beta, label_smoothing, average, backend = ctx.config
        grad_tokens, grad_ref = _sequence_preference_bwd(grad_losses.contiguous(), *ctx.saved_tensors,
                                                         loss, beta, label_smoothing, average, backend)
        return grad_tokens, None, grad_ref, None, None, None, None, None


def _fused_sequence_path(spec: LossSpec, ld_alpha, pair_weighted: bool, average: bool,
                         has_reference: bool) -> bool:
    """One elementwise loss on the plain log-ratios with nothing around it: the backend's fused
    sequence primitive (masked reduction + pair loss, one launch) computes it. The lengths are
    known here, so ipo on summed log-probs (TRL's length normalisation) is not plain; a
    reference-free loss given a reference (for the rewards alone) is not either."""
    if len(spec.terms) != 1 or ld_alpha is not None or pair_weighted:
        return False
    entry, weight, _ = spec.terms[0]
    return (weight == 1.0 and entry.elementwise and not (entry.reference_free and has_reference)
            and losses.runs_on_plain_ratios(entry, spec.f_divergence, True, average))


def _token_pair_batch(token_logps, mask, ref_logps, ld_alpha, average) -> losses.PairBatch:
    """Sequence log-probs [B] x 4, the token counts and the chosen token sums from per-token
    inputs [2B, T] (chosen rows first), in torch: autograd differentiates the reduction. ld_alpha
    (LD-DPO): the tokens at completion positions 1..min(|y_w|, |y_l|) of the pair count 1, the
    rest ld_alpha. Masked positions are selected away (their values may be NaN/inf). No
    reference (None): its log-probs are 0."""
    acc = accumulation_dtype(token_logps.dtype)
    pairs = token_logps.shape[0] // 2
    kept = mask != 0
    counts = kept.sum(-1).to(acc)
    token_weights = None
    if ld_alpha is not None:
        position = kept.cumsum(-1)  # 1-based completion position of each kept token
        shared = torch.minimum(counts[:pairs], counts[pairs:]).repeat(2)
        token_weights = torch.where(position <= shared[:, None], 1.0, ld_alpha).to(acc)

    def reduce(values):
        values = values.to(acc)
        weighted = values if token_weights is None else values * token_weights
        summed = torch.where(kept, weighted, 0.0).sum(-1)
        return summed / counts.clamp(min=1) if average else summed

    policy = reduce(token_logps)
    if ref_logps is None:
        ref = torch.zeros_like(policy)
    else:
        ref = reduce(ref_logps) if ref_logps.dim() == 2 else ref_logps.to(acc)
    chosen_token_sum = None  # sft: the plain sum of the chosen per-token log-probs
    if ld_alpha is not None or average:
        chosen_token_sum = torch.where(kept[:pairs], token_logps[:pairs].to(acc), 0.0).sum(-1)
    return losses.PairBatch(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:],
                              counts[:pairs], counts[pairs:], chosen_token_sum, bool(average))


@torch.no_grad()
def _wpo_pair_weights(token_logps, log_sum_sq_probs, mask) -> torch.Tensor:
    """WPO (arXiv 2406.11827, eq. 2, as TRL): per row w = exp(mean over its completion tokens of
    (log p_t − log Σ_v p_v²)); per pair w_chosen * w_rejected [B], detached."""
    acc = accumulation_dtype(token_logps.dtype)
    kept = mask != 0
    aligned = torch.where(kept, token_logps.to(acc) - log_sum_sq_probs.to(acc), 0.0).sum(-1)
    weights = torch.exp(aligned / kept.sum(-1).clamp(min=1).to(acc))
    pairs = token_logps.shape[0] // 2
    return weights[:pairs] * weights[pairs:]


def token_level_loss(token_logps, mask, ref_logps, spec: LossSpec, *, ld_alpha, log_sum_sq_probs,
                      average, reduction, backend, whole_batch=None) -> PreferenceLossOutput:
    """The per-token entry points' common tail (inputs validated; ``ref_logps`` None for a
    reference-free loss). ``whole_batch``: PairBatch.whole_batch, for a chunk of a batch."""
    pairs = token_logps.shape[0] // 2
    if _fused_sequence_path(spec, ld_alpha, log_sum_sq_probs is not None, average,
                            ref_logps is not None):
        (entry, _, label_smoothing), = spec.terms
        ref = (token_logps.new_zeros(token_logps.shape[0]) if ref_logps is None
               else ref_logps.to(token_logps.dtype))
        per_pair, policy_seq, ref_seq = SequencePreferenceFunction.apply(
            token_logps, mask != 0, ref, entry.name, spec.beta, label_smoothing, average, backend)
        rewards = spec.beta * (policy_seq - ref_seq)
    else:
        batch = _token_pair_batch(token_logps, mask, ref_logps, ld_alpha, average)
        if whole_batch is not None:
            batch = batch._replace(whole_batch=whole_batch)
        pair_weights = (None if log_sum_sq_probs is None
                        else _wpo_pair_weights(token_logps, log_sum_sq_probs, mask))
        per_pair = _combined_losses(batch, spec, backend, pair_weights)
        with torch.no_grad():
            rewards = spec.beta * torch.cat([batch.policy_chosen - batch.ref_chosen,
                                             batch.policy_rejected - batch.ref_rejected])
    chosen_rewards, rejected_rewards = rewards[:pairs], rewards[pairs:]
    return PreferenceLossOutput(reduced(per_pair, reduction), chosen_rewards, rejected_rewards,
                                chosen_rewards - rejected_rewards)


def token_preference_loss(policy_token_logps: torch.Tensor, ref_logps: Optional[torch.Tensor],
                          mask: torch.Tensor, *, loss: Union[str, Sequence[str]] = "sigmoid",
                          loss_weights: Optional[Sequence[float]] = None, beta: float = 0.1,
                          label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
                          f_alpha_divergence_coef: float = 0.5,
                          simpo_gamma: float = losses.SIMPO_GAMMA, ld_alpha: Optional[float] = None,
                          use_weighting: bool = False,
                          log_sum_sq_probs: Optional[torch.Tensor] = None,
                          average_log_prob: bool = False, reduction: str = "mean",
                          backend: str = "auto") -> PreferenceLossOutput:
    """The preference losses from per-token log-probs: TRL 1.16 DPOTrainer's ``_compute_loss``
    on the same per-token log-probs.

    ``policy_token_logps`` [2B, T] (chosen rows first, then rejected), ``mask`` [2B, T] bool or
    of any dtype holding 0 and 1 only (the completion tokens; TRL's shifted completion_mask),
    ``ref_logps`` per token [2B, T] (reduced like the policy's) or sequence log-probs [2B] (used
    as they are: with ld_alpha, precomputed with the same ld_alpha, as TRL's
    precompute_ref_log_probs does), or None for the reference-free losses (simpo, cpo, orpo,
    sft). Loss options as ``preference_loss``; the lengths come from the mask, so sigmoid_norm,
    sft, ipo, simpo and orpo run as TRL's (with ``average_log_prob=True`` the log-probs are
    per-token means and ipo / sigmoid_norm / simpo / orpo take them as they are). ``ld_alpha`` in
    [0, 1] (LD-DPO): tokens past the shared length of the pair weigh ld_alpha. ``use_weighting``
    (WPO) needs ``log_sum_sq_probs`` [2B, T], log Σ_v p_v² of the policy per token
    (logsumexp(2z) − 2·logsumexp(z)), and multiplies each loss's per-pair value by the detached
    pair weight. Gradients flow to the policy log-probs (and
    a reference that requires grad).
    """
    spec = check_loss_spec(loss, loss_weights, beta, label_smoothing, reduction, f_divergence,
                            f_alpha_divergence_coef, simpo_gamma)
    average_log_prob = _checks.check_bool("average_log_prob", average_log_prob)
    ld_alpha, use_weighting = check_token_options(spec, ld_alpha, use_weighting, average_log_prob)
    _checks.check_tensor("policy_token_logps", policy_token_logps, floating=True)
    if policy_token_logps.dim() != 2 or policy_token_logps.shape[0] % 2:
        raise ValueError(f"policy_token_logps must be [2B, T] with chosen rows first, got shape "
                         f"{tuple(policy_token_logps.shape)}")
    mask = _checks.check_mask("mask", mask)
    _checks.check_shape("mask", mask, policy_token_logps.shape, "policy_token_logps.shape")
    check_reference(spec, ref_logps is not None, "ref_logps")
    if ref_logps is not None:
        _checks.check_tensor("ref_logps", ref_logps, floating=True)
        if tuple(ref_logps.shape) not in (tuple(policy_token_logps.shape),
                                          (policy_token_logps.shape[0],)):
            raise ValueError(f"ref_logps must be [2B, T] per-token or [2B] sequence log-probs, got "
                             f"shape {tuple(ref_logps.shape)}")
    if use_weighting != (log_sum_sq_probs is not None):
        raise ValueError("use_weighting=True needs log_sum_sq_probs [2B, T] (log sum_v p_v^2 of the "
                         "policy per token), and log_sum_sq_probs is only used with use_weighting")
    if log_sum_sq_probs is not None:
        _checks.check_tensor("log_sum_sq_probs", log_sum_sq_probs, floating=True)
        _checks.check_shape("log_sum_sq_probs", log_sum_sq_probs, policy_token_logps.shape,
                            "policy_token_logps.shape")
    _checks.check_same_device(policy_token_logps=policy_token_logps, mask=mask, ref_logps=ref_logps,
                              log_sum_sq_probs=log_sum_sq_probs)
    backends.check_name(backend)
    return token_level_loss(policy_token_logps, mask, ref_logps, spec, ld_alpha=ld_alpha,
                             log_sum_sq_probs=log_sum_sq_probs, average=average_log_prob,
                             reduction=reduction, backend=backend)


def check_loss_options(loss, loss_weights=None, *, beta: float = 0.1, label_smoothing: float = 0.0,
                       f_divergence: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                       simpo_gamma: float = losses.SIMPO_GAMMA, ld_alpha: Optional[float] = None,
                       use_weighting: bool = False, average_log_prob: bool = False) -> None:
    """Raise (ValueError/TypeError naming the argument) for a loss configuration that
    ``token_preference_loss`` would refuse; for callers (trainers) that validate up front."""
    spec = check_loss_spec(loss, loss_weights, beta, label_smoothing, "mean", f_divergence,
                            f_alpha_divergence_coef, simpo_gamma)
    check_token_options(spec, ld_alpha, use_weighting, _checks.check_bool("average_log_prob",
                                                                           average_log_prob))


