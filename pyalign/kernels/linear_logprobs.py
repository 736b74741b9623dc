"""Fused linear + per-token log-probs: hidden [N, H] @ weight[V, H].T (+ bias) -> log-prob of the
label (and entropy), never materializing the [N, V] logits or their gradient.

Forward: each program owns BLOCK_N rows; it walks the vocabulary in BLOCK_V tiles, computes the
logit tile with tl.dot over H in BLOCK_H steps (fp32 accumulation; fp32 inputs use IEEE fp32
products like eager, not TF32) and folds it into an online log-sum-exp of s = (z - m) / T
(m: running max of the raw logits z; sum of exp(s), and sum exp(s) s for the entropy), picking
out the label logit on the way; it stores the row stats (m, L = log sum exp(s)) and
logp = min((z_y - m) / T - L, 0), so a common offset of the logits costs no accuracy beyond the
logits' own rounding and z / T never overflows. TRL's head (docs/algorithms.md): with
HAS_SOFTCAP each tile becomes softcap * tanh(logit_scale * z / softcap) first (tanh as
2 sigmoid(2x) - 1); without, logit_scale is folded into 1 / T by the wrapper. WITH_METRICS also
keeps sum exp(2 s) (log sum p^2), the sum of the head logits (their mean) and the max of the
logits before the label column (is_top1: the label is the first maximum), a few registers per
row.
This is the triton backend's strategy "fused"; strategy "chunked" (cuBLAS matmuls with the
logprobs kernels as epilogue) and how "auto" chooses between them: docs/gpu.md, which also
models this kernel's cost at the anchor shapes.
Backward: each program owns one (BLOCK_N x BLOCK_V) tile: it recomputes the logit tile, forms
d/dz = (g_lp (onehot - p) - g_ent p (log p + H)) / T with log p = (z - m) / T - L (times
logit_scale * (1 - tanh^2) with a softcap: d head / d raw), and adds
d/dz @ W into d_hidden and (d/dz)^T @ hidden into d_weight (and column sums into d_bias) with
fp32 atomic adds. Every term is kept (no gradient filtering); the sum order across tiles is not
deterministic (deterministic=True takes the chunked backward). The tiles run in a grouped order
(``_grouped_tile``): about sqrt(SMs) row blocks a group, so the tiles in flight share L2-sized
blocks of d_hidden and d_weight and the atomics stay in L2. NaN or inf in an ignored (padded)
token's hidden row reaches nothing: forward selects its outputs away (tl.where, never a 0
factor), backward loads that row as 0, so it adds nothing to d_weight / d_bias, and its d_hidden
is exactly 0.

Memory traffic / FLOPs (b = bytes per element):
    forward:  2*N*V*H FLOPs (the matmul, same as eager); reads hidden once per program and W
              once per BLOCK_N rows (N/BLOCK_N * V*H*b, mostly from L2); writes 12*N bytes.
              Eager writes + re-reads the N*V logits (N*V*b, plus fp32 temporaries).
    backward: 6*N*V*H FLOPs (recompute 2 + d_hidden 2 + d_weight 2; eager: 4, but eager must
              keep or recompute the logits). Atomic fp32 traffic: N*H*4 * V/BLOCK_V for
              d_hidden plus V*H*4 * N/BLOCK_N for d_weight (L2-resident reductions on GPU with
              the grouped order), 128 x 128 tiles for bf16/fp16.
              Extra memory: fp32 accumulators for d_hidden/d_weight when inputs are bf16/fp16.
Launch grid: forward (cdiv(N, BLOCK_N),); backward (cdiv(N, BLOCK_N) * cdiv(V, BLOCK_V),), one
program per tile in the grouped order.
The forward is batch-invariant: a row's programs run the same tile shapes and reduction order
whatever the other rows hold (batch_invariant=True takes it, docs/gpu.md).

An fp32 head (hidden and weight of different dtypes, one float32, the other bf16 / fp16:
pyalign._utils.head_logits_dtype) runs its own fp32 tiles: each loaded tile is widened to fp32 in
registers (no copy of either input), the dots are IEEE fp32 and the d/dz tile stays fp32
(FP32_HEAD); the bf16 / fp16 operand is read at its own width.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from pyalign import kernels as _kernels
from pyalign._utils import head_logits_dtype

# Tiles per input dtype: (BLOCK_N, BLOCK_V, BLOCK_H, num_warps), forward and backward. fp32 runs
# IEEE fp32 dots (no tensor cores), so it gets smaller tiles; its backward runs 8 warps (at 4
# the grouped order's index math tips it into 16-32 bytes of spills on sm_80). The half-precision
# backward tiles are 128 x 128 (each tile adds BLOCK_N x H into d_hidden and BLOCK_V x H into
# d_weight: twice the tile of 64 halves both atomic streams, docs/gpu.md) with BLOCK_H = 32: at
# BLOCK_H = 64 they spill on sm_80 (255 registers, 304 bytes of spills at 8 warps; 472 at 16).
FORWARD_TILES = {"fp32": (32, 64, 32, 8), "bf16": (64, 128, 64, 8), "fp16": (64, 128, 64, 8)}
BACKWARD_TILES = {"fp32": (32, 32, 32, 8), "bf16": (128, 128, 32, 8), "fp16": (128, 128, 32, 8)}
# The softcap + entropy-gradient variant spills at 128 x 128 on sm_80 (288 bytes): it takes 64
# rows, which keeps the halved d_hidden stream (the one that leaves L2) and d_weight's as before.
SOFTCAP_ENTROPY_BACKWARD_TILES = {"bf16": (64, 128, 32, 8), "fp16": (64, 128, 32, 8)}
# An fp32 head's (tile_key): fp32 dots, half the fp32 tiles' BLOCK_H, as the narrow operand's
# tile and its fp32 widening are both live; 8 warps in the backward, as fp32's
FORWARD_TILES["fp32_head"] = (32, 64, 16, 8)
BACKWARD_TILES["fp32_head"] = (32, 32, 16, 8)
KEEPS_LOGITS = False  # the fused kernels recompute in backward: memory_budget keeps nothing


@triton.jit
def _dot_operand(tile, UPCAST: tl.constexpr):
    # Triton 3.9's interpreter multiplies bf16 tiles as raw integers; widening them to fp32 is
    # exact (bf16 x bf16 products fit fp32), so CPU tests see what the tensor cores compute.
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, hidden_size,
                stride_hn, stride_hk, stride_wv, stride_wk, has_bias,
                DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """hidden[rows] @ weight[cols].T + bias[cols] in fp32 (before the temperature); -inf
    outside the vocabulary; rows not in ``row_ok`` read hidden as 0."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    ks = tl.arange(0, BLOCK_H)
    for k0 in range(0, hidden_size, BLOCK_H):
        k_ok = (k0 + ks) < hidden_size
        hidden_tile = tl.load(hidden_ptr + rows[:, None] * stride_hn + (k0 + ks)[None, :] * stride_hk,
                              mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        weight_tile = tl.load(weight_ptr + cols[:, None] * stride_wv + (k0 + ks)[None, :] * stride_wk,
                              mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(_dot_operand(hidden_tile, UPCAST), tl.trans(_dot_operand(weight_tile, UPCAST)),
                     acc, input_precision=DOT_PRECISION)
    if has_bias != 0:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc, float("-inf"))


@triton.jit
def _softcapped(raw, col_ok, softcap, logit_scale):
    """(softcap * tanh(logit_scale * raw / softcap), the tanh): TRL's head before the
    temperature, -inf again outside the vocabulary. tanh(x) = 2 sigmoid(2x) - 1."""
    tanh = 2.0 * tl.sigmoid(2.0 * (raw * (logit_scale / softcap))) - 1.0
    return tl.where(col_ok[None, :], softcap * tanh, float("-inf")), tanh


# num_rows unspecialized: one binary for every batch size (Triton would build another for
# N = 1 and for N % 16 == 0), so a row's bits cannot depend on how many rows came with it
@triton.jit(do_not_specialize=["num_rows"])
def linear_logprobs_forward_kernel(
        hidden_ptr, weight_ptr, bias_ptr, labels_ptr, logprobs_ptr, entropy_ptr, stats_ptr,
        log_sum_sq_ptr, mean_ptr, top1_ptr,
        num_rows, vocab, hidden_size, stride_hn, stride_hk, stride_wv, stride_wk, has_bias,
        ignore_index, inv_temperature, softcap, logit_scale, WITH_ENTROPY: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, WITH_METRICS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (labels != ignore_index)
    running_max = tl.zeros([BLOCK_N], tl.float32) - float("inf")  # of the raw logits
    sum_exp = tl.zeros([BLOCK_N], tl.float32)          # sum exp(s), s = (z - shift) / T
    sum_exp_shifted = tl.zeros([BLOCK_N], tl.float32)  # sum exp(s) * s
    label_logit = tl.zeros([BLOCK_N], tl.float32)
    sum_sq = tl.zeros([BLOCK_N], tl.float32)            # sum exp(2 s), for log sum p^2
    logit_sum = tl.zeros([BLOCK_N], tl.float32)         # sum of the head logits, for the mean
    max_before_label = tl.zeros([BLOCK_N], tl.float32) - float("inf")  # for is_top1
    for v0 in range(0, vocab, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # cols * stride_wv can pass 2^31
        col_ok = cols < vocab
        # an ignored token's row may hold NaN/inf (padding): its results are selected away below
        raw = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok,
                          hidden_size, stride_hn, stride_hk, stride_wv, stride_wk, has_bias,
                          DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
        if HAS_SOFTCAP:
            raw, _ = _softcapped(raw, col_ok, softcap, logit_scale)
        label_logit += tl.sum(tl.where(cols[None, :] == labels[:, None], raw, 0.0), 1)
        if WITH_METRICS:
            logit_sum += tl.sum(tl.where(col_ok[None, :], raw, 0.0), 1)
            before_label = cols[None, :] < labels[:, None]
            max_before_label = tl.maximum(
                max_before_label, tl.max(tl.where(before_label, raw, float("-inf")), 1))
        new_max = tl.maximum(running_max, tl.max(raw, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        scaled = (raw - shift[:, None]) * inv_temperature
        exps = tl.exp(scaled)
        # (old max - new max) / T <= 0, floored at -1e30 (not -inf: the old terms then vanish,
        # rescale = 0, and step * S stays finite for S <= V, so 0 * (...) is 0, not NaN)
        step = tl.maximum((running_max - shift) * inv_temperature, -1e30)
        rescale = tl.exp(step)
        if WITH_ENTROPY:
            # re-centre the old sum on the new max: sum e'(s') = a (sum e s + step S); NaN kept
            recentre = tl.where(sum_exp > 0, step * sum_exp, 0.0)
            terms = tl.where(exps > 0, exps * scaled, 0.0)
            sum_exp_shifted = rescale * (sum_exp_shifted + recentre) + tl.sum(terms, 1)
        if WITH_METRICS:
            sum_sq = sum_sq * (rescale * rescale) + tl.sum(exps * exps, 1)
        sum_exp = sum_exp * rescale + tl.sum(exps, 1)
        running_max = new_max
    log_sum_exp = tl.log(sum_exp)  # >= 0: the max term is e^0 = 1
    logprob = (label_logit - running_max) * inv_temperature - log_sum_exp
    logprob = tl.where(logprob > 0.0, 0.0, logprob)  # rounding above 0 only; NaN kept
    tl.store(logprobs_ptr + rows, tl.where(valid, logprob, 0.0), mask=row_ok)
    tl.store(stats_ptr + 2 * rows, tl.where(valid, running_max, 0.0), mask=row_ok)
    tl.store(stats_ptr + 2 * rows + 1, tl.where(valid, log_sum_exp, 0.0), mask=row_ok)
    if WITH_ENTROPY:
        entropy = log_sum_exp - sum_exp_shifted / sum_exp
        entropy = tl.where(entropy < 0.0, 0.0, entropy)
        tl.store(entropy_ptr + rows, tl.where(valid, entropy, 0.0), mask=row_ok)
    if WITH_METRICS:
        log_sum_sq = tl.log(sum_sq) - 2.0 * log_sum_exp
        tl.store(log_sum_sq_ptr + rows, tl.where(valid, log_sum_sq, 0.0), mask=row_ok)
        mean = logit_sum * inv_temperature / vocab
        tl.store(mean_ptr + rows, tl.where(valid, mean, 0.0), mask=row_ok)
        # the first maximum (argmax's tie rule); a NaN in the row (sum_exp NaN) makes it False
        top1 = ((label_logit >= running_max) & (label_logit > max_before_label)
                & (sum_exp == sum_exp) & valid)
        tl.store(top1_ptr + rows, top1.to(tl.int8), mask=row_ok)


@triton.jit
def _grouped_tile(pid, num_rows, vocab, group_rows, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """(row block, column block) of backward program ``pid`` in the grouped order: groups of
    ``group_rows`` row blocks, each walking its column blocks with the row blocks fastest, so
    the tiles running at once touch about group_rows row blocks of d_hidden and
    (programs in flight / group_rows) column blocks of d_weight, both L2-sized (docs/gpu.md)."""
    row_blocks = tl.cdiv(num_rows, BLOCK_N)
    col_blocks = tl.cdiv(vocab, BLOCK_V)
    per_group = group_rows * col_blocks
    first_row = (pid // per_group) * group_rows
    rows_here = tl.minimum(row_blocks - first_row, group_rows)  # the last group may be short
    within = pid % per_group
    return first_row + within % rows_here, within // rows_here


@triton.jit
def linear_logprobs_backward_kernel(
        hidden_ptr, weight_ptr, bias_ptr, labels_ptr, grad_logprobs_ptr, grad_entropy_ptr,
        stats_ptr, entropy_ptr, grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,
        num_rows, vocab, hidden_size, stride_hn, stride_hk, stride_wv, stride_wk, has_bias,
        ignore_index, inv_temperature, softcap, logit_scale, group_rows,
        HAS_GRAD_ENTROPY: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        FP32_HEAD: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    row_block, col_block = _grouped_tile(tl.program_id(0), num_rows, vocab, group_rows,
                                         BLOCK_N, BLOCK_V)
    rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col_block.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < num_rows
    col_ok = cols < vocab
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (labels != ignore_index)
    grad_logprob = tl.where(valid, tl.load(grad_logprobs_ptr + rows, mask=row_ok, other=0.0), 0.0)
    row_max = tl.load(stats_ptr + 2 * rows, mask=row_ok, other=0.0)
    log_sum_exp = tl.load(stats_ptr + 2 * rows + 1, mask=row_ok, other=0.0)
    raw = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, valid, col_ok,
                      hidden_size, stride_hn, stride_hk, stride_wv, stride_wk, has_bias,
                      DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
    if HAS_SOFTCAP:
        # the tanh is not kept: d head / d raw below takes it from the head (head / softcap), one
        # [BLOCK_N, BLOCK_V] fp32 tile fewer alive (128 x 128 tiles spill on sm_80 with it)
        raw, _ = _softcapped(raw, col_ok, softcap, logit_scale)
    if vocab <= BLOCK_V:  # never a vocab shard's: the backend table runs those on eager
        # The whole row is in this tile (V <= BLOCK_V, not a vocab shard): take its stats from
        # the recomputed logits themselves. The recompute's tile shapes differ from the
        # forward's, so its logits may differ by rounding; self-consistent stats keep sum p = 1
        # (V = 1: p = 1 and a gradient of exactly 0).
        tile_max = tl.max(raw, 1)
        row_max = tl.where(tile_max == float("-inf"), 0.0, tile_max)
        log_sum_exp = tl.log(tl.sum(tl.exp((raw - row_max[:, None]) * inv_temperature), 1))
    log_probs = (raw - row_max[:, None]) * inv_temperature - log_sum_exp[:, None]
    probs = tl.exp(log_probs)
    grad = (tl.where(cols[None, :] == labels[:, None], grad_logprob[:, None], 0.0)
            - grad_logprob[:, None] * probs)
    if HAS_GRAD_ENTROPY:
        grad_entropy = tl.where(valid, tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0), 0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        d_entropy = tl.where(probs == 0.0, 0.0, probs * (log_probs + entropy[:, None]))
        grad -= grad_entropy[:, None] * d_entropy
    grad = grad * inv_temperature
    if HAS_SOFTCAP:
        tanh = tl.where(col_ok[None, :], raw / softcap, 0.0)
        grad = grad * (logit_scale * (1.0 - tanh * tanh))  # d head / d raw logit
    grad = tl.where(valid[:, None] & col_ok[None, :], grad, 0.0)
    if has_bias != 0:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(grad, 0), mask=col_ok)
    if FP32_HEAD:  # an fp32 head: d/dz stays fp32 (UPCAST widens the other operands)
        grad_dot = grad
    else:  # low-precision inputs: the d/dz tile goes to the tensor cores in their dtype (as eager)
        grad_dot = _dot_operand(grad.to(hidden_ptr.dtype.element_ty), UPCAST)
    ks = tl.arange(0, BLOCK_H)
    for k0 in range(0, hidden_size, BLOCK_H):
        k_ok = (k0 + ks) < hidden_size
        weight_tile = tl.load(weight_ptr + cols[:, None] * stride_wv + (k0 + ks)[None, :] * stride_wk,
                              mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        grad_hidden_tile = tl.dot(grad_dot, _dot_operand(weight_tile, UPCAST),
                                  input_precision=DOT_PRECISION)
        tl.atomic_add(grad_hidden_ptr + rows[:, None] * hidden_size + (k0 + ks)[None, :],
                      grad_hidden_tile, mask=row_ok[:, None] & k_ok[None, :])
        # ignored rows as 0: their d/dz row is 0, but 0 * NaN (a padded hidden row) is NaN
        hidden_tile = tl.load(hidden_ptr + rows[:, None] * stride_hn + (k0 + ks)[None, :] * stride_hk,
                              mask=valid[:, None] & k_ok[None, :], other=0.0)
        grad_weight_tile = tl.dot(tl.trans(grad_dot), _dot_operand(hidden_tile, UPCAST),
                                  input_precision=DOT_PRECISION)
        tl.atomic_add(grad_weight_ptr + cols[:, None] * hidden_size + (k0 + ks)[None, :],
                      grad_weight_tile, mask=col_ok[:, None] & k_ok[None, :])


def tile_key(hidden_dtype, weight_dtype) -> str:
    """The key of FORWARD_TILES / BACKWARD_TILES for a launch: the inputs' dtype, or "fp32_head"
    (an fp32 head of a bf16 / fp16 operand: pyalign._utils.head_logits_dtype)."""
    if hidden_dtype != weight_dtype:
        return "fp32_head"
    return _kernels.TRITON_DTYPE_NAMES[hidden_dtype]


def _dot_precision(key):
    # fp32 products: IEEE, not TF32 (tf32 is ignored for bf16/fp16 operands)
    return "ieee" if key in ("fp32", "fp32_head") else "tf32"


def _dot_flags(hidden, weight):
    """(DOT_PRECISION, UPCAST) for a launch: UPCAST widens the dot operands to fp32 (an fp32
    head's; in the interpreter, bf16's)."""
    if hidden.dtype != weight.dtype or (hidden.dtype == torch.bfloat16
                                        and os.environ.get("TRITON_INTERPRET") == "1"):
        return dict(DOT_PRECISION="ieee", UPCAST=True)
    return dict(DOT_PRECISION=_dot_precision(_kernels.TRITON_DTYPE_NAMES[hidden.dtype]),
                UPCAST=False)


def backward_tile(dtype_name: str, softcap: bool, grad_entropy: bool) -> tuple:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps) of a backward launch."""
    if softcap and grad_entropy and dtype_name in SOFTCAP_ENTROPY_BACKWARD_TILES:
        return SOFTCAP_ENTROPY_BACKWARD_TILES[dtype_name]
    return BACKWARD_TILES[dtype_name]


@functools.lru_cache(maxsize=None)
def _group_rows(device) -> int:
    """Row blocks per group of the backward's launch order: about the square root of the SMs
    (11 on an H100's 132), so the ~one tile per SM in flight form a near-square block of row and
    column blocks (docs/gpu.md); 8 where the device has no SM count (the interpreter)."""
    try:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    except (AssertionError, RuntimeError, ValueError):  # a CPU tensor, or no CUDA at all
        return 8
    return max(1, math.isqrt(sms))


def _head_arguments(temperature, softcap, logit_scale):
    """(inv_temperature, softcap, logit_scale, HAS_SOFTCAP) for a launch: without a softcap the
    scale folds into 1 / T (one multiply fewer per logit, no extra variant)."""
    if softcap is None:
        return dict(inv_temperature=float(logit_scale) / float(temperature), softcap=1.0,
                    logit_scale=1.0, HAS_SOFTCAP=False)
    return dict(inv_temperature=1.0 / float(temperature), softcap=float(softcap),
                logit_scale=float(logit_scale), HAS_SOFTCAP=True)


def forward(hidden, weight, bias, labels, ignore_index, temperature, with_entropy, chunk_size,
            softcap, logit_scale, metrics, keep_rows):
    """The linear_logprobs family's forward (pyalign/eager/linear_logprobs.py). ``chunk_size``
    and ``keep_rows`` are not used: the fused kernel holds BLOCK_N x BLOCK_V logits at a time and
    keeps none for backward (KEEPS_LOGITS: the kept logits are [0, V])."""
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    block_n, block_v, block_h, num_warps = FORWARD_TILES[tile_key(hidden.dtype, weight.dtype)]
    logprobs = _kernels.new_output(num_rows, torch.float32, device)
    stats = _kernels.new_output((num_rows, 2), torch.float32, device)
    entropy = _kernels.new_output(num_rows if with_entropy else 0, torch.float32, device)
    with_metrics = any(metrics)
    # all three metrics come from the same pass: computed together, returned as asked
    log_sum_sq = _kernels.new_output(num_rows if with_metrics else 0, torch.float32, device)
    mean = _kernels.new_output(num_rows if with_metrics else 0, torch.float32, device)
    # int8 storage viewed as bool after; one element stands in when unused (the pointer's dtype
    # stays that of the AOT signature)
    top1 = torch.empty(num_rows if with_metrics else 1, dtype=torch.int8, device=device)
    bias_arg = bias.contiguous() if bias is not None else weight
    linear_logprobs_forward_kernel[(triton.cdiv(num_rows, block_n),)](
        hidden, weight, bias_arg, labels.contiguous(), logprobs,
        entropy if with_entropy else logprobs, stats,
        log_sum_sq if with_metrics else logprobs, mean if with_metrics else logprobs,
        top1, num_rows, vocab, hidden_size,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        int(bias is not None), int(ignore_index), **_head_arguments(temperature, softcap, logit_scale),
        WITH_ENTROPY=bool(with_entropy), WITH_METRICS=with_metrics,
        **_dot_flags(hidden, weight), BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        num_warps=num_warps)
    metric_out = (log_sum_sq if metrics[0] else logprobs.new_empty(0),
                  mean if metrics[1] else logprobs.new_empty(0),
                  top1.view(torch.bool) if metrics[2] else top1.new_empty(0, dtype=torch.bool))
    kept = hidden.new_empty(0, vocab, dtype=head_logits_dtype(hidden.dtype, weight.dtype))
    return (logprobs, entropy, stats, *metric_out, kept)


def backward(grad_logprobs, grad_entropy, hidden, weight, bias, labels, stats, entropy,
             ignore_index, temperature, chunk_size, softcap, logit_scale, kept, *,
             vocab_shard=False):
    """The linear_logprobs family's backward (pyalign/eager/linear_logprobs.py) -> (grad_hidden,
    grad_weight, grad_bias | None) in the inputs' dtypes, accumulated in fp32. A vocab shard
    wider than one tile only (pyalign/_triton_backend.py sends the others to eager): a row held
    in one tile would take its own stats, not the wider vocabulary's."""
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    has_grad_entropy = grad_entropy is not None
    block_n, block_v, block_h, num_warps = backward_tile(tile_key(hidden.dtype, weight.dtype),
                                                         softcap is not None, has_grad_entropy)
    # atomic accumulation targets: zero-initialized fp32
    grad_hidden = torch.zeros((num_rows, hidden_size), dtype=torch.float32, device=device)
    grad_weight = torch.zeros((vocab, hidden_size), dtype=torch.float32, device=device)
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if bias is not None else None
    grad_logprobs, grad_entropy, stats, entropy = _kernels.backward_row_vectors(
        grad_logprobs, grad_entropy, stats, entropy)
    tiles = triton.cdiv(num_rows, block_n) * triton.cdiv(vocab, block_v)
    linear_logprobs_backward_kernel[(tiles,)](
        hidden, weight, bias.contiguous() if bias is not None else weight, labels.contiguous(),
        grad_logprobs, grad_entropy if has_grad_entropy else grad_logprobs, stats,
        entropy if has_grad_entropy else stats, grad_hidden, grad_weight,
        grad_bias if bias is not None else grad_weight, num_rows, vocab, hidden_size,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        int(bias is not None), int(ignore_index), **_head_arguments(temperature, softcap, logit_scale),
        group_rows=_group_rows(device), HAS_GRAD_ENTROPY=has_grad_entropy,
        **_dot_flags(hidden, weight), FP32_HEAD=hidden.dtype != weight.dtype,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=num_warps)
    return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))


# (hidden, weight and bias) dtypes of every launch: one dtype, or an fp32 head of a bf16 / fp16
# operand (head_logits_dtype).
HEAD_DTYPES = (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32"),
               ("fp16", "fp32"), ("fp32", "bf16"), ("fp32", "fp16"))


def compile_configs():
    """Every launch variant: per (hidden, weight) dtypes, forward entropy x softcap x metrics,
    backward grad_entropy x softcap."""
    configs = []
    aligned_scalars = ("vocab", "hidden_size", "stride_hn", "stride_wv")
    for hidden_name, weight_name in HEAD_DTYPES:
        fp32_head = hidden_name != weight_name
        tiles = "fp32_head" if fp32_head else hidden_name
        label = tiles if not fp32_head else f"{hidden_name} hidden, {weight_name} head"
        types = {"hidden_ptr": f"*{hidden_name}", "weight_ptr": f"*{weight_name}",
                 "bias_ptr": f"*{weight_name}", "labels_ptr": "*i64", "top1_ptr": "*i8",
                 "inv_temperature": "fp32", "softcap": "fp32", "logit_scale": "fp32"}
        # unit column strides: the JIT specializes a stride of 1 the same way
        common = {"stride_hk": 1, "stride_wk": 1, "DOT_PRECISION": _dot_precision(tiles),
                  "UPCAST": fp32_head}
        for flag in (False, True):
            for softcap in (False, True):
                for metrics in (False, True):
                    block_n, block_v, block_h, num_warps = FORWARD_TILES[tiles]
                    configs.append(_kernels.compile_config(
                        linear_logprobs_forward_kernel, "linear_logprobs_forward",
                        f"{label} {block_n}x{block_v}x{block_h} entropy={flag} "
                        f"softcap={softcap} metrics={metrics}", num_warps,
                        {**common, "WITH_ENTROPY": flag, "HAS_SOFTCAP": softcap,
                         "WITH_METRICS": metrics, "BLOCK_N": block_n, "BLOCK_V": block_v,
                         "BLOCK_H": block_h},
                        types=types, aligned_scalars=aligned_scalars))
                block_n, block_v, block_h, num_warps = backward_tile(tiles, softcap, flag)
                configs.append(_kernels.compile_config(
                    linear_logprobs_backward_kernel, "linear_logprobs_backward",
                    f"{label} {block_n}x{block_v}x{block_h} grad_entropy={flag} "
                    f"softcap={softcap}", num_warps,
                    {**common, "HAS_GRAD_ENTROPY": flag, "HAS_SOFTCAP": softcap,
                     "FP32_HEAD": fp32_head, "BLOCK_N": block_n, "BLOCK_V": block_v,
                     "BLOCK_H": block_h},
                    types={name: kind for name, kind in types.items() if name != "top1_ptr"},
                    aligned_scalars=aligned_scalars))
    return configs
