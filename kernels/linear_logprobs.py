"""Fused linear + per-token log-probs: hidden [N, H] @ weight[V, H].T (+ bias) -> log-prob of the
label (and entropy), never materializing the [N, V] logits or their gradient.

Forward: each program owns BLOCK_N rows; it walks the vocabulary in BLOCK_V tiles, computes the
logit tile with tl.dot over H in BLOCK_H steps (fp32 accumulation; fp32 inputs use IEEE fp32
products like eager, not TF32) and folds it into an online log-sum-exp (running max, sum of
exp, and sum exp(s - m)(s - m) for the entropy), picking out the label logit on the way.
Backward: each program owns one (BLOCK_N x BLOCK_V) tile: it recomputes the logit tile, forms
d/dz = (g_lp (onehot - p) - g_ent p (s - lse + H)) / T, and adds d/dz @ W into d_hidden and
(d/dz)^T @ hidden into d_weight (and column sums into d_bias) with fp32 atomic adds. Every term
is kept (no gradient filtering); the sum order across tiles is not deterministic.

Memory traffic / FLOPs (b = bytes per element):
    forward:  2*N*V*H FLOPs (the matmul, same as eager); reads hidden once per program and W
              once per BLOCK_N rows (N/BLOCK_N * V*H*b, mostly from L2); writes 12*N bytes.
              Eager writes + re-reads the N*V logits (N*V*b, plus fp32 temporaries).
    backward: 6*N*V*H FLOPs (recompute 2 + d_hidden 2 + d_weight 2; eager: 4, but eager must
              keep or recompute the logits). Atomic fp32 traffic: N*H*4 * V/BLOCK_V for
              d_hidden plus V*H*4 * N/BLOCK_N for d_weight (L2-resident reductions on GPU).
              Extra memory: fp32 accumulators for d_hidden/d_weight when inputs are bf16/fp16.
Launch grid: forward (cdiv(N, BLOCK_N),); backward (cdiv(N, BLOCK_N), cdiv(V, BLOCK_V)).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pyalign import kernels as _kernels
from pyalign.eager import linear_logprobs as _eager

# Tiles per input dtype: (BLOCK_N, BLOCK_V, BLOCK_H, num_warps), forward and backward. fp32 runs
# IEEE fp32 dots (no tensor cores), so it gets smaller tiles.
FORWARD_TILES = {"fp32": (32, 64, 32, 8), "bf16": (64, 128, 64, 8), "fp16": (64, 128, 64, 8)}
BACKWARD_TILES = {"fp32": (32, 32, 32, 4), "bf16": (64, 64, 64, 8), "fp16": (64, 64, 64, 8)}


@triton.jit
def _dot_operand(tile, UPCAST: tl.constexpr):
    # Triton 3.9's interpreter multiplies bf16 tiles as raw integers; widening them to fp32 is
    # exact (bf16 x bf16 products fit fp32), so CPU tests see what the tensor cores compute.
    if UPCAST:
        return tile.to(tl.float32)
    return tile


@triton.jit
def _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, hidden_size,
                stride_hn, stride_hk, stride_wv, stride_wk, has_bias, inv_temperature,
                DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """(hidden[rows] @ weight[cols].T + bias[cols]) / T in fp32; -inf outside the vocabulary."""
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
    return tl.where(col_ok[None, :], acc * inv_temperature, float("-inf"))


@triton.jit
def linear_logprobs_forward_kernel(
        hidden_ptr, weight_ptr, bias_ptr, labels_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
        num_rows, vocab, hidden_size, stride_hn, stride_hk, stride_wv, stride_wk, has_bias,
        ignore_index, inv_temperature, WITH_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (labels != ignore_index)
    running_max = tl.zeros([BLOCK_N], tl.float32) - float("inf")
    sum_exp = tl.zeros([BLOCK_N], tl.float32)
    sum_exp_shifted = tl.zeros([BLOCK_N], tl.float32)
    label_logit = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # cols * stride_wv can pass 2^31
        col_ok = cols < vocab
        scaled = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok,
                             hidden_size, stride_hn, stride_hk, stride_wv, stride_wk, has_bias,
                             inv_temperature, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
        label_logit += tl.sum(tl.where(cols[None, :] == labels[:, None], scaled, 0.0), 1)
        new_max = tl.maximum(running_max, tl.max(scaled, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        exps = tl.exp(scaled - shift[:, None])
        rescale = tl.exp(running_max - shift)
        if WITH_ENTROPY:
            recentre = tl.where(sum_exp > 0, (running_max - shift) * sum_exp, 0.0)
            terms = tl.where(exps > 0, exps * (scaled - shift[:, None]), 0.0)
            sum_exp_shifted = rescale * (sum_exp_shifted + recentre) + tl.sum(terms, 1)
        sum_exp = sum_exp * rescale + tl.sum(exps, 1)
        running_max = new_max
    log_sum_exp = tl.log(sum_exp)
    lse = running_max + log_sum_exp
    tl.store(logprobs_ptr + rows, tl.where(valid, label_logit - lse, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, tl.where(valid, lse, 0.0), mask=row_ok)
    if WITH_ENTROPY:
        entropy = log_sum_exp - sum_exp_shifted / sum_exp
        tl.store(entropy_ptr + rows, tl.where(valid, entropy, 0.0), mask=row_ok)


@triton.jit
def linear_logprobs_backward_kernel(
        hidden_ptr, weight_ptr, bias_ptr, labels_ptr, grad_logprobs_ptr, grad_entropy_ptr,
        lse_ptr, entropy_ptr, grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,
        num_rows, vocab, hidden_size, stride_hn, stride_hk, stride_wv, stride_wk, has_bias,
        ignore_index, inv_temperature, HAS_GRAD_ENTROPY: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < num_rows
    col_ok = cols < vocab
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (labels != ignore_index)
    grad_logprob = tl.where(valid, tl.load(grad_logprobs_ptr + rows, mask=row_ok, other=0.0), 0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scaled = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok,
                         hidden_size, stride_hn, stride_hk, stride_wv, stride_wk, has_bias,
                         inv_temperature, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
    probs = tl.exp(scaled - lse[:, None])
    grad = (tl.where(cols[None, :] == labels[:, None], grad_logprob[:, None], 0.0)
            - grad_logprob[:, None] * probs)
    if HAS_GRAD_ENTROPY:
        grad_entropy = tl.where(valid, tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0), 0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        d_entropy = tl.where(probs == 0.0, 0.0, probs * (scaled - lse[:, None] + entropy[:, None]))
        grad -= grad_entropy[:, None] * d_entropy
    grad = tl.where(valid[:, None] & col_ok[None, :], grad * inv_temperature, 0.0)
    if has_bias != 0:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(grad, 0), mask=col_ok)
    # low-precision inputs: the d/dz tile goes to the tensor cores in their dtype (as eager does)
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
        # ignored rows are not loaded: their d/dz is 0, but 0 * a NaN/inf hidden state is NaN
        hidden_tile = tl.load(hidden_ptr + rows[:, None] * stride_hn + (k0 + ks)[None, :] * stride_hk,
                              mask=valid[:, None] & k_ok[None, :], other=0.0)
        grad_weight_tile = tl.dot(tl.trans(grad_dot), _dot_operand(hidden_tile, UPCAST),
                                  input_precision=DOT_PRECISION)
        tl.atomic_add(grad_weight_ptr + cols[:, None] * hidden_size + (k0 + ks)[None, :],
                      grad_weight_tile, mask=col_ok[:, None] & k_ok[None, :])


def _dtype_name(tensor):
    return _kernels.TRITON_DTYPE_NAMES[tensor.dtype]


def _dot_precision(dtype_name):
    return "ieee" if dtype_name == "fp32" else "tf32"  # tf32 is ignored for bf16/fp16 operands


def _dot_flags(dtype_name):
    """(DOT_PRECISION, UPCAST) for a launch (UPCAST only in the interpreter, for bf16)."""
    if dtype_name == "bf16" and os.environ.get("TRITON_INTERPRET") == "1":
        return dict(DOT_PRECISION="ieee", UPCAST=True)
    return dict(DOT_PRECISION=_dot_precision(dtype_name), UPCAST=False)


def _eager_only(hidden, weight):
    # float64 and empty inputs never get here (the backend table runs them on eager); the ops
    # give hidden and weight one dtype, direct callers may not.
    return hidden.dtype != weight.dtype


def forward(hidden, weight, bias, labels, ignore_index, temperature, with_entropy, chunk_size,
            *, tiles=None):
    """Contract of backends.py (linear_logprobs.forward). ``chunk_size`` is not used: the fused
    kernel holds BLOCK_N x BLOCK_V logits at a time. ``tiles`` overrides the tiles (tests)."""
    if _eager_only(hidden, weight):
        return _eager.forward(hidden, weight, bias, labels, ignore_index, temperature,
                              with_entropy, chunk_size)
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    dtype_name = _dtype_name(hidden)
    block_n, block_v, block_h, num_warps = tiles or FORWARD_TILES[dtype_name]
    logprobs = _kernels.new_output(num_rows, torch.float32, device)
    lse = _kernels.new_output(num_rows, torch.float32, device)
    entropy = _kernels.new_output(num_rows if with_entropy else 0, torch.float32, device)
    bias_arg = bias.contiguous() if bias is not None else weight
    linear_logprobs_forward_kernel[(triton.cdiv(num_rows, block_n),)](
        hidden, weight, bias_arg, labels.contiguous(), logprobs,
        entropy if with_entropy else logprobs, lse, num_rows, vocab, hidden_size,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        int(bias is not None), int(ignore_index), 1.0 / float(temperature),
        WITH_ENTROPY=bool(with_entropy), **_dot_flags(dtype_name),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=num_warps)
    return logprobs, entropy, lse


def backward(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy,
             ignore_index, temperature, chunk_size, *, tiles=None):
    """Contract of backends.py (linear_logprobs.backward) -> (grad_hidden, grad_weight,
    grad_bias | None) in the inputs' dtypes, accumulated in fp32."""
    if _eager_only(hidden, weight):
        return _eager.backward(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse,
                               entropy, ignore_index, temperature, chunk_size)
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    dtype_name = _dtype_name(hidden)
    block_n, block_v, block_h, num_warps = tiles or BACKWARD_TILES[dtype_name]
    # atomic accumulation targets: zero-initialized fp32
    grad_hidden = torch.zeros((num_rows, hidden_size), dtype=torch.float32, device=device)
    grad_weight = torch.zeros((vocab, hidden_size), dtype=torch.float32, device=device)
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if bias is not None else None
    has_grad_entropy = grad_entropy is not None
    grad_logprobs, grad_entropy, lse, entropy = _kernels.backward_row_vectors(
        grad_logprobs, grad_entropy, lse, entropy)
    linear_logprobs_backward_kernel[(triton.cdiv(num_rows, block_n), triton.cdiv(vocab, block_v))](
        hidden, weight, bias.contiguous() if bias is not None else weight, labels.contiguous(),
        grad_logprobs, grad_entropy if has_grad_entropy else grad_logprobs, lse,
        entropy if has_grad_entropy else lse, grad_hidden, grad_weight,
        grad_bias if bias is not None else grad_weight, num_rows, vocab, hidden_size,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        int(bias is not None), int(ignore_index), 1.0 / float(temperature),
        HAS_GRAD_ENTROPY=has_grad_entropy, **_dot_flags(dtype_name),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=num_warps)
    return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))


def compile_configs():
    configs = []
    for dtype_name in ("fp32", "bf16", "fp16"):
        tensor = f"*{dtype_name}"
        common = {"num_rows": "i32", "vocab": "i32", "hidden_size": "i32", "stride_hn": "i32",
                  "stride_wv": "i32", "has_bias": "i32", "ignore_index": "i32",
                  "inv_temperature": "fp32"}
        for flag in (False, True):
            block_n, block_v, block_h, num_warps = FORWARD_TILES[dtype_name]
            configs.append(dict(
                name="linear_logprobs_forward", kernel=linear_logprobs_forward_kernel,
                signature={"hidden_ptr": tensor, "weight_ptr": tensor, "bias_ptr": tensor,
                           "labels_ptr": "*i64", "logprobs_ptr": "*fp32", "entropy_ptr": "*fp32",
                           "lse_ptr": "*fp32", **common},
                # unit column strides: the JIT specializes a stride of 1 the same way
                constexprs={"stride_hk": 1, "stride_wk": 1, "WITH_ENTROPY": flag,
                            "DOT_PRECISION": _dot_precision(dtype_name), "UPCAST": False,
                            "BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_H": block_h},
                aligned=("hidden_ptr", "weight_ptr", "bias_ptr", "labels_ptr", "logprobs_ptr",
                         "entropy_ptr", "lse_ptr", "vocab", "hidden_size", "stride_hn",
                         "stride_wv"),
                num_warps=num_warps,
                label=f"{dtype_name} {block_n}x{block_v}x{block_h} entropy={flag}"))
            block_n, block_v, block_h, num_warps = BACKWARD_TILES[dtype_name]
            configs.append(dict(
                name="linear_logprobs_backward", kernel=linear_logprobs_backward_kernel,
                signature={"hidden_ptr": tensor, "weight_ptr": tensor, "bias_ptr": tensor,
                           "labels_ptr": "*i64", "grad_logprobs_ptr": "*fp32",
                           "grad_entropy_ptr": "*fp32", "lse_ptr": "*fp32",
                           "entropy_ptr": "*fp32", "grad_hidden_ptr": "*fp32",
                           "grad_weight_ptr": "*fp32", "grad_bias_ptr": "*fp32", **common},
                constexprs={"stride_hk": 1, "stride_wk": 1, "HAS_GRAD_ENTROPY": flag,
                            "DOT_PRECISION": _dot_precision(dtype_name), "UPCAST": False,
                            "BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_H": block_h},
                aligned=("hidden_ptr", "weight_ptr", "bias_ptr", "labels_ptr",
                         "grad_logprobs_ptr", "grad_entropy_ptr", "lse_ptr", "entropy_ptr",
                         "grad_hidden_ptr", "grad_weight_ptr", "grad_bias_ptr", "vocab",
                         "hidden_size", "stride_hn", "stride_wv"),
                num_warps=num_warps,
                label=f"{dtype_name} {block_n}x{block_v}x{block_h} grad_entropy={flag}"))
    return configs
