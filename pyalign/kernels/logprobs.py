"""Per-token log-probability of the label (and entropy) from logits, one streaming pass per row.

Computes, for each row n of logits z[N, V] (fp32/bf16/fp16), with m = max_v z[n, v] (online,
of the raw logits) and the shifted s = (z - m) / T <= 0:
    stats[n]    = (m, L) with L = log sum_v exp(s[n, v])   (online: rescaled when m grows)
    logprobs[n] = min(s[n, y_n] - L, 0)
    entropy[n]  = max(L - sum_v softmax(s)_v s_v, 0)       (online: sum exp(s) s)
Shifting before scaling keeps fp32 accuracy at any common offset of the logits (z/T - lse with
both ~1e4 loses 4 digits) and cannot overflow where z / T would; s_y <= 0 <= L, so the clamps
only remove rounding (NaN passes through them).
Backward writes d/dz = (g_lp (onehot - p) - g_ent p (log p + H)) / T with log p = s - L,
0 where p == 0 (-inf logits), into a new buffer or into the logits buffer itself (inplace);
``backward_columns`` does it in place on columns c0.. of a wider vocabulary (the chunked CUDA
head's epilogue, pyalign/_chunked_head.py and docs/gpu.md: the label term only where the label
falls in the slice).
Rows whose label is ignore_index skip the vocabulary loop: their logits are never read (NaN or
inf there reaches nothing), outputs 0, gradient 0.

Memory traffic (b = bytes per logit):
    forward:  N*V*b read + 20 N bytes.  Eager (to fp32, logsumexp, gather, entropy terms) reads
              the logits and writes/reads several fp32 [N, V] temporaries: >= N*V*(b + 4*3).
    backward: N*V*b read + N*V*b written (0 extra with inplace).  Eager: softmax, scatter and
              scaling over fp32 temporaries, >= N*V*(b + 4*4 + b).
    FLOPs: ~5 per logit forward (+3 with entropy), ~6 backward (+4 with entropy); exp dominates.
Launch grid: (N,), one program per row, looping over V in BLOCK_V chunks (a row of any length,
256k vocabularies included, runs in registers). Batch-invariant (a row's program never sees
another row). Its cost on a GPU, and its part as the chunked head's epilogue: docs/gpu.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyalign import kernels as _kernels

# (largest V it serves, BLOCK_V, num_warps): rows up to 1024 in one chunk with 4 warps, longer
# rows in 4096-wide chunks with 8 warps (16 fp32 / 16 half values per thread: 128-bit loads).
BLOCK_CONFIGS = ((1024, 1024, 4), (None, 4096, 8))


def pick_block(vocab: int) -> tuple[int, int]:
    for max_vocab, block_v, num_warps in BLOCK_CONFIGS:
        if max_vocab is None or vocab <= max_vocab:
            return block_v, num_warps
    raise AssertionError("unreachable")


@triton.jit
def logprobs_forward_kernel(logits_ptr, labels_ptr, logprobs_ptr, entropy_ptr, stats_ptr,
                            vocab, stride_row, ignore_index, inv_temperature,
                            WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    # An ignored row runs zero iterations: its logits are never read.
    num_cols = tl.where(valid, vocab, 0)
    cols = tl.arange(0, BLOCK_V)

    running_max = tl.zeros([], tl.float32) - float("inf")  # of the raw logits
    sum_exp = tl.zeros([], tl.float32)          # sum exp(s), s = (z - shift) / T
    sum_exp_shifted = tl.zeros([], tl.float32)  # sum exp(s) * s
    for start in range(0, num_cols, BLOCK_V):
        offs = start + cols
        raw = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(raw, 0))
        # While everything seen is -inf, shift by 0 so that exp(-inf - shift) is 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        scaled = (raw - shift) * inv_temperature
        exps = tl.exp(scaled)
        # (old max - new max) / T < 0; -inf (no terms yet, or they vanish) gives exactly 0
        step = (running_max - shift) * inv_temperature
        rescale = tl.exp(step)
        if WITH_ENTROPY:
            # re-centre the old sum on the new max: sum e'(s') = a (sum e s + step S); nothing
            # to re-centre when the old terms vanish (0 * -inf would be NaN), NaN kept
            recentre = tl.where(rescale > 0, rescale * (sum_exp_shifted + step * sum_exp),
                                sum_exp_shifted * 0.0)
            terms = tl.where(exps > 0, exps * scaled, 0.0)
            sum_exp_shifted = recentre + tl.sum(terms, 0)
        sum_exp = sum_exp * rescale + tl.sum(exps, 0)
        running_max = new_max

    log_sum_exp = tl.log(sum_exp)  # >= 0: the max term is e^0 = 1
    in_range = valid & (label >= 0) & (label < vocab)
    label_logit = tl.load(row_ptr + tl.where(in_range, label, 0), mask=in_range,
                          other=float("nan")).to(tl.float32)
    logprob = (label_logit - running_max) * inv_temperature - log_sum_exp
    # s_y <= 0 <= log_sum_exp: the clamp removes rounding above 0 only (NaN is kept)
    logprob = tl.where(logprob > 0.0, 0.0, logprob)
    tl.store(logprobs_ptr + row, tl.where(valid, logprob, 0.0))
    tl.store(stats_ptr + 2 * row, tl.where(valid, running_max, 0.0))
    tl.store(stats_ptr + 2 * row + 1, tl.where(valid, log_sum_exp, 0.0))
    if WITH_ENTROPY:
        entropy = log_sum_exp - sum_exp_shifted / sum_exp
        entropy = tl.where(entropy < 0.0, 0.0, entropy)
        tl.store(entropy_ptr + row, tl.where(valid, entropy, 0.0))


@triton.jit
def logprobs_backward_kernel(logits_ptr, grad_logits_ptr, labels_ptr, grad_logprobs_ptr,
                             grad_entropy_ptr, stats_ptr, entropy_ptr,
                             vocab, stride_row, stride_grad_row, ignore_index, inv_temperature,
                             column_start, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    grad_row_ptr = grad_logits_ptr + row * stride_grad_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    # the label's column in this slice (column_start: where the slice starts in the vocabulary);
    # outside [0, vocab) it matches no column: no label term
    label_column = label - column_start
    grad_logprob = tl.where(valid, tl.load(grad_logprobs_ptr + row), 0.0)
    row_max = tl.load(stats_ptr + 2 * row)
    log_sum_exp = tl.load(stats_ptr + 2 * row + 1)
    if HAS_GRAD_ENTROPY:
        grad_entropy = tl.where(valid, tl.load(grad_entropy_ptr + row), 0.0)
        entropy = tl.load(entropy_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    # Ignored rows read nothing (no column is below read_cols) and write zeros.
    read_cols = tl.where(valid, vocab, 0)
    for start in range(0, vocab, BLOCK_V):
        offs = start + cols
        in_row = offs < vocab
        raw = tl.load(row_ptr + offs, mask=offs < read_cols, other=0.0).to(tl.float32)
        log_probs = (raw - row_max) * inv_temperature - log_sum_exp
        probs = tl.exp(log_probs)
        grad = tl.where(offs == label_column, grad_logprob, 0.0) - grad_logprob * probs
        if HAS_GRAD_ENTROPY:
            d_entropy = tl.where(probs == 0.0, 0.0, probs * (log_probs + entropy))
            grad -= grad_entropy * d_entropy
        grad = tl.where(valid, grad * inv_temperature, 0.0)
        tl.store(grad_row_ptr + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _kernel_ready(logits: torch.Tensor) -> torch.Tensor:
    """logits with unit column stride (float64 and empty logits never get here: the backend
    table runs them on eager)."""
    return logits if logits.stride(1) == 1 else logits.contiguous()


def forward(logits, labels, ignore_index, temperature, with_entropy):
    """The logprobs family's forward (pyalign/eager/logprobs.py)."""
    ready = _kernel_ready(logits)
    num_rows, vocab = ready.shape
    device = ready.device
    logprobs = _kernels.new_output(num_rows, torch.float32, device)
    stats = _kernels.new_output((num_rows, 2), torch.float32, device)
    entropy = _kernels.new_output(num_rows if with_entropy else 0, torch.float32, device)
    block, num_warps = pick_block(vocab)
    logprobs_forward_kernel[(num_rows,)](
        ready, labels.contiguous(), logprobs, entropy if with_entropy else logprobs, stats,
        vocab, ready.stride(0), int(ignore_index), 1.0 / float(temperature),
        WITH_ENTROPY=bool(with_entropy), BLOCK_V=block, num_warps=num_warps)
    return logprobs, entropy, stats


def backward(grad_logprobs, grad_entropy, logits, labels, stats, entropy, ignore_index, temperature,
             inplace):
    """The logprobs family's backward (pyalign/eager/logprobs.py). In place on logits without a
    unit column stride: into their contiguous copy, copied back."""
    return _backward(grad_logprobs, grad_entropy, logits, labels, stats, entropy, ignore_index,
                     temperature, inplace, 0)


def backward_columns(grad_logprobs, grad_entropy, logits, labels, stats, entropy, ignore_index,
                     temperature, column_start):
    """backward in place on logits[:, c0:c0+W] of a wider vocabulary (c0 = ``column_start``):
    the whole rows' stats, labels of the whole vocabulary (pyalign/eager/logprobs.py)."""
    return _backward(grad_logprobs, grad_entropy, logits, labels, stats, entropy, ignore_index,
                     temperature, True, column_start)


def _backward(grad_logprobs, grad_entropy, logits, labels, stats, entropy, ignore_index,
              temperature, inplace, column_start):
    ready = _kernel_ready(logits)
    num_rows, vocab = ready.shape
    grad_logits = ready if inplace else _kernels.new_output(ready.shape, ready.dtype, ready.device)
    has_grad_entropy = grad_entropy is not None
    grad_logprobs, grad_entropy, stats, entropy = _kernels.backward_row_vectors(
        grad_logprobs, grad_entropy, stats, entropy)
    block, num_warps = pick_block(vocab)
    logprobs_backward_kernel[(num_rows,)](
        ready, grad_logits, labels.contiguous(), grad_logprobs,
        grad_entropy if has_grad_entropy else grad_logprobs, stats,
        entropy if has_grad_entropy else stats,
        vocab, ready.stride(0), grad_logits.stride(0), int(ignore_index), 1.0 / float(temperature),
        int(column_start), HAS_GRAD_ENTROPY=has_grad_entropy, BLOCK_V=block, num_warps=num_warps)
    if inplace and ready is not logits:
        return logits.copy_(ready)
    return grad_logits


def compile_configs():
    """Every (kernel, signature, constexprs, num_warps) the wrappers above can launch."""
    configs = []
    for dtype_name in ("fp32", "bf16", "fp16"):
        logits = f"*{dtype_name}"
        for _, block_v, num_warps in BLOCK_CONFIGS:
            for flag in (False, True):
                configs.append(_kernels.compile_config(
                    logprobs_forward_kernel, "logprobs_forward",
                    f"{dtype_name} BLOCK_V={block_v} entropy={flag}", num_warps,
                    {"WITH_ENTROPY": flag, "BLOCK_V": block_v},
                    types={"logits_ptr": logits, "labels_ptr": "*i64", "inv_temperature": "fp32"},
                    aligned_scalars=("vocab", "stride_row")))
                configs.append(_kernels.compile_config(
                    logprobs_backward_kernel, "logprobs_backward",
                    f"{dtype_name} BLOCK_V={block_v} grad_entropy={flag}", num_warps,
                    {"HAS_GRAD_ENTROPY": flag, "BLOCK_V": block_v},
                    types={"logits_ptr": logits, "grad_logits_ptr": logits, "labels_ptr": "*i64",
                           "inv_temperature": "fp32"},
                    aligned_scalars=("vocab", "stride_row", "stride_grad_row")))
    return configs
