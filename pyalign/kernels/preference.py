"""Per-pair preference losses (the registry's, pyalign/losses.py) and their gradients; and a fused
"sequence reduce + pair loss" from per-token log-probs.

Per pair, r_w = policy_chosen - ref_chosen, r_l = policy_rejected - ref_rejected, h = r_w - r_l,
x = beta*h. The branches are the registry entries with their own pair math; the other entries
reach them through the registry's ``pair_math`` and ``pair_inputs`` (sigmoid_norm and ipo with
lengths: the sigmoid/ipo branch on length-normalised scores; aot, aot_unpaired: the sigmoid
branch on batch-sorted margins; simpo and cpo: the sigmoid branch on the policy's log-probs,
simpo's shifted by its margin; f-divergences: scores computed in torch before the kernel, their
derivative by autograd), so no loss has a code path here of its own; sft (a linear batch mean,
nothing to fuse) has no branch and runs on eager. orpo runs on the policy's (averaged) log-probs
p <= 0: its log-odds p - log(1 - e^p) with an exact expm1 near 0. One helper, ``_pair_loss_and_grads``, gives
(loss, dloss/dr_w, dloss/dr_l) for the loss id (a runtime argument: one compiled kernel serves
every loss; B is small). Grads of the four inputs: (+, +, -, -) of (dr_w, dr_l, dr_w, dr_l),
times the upstream gradient.
Numerics: log-sigmoid as min(x, 0) - log1p(exp(-|x|)) with an exact log1p; 1 - sigmoid(u) as
sigmoid(-u) and sigmoid'(u) as sigmoid(u)*sigmoid(-u) (no cancellation near 1); discopop's
sigmoid(x/tau)*exp(-x) as exp(logsigmoid(x/tau) - x) (no inf*0); the label-smoothing term is
dropped for eps = 0 and exo_pair's sigmoid(-x)*logsigmoid(-x) is 0 where sigmoid(-x) = 0
(0 * logsigmoid(-inf) would be NaN where the loss is finite).

Sequence kernel: token_logprobs [2B, T] (chosen rows first), mask [2B, T] -> per-row masked sum
(or mean: sum / max(sum(mask), 1), as pyalign.sequence_logprobs), the reference the same way when
given per token ([2B, T]) or as is ([2B]), then the pair loss: one launch, one read of the
per-token log-probs. Its backward writes dloss/dtoken = g * mask (/ count).

Memory traffic: pair kernels read 4*4B and write 4B (forward) / 16B (backward); eager runs
~10-20 elementwise kernels over [B] temporaries. Sequence kernel: reads 2B*T*(4 + 4) bytes
(log-probs + mask; + 4 more with per-token ref), writes 20B bytes; eager's mask-multiply-sum
writes a [2B, T] temporary first. FLOPs: O(B*T), negligible.
Launch grid: pair kernels (cdiv(B, BLOCK),); sequence kernels (B,), one program per pair looping
over T in BLOCK_T chunks. Its cost on a GPU beside the other families' (launch-bound):
docs/gpu.md.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pyalign import kernels as _kernels
from pyalign import losses

# _pair_loss_and_grads has one branch per id 0..KERNEL_BRANCHES-1; the registry says which loss
# each id is (and asserts that every branch has exactly one entry). A pairwise loss without a
# kernel id runs on eager: the backend table sends it there (pyalign/_triton_backend.py).
KERNEL_BRANCHES = 12
LOSS_IDS = losses.kernel_ids(KERNEL_BRANCHES)
BLOCK = 256
BLOCK_T = 512
NUM_WARPS = 4


@triton.jit
def _log1p(value):
    # log(1 + v) exact to a few ulps also for tiny v (Goldberg's trick; no libdevice needed).
    one_plus = 1.0 + value
    return tl.where(one_plus == 1.0, value, tl.log(one_plus) * (value / (one_plus - 1.0)))


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _expm1(x):
    # exp(x) - 1 exact to a few ulps also near 0 (Kahan's trick), -1 at -inf, inf at +inf
    u = tl.exp(x)
    near = tl.where(u == 1.0, x, (u - 1.0) * (x / tl.log(u)))
    return tl.where(u - 1.0 == -1.0, -1.0, tl.where(u == float("inf"), u, near))


@triton.jit
def _log1mexp(p):
    # log(1 - exp(p)) for p <= 0: log(-expm1(p)) above -log 2, log1p(-exp(p)) below
    return tl.where(p > -0.6931471805599453, tl.log(-_expm1(p)), _log1p(-tl.exp(p)))


@triton.jit
def _pair_loss_and_grads(chosen_ratio, rejected_ratio, loss_id, beta, eps, log_one_minus_eps,
                         log_eps, inv_tau):
    """(loss, dloss/dchosen_ratio, dloss/drejected_ratio) elementwise."""
    margin = chosen_ratio - rejected_ratio
    x = beta * margin
    zero = tl.zeros_like(x)
    if loss_id == 0:  # sigmoid (DPO / cDPO)
        loss = -(1.0 - eps) * _logsigmoid(x)
        loss = tl.where(eps != 0.0, loss - eps * _logsigmoid(-x), loss)
        d_x = -(1.0 - eps) * _sigmoid(-x) + eps * _sigmoid(x)
        d_chosen = beta * d_x
        d_rejected = -d_chosen
    elif loss_id == 1:  # ipo
        offset = margin - 0.5 / beta
        loss = offset * offset
        d_chosen = 2.0 * offset
        d_rejected = -d_chosen
    elif loss_id == 2:  # hinge (SLiC); relu'(0) = 0 like torch
        loss = tl.maximum(1.0 - x, 0.0, propagate_nan=tl.PropagateNan.ALL)
        d_chosen = tl.where(1.0 - x > 0.0, -beta, zero)
        d_rejected = -d_chosen
    elif loss_id == 3:  # robust
        scale = 1.0 / (1.0 - 2.0 * eps)
        loss = -(1.0 - eps) * _logsigmoid(x)
        loss = tl.where(eps != 0.0, loss + eps * _logsigmoid(-x), loss) * scale
        d_chosen = beta * scale * (-(1.0 - eps) * _sigmoid(-x) - eps * _sigmoid(x))
        d_rejected = -d_chosen
    elif loss_id == 4:  # exo_pair: d/dx = s(x) s(-x) (x - log(1-eps) + log eps)
        s_pos = _sigmoid(x)
        s_neg = _sigmoid(-x)
        # a zero weight selects 0: logsigmoid(-x) is -inf at x = +inf, where the loss is finite
        loss = (tl.where(s_pos == 0.0, zero, s_pos * (_logsigmoid(x) - log_one_minus_eps))
                + tl.where(s_neg == 0.0, zero, s_neg * (_logsigmoid(-x) - log_eps)))
        s_prime = s_pos * s_neg
        d_chosen = beta * tl.where(s_prime == 0.0, zero, s_prime * (x - log_one_minus_eps + log_eps))
        d_rejected = -d_chosen
    elif loss_id == 5:  # nca_pair
        chosen_x = beta * chosen_ratio
        rejected_x = beta * rejected_ratio
        loss = (-_logsigmoid(chosen_x) - 0.5 * _logsigmoid(-chosen_x)
                - 0.5 * _logsigmoid(-rejected_x))
        d_chosen = beta * (-_sigmoid(-chosen_x) + 0.5 * _sigmoid(chosen_x))
        d_rejected = beta * 0.5 * _sigmoid(rejected_x)
    elif loss_id == 6:  # bco_pair
        chosen_x = beta * chosen_ratio
        rejected_x = beta * rejected_ratio
        loss = -_logsigmoid(chosen_x) - _logsigmoid(-rejected_x)
        d_chosen = -beta * _sigmoid(-chosen_x)
        d_rejected = beta * _sigmoid(rejected_x)
    elif loss_id == 7:  # sppo_hard
        chosen_offset = chosen_ratio - 0.5 / beta
        rejected_offset = rejected_ratio + 0.5 / beta
        loss = chosen_offset * chosen_offset + rejected_offset * rejected_offset
        d_chosen = 2.0 * chosen_offset
        d_rejected = 2.0 * rejected_offset
    elif loss_id == 8:  # apo_zero
        chosen_x = beta * chosen_ratio
        rejected_x = beta * rejected_ratio
        s_rejected = _sigmoid(rejected_x)
        loss = _sigmoid(-chosen_x) + s_rejected  # 1 - s(u_w) + s(u_l)
        d_chosen = -beta * _sigmoid(chosen_x) * _sigmoid(-chosen_x)
        d_rejected = beta * s_rejected * _sigmoid(-rejected_x)
    elif loss_id == 9:  # apo_down
        chosen_x = beta * chosen_ratio
        s_chosen = _sigmoid(chosen_x)
        s_neg_margin = _sigmoid(-x)
        loss = s_chosen + s_neg_margin  # s(u_w) + 1 - s(x)
        d_rejected = beta * _sigmoid(x) * s_neg_margin
        d_chosen = beta * s_chosen * _sigmoid(-chosen_x) - d_rejected
    elif loss_id == 10:  # discopop: m = s(x/tau); (1 - m)(-logsig(x)) + m exp(-x)
        mix = _sigmoid(x * inv_tau)
        one_minus_mix = _sigmoid(-x * inv_tau)
        log_mix = _logsigmoid(x * inv_tau)
        mixed_exp = tl.exp(log_mix - x)                                   # m exp(-x)
        d_mix_exp = tl.exp(log_mix + _logsigmoid(-x * inv_tau) - x) * inv_tau  # m(1-m)/tau exp(-x)
        d_mix = mix * one_minus_mix * inv_tau
        logistic = -_logsigmoid(x)
        loss = one_minus_mix * logistic + mixed_exp
        d_x = -d_mix * logistic - one_minus_mix * _sigmoid(-x) + d_mix_exp - mixed_exp
        d_chosen = beta * d_x
        d_rejected = -d_chosen
    else:  # loss_id == 11, orpo: -beta logsig(z), z = log odds_w - log odds_l of the log-probs
        rejected_log_odds = rejected_ratio - _log1mexp(rejected_ratio)
        z = chosen_ratio - _log1mexp(chosen_ratio) - rejected_log_odds
        loss = -beta * _logsigmoid(z)
        # d/dp_w = -beta s(-z) / (1 - e^p_w), as a sum of positive terms (finite at p_w = 0)
        d_chosen = -beta / (-_expm1(chosen_ratio) + tl.exp(chosen_ratio - rejected_log_odds))
        d_rejected = beta * _sigmoid(-z) / (0.0 - _expm1(rejected_ratio))  # +inf at p_l = 0
    return loss, d_chosen, d_rejected


@triton.jit
def preference_forward_kernel(policy_chosen_ptr, policy_rejected_ptr, ref_chosen_ptr,
                              ref_rejected_ptr, losses_ptr, num_pairs, loss_id, beta, eps,
                              log_one_minus_eps, log_eps, inv_tau, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_pairs
    chosen_ratio = (tl.load(policy_chosen_ptr + offs, mask=in_range, other=0.0)
                    - tl.load(ref_chosen_ptr + offs, mask=in_range, other=0.0))
    rejected_ratio = (tl.load(policy_rejected_ptr + offs, mask=in_range, other=0.0)
                      - tl.load(ref_rejected_ptr + offs, mask=in_range, other=0.0))
    loss, _, _ = _pair_loss_and_grads(chosen_ratio, rejected_ratio, loss_id, beta, eps,
                                      log_one_minus_eps, log_eps, inv_tau)
    tl.store(losses_ptr + offs, loss, mask=in_range)


@triton.jit
def preference_backward_kernel(grad_losses_ptr, policy_chosen_ptr, policy_rejected_ptr,
                               ref_chosen_ptr, ref_rejected_ptr, grad_policy_chosen_ptr,
                               grad_policy_rejected_ptr, grad_ref_chosen_ptr,
                               grad_ref_rejected_ptr, num_pairs, loss_id, beta, eps,
                               log_one_minus_eps, log_eps, inv_tau, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_pairs
    chosen_ratio = (tl.load(policy_chosen_ptr + offs, mask=in_range, other=0.0)
                    - tl.load(ref_chosen_ptr + offs, mask=in_range, other=0.0))
    rejected_ratio = (tl.load(policy_rejected_ptr + offs, mask=in_range, other=0.0)
                      - tl.load(ref_rejected_ptr + offs, mask=in_range, other=0.0))
    grad_loss = tl.load(grad_losses_ptr + offs, mask=in_range, other=0.0)
    _, d_chosen, d_rejected = _pair_loss_and_grads(chosen_ratio, rejected_ratio, loss_id, beta,
                                                   eps, log_one_minus_eps, log_eps, inv_tau)
    tl.store(grad_policy_chosen_ptr + offs, grad_loss * d_chosen, mask=in_range)
    tl.store(grad_policy_rejected_ptr + offs, grad_loss * d_rejected, mask=in_range)
    tl.store(grad_ref_chosen_ptr + offs, -grad_loss * d_chosen, mask=in_range)
    tl.store(grad_ref_rejected_ptr + offs, -grad_loss * d_rejected, mask=in_range)


@triton.jit
def _masked_row_sums(row_ptr, mask_row_ptr, seq_len, BLOCK_T: tl.constexpr):
    """(sum_t value*mask over the unmasked t, sum_t mask) of one row."""
    cols = tl.arange(0, BLOCK_T)
    weighted = tl.zeros([BLOCK_T], tl.float32)
    count = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, seq_len, BLOCK_T):
        offs = start + cols
        in_row = offs < seq_len
        mask = tl.load(mask_row_ptr + offs, mask=in_row, other=0.0)
        # masked positions are not even loaded (NaN/inf there must not leak: 0 * NaN = NaN)
        value = tl.load(row_ptr + offs, mask=in_row & (mask != 0.0), other=0.0)
        weighted += value * mask
        count += mask
    return tl.sum(weighted, 0), tl.sum(count, 0)


@triton.jit
def sequence_preference_forward_kernel(
        token_logprobs_ptr, mask_ptr, ref_ptr, losses_ptr, policy_logps_ptr, ref_logps_ptr,
        num_pairs, seq_len, stride_row, mask_stride_row, ref_stride_row, average, loss_id, beta,
        eps, log_one_minus_eps, log_eps, inv_tau, REF_PER_TOKEN: tl.constexpr,
        BLOCK_T: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64)
    chosen_row = pair
    rejected_row = pair + num_pairs
    chosen_sum, chosen_count = _masked_row_sums(token_logprobs_ptr + chosen_row * stride_row,
                                                mask_ptr + chosen_row * mask_stride_row,
                                                seq_len, BLOCK_T)
    rejected_sum, rejected_count = _masked_row_sums(
        token_logprobs_ptr + rejected_row * stride_row, mask_ptr + rejected_row * mask_stride_row,
        seq_len, BLOCK_T)
    if REF_PER_TOKEN:
        ref_chosen, _ = _masked_row_sums(ref_ptr + chosen_row * ref_stride_row,
                                         mask_ptr + chosen_row * mask_stride_row, seq_len, BLOCK_T)
        ref_rejected, _ = _masked_row_sums(ref_ptr + rejected_row * ref_stride_row,
                                           mask_ptr + rejected_row * mask_stride_row, seq_len,
                                           BLOCK_T)
    else:
        ref_chosen = tl.load(ref_ptr + chosen_row)
        ref_rejected = tl.load(ref_ptr + rejected_row)
    if average != 0:
        chosen_sum = chosen_sum / tl.maximum(chosen_count, 1.0)
        rejected_sum = rejected_sum / tl.maximum(rejected_count, 1.0)
        if REF_PER_TOKEN:
            ref_chosen = ref_chosen / tl.maximum(chosen_count, 1.0)
            ref_rejected = ref_rejected / tl.maximum(rejected_count, 1.0)
    loss, _, _ = _pair_loss_and_grads(chosen_sum - ref_chosen, rejected_sum - ref_rejected,
                                      loss_id, beta, eps, log_one_minus_eps, log_eps, inv_tau)
    tl.store(losses_ptr + pair, loss)
    tl.store(policy_logps_ptr + chosen_row, chosen_sum)
    tl.store(policy_logps_ptr + rejected_row, rejected_sum)
    tl.store(ref_logps_ptr + chosen_row, ref_chosen)
    tl.store(ref_logps_ptr + rejected_row, ref_rejected)


@triton.jit
def sequence_preference_backward_kernel(
        grad_losses_ptr, mask_ptr, policy_logps_ptr, ref_logps_ptr, grad_token_logprobs_ptr,
        grad_ref_ptr, num_pairs, seq_len, mask_stride_row, average, loss_id, beta, eps,
        log_one_minus_eps, log_eps, inv_tau, REF_PER_TOKEN: tl.constexpr, BLOCK_T: tl.constexpr):
    # grid (2B,): program r writes row r of the gradient (contiguous [2B, T] outputs)
    row = tl.program_id(0).to(tl.int64)
    pair = row % num_pairs
    chosen_ratio = tl.load(policy_logps_ptr + pair) - tl.load(ref_logps_ptr + pair)
    rejected_ratio = (tl.load(policy_logps_ptr + pair + num_pairs)
                      - tl.load(ref_logps_ptr + pair + num_pairs))
    _, d_chosen, d_rejected = _pair_loss_and_grads(chosen_ratio, rejected_ratio, loss_id, beta,
                                                   eps, log_one_minus_eps, log_eps, inv_tau)
    grad_seq = tl.load(grad_losses_ptr + pair) * tl.where(row < num_pairs, d_chosen, d_rejected)
    if not REF_PER_TOKEN:
        tl.store(grad_ref_ptr + row, -grad_seq)
    cols = tl.arange(0, BLOCK_T)
    mask_row_ptr = mask_ptr + row * mask_stride_row
    if average != 0:
        count = tl.zeros([BLOCK_T], tl.float32)
        for start in range(0, seq_len, BLOCK_T):
            offs = start + cols
            count += tl.load(mask_row_ptr + offs, mask=offs < seq_len, other=0.0)
        grad_seq = grad_seq / tl.maximum(tl.sum(count, 0), 1.0)
    for start in range(0, seq_len, BLOCK_T):
        offs = start + cols
        in_row = offs < seq_len
        grad_token = grad_seq * tl.load(mask_row_ptr + offs, mask=in_row, other=0.0)
        tl.store(grad_token_logprobs_ptr + row * seq_len + offs, grad_token, mask=in_row)
        if REF_PER_TOKEN:
            tl.store(grad_ref_ptr + row * seq_len + offs, -grad_token, mask=in_row)


# ---------------------------------------------------------------------------------- wrappers

def _loss_scalars(loss, beta, label_smoothing):
    if loss not in LOSS_IDS:
        raise ValueError(f"unknown preference loss {loss!r}; expected one of {tuple(LOSS_IDS)}")
    eps = float(label_smoothing)
    # exo_pair needs 0 < eps < 1 (the ops layer substitutes 1e-3 for 0); other losses ignore these
    log_one_minus_eps = math.log1p(-eps) if eps < 1 else float("nan")
    log_eps = math.log(eps) if eps > 0 else float("nan")
    return dict(loss_id=LOSS_IDS[loss], beta=float(beta), eps=eps,
                log_one_minus_eps=log_one_minus_eps, log_eps=log_eps, inv_tau=1.0 / losses.DISCOPOP_TAU)


def forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta, label_smoothing):
    """The preference family's forward (pyalign/eager/preference.py): losses [B] fp32."""
    inputs = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    scalars = _loss_scalars(loss, beta, label_smoothing)
    num_pairs = policy_chosen.numel()
    per_pair = _kernels.new_output(num_pairs, torch.float32, policy_chosen.device)
    preference_forward_kernel[(triton.cdiv(num_pairs, BLOCK),)](
        *(_kernels.as_fp32_vector(t) for t in inputs), per_pair, num_pairs, **scalars, BLOCK=BLOCK,
        num_warps=NUM_WARPS)
    return per_pair.view(policy_chosen.shape)


def backward(grad_losses, policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta,
             label_smoothing):
    """The preference family's backward (pyalign/eager/preference.py): grads of the four
    inputs, in their dtypes."""
    inputs = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    scalars = _loss_scalars(loss, beta, label_smoothing)
    num_pairs = policy_chosen.numel()
    grads = [_kernels.new_output(num_pairs, torch.float32, policy_chosen.device) for _ in inputs]
    preference_backward_kernel[(triton.cdiv(num_pairs, BLOCK),)](
        _kernels.as_fp32_vector(grad_losses), *(_kernels.as_fp32_vector(t) for t in inputs),
        *grads, num_pairs, **scalars,
        BLOCK=BLOCK, num_warps=NUM_WARPS)
    return tuple(grad.view(t.shape).to(t.dtype) for grad, t in zip(grads, inputs))


def _sequence_inputs(token_logprobs, mask, ref_logps):
    if token_logprobs.dim() != 2 or token_logprobs.shape[0] % 2:
        raise ValueError(f"token_logprobs must be [2B, T] (chosen rows first), got "
                         f"{tuple(token_logprobs.shape)}")
    if tuple(mask.shape) != tuple(token_logprobs.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(token_logprobs.shape)}")
    if tuple(ref_logps.shape) not in (tuple(token_logprobs.shape), (token_logprobs.shape[0],)):
        raise ValueError(f"ref_logps must be [2B] sequence log-probs or [2B, T] per-token "
                         f"log-probs, got {tuple(ref_logps.shape)}")
    ref_per_token = ref_logps.dim() == 2
    token_logprobs = token_logprobs.to(torch.float32).contiguous()
    mask = mask.to(torch.float32).contiguous()
    ref_logps = ref_logps.to(torch.float32).contiguous()
    return token_logprobs, mask, ref_logps, ref_per_token


def sequence_preference_forward(token_logprobs, mask, ref_logps, loss, beta, label_smoothing,
                                average):
    """Fused masked sequence reduction + pair loss.

    token_logprobs [2B, T] (chosen rows first), mask [2B, T] (bool or float weights), ref_logps
    [2B] (sequence log-probs, used as is) or [2B, T] (per token, reduced like the policy's).
    Per row: sum_t lp*mask, or with ``average`` that divided by max(sum_t mask, 1).
    Returns (losses [B], policy_logps [2B], ref_logps [2B]), all fp32.
    """
    token_logprobs, mask, ref_logps, ref_per_token = _sequence_inputs(token_logprobs, mask, ref_logps)
    scalars = _loss_scalars(loss, beta, label_smoothing)
    rows, seq_len = token_logprobs.shape
    num_pairs = rows // 2
    device = token_logprobs.device
    per_pair = _kernels.new_output(num_pairs, torch.float32, device)
    policy_seq = _kernels.new_output(rows, torch.float32, device)
    ref_seq = _kernels.new_output(rows, torch.float32, device)
    if num_pairs == 0:
        return per_pair, policy_seq, ref_seq
    sequence_preference_forward_kernel[(num_pairs,)](
        token_logprobs, mask, ref_logps, per_pair, policy_seq, ref_seq, num_pairs, seq_len,
        token_logprobs.stride(0), mask.stride(0), ref_logps.stride(0) if ref_per_token else 0,
        int(bool(average)), **scalars, REF_PER_TOKEN=ref_per_token,
        BLOCK_T=BLOCK_T, num_warps=NUM_WARPS)
    return per_pair, policy_seq, ref_seq


def sequence_preference_backward(grad_losses, token_logprobs, mask, ref_logps, policy_seq, ref_seq,
                                 loss, beta, label_smoothing, average):
    """Backward of sequence_preference_forward: (grad_token_logprobs [2B, T] fp32,
    grad_ref_logps shaped like ref_logps, fp32). ``policy_seq``/``ref_seq`` are the forward's
    second and third outputs."""
    token_logprobs, mask, ref_logps, ref_per_token = _sequence_inputs(token_logprobs, mask, ref_logps)
    scalars = _loss_scalars(loss, beta, label_smoothing)
    rows, seq_len = token_logprobs.shape
    device = token_logprobs.device
    grad_tokens = _kernels.new_output((rows, seq_len), torch.float32, device)
    grad_ref = _kernels.new_output(ref_logps.shape, torch.float32, device)
    if rows == 0:
        return grad_tokens, grad_ref
    sequence_preference_backward_kernel[(rows,)](
        _kernels.as_fp32_vector(grad_losses), mask, _kernels.as_fp32_vector(policy_seq),
        _kernels.as_fp32_vector(ref_seq), grad_tokens, grad_ref,
        rows // 2, seq_len, mask.stride(0), int(bool(average)), **scalars,
        REF_PER_TOKEN=ref_per_token, BLOCK_T=BLOCK_T, num_warps=NUM_WARPS)
    return grad_tokens, grad_ref


def compile_configs():
    floats = {name: "fp32" for name in ("beta", "eps", "log_one_minus_eps", "log_eps", "inv_tau")}
    label = f"all {len(LOSS_IDS)} losses (runtime id)"
    configs = [
        _kernels.compile_config(preference_forward_kernel, "preference_forward", label, NUM_WARPS,
                                {"BLOCK": BLOCK}, types=floats),
        _kernels.compile_config(preference_backward_kernel, "preference_backward", label,
                                NUM_WARPS, {"BLOCK": BLOCK}, types=floats),
    ]
    for ref_per_token in (False, True):
        label = f"ref={'per-token' if ref_per_token else 'sequence'} BLOCK_T={BLOCK_T}"
        constexprs = {"REF_PER_TOKEN": ref_per_token, "BLOCK_T": BLOCK_T}
        configs.append(_kernels.compile_config(
            sequence_preference_forward_kernel, "sequence_preference_forward", label, NUM_WARPS,
            constexprs, types=floats,
            unaligned=("losses_ptr", "policy_logps_ptr", "ref_logps_ptr"),
            aligned_scalars=("seq_len", "stride_row", "mask_stride_row")))
        configs.append(_kernels.compile_config(
            sequence_preference_backward_kernel, "sequence_preference_backward", label, NUM_WARPS,
            constexprs, types=floats,
            unaligned=("grad_losses_ptr", "policy_logps_ptr", "ref_logps_ptr"),
            aligned_scalars=("seq_len", "mask_stride_row")))
    return configs
