"""Preference losses: DPO and its relatives (names follow TRL's DPOTrainer), KTO, and the fused
path from the policy's last hidden state to the loss.

Per pair, with r_w = policy_chosen - ref_chosen, r_l = policy_rejected - ref_rejected and
h = r_w - r_l, the loss table of docs/algorithms.md. Implicit rewards reported: beta*r_w, beta*r_l
and the margin beta*h (detached: they are metrics). Family "preference" of pyalign/backends.py.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from pyalign import backends
from pyalign._utils import accumulation_dtype
from pyalign.ops import _checks
from pyalign.ops.linear_logprobs import linear_token_logprobs

LOSS_NAMES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
              "sppo_hard", "apo_zero", "apo_down", "discopop")
REDUCTIONS = ("mean", "sum", "none")
EXO_DEFAULT_LABEL_SMOOTHING = 1e-3  # exo_pair needs eps > 0; TRL substitutes this value for 0


class PreferenceLossOutput(NamedTuple):
    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor


class KTOLossOutput(NamedTuple):
    loss: torch.Tensor
    rewards: torch.Tensor  # beta * (policy_logps - ref_logps), detached
    kl: torch.Tensor  # the z0 used: detached, clamped at 0


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
    if loss not in LOSS_NAMES:
        raise ValueError(f"unknown preference loss {loss!r}; expected one of {LOSS_NAMES}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    beta = _checks.check_positive("beta", beta)
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss == "exo_pair" and label_smoothing == 0.0:
        label_smoothing = EXO_DEFAULT_LABEL_SMOOTHING
    return beta, label_smoothing


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

    ``loss`` names follow TRL (sigmoid = DPO, cDPO with label_smoothing > 0; ipo; hinge = SLiC;
    robust; exo_pair; nca_pair; bco_pair; sppo_hard; apo_zero; apo_down; discopop). exo_pair
    with label_smoothing 0 uses 1e-3, as TRL does. Returns loss (reduced per ``reduction``),
    chosen_rewards, rejected_rewards and margins (detached, per pair).
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


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl: torch.Tensor, *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, reduction: str = "mean") -> KTOLossOutput:
    """KTO on unpaired examples.

    ``kl``: the KL reference point, a scalar or per-example estimates of log policy/ref on
    mismatched prompt-completion pairs; z0 = mean(kl), clamped at 0 and detached. Per example,
    with r = policy_logps - ref_logps: desirable ``w_d * (1 - sigmoid(beta (r - z0)))``,
    undesirable ``w_u * (1 - sigmoid(beta (z0 - r)))``; mean over examples.
    """
    beta = _checks.check_positive("beta", beta)
    for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not float(weight) >= 0:
            raise ValueError(f"{name} must be >= 0, got {weight}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _checks.check_tensor("policy_logps", policy_logps, floating=True)
    _checks.check_tensor("ref_logps", ref_logps, floating=True)
    _checks.check_tensor("kl", kl, floating=True)
    if not isinstance(desirable, torch.Tensor):
        raise TypeError(f"desirable must be a bool tensor, got {type(desirable).__name__}")
    if policy_logps.dim() != 1:
        raise ValueError(f"policy_logps must be 1-D [B], got shape {tuple(policy_logps.shape)}")
    _checks.check_shape("ref_logps", ref_logps, policy_logps.shape, "policy_logps.shape")
    _checks.check_shape("desirable", desirable, policy_logps.shape, "policy_logps.shape")
    _checks.check_same_device(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable, kl=kl)
    acc = accumulation_dtype(policy_logps.dtype)
    reference_point = (kl.detach().to(acc).mean().clamp(min=0) if kl.numel()
                       else torch.zeros((), dtype=acc, device=kl.device))
    log_ratio = policy_logps.to(acc) - ref_logps.to(acc)
    desirable = desirable.to(torch.bool)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - reference_point)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - log_ratio)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return KTOLossOutput(_reduce(losses, reduction), (beta * log_ratio).detach(), reference_point)


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor,
                      average: bool = False) -> torch.Tensor:
    """Masked sum (or mean, ``average=True``) of per-token log-probs over the last dimension.

    ``mask`` (bool, or 0/1 or float weights) is shaped like ``token_logprobs``. Positions where it
    is 0 are skipped, not multiplied by 0: a NaN or inf there changes neither the result nor the
    gradient (which is 0 there). A row with nothing unmasked gives 0, also for the mean (its count
    clamps to 1).
    """
    _checks.check_tensor("token_logprobs", token_logprobs, floating=True)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    _checks.check_shape("mask", mask, token_logprobs.shape, "token_logprobs.shape")
    _checks.check_same_device(token_logprobs=token_logprobs, mask=mask)
    weights = mask.to(token_logprobs.dtype)
    # selection, not 0 * value: 0 * NaN and 0 * inf are NaN
    summed = torch.where(mask != 0, token_logprobs * weights, 0.0).sum(-1)
    if not average:
        return summed
    return summed / weights.sum(-1).clamp(min=1)


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
    if hidden.dim() != 3 or hidden.shape[0] % 2:
        raise ValueError(f"hidden must be [2B, T, H] with chosen rows first, got shape {tuple(hidden.shape)}")
    if (ref_logps is None) == (ref_hidden is None):
        raise ValueError("give exactly one of ref_logps (precomputed [2B]) or ref_hidden")
    pairs = hidden.shape[0] // 2
    mask = labels != ignore_index
    token_logps = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                        temperature=temperature, chunk_size=chunk_size,
                                        backend=backend)
    if ref_logps is None:
        _checks.check_shape("ref_hidden", ref_hidden, hidden.shape, "hidden.shape")
        with torch.no_grad():  # per-token [2B, T]: the fused kernel reduces it with the policy's
            ref_logps = linear_token_logprobs(
                ref_hidden, weight if ref_weight is None else ref_weight, labels,
                bias=bias if ref_weight is None else ref_bias, ignore_index=ignore_index,
                temperature=temperature, chunk_size=chunk_size, backend=backend)
    else:
        _checks.check_tensor("ref_logps", ref_logps, floating=True)
        _checks.check_same_device(hidden=hidden, ref_logps=ref_logps)
        _checks.check_shape("ref_logps", ref_logps, (2 * pairs,), "[2B], chosen rows first")
    # A backend named for the per-token part (say "cpu") need not have a loss kernel: the tiny
    # [2B, T] reduction then runs on whatever "auto" picks.
    loss_backend = backend if backend == "auto" or backends.has("preference", backend) else "auto"
    losses, policy_seq, ref_seq = SequencePreferenceFunction.apply(
        token_logps, mask, ref_logps.to(token_logps.dtype), loss, beta, label_smoothing,
        bool(average_log_prob), loss_backend)
    rewards = beta * (policy_seq - ref_seq)
    chosen_rewards, rejected_rewards = rewards[:pairs], rewards[pairs:]
    return PreferenceLossOutput(_reduce(losses, reduction), chosen_rewards, rejected_rewards,
                                chosen_rewards - rejected_rewards)
