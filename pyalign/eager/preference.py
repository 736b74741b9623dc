"""Eager preference losses: the reference implementation of the ``preference`` family.

The family's contract (every backend's primitives); ``loss`` names a registry entry's pair math
(pyalign/losses.py, ``Loss.math``):

forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta, label_smoothing)
    -> losses[B] f32
backward(grad_losses, policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta,
         label_smoothing) -> (grad_pc, grad_pr, grad_rc, grad_rr)
sequence_preference_forward(token_logprobs[2B,T], mask[2B,T], ref_logps[2B] | [2B,T], loss,
         beta, label_smoothing, average) -> (losses[B], policy_logps[2B], ref_logps[2B])
    masked sum (mean with ``average``) over T, chosen rows first, then the pair loss
sequence_preference_backward(grad_losses, token_logprobs, mask, ref_logps, policy_logps,
         ref_logps_reduced, loss, beta, label_smoothing, average)
    -> (grad_token_logprobs[2B,T], grad_ref_logps shaped like ref_logps)

A backend whose kernels lack a loss's pair math says so in its capability hook
(pyalign/_triton_backend.py); the call then runs here.

``pair_losses`` (differentiable by autograd) and ``pair_loss_ratio_grads`` (closed-form
gradients) are the per-pair math every entry point shares; both call the registry entry.

The C++ CPU backend has no preference family on purpose: the pair math is O(B), and the only
O(B·T) part, the masked sequence reduction, is one vectorised torch where+sum over the per-token
log-probs whose computation (the lm_head, O(B·T·V·H)) costs ~V·H times more; a C++ kernel would
save one [2B, T] temporary and add a second implementation of every pair loss to keep in step.
"""
from __future__ import annotations

import torch

from pyalign import losses
from pyalign._utils import accumulation_dtype

PRIMITIVES = ("forward", "backward", "sequence_preference_forward",
              "sequence_preference_backward")


def pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta,
                label_smoothing):
    """Per-pair losses [B] in fp32 (fp64 for fp64 inputs), differentiable by torch autograd: the
    registry entry's forward (pyalign/losses.py, the loss table of docs/algorithms.md)."""
    entry = losses.get(loss)
    acc = accumulation_dtype(policy_chosen.dtype)
    chosen_ratio = policy_chosen.to(acc) - ref_chosen.to(acc)  # r_w
    rejected_ratio = policy_rejected.to(acc) - ref_rejected.to(acc)  # r_l
    return entry.forward(chosen_ratio, rejected_ratio, beta, label_smoothing)


def forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta, label_smoothing):
    with torch.no_grad():
        return pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta,
                           label_smoothing)


def pair_loss_ratio_grads(chosen_ratio, rejected_ratio, loss, beta, label_smoothing):
    """(dL/dr_w, dL/dr_l) per pair, in closed form (custom ops run below autograd): the registry
    entry's gradient."""
    return losses.get(loss).grad(chosen_ratio, rejected_ratio, beta, label_smoothing)


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
    kept = mask != 0
    weights = kept.to(per_token.dtype)  # each kept token counts once, as in sequence_logprobs
    summed = torch.where(kept, per_token, 0.0).sum(-1)
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
    per_pair = pair_losses(policy_seq[:pairs], policy_seq[pairs:], ref_seq[:pairs], ref_seq[pairs:],
                         loss, beta, label_smoothing)
    return per_pair, policy_seq, ref_seq


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
