"""Preference losses: DPO and its relatives (names follow TRL's DPOTrainer) and the fused path
from the policy's last hidden state to the loss. KTO (unpaired) lives in pyalign/ops/kto.py.

Per pair, with r_w = policy_chosen - ref_chosen, r_l = policy_rejected - ref_rejected and
h = r_w - r_l, the loss table of docs/algorithms.md. Implicit rewards reported: beta*r_w, beta*r_l
and the margin beta*h (detached: they are metrics). Family "preference" of pyalign/backends.py.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from pyalign import backends
from pyalign import losses as registry
from pyalign._utils import accumulation_dtype
from pyalign.ops import _checks
from pyalign.ops.linear_logprobs import linear_token_logprobs

LOSS_NAMES = registry.PAIRWISE_NAMES  # the pairwise entries of the registry, pyalign/losses.py
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
    impl = backends.implementation("preference", backend, policy_chosen)
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
    impl = backends.implementation("preference", backend, policy_chosen)
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


def _check_loss_config(loss: str, beta, label_smoothing, reduction: str) -> tuple[float, float]:
    if not isinstance(loss, str):
        raise TypeError(f"loss must be a str, one of {LOSS_NAMES}, got {type(loss).__name__} {loss!r}")
    if loss not in LOSS_NAMES:
        raise ValueError(f"unknown preference loss {loss!r}; expected one of {LOSS_NAMES}")
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    beta = _checks.check_positive("beta", beta)
    label_smoothing = _checks.check_finite_range("label_smoothing", label_smoothing, low=0.0, high=0.5,
                                                 high_inclusive=False)
    # exo_pair needs eps > 0; TRL substitutes 1e-3 for 0 (the entry's zero_smoothing_substitute)
    return beta, registry.effective_label_smoothing(loss, label_smoothing)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    if values.numel() == 0:  # an empty batch: a zero loss that still has a graph
        return values.sum()
    return values.mean() if reduction == "mean" else values.sum()


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, loss: str = "sigmoid",
                    beta: float = 0.1, label_smoothing: float = 0.0, reduction: str = "mean",
                    backend: str = "auto") -> PreferenceLossOutput:
    """A DPO-family loss from sequence log-probs [B] of the policy and the reference.

    ``loss``: a name of ``LOSS_NAMES``, the pairwise entries of the loss registry
    (pyalign/losses.py: each with its paper and equation; the names follow TRL, sigmoid = DPO, or
    cDPO with label_smoothing > 0). exo_pair with label_smoothing 0 uses 1e-3, as TRL does.
    Returns loss (reduced per ``reduction``), chosen_rewards, rejected_rewards and margins
    (detached, per pair).
    """
    beta, label_smoothing = _check_loss_config(loss, beta, label_smoothing, reduction)
    tensors = dict(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                   ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    for name, tensor in tensors.items():
        _checks.check_tensor(name, tensor, floating=True)
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D [B] sequence log-probs, got shape {tuple(tensor.shape)}")
        _checks.check_shape(name, tensor, policy_chosen.shape, "policy_chosen.shape")
    _checks.check_same_device(**tensors)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors.values()) else torch.float32
    if dtype == torch.float64:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected = (
            t.to(dtype) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    backends.check_name(backend)
    losses = PreferenceLossFunction.apply(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                          loss, beta, label_smoothing, backend)
    with torch.no_grad():
        chosen_rewards = beta * (policy_chosen.to(losses.dtype) - ref_chosen.to(losses.dtype))
        rejected_rewards = beta * (policy_rejected.to(losses.dtype) - ref_rejected.to(losses.dtype))
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
    impl = backends.implementation("preference", backend, token_logprobs)
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
    impl = backends.implementation("preference", backend, token_logprobs)
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
        return
    _checks.check_tensor("ref_hidden", ref_hidden, floating=True)
    _checks.check_shape("ref_hidden", ref_hidden, hidden.shape, "hidden.shape")
    if ref_weight is None:
        if ref_bias is not None:
            raise ValueError("ref_bias is given without ref_weight (the reference uses weight and bias)")
        _checks.check_same_device(hidden=hidden, ref_hidden=ref_hidden)
        return
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


def linear_preference_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                           bias: Optional[torch.Tensor] = None,
                           ref_logps: Optional[torch.Tensor] = None,
                           ref_hidden: Optional[torch.Tensor] = None,
                           ref_weight: Optional[torch.Tensor] = None,
                           ref_bias: Optional[torch.Tensor] = None,
                           loss: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                           ignore_index: int = -100, average_log_prob: bool = False,
                           temperature: float = 1.0, reduction: str = "mean",
                           chunk_size: Optional[int] = None,
                           backend: str = "auto") -> PreferenceLossOutput:
    """The fused path from the policy's last hidden state to a preference loss.

    hidden: [2B, T, H], chosen rows first then rejected; weight: the lm_head [V, H]; labels:
    [2B, T], already aligned with hidden (labels[i, t] is the token predicted from hidden[i, t]),
    ``ignore_index`` on prompt and padding positions. The reference is either precomputed
    sequence log-probs ``ref_logps`` [2B] (same order) or ``ref_hidden`` (+ ``ref_weight``, by
    default ``weight``), evaluated without gradient. ``average_log_prob=True`` length-normalises
    (what IPO expects). No [2B*T, V] logits are ever held.
    """
    beta, label_smoothing = _check_loss_config(loss, beta, label_smoothing, reduction)
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
    _check_linear_inputs(hidden, weight, bias, labels, ref_logps, ref_hidden, ref_weight, ref_bias)
    backends.check_name(backend)
    pairs = hidden.shape[0] // 2
    mask = labels != ignore_index
    token_logps = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                        temperature=temperature, chunk_size=chunk_size,
                                        backend=backend)
    if ref_logps is None:
        with torch.no_grad():  # per-token [2B, T]: the fused kernel reduces it with the policy's
            ref_logps = linear_token_logprobs(
                ref_hidden, weight if ref_weight is None else ref_weight, labels,
                bias=bias if ref_weight is None else ref_bias, ignore_index=ignore_index,
                temperature=temperature, chunk_size=chunk_size, backend=backend)
    # A backend named for the per-token part (say "cpu") need not have a loss kernel: the tiny
    # [2B, T] reduction then runs on whatever "auto" picks.
    loss_backend = backend if backend == "auto" or backends.has("preference", backend) else "auto"
    losses, policy_seq, ref_seq = SequencePreferenceFunction.apply(
        token_logps, mask, ref_logps.to(token_logps.dtype), loss, beta, label_smoothing,
        average_log_prob, loss_backend)
    rewards = beta * (policy_seq - ref_seq)
    chosen_rewards, rejected_rewards = rewards[:pairs], rewards[pairs:]
    return PreferenceLossOutput(_reduce(losses, reduction), chosen_rewards, rejected_rewards,
                                chosen_rewards - rejected_rewards)
