"""Eager preference losses (family ``preference`` of pyalign/backends.py): the eleven DPO-family
pair losses, ``forward``/``backward`` on sequence log-probs [B] and the fused
``sequence_preference_forward``/``sequence_preference_backward`` from per-token log-probs.

``pair_losses`` (differentiable by autograd) and ``pair_loss_ratio_grads`` (closed-form
gradients) are the per-pair math every entry point shares; the Triton kernels take
``DISCOPOP_TAU`` from here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pyalign._utils import accumulation_dtype

DISCOPOP_TAU = 0.05


def pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta,
                label_smoothing):
    """Per-pair losses [B] in fp32, differentiable by torch autograd (the loss table of
    docs/algorithms.md)."""
    eps = label_smoothing
    acc = accumulation_dtype(policy_chosen.dtype)
    chosen_ratio = policy_chosen.to(acc) - ref_chosen.to(acc)  # r_w
    rejected_ratio = policy_rejected.to(acc) - ref_rejected.to(acc)  # r_l
    margin = chosen_ratio - rejected_ratio  # h
    x = beta * margin
    logsig = F.logsigmoid
    if loss == "sigmoid":
        return -(1 - eps) * logsig(x) - eps * logsig(-x)
    if loss == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return torch.relu(1 - x)
    if loss == "robust":
        return (-(1 - eps) * logsig(x) + eps * logsig(-x)) / (1 - 2 * eps)
    if loss == "exo_pair":
        return (torch.sigmoid(x) * (logsig(x) - math.log(1 - eps))
                + torch.sigmoid(-x) * (logsig(-x) - math.log(eps)))
    if loss == "nca_pair":
        return (-logsig(beta * chosen_ratio) - 0.5 * logsig(-beta * chosen_ratio)
                - 0.5 * logsig(-beta * rejected_ratio))
    if loss == "bco_pair":
        return -logsig(beta * chosen_ratio) - logsig(-beta * rejected_ratio)
    if loss == "sppo_hard":
        return (chosen_ratio - 1 / (2 * beta)) ** 2 + (rejected_ratio + 1 / (2 * beta)) ** 2
    if loss == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    if loss == "apo_down":
        return torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(x)
    if loss == "discopop":
        mix = torch.sigmoid(x / DISCOPOP_TAU)
        return (1 - mix) * (-logsig(x)) + mix * torch.exp(-x)
    raise ValueError(f"unknown preference loss {loss!r}")


def forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta, label_smoothing):
    with torch.no_grad():
        return pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta,
                           label_smoothing)


def pair_loss_ratio_grads(chosen_ratio, rejected_ratio, loss, beta, label_smoothing):
    """(dL/dr_w, dL/dr_l) per pair, in closed form (custom ops run below autograd)."""
    eps = label_smoothing
    x = beta * (chosen_ratio - rejected_ratio)
    sig, logsig = torch.sigmoid, F.logsigmoid

    def sig_prime(u):
        return sig(u) * sig(-u)

    by_margin = None  # dL/dh for the losses that depend on h only
    if loss == "sigmoid":
        by_margin = beta * (-(1 - eps) * sig(-x) + eps * sig(x))
    elif loss == "ipo":
        by_margin = 2 * ((chosen_ratio - rejected_ratio) - 1 / (2 * beta))
    elif loss == "hinge":
        by_margin = torch.where(1 - x > 0, -beta, 0.0).to(x.dtype)
    elif loss == "robust":
        by_margin = beta * (-(1 - eps) * sig(-x) - eps * sig(x)) / (1 - 2 * eps)
    elif loss == "exo_pair":
        by_margin = beta * sig_prime(x) * (x - math.log((1 - eps) / eps))
    elif loss == "discopop":
        mix = sig(x / DISCOPOP_TAU)
        d_mix = mix * (1 - mix) / DISCOPOP_TAU
        by_margin = beta * (d_mix * (logsig(x) + torch.exp(-x)) - (1 - mix) * sig(-x)
                            - mix * torch.exp(-x))
    if by_margin is not None:
        return by_margin, -by_margin
    u_w, u_l = beta * chosen_ratio, beta * rejected_ratio
    if loss == "nca_pair":
        return beta * (-sig(-u_w) + 0.5 * sig(u_w)), beta * 0.5 * sig(u_l)
    if loss == "bco_pair":
        return -beta * sig(-u_w), beta * sig(u_l)
    if loss == "sppo_hard":
        return 2 * (chosen_ratio - 1 / (2 * beta)), 2 * (rejected_ratio + 1 / (2 * beta))
    if loss == "apo_zero":
        return -beta * sig_prime(u_w), beta * sig_prime(u_l)
    if loss == "apo_down":
        return beta * (sig_prime(u_w) - sig_prime(x)), beta * sig_prime(x)
    raise ValueError(f"unknown preference loss {loss!r}")


def backward(grad_losses, policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta,
             label_smoothing):
    acc = accumulation_dtype(policy_chosen.dtype)
    chosen_ratio = policy_chosen.to(acc) - ref_chosen.to(acc)
    rejected_ratio = policy_rejected.to(acc) - ref_rejected.to(acc)
    d_chosen, d_rejected = pair_loss_ratio_grads(chosen_ratio, rejected_ratio, loss, beta,
                                                 label_smoothing)
    grad = grad_losses.to(acc)
    d_chosen, d_rejected = grad * d_chosen, grad * d_rejected
    return (d_chosen.to(policy_chosen.dtype), d_rejected.to(policy_rejected.dtype),
            (-d_chosen).to(ref_chosen.dtype), (-d_rejected).to(ref_rejected.dtype))


def _masked_row_reduce(per_token, mask, average):
    """(per-row masked sum or mean, d result / d per_token). Masked positions are skipped by
    selection: 0 * NaN = NaN, so a multiply by the mask would let them leak."""
    weights = mask.to(per_token.dtype)
    summed = torch.where(mask != 0, per_token * weights, 0.0).sum(-1)
    if not average:
        return summed, weights
    counts = weights.sum(-1).clamp(min=1)
    return summed / counts, weights / counts[:, None]


def sequence_preference_forward(token_logprobs, mask, ref_logps, loss, beta, label_smoothing,
                                average):
    """Masked sum (or mean) over T of per-token log-probs [2B, T], chosen rows first, then the
    pair loss. ref_logps is [2B] (used as is) or [2B, T] (reduced like the policy's).
    Returns (losses [B], policy_logps [2B], ref_logps [2B])."""
    acc = accumulation_dtype(token_logprobs.dtype)
    policy_seq, _ = _masked_row_reduce(token_logprobs.to(acc), mask, average)
    ref_seq = (_masked_row_reduce(ref_logps.to(acc), mask, average)[0] if ref_logps.dim() == 2
               else ref_logps.to(acc, copy=True))
    pairs = token_logprobs.shape[0] // 2
    losses = pair_losses(policy_seq[:pairs], policy_seq[pairs:], ref_seq[:pairs], ref_seq[pairs:],
                         loss, beta, label_smoothing)
    return losses, policy_seq, ref_seq


def sequence_preference_backward(grad_losses, token_logprobs, mask, ref_logps, policy_seq, ref_seq,
                                 loss, beta, label_smoothing, average):
    """(grad_token_logprobs [2B, T], grad_ref_logps shaped like ref_logps)."""
    acc = policy_seq.dtype
    pairs = token_logprobs.shape[0] // 2
    d_chosen, d_rejected = pair_loss_ratio_grads(policy_seq[:pairs] - ref_seq[:pairs],
                                                 policy_seq[pairs:] - ref_seq[pairs:],
                                                 loss, beta, label_smoothing)
    grad_policy_seq = torch.cat([d_chosen, d_rejected]) * grad_losses.to(acc).repeat(2)
    _, token_weights = _masked_row_reduce(token_logprobs.to(acc), mask, average)
    grad_tokens = grad_policy_seq[:, None] * token_weights
    grad_ref = -grad_tokens if ref_logps.dim() == 2 else -grad_policy_seq
    return grad_tokens, grad_ref
