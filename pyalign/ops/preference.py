"""Preference losses: DPO and its relatives (names and numbers follow TRL 1.16's DPOTrainer) and
the fused path from the policy's last hidden state to the loss. KTO (unpaired) lives in
pyalign/ops/kto.py.

Per pair, with r_w = policy_chosen - ref_chosen, r_l = policy_rejected - ref_rejected and
h = r_w - r_l, the loss table of docs/algorithms.md. Implicit rewards reported: beta*r_w, beta*r_l
and the margin beta*h (detached: they are metrics). Family "preference" of pyalign/backends.py.

Every loss runs the same way (``_combined_losses``): the registry's ``pair_inputs`` (torch,
autograd: f-divergence scores, length normalisation, aot's sort, sft's token mean; the log-probs
as they are for a plain loss) feeds the backend's pair primitive with the entry's pair math; a
list of losses is the weighted sum of their per-pair losses. Entry points: ``preference_loss``
(sequence log-probs [B]), ``token_preference_loss`` (per-token log-probs [2B, T]: ld_alpha and
WPO weighting) and ``linear_preference_loss`` (hidden states).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from pyalign import backends
from pyalign import losses as registry
from pyalign._utils import accumulation_dtype
from pyalign.eager.logprobs import log_sum_sq_probs
from pyalign.ops import _checks, _fused_head, _vocab_parallel
from pyalign.ops.linear_logprobs import linear_token_logprobs

LOSS_NAMES = registry.PAIRWISE_NAMES  # the pairwise entries of the registry, pyalign/losses.py
F_DIVERGENCES = registry.F_DIVERGENCE_NAMES
REDUCTIONS = ("mean", "sum", "none")


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


class _LossSpec(NamedTuple):
    """A validated loss configuration: (entry, weight, effective label smoothing) per term."""
    terms: tuple
    beta: float
    f_divergence: str
    alpha: float


def _check_loss_spec(loss, loss_weights, beta, label_smoothing, reduction, f_divergence,
                     f_alpha_divergence_coef) -> _LossSpec:
    """Every scalar argument of a loss configuration, before any tensor is looked at."""
    names = [loss] if isinstance(loss, str) else loss
    if not isinstance(names, (list, tuple)) or not names:
        raise TypeError(f"loss must be a name of {LOSS_NAMES} or a non-empty list of them, got "
                        f"{type(loss).__name__} {loss!r}")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"loss must be a str, one of {LOSS_NAMES}, got {type(name).__name__} "
                            f"{name!r}")
        if name not in LOSS_NAMES:
            where = "" if isinstance(loss, str) else f" in loss={list(names)}"
            raise ValueError(f"unknown preference loss {name!r}{where}; expected one of {LOSS_NAMES}")
    if loss_weights is None:
        weights = [1.0] * len(names)
    else:
        if not isinstance(loss_weights, (list, tuple)) or len(loss_weights) != len(names):
            raise ValueError(f"loss_weights must be a list of {len(names)} weights, one per loss of "
                             f"{list(names)}, got {loss_weights!r}")
        weights = [_checks.check_finite_range("loss_weights", weight, low=0.0,
                                              what="finite numbers >= 0")
                   for weight in loss_weights]
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    beta = _checks.check_positive("beta", beta)
    label_smoothing = _checks.check_finite_range("label_smoothing", label_smoothing, low=0.0, high=0.5,
                                                 high_inclusive=False)
    _checks.check_choice("f_divergence", f_divergence, F_DIVERGENCES)
    alpha = _checks.check_finite_range("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if f_divergence != "reverse_kl":
        refused = [name for name in names if not registry.REGISTRY[name].f_divergence]
        if refused:
            raise ValueError(f"f_divergence={f_divergence!r} applies only to the losses built on the "
                             f"chosen-rejected score difference {registry.F_DIVERGENCE_LOSSES}, not "
                             f"to {refused}; use f_divergence='reverse_kl' with them")
    # exo_pair needs eps > 0; TRL substitutes 1e-3 for 0 (the entry's zero_smoothing_substitute)
    terms = tuple((registry.REGISTRY[name], weight,
                   registry.effective_label_smoothing(name, label_smoothing))
                  for name, weight in zip(names, weights))
    return _LossSpec(terms, beta, f_divergence, alpha)


def _check_needs(spec: _LossSpec, given: dict, remedy: str) -> None:
    """Each term's ``needs`` (registry) against the inputs given (name -> tensor or None)."""
    for entry, _, _ in spec.terms:
        missing = [name for name in entry.needs if given.get(name) is None]
        if missing:
            raise ValueError(f"loss {entry.name!r} needs {' and '.join(missing)} (the completion "
                             f"token counts [B] its sequence log-probs sum over); {remedy}")


def _combined_losses(batch: registry.PairBatch, spec: _LossSpec, backend: str,
                     pair_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_k weight_k * loss_k per pair [B]: the pair primitive of each term's pair math on its
    inputs (registry.pair_inputs: the log-probs, or the prepared ratios against a zero
    reference), times the WPO pair weights when given."""
    total = None
    for entry, weight, label_smoothing in spec.terms:
        inputs = registry.pair_inputs(entry, batch, spec.f_divergence, spec.alpha)
        per_pair = PreferenceLossFunction.apply(*inputs, entry.math.name, spec.beta,
                                                label_smoothing, backend)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        if weight != 1.0:
            per_pair = weight * per_pair
        total = per_pair if total is None else total + per_pair
    return total


def _check_lengths(name: str, lengths, pairs: int, device) -> None:
    _checks.check_tensor(name, lengths)
    if lengths.dtype == torch.bool or lengths.dtype.is_complex:
        raise TypeError(f"{name} must be an integer or floating tensor of token counts, got "
                        f"{lengths.dtype}")
    _checks.check_shape(name, lengths, (pairs,), "[B]")
    if lengths.device != device:
        raise ValueError(f"{name} is on {lengths.device}, the log-probs on {device}")
    # data-dependent: checked eagerly; under torch.compile it would break the graph, so it is
    # left to the eager run (negative counts clamp to 1 in the losses that divide by them)
    if (lengths.numel() and not torch.compiler.is_compiling()
            and not bool(((lengths >= 0) & torch.isfinite(lengths.double())).all())):
        raise ValueError(f"{name} must hold finite token counts >= 0")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    if values.numel() == 0:  # an empty batch: a zero loss that still has a graph
        return values.sum()
    return values.mean() if reduction == "mean" else values.sum()


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *,
                    loss: Union[str, Sequence[str]] = "sigmoid",
                    loss_weights: Optional[Sequence[float]] = None, beta: float = 0.1,
                    label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
                    f_alpha_divergence_coef: float = 0.5,
                    chosen_lengths: Optional[torch.Tensor] = None,
                    rejected_lengths: Optional[torch.Tensor] = None, reduction: str = "mean",
                    backend: str = "auto") -> PreferenceLossOutput:
    """A DPO-family loss from sequence log-probs [B] of the policy and the reference.

    ``loss``: a name of ``LOSS_NAMES`` (the pairwise entries of the loss registry,
    pyalign/losses.py, each with its paper and equation; TRL's ``loss_type`` names), or a list of
    them combined as ``sum_k loss_weights[k] * loss_k`` (default weights 1; the MPO recipe is
    ``["sigmoid", "bco_pair", "sft"]`` with ``[0.8, 0.2, 1.0]``). ``f_divergence``: TRL's
    ``f_divergence_type`` (with ``f_alpha_divergence_coef``, TRL's default 0.5), only for the
    losses of ``registry.F_DIVERGENCE_LOSSES``. ``chosen_lengths``/``rejected_lengths`` [B]: the
    completion token counts the log-probs sum over; sigmoid_norm and sft need them and ipo, given
    them, length-normalises as TRL does (without them it runs on the log-probs as given, e.g.
    per-token means). sigmoid (and sigmoid_norm) apply cDPO smoothing for label_smoothing > 0
    (TRL ignores it there); exo_pair with label_smoothing 0 uses 1e-3.
    Returns loss (reduced per ``reduction``; "none": the weighted per-pair sum), chosen_rewards,
    rejected_rewards and margins (detached, per pair).
    """
    spec = _check_loss_spec(loss, loss_weights, beta, label_smoothing, reduction, f_divergence,
                            f_alpha_divergence_coef)
    tensors = dict(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                   ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    for name, tensor in tensors.items():
        _checks.check_tensor(name, tensor, floating=True)
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D [B] sequence log-probs, got shape {tuple(tensor.shape)}")
        _checks.check_shape(name, tensor, policy_chosen.shape, "policy_chosen.shape")
    _checks.check_same_device(**tensors)
    lengths = dict(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _check_needs(spec, lengths, "pass them, or call token_preference_loss / linear_preference_loss, "
                                "which count them from the mask")
    for name, value in lengths.items():
        if value is not None:
            _check_lengths(name, value, policy_chosen.shape[0], policy_chosen.device)
    backends.check_name(backend)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors.values()) else torch.float32
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (
        t.to(dtype) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    chosen_lengths, rejected_lengths = (None if t is None else t.to(dtype)
                                        for t in (chosen_lengths, rejected_lengths))
    batch = registry.PairBatch(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                               chosen_lengths, rejected_lengths)
    losses = _combined_losses(batch, spec, backend)
    with torch.no_grad():
        chosen_rewards = spec.beta * (policy_chosen - ref_chosen)
        rejected_rewards = spec.beta * (policy_rejected - ref_rejected)
    return PreferenceLossOutput(_reduce(losses, reduction), chosen_rewards, rejected_rewards,
                                chosen_rewards - rejected_rewards)


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """Masked sum (or mean, ``average=True``) of per-token log-probs over the last dimension.

    ``token_logprobs`` [..., T] floating and ``mask`` of exactly that shape (no broadcasting: a
    [B, 1] against a [B, T] mask would count one token T times), bool or integer (nonzero =
    kept, counted once; a float mask is refused). Masked positions are skipped, not multiplied by
    0: a NaN or inf there changes neither the result nor the gradient (which is 0 there). A row
    with nothing kept gives 0, also for the mean (its count clamps to 1).
    """
    _checks.check_tensor("token_logprobs", token_logprobs, floating=True)
    _checks.check_mask("mask", mask)
    _checks.check_same_device(token_logprobs=token_logprobs, mask=mask)
    if token_logprobs.dim() < 1:
        raise ValueError("token_logprobs must have a last (token) dimension, got a 0-d tensor")
    _checks.check_shape("mask", mask, token_logprobs.shape, "token_logprobs.shape")
    average = _checks.check_bool("average", average)
    kept = mask != 0
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
        losses, policy_seq, ref_seq = _sequence_preference_fwd(
            token_logprobs, mask, ref_logps, loss, beta, label_smoothing, average, backend)
        ctx.save_for_backward(token_logprobs, mask, ref_logps, policy_seq, ref_seq)
        ctx.config = (loss, beta, label_smoothing, average, backend)
        ctx.mark_non_differentiable(policy_seq, ref_seq)
        return losses, policy_seq, ref_seq

    @staticmethod
    def backward(ctx, grad_losses, _grad_policy_seq, _grad_ref_seq):
        loss, beta, label_smoothing, average, backend = ctx.config
        grad_tokens, grad_ref = _sequence_preference_bwd(grad_losses.contiguous(), *ctx.saved_tensors,
                                                         loss, beta, label_smoothing, average, backend)
        return grad_tokens, None, grad_ref, None, None, None, None, None


def _check_linear_inputs(hidden, weight, bias, labels, ref_logps, ref_hidden, ref_weight,
                         ref_bias) -> None:
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
    if ref_logps is not None:
        _checks.check_tensor("ref_logps", ref_logps, floating=True)
        _checks.check_same_device(hidden=hidden, ref_logps=ref_logps)
        _checks.check_shape("ref_logps", ref_logps, (hidden.shape[0],), "[2B], chosen rows first")
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight / ref_bias are given with ref_logps (the precomputed "
                             "reference log-probs need no head); give ref_hidden with them instead")
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
    if ref_weight.dtype != ref_hidden.dtype:
        raise TypeError(f"ref_hidden and ref_weight must share a dtype, got {ref_hidden.dtype} and "
                        f"{ref_weight.dtype}")
    if ref_bias is not None:
        _checks.check_tensor("ref_bias", ref_bias, floating=True)
        _checks.check_shape("ref_bias", ref_bias, (ref_weight.shape[0],), "[V]")
        if ref_bias.dtype != ref_hidden.dtype:
            raise TypeError(f"ref_bias must have ref_hidden's dtype {ref_hidden.dtype}, got {ref_bias.dtype}")
    _checks.check_same_device(hidden=hidden, ref_hidden=ref_hidden, ref_weight=ref_weight,
                              ref_bias=ref_bias)


def _check_token_options(spec: _LossSpec, ld_alpha, use_weighting, average) -> tuple:
    """ld_alpha (None or in [0, 1]) and use_weighting against the losses they go with."""
    if ld_alpha is not None:
        ld_alpha = _checks.check_finite_range("ld_alpha", ld_alpha, low=0.0, high=1.0)
        if average:
            raise ValueError("ld_alpha weights the tokens of summed log-probs (LD-DPO); it is not "
                             "defined with average_log_prob=True")
    use_weighting = _checks.check_bool("use_weighting", use_weighting)
    if use_weighting:
        refused = [entry.name for entry, _, _ in spec.terms if not entry.pair_weights]
        if refused:
            raise ValueError(f"use_weighting (WPO) cannot weight {refused}: they sort the batch, "
                             f"which would misalign the per-pair weights")
    return ld_alpha, use_weighting


def _fused_sequence_path(spec: _LossSpec, ld_alpha, pair_weighted: bool, average: bool) -> bool:
    """One elementwise loss on the plain log-ratios with nothing around it: the backend's fused
    sequence primitive (masked reduction + pair loss, one launch) computes it. The lengths are
    known here, so ipo on summed log-probs (TRL's length normalisation) is not plain."""
    if len(spec.terms) != 1 or ld_alpha is not None or pair_weighted:
        return False
    entry, weight, _ = spec.terms[0]
    return (weight == 1.0 and entry.elementwise
            and registry.runs_on_plain_ratios(entry, spec.f_divergence, True, average))


def _token_pair_batch(token_logps, mask, ref_logps, ld_alpha, average) -> registry.PairBatch:
    """Sequence log-probs [B] x 4, the token counts and the chosen token sums from per-token
    inputs [2B, T] (chosen rows first), in torch: autograd differentiates the reduction. ld_alpha
    (LD-DPO): the tokens at completion positions 1..min(|y_w|, |y_l|) of the pair count 1, the
    rest ld_alpha. Masked positions are selected away (their values may be NaN/inf)."""
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
    ref = reduce(ref_logps) if ref_logps.dim() == 2 else ref_logps.to(acc)
    chosen_token_sum = None  # sft: the plain sum of the chosen per-token log-probs
    if ld_alpha is not None or average:
        chosen_token_sum = torch.where(kept[:pairs], token_logps[:pairs].to(acc), 0.0).sum(-1)
    return registry.PairBatch(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:],
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


def _token_level_loss(token_logps, mask, ref_logps, spec: _LossSpec, *, ld_alpha, log_sum_sq_probs,
                      average, reduction, backend) -> PreferenceLossOutput:
    """The per-token entry points' common tail (inputs validated)."""
    pairs = token_logps.shape[0] // 2
    if _fused_sequence_path(spec, ld_alpha, log_sum_sq_probs is not None, average):
        (entry, _, label_smoothing), = spec.terms
        losses, policy_seq, ref_seq = SequencePreferenceFunction.apply(
            token_logps, mask != 0, ref_logps.to(token_logps.dtype), entry.name, spec.beta,
            label_smoothing, average, backend)
        rewards = spec.beta * (policy_seq - ref_seq)
    else:
        batch = _token_pair_batch(token_logps, mask, ref_logps, ld_alpha, average)
        pair_weights = (None if log_sum_sq_probs is None
                        else _wpo_pair_weights(token_logps, log_sum_sq_probs, mask))
        losses = _combined_losses(batch, spec, backend, pair_weights)
        with torch.no_grad():
            rewards = spec.beta * torch.cat([batch.policy_chosen - batch.ref_chosen,
                                             batch.policy_rejected - batch.ref_rejected])
    chosen_rewards, rejected_rewards = rewards[:pairs], rewards[pairs:]
    return PreferenceLossOutput(_reduce(losses, reduction), chosen_rewards, rejected_rewards,
                                chosen_rewards - rejected_rewards)


def token_preference_loss(policy_token_logps: torch.Tensor, ref_logps: torch.Tensor,
                          mask: torch.Tensor, *, loss: Union[str, Sequence[str]] = "sigmoid",
                          loss_weights: Optional[Sequence[float]] = None, beta: float = 0.1,
                          label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
                          f_alpha_divergence_coef: float = 0.5, ld_alpha: Optional[float] = None,
                          use_weighting: bool = False,
                          log_sum_sq_probs: Optional[torch.Tensor] = None,
                          average_log_prob: bool = False, reduction: str = "mean",
                          backend: str = "auto") -> PreferenceLossOutput:
    """The preference losses from per-token log-probs: TRL 1.16 DPOTrainer's ``_compute_loss``
    on the same per-token log-probs.

    ``policy_token_logps`` [2B, T] (chosen rows first, then rejected), ``mask`` [2B, T] bool or
    integer (the completion tokens; TRL's shifted completion_mask), ``ref_logps`` per token
    [2B, T] (reduced like the policy's) or sequence log-probs [2B] (used as they are: with
    ld_alpha, precomputed with the same ld_alpha, as TRL's precompute_ref_log_probs does).
    Loss options as ``preference_loss``; the lengths come from the mask, so sigmoid_norm, sft and
    ipo run as TRL's (with ``average_log_prob=True`` the log-probs are per-token means and ipo /
    sigmoid_norm take them as they are). ``ld_alpha`` in [0, 1] (LD-DPO): tokens past the shared
    length of the pair weigh ld_alpha. ``use_weighting`` (WPO) needs ``log_sum_sq_probs`` [2B, T],
    log Σ_v p_v² of the policy per token (logsumexp(2z) − 2·logsumexp(z)), and multiplies each
    loss's per-pair value by the detached pair weight. Gradients flow to the policy log-probs (and
    a reference that requires grad).
    """
    spec = _check_loss_spec(loss, loss_weights, beta, label_smoothing, reduction, f_divergence,
                            f_alpha_divergence_coef)
    average_log_prob = _checks.check_bool("average_log_prob", average_log_prob)
    ld_alpha, use_weighting = _check_token_options(spec, ld_alpha, use_weighting, average_log_prob)
    _checks.check_tensor("policy_token_logps", policy_token_logps, floating=True)
    if policy_token_logps.dim() != 2 or policy_token_logps.shape[0] % 2:
        raise ValueError(f"policy_token_logps must be [2B, T] with chosen rows first, got shape "
                         f"{tuple(policy_token_logps.shape)}")
    _checks.check_mask("mask", mask)
    _checks.check_shape("mask", mask, policy_token_logps.shape, "policy_token_logps.shape")
    _checks.check_tensor("ref_logps", ref_logps, floating=True)
    if tuple(ref_logps.shape) not in (tuple(policy_token_logps.shape), (policy_token_logps.shape[0],)):
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
    return _token_level_loss(policy_token_logps, mask, ref_logps, spec, ld_alpha=ld_alpha,
                             log_sum_sq_probs=log_sum_sq_probs, average=average_log_prob,
                             reduction=reduction, backend=backend)


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
    chunk = chunk_size or max(1, (1 << 22) // max(weight.shape[0], 1))  # ~16 MiB of fp32 logits
    for start in range(0, rows.numel(), chunk):
        index = rows[start:start + chunk]
        logits = flat_hidden[index] @ weight.t()
        out[index] = log_sum_sq_probs(logits if bias is None else logits + bias, temperature)
    return out.view(kept.shape)


def check_loss_options(loss, loss_weights=None, *, beta: float = 0.1, label_smoothing: float = 0.0,
                       f_divergence: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                       ld_alpha: Optional[float] = None, use_weighting: bool = False,
                       average_log_prob: bool = False) -> None:
    """Raise (ValueError/TypeError naming the argument) for a loss configuration that
    ``token_preference_loss`` would refuse; for callers (trainers) that validate up front."""
    spec = _check_loss_spec(loss, loss_weights, beta, label_smoothing, "mean", f_divergence,
                            f_alpha_divergence_coef)
    _check_token_options(spec, ld_alpha, use_weighting, _checks.check_bool("average_log_prob",
                                                                           average_log_prob))


def linear_preference_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                           bias: Optional[torch.Tensor] = None,
                           ref_logps: Optional[torch.Tensor] = None,
                           ref_hidden: Optional[torch.Tensor] = None,
                           ref_weight: Optional[torch.Tensor] = None,
                           ref_bias: Optional[torch.Tensor] = None,
                           loss: Union[str, Sequence[str]] = "sigmoid",
                           loss_weights: Optional[Sequence[float]] = None, beta: float = 0.1,
                           label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
                           f_alpha_divergence_coef: float = 0.5, ld_alpha: Optional[float] = None,
                           use_weighting: bool = False, ignore_index: int = -100,
                           average_log_prob: bool = False, temperature: float = 1.0,
                           reduction: str = "mean", chunk_size: Optional[int] = None,
                           backend: str = "auto", process_group=None) -> PreferenceLossOutput:
    """The fused path from the policy's last hidden state to a preference loss.

    hidden: [2B, T, H], chosen rows first then rejected; weight: the lm_head [V, H]; labels:
    [2B, T], already aligned with hidden (labels[i, t] is the token predicted from hidden[i, t]),
    ``ignore_index`` on prompt and padding positions. The reference is either precomputed
    sequence log-probs ``ref_logps`` [2B] (same order) or ``ref_hidden`` with the reference's
    head ``ref_weight`` (required: pass ``weight`` if the reference shares the policy's head;
    + ``ref_bias``), evaluated without gradient; no gradient flows to the reference. Loss options
    as ``token_preference_loss`` (``use_weighting`` computes log Σ p² of the policy head itself).
    ``average_log_prob=True`` length-normalises every loss's log-probs. ``chunk_size``: tokens
    whose logits exist at once. No [2B*T, V] logits are ever held.

    Cost. With ``reduction`` "mean"/"sum" and a gradient wanted, the loss runs in 3 matmuls
    (pyalign/ops/_fused_head.py): per chunk of whole pairs (about ``chunk_size`` kept tokens, at
    least one pair) the logits, the loss and its gradient are computed in the forward, only the
    kept tokens enter the matmuls, and backward just scales the stored gradients; memory is one
    chunk's logits plus gradient buffers of hidden's and W's (fp32) size. The batch-level losses
    (aot, aot_unpaired, sft: their value needs the whole batch), ``reduction="none"``, no-grad
    calls and torch.compile take the recompute path instead: per-token log-probs
    (linear_token_logprobs, which recomputes the logits in backward: 4 matmuls) then the loss.

    ``process_group``: the vocab-parallel head, as in ``linear_token_logprobs``: ``weight``,
    ``bias``, ``ref_weight`` and ``ref_bias`` are this rank's vocabulary rows (the reference
    sharded like the policy), everything else is the same on every rank, and every rank returns
    the same loss; its weight gradients are its shard's.
    """
    with _vocab_parallel.ShardChecks(process_group, "process_group") as shard_checks:
        spec = _check_loss_spec(loss, loss_weights, beta, label_smoothing, reduction, f_divergence,
                                f_alpha_divergence_coef)
        _checks.check_tensor("hidden", hidden, floating=True)
        if hidden.dim() != 3 or hidden.shape[0] % 2 or hidden.shape[-1] == 0:
            raise ValueError(f"hidden must be [2B, T, H] with chosen rows first and H > 0, got shape "
                             f"{tuple(hidden.shape)}")
        if (ref_logps is None) == (ref_hidden is None):
            raise ValueError("give exactly one of ref_logps (precomputed [2B]) or ref_hidden")
        ignore_index = _checks.check_int("ignore_index", ignore_index)
        temperature = _checks.check_temperature(temperature)
        chunk_size = _checks.check_optional_positive_int("chunk_size", chunk_size)
        average_log_prob = _checks.check_bool("average_log_prob", average_log_prob)
        ld_alpha, use_weighting = _check_token_options(spec, ld_alpha, use_weighting, average_log_prob)
        _check_linear_inputs(hidden, weight, bias, labels, ref_logps, ref_hidden, ref_weight, ref_bias)
        backends.check_name(backend)
    shard = shard_checks.shard(weight, hidden, labels, ignore_index)
    if ref_logps is not None:
        ref_logps = ref_logps.detach()
    # A backend named for the per-token part (say "cpu") need not have a loss kernel: the tiny
    # [2B, T] reduction then runs on whatever "auto" picks.
    options = dict(ld_alpha=ld_alpha, average=average_log_prob,
                   backend=backends.backend_for("preference", backend))
    if (_fused_head.applies(reduction, hidden, weight, bias)
            and all(entry.batch_step is None for entry, _, _ in spec.terms)):
        return _fused_linear_preference(hidden, weight, bias, labels, ref_logps, ref_hidden,
                                        ref_weight, ref_bias, spec, options, use_weighting,
                                        ignore_index, temperature, reduction, chunk_size, backend,
                                        shard)
    mask = labels != ignore_index
    head = dict(ignore_index=ignore_index, temperature=temperature, chunk_size=chunk_size,
                backend=backend, process_group=process_group)
    token_logps = linear_token_logprobs(hidden, weight, labels, bias=bias, **head)
    if ref_logps is None:
        with torch.no_grad():  # per-token [2B, T]: the fused kernel reduces it with the policy's
            ref_logps = linear_token_logprobs(ref_hidden, ref_weight, labels, bias=ref_bias, **head)
    sum_sq = None
    if use_weighting and shard is None:
        sum_sq = linear_log_sum_sq_probs(hidden, weight, bias, mask, temperature, chunk_size)
    elif use_weighting:  # the whole vocabulary's log Σ p²: the head's metric, combined
        with torch.no_grad():
            sum_sq = linear_token_logprobs(hidden, weight, labels, bias=bias,
                                           outputs=("log_sum_sq_probs",), **head).log_sum_sq_probs
    return _token_level_loss(token_logps, mask, ref_logps, spec, log_sum_sq_probs=sum_sq,
                             reduction=reduction, **options)


def _fused_linear_preference(hidden, weight, bias, labels, ref_logps, ref_hidden, ref_weight,
                             ref_bias, spec, options, use_weighting, ignore_index, temperature,
                             reduction, chunk_size, backend, shard) -> PreferenceLossOutput:
    """linear_preference_loss in 3 matmuls: chunks of whole pairs, each chunk's per-pair losses by
    ``_token_level_loss`` itself (the recompute path's code), differentiated in the forward."""
    pairs = hidden.shape[0] // 2
    index = torch.arange(pairs, device=hidden.device)
    unit_rows = torch.stack([index, index + pairs], dim=1)  # chunk rows: chosen, then rejected

    def chunk_loss(rows, token_logps, mask, ref_tokens, sum_sq):
        ref = ref_tokens if ref_tokens is not None else ref_logps[rows]
        out = _token_level_loss(token_logps, mask, ref, spec, log_sum_sq_probs=sum_sq,
                                reduction="none", **options)
        return out.loss, (out.chosen_rewards, out.rejected_rewards)

    reference = None if ref_hidden is None else _fused_head.ReferenceHead(ref_hidden, ref_weight,
                                                                          ref_bias)
    plan = _fused_head.FusedHeadPlan(labels, unit_rows, chunk_loss, reduction, ignore_index,
                                     temperature, chunk_size, backend, reference, use_weighting,
                                     vocab_shard=shard)
    loss, chosen_rewards, rejected_rewards = _fused_head.fused_head_loss(hidden, weight, bias, plan)
    return PreferenceLossOutput(loss, chosen_rewards, rejected_rewards,
                                chosen_rewards - rejected_rewards)
