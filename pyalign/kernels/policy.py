"""Policy-gradient losses (the registry's policy terms, pyalign/losses/policy.py) fused with the
per-token KL and entropy terms and the masked row reductions.

Forward, per row b (one program): pass 1 reads the mask and the log-ratios l = logp − old_logp
for the row's token count n, its log-ratio sum (mean for the "sequence" level) and vespo's
clamped sum (plus its sampler log-weight); pass 2 forms per token the ratio w (exp(l) per token,
or the row's exp(s)), the policy term P (``_policy_term``, branch = the entry's kernel_id, a
runtime argument) times the rollout weight ω (pyalign/losses/rollout.py), the KL estimate
(k1/k2/k3 of d = ref_logp − logp, times w with the bias correction) and the clip flags, and
writes the row's reduction pieces (losses.POLICY_ROW_STATS, 12 floats). The op forms loss and
metrics from them. Backward, per row: the same pass 1; for sequence-level ratios one more pass
for R_b = Σ_t m·(em·ω·dP/dw + β·[bias]·kl) (dw_b/dlogp_t = w_b·m_t (/ n_b)); then one pass
writing d loss/d logp_t for the given per-row token weights (and the entropy gradient).
Masked positions are selected away (never multiplied by 0): NaN there does not leak. Clamps and
minima are written as selects, so NaN in kept data propagates. Every product with the ratio or
ω is ``_times`` (0·inf = 0; ``_times_ratio`` where one factor is a ratio ≥ 0): a zero slope,
advantage or weight contributes exactly 0 however far the ratio overflows. ω is a compile-time
flag (HAS_WEIGHTS): the kernels without it carry none of its code.

Memory traffic per token: forward reads logp, old_logp (+ ref, entropy, advantages when per
token; ω when given) in fp32 and the mask bytes twice (the two passes), writes 48 bytes per row;
backward reads them two or three times and writes the gradient (+ the entropy gradient). Eager runs some
40 elementwise kernels over [B, T] temporaries. Launch grid: (B,), one program per row looping
over T in BLOCK_T chunks. Its cost on a GPU beside the other families' (launch-bound):
docs/gpu.md.
"""
from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from pyalign import kernels as _kernels
from pyalign import losses
from pyalign.kernels.kl import k3_and_expm1

TERM_IDS = losses.policy_kernel_ids()  # {loss name: branch of _policy_term}
NUM_STATS = len(losses.POLICY_ROW_STATS)
_S = {name: index for index, name in enumerate(losses.POLICY_ROW_STATS)}
assert list(_S) == ["tokens", "log_ratio", "log_ratio_clamped_sum", "policy", "kl", "clip_low",
                    "clip_high", "clip_region", "ratio", "entropy", "entropy_kept", "kept"], \
    "the kernels store the row stats in this order"
BLOCK_T = 512
NUM_WARPS = 4
VESPO_CLAMP = losses.VESPO_LOG_RATIO_CLAMP
VESPO_MIN_LOG_W = losses.VESPO_MIN_LOG_WEIGHT


@triton.jit
def _times(a, b):
    """a*b with 0*inf = 0 either way round (pyalign.losses.times); NaN still propagates."""
    zero_times_inf = ((a == 0.0) & (tl.abs(b) == float("inf"))) | \
        ((b == 0.0) & (tl.abs(a) == float("inf")))
    return tl.where(zero_times_inf, 0.0, a * b)


@triton.jit
def _times_ratio(x, w):
    """x*w for a ratio w >= 0 (+inf included): _times with the one case a ratio can give."""
    return tl.where((x == 0.0) & (w == float("inf")), 0.0, x * w)


@triton.jit
def _policy_term(w, adv, logp, vespo_log_w, term_id, eps_low, eps_high, delta, tau_pos, tau_neg,
                 k_pos, lam_pos, k_neg, lam_neg):
    """(P, dP/dw, D = dP/dlogp at fixed w, clipped low, clipped high) elementwise."""
    zero = tl.zeros_like(w)
    if term_id == 0:  # PPO clip: -min(min(w, delta)*A, clamp(w, 1-eps_low, 1+eps_high)*A)
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        c1 = tl.where(w > delta, delta, w)
        c2 = tl.where(w < lo, lo, tl.where(w > hi, hi, w))
        a = _times(c1, adv)
        b = _times(c2, adv)
        value = -tl.where(a < b, a, b)
        slope1 = tl.where(w <= delta, 1.0, 0.0)
        slope2 = tl.where((w >= lo) & (w <= hi), 1.0, 0.0)
        # torch.minimum splits the gradient at a tie (w inside the clip range)
        slope = tl.where(a < b, slope1, tl.where(a > b, slope2, 0.5 * (slope1 + slope2)))
        d_ratio = -adv * slope
        direct = zero
        low = (c1 < lo) & (adv < 0.0)
        high = (c1 > hi) & (adv > 0.0)
    elif term_id == 1:  # cispo: -sg(min(w, eps_high))*A*logp
        capped = tl.where(w > eps_high, eps_high, w)
        direct = -capped * adv
        value = direct * logp
        d_ratio = zero
        low = zero != zero  # never clipped low
        high = (w > eps_high) & (adv > 0.0)
    elif term_id == 2:  # sapo: -sigmoid(tau*(w-1))*4/tau*A
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        x = tau * (w - 1.0)
        gate = tl.sigmoid(x)
        value = -gate * (4.0 / tau) * adv
        d_ratio = -4.0 * gate * tl.sigmoid(-x) * adv
        direct = zero
        low = zero != zero  # no clip
        high = low
    else:  # vespo: -sg(phi)*A*logp, phi = exp(lam + k*log w_s - lam*w_s)
        nonneg = adv >= 0.0
        k = tl.where(nonneg, k_pos, k_neg)
        lam = tl.maximum(tl.where(nonneg, lam_pos, lam_neg), 1e-4)
        phi = tl.exp(lam + k * vespo_log_w - lam * tl.exp(vespo_log_w))
        phi = tl.where((phi == phi) & (phi < float("inf")), phi, 0.0)  # nan_to_num, as TRL
        direct = -phi * adv
        value = direct * logp
        d_ratio = zero
        low = zero != zero  # no clip
        high = low
    return value, d_ratio, direct, low, high


@triton.jit
def _kl_and_slope(logp, ref, estimator):
    """(kl, d kl / d logp) at the sampled token, d = ref_logp - logp."""
    diff = ref - logp
    if estimator == 1:
        kl = -diff
        slope = tl.zeros_like(diff) + 1.0
    elif estimator == 2:
        kl = 0.5 * diff * diff
        slope = -diff
    else:
        kl, expm1 = k3_and_expm1(diff)
        slope = -expm1
    return kl, slope


@triton.jit
def _row_ratio_stats(logprobs_ptr, old_ptr, mask_ptr, row_start, length, BLOCK_T: tl.constexpr):
    """(n, Σ m·l, Σ m·clamp(l, ±20)) of one row."""
    count = tl.zeros((BLOCK_T,), tl.float32)
    total = tl.zeros((BLOCK_T,), tl.float32)
    clamped = tl.zeros((BLOCK_T,), tl.float32)
    for start in range(0, length, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        in_row = cols < length
        keep = tl.load(mask_ptr + row_start + cols, mask=in_row, other=0) != 0
        logp = tl.load(logprobs_ptr + row_start + cols, mask=in_row, other=0.0)
        old = tl.load(old_ptr + row_start + cols, mask=in_row, other=0.0)
        log_ratio = tl.where(keep, logp - old, 0.0)
        count += tl.where(keep, 1.0, 0.0)
        total += log_ratio
        clamped += tl.where(log_ratio < -20.0, -20.0, tl.where(log_ratio > 20.0, 20.0, log_ratio))
    return tl.sum(count, axis=0), tl.sum(total, axis=0), tl.sum(clamped, axis=0)


@triton.jit
def _row_setup(logprobs_ptr, old_ptr, mask_ptr, adv_ptr, log_weights_ptr, length, adv_token_stride,
               sequence_mean, has_log_weights, BLOCK_T: tl.constexpr):
    """What both kernels need of their row before the token loop: (row, row_start, adv_row, n,
    the row's log-ratio (sum or mean), its clamped sum, vespo's log-weight, the sequence ratio)."""
    row = tl.program_id(0).to(tl.int64)
    row_start = row * length
    count, total, clamped = _row_ratio_stats(logprobs_ptr, old_ptr, mask_ptr, row_start, length,
                                             BLOCK_T)
    row_log_ratio = tl.where(sequence_mean != 0, total / tl.maximum(count, 1.0), total)
    log_w = clamped + tl.where(has_log_weights != 0, tl.load(log_weights_ptr + row), 0.0)
    vespo_log_w = tl.where(log_w < -18.420680743952367, -18.420680743952367,
                           tl.where(log_w > 20.0, 20.0, log_w))
    row_ratio = tl.exp(row_log_ratio)
    adv_row = adv_ptr + row * (1 + (length - 1) * adv_token_stride)
    return row, row_start, adv_row, count, row_log_ratio, clamped, vespo_log_w, row_ratio


@triton.jit
def _weighted(value, weights_ptr, row_start, start, length, HAS_WEIGHTS: tl.constexpr,
              BLOCK_T: tl.constexpr):
    """ω·value for one block of a row (0·inf = 0), ω the rollout weights; value without them."""
    if HAS_WEIGHTS:
        cols = start + tl.arange(0, BLOCK_T)
        omega = tl.load(weights_ptr + row_start + cols, mask=cols < length, other=1.0)
        value = _times(omega, value)
    return value


@triton.jit
def _load_block(logprobs_ptr, old_ptr, mask_ptr, emask_ptr, adv_row, row_start, start, length,
                adv_token_stride, row_ratio, SEQUENCE: tl.constexpr, BLOCK_T: tl.constexpr):
    """One block of a row: (cols, in_row, keep (the mask), kept (mask and entropy mask), logp,
    adv, the ratio w). Masked tokens read as 0 by selection, so NaN there stays out; the old
    log-probs are read only for token-level ratios."""
    cols = start + tl.arange(0, BLOCK_T)
    in_row = cols < length
    keep = tl.load(mask_ptr + row_start + cols, mask=in_row, other=0) != 0
    kept = keep & (tl.load(emask_ptr + row_start + cols, mask=in_row, other=0) != 0)
    logp = tl.where(keep, tl.load(logprobs_ptr + row_start + cols, mask=in_row, other=0.0), 0.0)
    adv = tl.where(keep, tl.load(adv_row + cols * adv_token_stride, mask=in_row, other=0.0), 0.0)
    if SEQUENCE:
        w = tl.zeros_like(logp) + row_ratio
    else:
        old = tl.where(keep, tl.load(old_ptr + row_start + cols, mask=in_row, other=0.0), 0.0)
        w = tl.exp(logp - old)
    return cols, in_row, keep, kept, logp, adv, w


@triton.jit
def policy_forward_kernel(logprobs_ptr, old_ptr, adv_ptr, mask_ptr, emask_ptr, ref_ptr,
                          entropy_ptr, weights_ptr, log_weights_ptr, stats_ptr, length,
                          adv_token_stride, has_log_weights, term_id, estimator,
                          sequence_mean, bias, eps_low, eps_high, delta, tau_pos, tau_neg, k_pos,
                          lam_pos, k_neg, lam_neg,
                          SEQUENCE: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENTROPY: tl.constexpr,
                          HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr):
    row, row_start, adv_row, count, row_log_ratio, clamped, vespo_log_w, row_ratio = _row_setup(
        logprobs_ptr, old_ptr, mask_ptr, adv_ptr, log_weights_ptr, length, adv_token_stride,
        sequence_mean, has_log_weights, BLOCK_T)
    policy = tl.zeros((BLOCK_T,), tl.float32)
    kl_sum = tl.zeros((BLOCK_T,), tl.float32)
    low_sum = tl.zeros((BLOCK_T,), tl.float32)
    high_sum = tl.zeros((BLOCK_T,), tl.float32)
    ratio_sum = tl.zeros((BLOCK_T,), tl.float32)
    entropy_sum = tl.zeros((BLOCK_T,), tl.float32)
    entropy_kept = tl.zeros((BLOCK_T,), tl.float32)
    kept_sum = tl.zeros((BLOCK_T,), tl.float32)
    for start in range(0, length, BLOCK_T):
        cols, in_row, keep, kept, logp, adv, w = _load_block(
            logprobs_ptr, old_ptr, mask_ptr, emask_ptr, adv_row, row_start, start, length,
            adv_token_stride, row_ratio, SEQUENCE, BLOCK_T)
        value, d_ratio, direct, low, high = _policy_term(
            w, adv, logp, vespo_log_w, term_id, eps_low, eps_high, delta, tau_pos, tau_neg, k_pos,
            lam_pos, k_neg, lam_neg)
        value = _weighted(value, weights_ptr, row_start, start, length, HAS_WEIGHTS, BLOCK_T)
        policy += tl.where(kept, value, 0.0)
        low = low & keep
        high = high & keep
        low_sum += tl.where(low, 1.0, 0.0)
        high_sum += tl.where(high, 1.0, 0.0)
        ratio_sum += tl.where(keep, w, 0.0)
        kept_sum += tl.where(kept, 1.0, 0.0)
        if HAS_REF:
            ref = tl.where(keep, tl.load(ref_ptr + row_start + cols, mask=in_row, other=0.0), 0.0)
            kl, _ = _kl_and_slope(logp, ref, estimator)
            kl = tl.where(bias != 0, _times_ratio(kl, w), kl)
            kl_sum += tl.where(keep, kl, 0.0)
        if HAS_ENTROPY:
            entropy = tl.load(entropy_ptr + row_start + cols, mask=in_row, other=0.0)
            entropy_sum += tl.where(keep, entropy, 0.0)
            entropy_kept += tl.where(kept, entropy, 0.0)
    out = stats_ptr + row * 12
    tl.store(out + 0, count)
    tl.store(out + 1, row_log_ratio)
    tl.store(out + 2, clamped)
    tl.store(out + 3, tl.sum(policy, axis=0))
    tl.store(out + 4, tl.sum(kl_sum, axis=0))
    tl.store(out + 5, tl.sum(low_sum, axis=0))
    tl.store(out + 6, tl.sum(high_sum, axis=0))
    # the union's count: the flags are disjoint (low needs A < 0, high A > 0), one fewer
    # accumulator to hold
    tl.store(out + 7, tl.sum(low_sum, axis=0) + tl.sum(high_sum, axis=0))
    tl.store(out + 8, tl.sum(ratio_sum, axis=0))
    tl.store(out + 9, tl.sum(entropy_sum, axis=0))
    tl.store(out + 10, tl.sum(entropy_kept, axis=0))
    tl.store(out + 11, tl.sum(kept_sum, axis=0))


@triton.jit
def policy_backward_kernel(row_weights_ptr, entropy_weights_ptr, logprobs_ptr, old_ptr, adv_ptr,
                           mask_ptr, emask_ptr, ref_ptr, weights_ptr, log_weights_ptr, grad_ptr,
                           grad_entropy_ptr, length, adv_token_stride, has_log_weights, term_id,
                           estimator, sequence_mean, bias, beta,
                           eps_low, eps_high, delta, tau_pos, tau_neg, k_pos, lam_pos, k_neg,
                           lam_neg,
                           SEQUENCE: tl.constexpr, HAS_KL: tl.constexpr,
                           HAS_ENTROPY_GRAD: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                           BLOCK_T: tl.constexpr):
    row, row_start, adv_row, count, row_log_ratio, clamped, vespo_log_w, row_ratio = _row_setup(
        logprobs_ptr, old_ptr, mask_ptr, adv_ptr, log_weights_ptr, length, adv_token_stride,
        sequence_mean, has_log_weights, BLOCK_T)
    row_weight = tl.load(row_weights_ptr + row)
    through_row = 0.0
    if SEQUENCE:  # R_b = Σ_t m·(em·ω·dP/dw + β·[bias]·kl), then dw_b/dlogp_t = w_b (/ n_b)
        row_sum = tl.zeros((BLOCK_T,), tl.float32)
        for start in range(0, length, BLOCK_T):
            cols, in_row, keep, kept, logp, adv, w = _load_block(
                logprobs_ptr, old_ptr, mask_ptr, emask_ptr, adv_row, row_start, start, length,
                adv_token_stride, row_ratio, True, BLOCK_T)
            _, d_ratio, _, _, _ = _policy_term(
                w, adv, logp, vespo_log_w, term_id, eps_low, eps_high, delta, tau_pos, tau_neg,
                k_pos, lam_pos, k_neg, lam_neg)
            d_ratio = _weighted(d_ratio, weights_ptr, row_start, start, length, HAS_WEIGHTS,
                                BLOCK_T)
            row_sum += tl.where(kept, d_ratio, 0.0)
            if HAS_KL:
                ref = tl.where(keep, tl.load(ref_ptr + row_start + cols, mask=in_row, other=0.0),
                               0.0)
                kl, _ = _kl_and_slope(logp, ref, estimator)
                row_sum += tl.where(keep & (bias != 0), beta * kl, 0.0)
        through_row = _times(tl.sum(row_sum, axis=0), row_ratio)
        through_row = tl.where(sequence_mean != 0, through_row / tl.maximum(count, 1.0),
                               through_row)
    if HAS_ENTROPY_GRAD:
        entropy_weight = tl.load(entropy_weights_ptr + row)
    for start in range(0, length, BLOCK_T):
        cols, in_row, keep, kept, logp, adv, w = _load_block(
            logprobs_ptr, old_ptr, mask_ptr, emask_ptr, adv_row, row_start, start, length,
            adv_token_stride, row_ratio, SEQUENCE, BLOCK_T)
        _, d_ratio, direct, _, _ = _policy_term(
            w, adv, logp, vespo_log_w, term_id, eps_low, eps_high, delta, tau_pos, tau_neg, k_pos,
            lam_pos, k_neg, lam_neg)
        d_ratio = _weighted(d_ratio, weights_ptr, row_start, start, length, HAS_WEIGHTS, BLOCK_T)
        direct = _weighted(direct, weights_ptr, row_start, start, length, HAS_WEIGHTS, BLOCK_T)
        d_ratio = tl.where(kept, d_ratio, 0.0)
        grad = tl.where(kept, direct, 0.0)
        if HAS_KL:
            ref = tl.where(keep, tl.load(ref_ptr + row_start + cols, mask=in_row, other=0.0), 0.0)
            kl, kl_slope = _kl_and_slope(logp, ref, estimator)
            slope = beta * kl_slope
            grad += tl.where(bias != 0, _times_ratio(slope, w), slope)
            d_ratio += tl.where(bias != 0, beta * kl, 0.0)
        if SEQUENCE:
            grad += through_row
        else:
            grad += _times(d_ratio, w)
        tl.store(grad_ptr + row_start + cols, tl.where(keep, grad * row_weight, 0.0), mask=in_row)
        if HAS_ENTROPY_GRAD:
            tl.store(grad_entropy_ptr + row_start + cols, tl.where(kept, entropy_weight, 0.0),
                     mask=in_row)


def _bytes(mask):
    # bytes, not i1: a bool load goes through a shared-memory layout conversion in Triton
    return mask.to(torch.bool).contiguous().view(torch.uint8)


def _scalars(loss, level, params, kl_estimator, bias_correction):
    p = list(params)
    return dict(term_id=TERM_IDS[loss], estimator=losses.KL_ESTIMATOR_IDS[kl_estimator],
                sequence_mean=int(level == "sequence"), bias=int(bool(bias_correction)),
                eps_low=p[0], eps_high=p[1], delta=p[2], tau_pos=p[3], tau_neg=p[4], k_pos=p[5],
                lam_pos=p[6], k_neg=p[7], lam_neg=p[8])


def _row_inputs(logprobs, old_logprobs, advantages, mask, entropy_mask, ref_logprobs):
    vec = _kernels.as_fp32_vector
    mask_bytes = _bytes(mask)
    emask_bytes = mask_bytes if entropy_mask is None else _bytes(entropy_mask)
    adv = vec(advantages)
    return (vec(logprobs), vec(old_logprobs), adv, mask_bytes, emask_bytes,
            None if ref_logprobs is None else vec(ref_logprobs), int(advantages.dim() == 2))


def _corrections(policy_weights, sampler_log_weights, per_row):
    """The rollout weights' kernel arguments: (weights, log_weights, has_log_weights,
    HAS_WEIGHTS); ``per_row``, a buffer of at least B floats, stands in for an absent one (never
    read for the weights; its value selected away for the log-weights)."""
    vec = _kernels.as_fp32_vector
    return dict(weights_ptr=per_row if policy_weights is None else vec(policy_weights),
                log_weights_ptr=(per_row if sampler_log_weights is None
                                 else vec(sampler_log_weights)),
                has_log_weights=int(sampler_log_weights is not None),
                HAS_WEIGHTS=policy_weights is not None)


def forward(logprobs, old_logprobs, advantages, mask, entropy_mask, ref_logprobs, entropy,
            policy_weights, sampler_log_weights, loss, level, params, beta, kl_estimator,
            bias_correction):
    """The policy family's forward (pyalign/eager/policy.py): row stats [B, 12] fp32."""
    rows, length = logprobs.shape
    lp, old, adv, mask_b, emask_b, ref, adv_stride = _row_inputs(
        logprobs, old_logprobs, advantages, mask, entropy_mask, ref_logprobs)
    ent = None if entropy is None else _kernels.as_fp32_vector(entropy)
    stats = _kernels.new_output((rows, NUM_STATS), torch.float32, logprobs.device)
    policy_forward_kernel[(rows,)](
        lp, old, adv, mask_b, emask_b, lp if ref is None else ref, lp if ent is None else ent,
        stats_ptr=stats, length=length, adv_token_stride=adv_stride,
        **_corrections(policy_weights, sampler_log_weights, stats),
        **_scalars(loss, level, params, kl_estimator, bias_correction),
        SEQUENCE=level != "token", HAS_REF=ref is not None, HAS_ENTROPY=ent is not None,
        BLOCK_T=BLOCK_T, num_warps=NUM_WARPS)
    return stats


def backward(row_weights, entropy_weights, logprobs, old_logprobs, advantages, mask, entropy_mask,
             ref_logprobs, entropy, policy_weights, sampler_log_weights, loss, level, params, beta,
             kl_estimator, bias_correction):
    """The policy family's backward (pyalign/eager/policy.py): (grad_logprobs, grad_entropy or None)."""
    rows, length = logprobs.shape
    lp, old, adv, mask_b, emask_b, ref, adv_stride = _row_inputs(
        logprobs, old_logprobs, advantages, mask, entropy_mask, ref_logprobs)
    has_kl = ref is not None and beta != 0
    with_entropy = entropy is not None and entropy_weights is not None
    weights = _kernels.as_fp32_vector(row_weights)
    grad = _kernels.new_output(rows * length, torch.float32, logprobs.device)
    grad_entropy = (_kernels.new_output(rows * length, torch.float32, logprobs.device)
                    if with_entropy else None)
    policy_backward_kernel[(rows,)](
        weights, _kernels.as_fp32_vector(entropy_weights) if with_entropy else weights, lp, old,
        adv, mask_b, emask_b, ref if has_kl else lp,
        grad_ptr=grad, grad_entropy_ptr=grad_entropy if with_entropy else grad, length=length,
        adv_token_stride=adv_stride, **_corrections(policy_weights, sampler_log_weights, weights),
        **_scalars(loss, level, params, kl_estimator, bias_correction), beta=float(beta),
        SEQUENCE=level != "token", HAS_KL=has_kl, HAS_ENTROPY_GRAD=with_entropy, BLOCK_T=BLOCK_T,
        num_warps=NUM_WARPS)
    grad = grad.view(rows, length).to(logprobs.dtype)
    if grad_entropy is not None:
        grad_entropy = grad_entropy.view(rows, length).to(entropy.dtype)
    return grad, grad_entropy


# the kernels' float arguments (the others are i32 scalars and fp32 pointers but the byte masks)
_TYPES = {"mask_ptr": "*u8", "emask_ptr": "*u8",
          **{name: "fp32" for name in ("beta", "eps_low", "eps_high", "delta", "tau_pos", "tau_neg",
                                       "k_pos", "lam_pos", "k_neg", "lam_neg")}}


def compile_configs():
    configs = []
    for sequence, weights in itertools.product((False, True), (False, True)):
        for has_ref, has_entropy in itertools.product((False, True), (False, True)):
            configs.append(_kernels.compile_config(
                policy_forward_kernel, "policy_forward",
                f"seq={sequence} ref={has_ref} entropy={has_entropy} weights={weights}",
                NUM_WARPS, {"SEQUENCE": sequence, "HAS_REF": has_ref, "HAS_ENTROPY": has_entropy,
                            "HAS_WEIGHTS": weights, "BLOCK_T": BLOCK_T},
                types=_types_of(policy_forward_kernel)))
        for has_kl, entropy_grad in itertools.product((False, True), (False, True)):
            configs.append(_kernels.compile_config(
                policy_backward_kernel, "policy_backward",
                f"seq={sequence} kl={has_kl} entropy_grad={entropy_grad} weights={weights}",
                NUM_WARPS, {"SEQUENCE": sequence, "HAS_KL": has_kl,
                            "HAS_ENTROPY_GRAD": entropy_grad, "HAS_WEIGHTS": weights,
                            "BLOCK_T": BLOCK_T}, types=_types_of(policy_backward_kernel)))
    return configs


def _types_of(kernel):
    """_TYPES restricted to the arguments of ``kernel``."""
    return {name: kind for name, kind in _TYPES.items() if name in kernel.arg_names}


assert math.isclose(VESPO_MIN_LOG_W, -18.420680743952367) and VESPO_CLAMP == 20.0, \
    "the kernels hard-code vespo's clamps"
