"""Eager policy-gradient loss pieces: the reference implementation of the ``policy`` family,
straight from the registry's policy terms (pyalign/losses.py).

The family's contract (every backend's primitives):

forward(logprobs[B,T], old_logprobs[B,T], advantages[B] | [B,T], mask[B,T] bool,
        entropy_mask[B,T] bool | None, ref_logprobs[B,T] | None, entropy[B,T] | None,
        policy_weights[B,T] | None, sampler_log_weights[B] | None, loss, level, params, beta,
        kl_estimator, bias_correction) -> row_stats[B, S] (f32; f64 for f64 inputs), the per-row
        reductions named by pyalign.losses.POLICY_ROW_STATS
    loss: a name of losses.POLICY_REGISTRY (its policy term, by kernel_id); level "token",
    "sequence" (w = exp of the row's masked mean log-ratio) or "sequence_sum" (exp of the sum);
    params: losses.PolicyParams.as_list(); the KL stat (and term) only with ref_logprobs, times
    the ratio with bias_correction; entropy_mask already within mask. policy_weights: a constant
    factor ω_t on the policy term (the rollout correction and the off-policy mask,
    pyalign/losses/rollout.py); sampler_log_weights: added to vespo's clamped log-ratio sum before
    its clamp (its sequence weight takes the rollout correction). A product 0·∞ is 0
    (losses.times): a zero slope, advantage or weight contributes exactly 0 however far the ratio
    overflows. Masked positions: their inputs never reach a stat (selected away, NaN included).
backward(row_weights[B] f32, entropy_weights[B] f32 | None, the forward's inputs)
    -> (grad_logprobs like logprobs, grad_entropy like entropy or None)
    the gradient of Σ_b row_weights[b]·Σ_t m·(em·P + β·kl) + Σ_b entropy_weights[b]·Σ_t m·em·H;
    masked positions exactly 0

fp32 math (fp64 for fp64 inputs); masked positions are selected away, so NaN there never leaks.
The oracle-grade reference of the kernels in pyalign/kernels/policy.py and csrc/cpu/policy.cpp.
"""
from __future__ import annotations

import torch

from pyalign import losses
from pyalign._utils import accumulation_dtype
from pyalign.eager import kl as _kl

PRIMITIVES = ("forward", "backward")

_STAT = {name: index for index, name in enumerate(losses.POLICY_ROW_STATS)}


def _kl_slope(logprobs, ref_logprobs, estimator):
    """d kl / d logp at fixed ref_logp, d = ref_logp − logp."""
    diff = ref_logprobs - logprobs
    if estimator == "k1":
        return torch.ones_like(diff)
    if estimator == "k2":
        return -diff
    return -torch.expm1(diff)


def _terms(logprobs, old_logprobs, advantages, mask, entropy_mask, ref_logprobs, policy_weights,
           sampler_log_weights, loss, level, params, estimator, bias_correction):
    """The per-token pieces both primitives need, masked positions selected to 0."""
    acc = accumulation_dtype(logprobs, old_logprobs, ref_logprobs)
    entry = losses.get_policy(loss)
    p = losses.PolicyParams.from_list(params)
    zero = torch.zeros((), dtype=acc, device=logprobs.device)
    logp = torch.where(mask, logprobs.to(acc), zero)
    log_ratio = torch.where(mask, logp - old_logprobs.to(acc), zero)
    advantages = advantages.to(acc)
    advantages = advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages
    advantages = torch.where(mask, advantages, zero)
    tokens = mask.sum(-1).to(acc)
    clamped_sum = torch.clamp(log_ratio, -losses.VESPO_LOG_RATIO_CLAMP,
                              losses.VESPO_LOG_RATIO_CLAMP).sum(-1)
    if level == "token":
        row_log_ratio = log_ratio.sum(-1) / tokens.clamp(min=1)
        ratio = torch.exp(log_ratio)
        ratio_slope = ratio  # dw_t / dlogp_t
    else:
        row_log_ratio = log_ratio.sum(-1)
        if level == "sequence":
            row_log_ratio = row_log_ratio / tokens.clamp(min=1)
        ratio = torch.exp(row_log_ratio)[:, None].expand_as(logp)
        ratio_slope = None  # through the row: see backward
    kept = mask if entropy_mask is None else entropy_mask & mask
    weight_log_sum = clamped_sum if sampler_log_weights is None else \
        clamped_sum + sampler_log_weights.to(acc)
    weights = None if policy_weights is None else torch.where(mask, policy_weights.to(acc), zero)
    policy = entry.forward(ratio, advantages, logp, weight_log_sum[:, None], p)
    policy = torch.where(kept, policy if weights is None else losses.times(weights, policy), zero)
    if ref_logprobs is not None:
        ref = torch.where(mask, ref_logprobs.to(acc), zero)
        kl = _kl.forward(logp, ref, mask, estimator)
        kl_slope = torch.where(mask, _kl_slope(logp, ref, estimator), zero)
    else:
        kl = kl_slope = None
    if kl is not None and bias_correction:
        kl_term = torch.where(mask, losses.times(kl, ratio), zero)
    else:
        kl_term = kl
    return dict(acc=acc, entry=entry, p=p, zero=zero, logp=logp, ratio=ratio,
                ratio_slope=ratio_slope, advantages=advantages, tokens=tokens,
                row_log_ratio=row_log_ratio, clamped_sum=clamped_sum,
                weight_log_sum=weight_log_sum, weights=weights, kept=kept, policy=policy, kl=kl,
                kl_term=kl_term, kl_slope=kl_slope)


def forward(logprobs, old_logprobs, advantages, mask, entropy_mask, ref_logprobs, entropy,
            policy_weights, sampler_log_weights, loss, level, params, beta, kl_estimator,
            bias_correction):
    t = _terms(logprobs, old_logprobs, advantages, mask, entropy_mask, ref_logprobs,
               policy_weights, sampler_log_weights, loss, level, params, kl_estimator,
               bias_correction)
    zero, kept = t["zero"], t["kept"]
    low, high = losses.policy_clip_flags(t["entry"], t["ratio"], t["advantages"], t["p"])
    low, high = low & mask, high & mask
    stats = torch.zeros(mask.shape[0], len(losses.POLICY_ROW_STATS), dtype=t["acc"],
                        device=mask.device)
    stats[:, _STAT["tokens"]] = t["tokens"]
    stats[:, _STAT["log_ratio"]] = t["row_log_ratio"]
    stats[:, _STAT["log_ratio_clamped_sum"]] = t["clamped_sum"]
    stats[:, _STAT["policy"]] = t["policy"].sum(-1)
    if t["kl_term"] is not None:
        stats[:, _STAT["kl"]] = t["kl_term"].sum(-1)
    stats[:, _STAT["clip_low"]] = low.sum(-1).to(t["acc"])
    stats[:, _STAT["clip_high"]] = high.sum(-1).to(t["acc"])
    stats[:, _STAT["clip_region"]] = (low | high).sum(-1).to(t["acc"])
    stats[:, _STAT["ratio"]] = torch.where(mask, t["ratio"], zero).sum(-1)
    if entropy is not None:
        ent = entropy.to(t["acc"])
        stats[:, _STAT["entropy"]] = torch.where(mask, ent, zero).sum(-1)
        stats[:, _STAT["entropy_kept"]] = torch.where(kept, ent, zero).sum(-1)
    stats[:, _STAT["kept"]] = kept.sum(-1).to(t["acc"])
    return stats


def backward(row_weights, entropy_weights, logprobs, old_logprobs, advantages, mask, entropy_mask,
             ref_logprobs, entropy, policy_weights, sampler_log_weights, loss, level, params, beta,
             kl_estimator, bias_correction):
    """d loss / d logprobs for loss = Σ_b row_weights[b]·Σ_t m·(em·ω·P + β·kl) (+ Σ_b
    entropy_weights[b]·Σ_t m·em·H: its gradient to entropy)."""
    t = _terms(logprobs, old_logprobs, advantages, mask, entropy_mask, ref_logprobs,
               policy_weights, sampler_log_weights, loss, level, params, kl_estimator,
               bias_correction)
    zero, kept, ratio, weights = t["zero"], t["kept"], t["ratio"], t["weights"]
    d_ratio, direct = t["entry"].grad(ratio, t["advantages"], t["logp"],
                                      t["weight_log_sum"][:, None], t["p"])
    if weights is not None:
        d_ratio, direct = losses.times(weights, d_ratio), losses.times(weights, direct)
    d_ratio = torch.where(kept, d_ratio, zero)  # d(term)/dw, per token
    grad = torch.where(kept, direct, zero)
    if t["kl"] is not None and beta != 0:
        kl_slope = beta * t["kl_slope"]
        grad = grad + (losses.times(kl_slope, ratio) if bias_correction else kl_slope)
        if bias_correction:
            d_ratio = d_ratio + beta * t["kl"]
    if level == "token":
        grad = grad + losses.times(d_ratio, t["ratio_slope"])
    else:  # w_b = exp(s_b): dw_b/dlogp_t = w_b·m_t (/ n_b for the mean)
        row = losses.times(d_ratio.sum(-1), ratio[:, 0])
        if level == "sequence":
            row = row / t["tokens"].clamp(min=1)
        grad = grad + row[:, None]
    grad = torch.where(mask, grad * row_weights.to(t["acc"])[:, None], zero)
    grad_entropy = None
    if entropy is not None and entropy_weights is not None:
        grad_entropy = torch.where(kept, entropy_weights.to(t["acc"])[:, None].expand_as(grad), zero)
        grad_entropy = grad_entropy.to(entropy.dtype)
    return grad.to(logprobs.dtype), grad_entropy
