"""Eager PyTorch implementations of every op family: the fallback backend and the structure the
kernels are tested against (the tests' float64 oracle is written separately, in tests/oracle.py).

Each family is a namespace with the primitive functions of the contract in backends.py. All math
runs in fp32 whatever the input dtype (fp64 for fp64 inputs, so gradcheck works). Per-token ops
work over row chunks of about ``_ROW_CHUNK_ELEMENTS`` logits, with two or three fp32 temporaries
of a chunk alive at a time.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

_ROW_CHUNK_ELEMENTS = 1 << 22  # 16 MiB per fp32 temporary of a chunk


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 inputs (gradcheck) stay fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(num_rows: int, row_length: int):
    rows = max(1, _ROW_CHUNK_ELEMENTS // max(1, row_length))
    for start in range(0, num_rows, rows):
        yield start, min(num_rows, start + rows)


def _scaled_rows(logits: torch.Tensor, acc: torch.dtype, temperature: float) -> torch.Tensor:
    """A fresh fp32 (or fp64) copy of logits / temperature that the caller may overwrite."""
    scaled = logits.to(acc, copy=True)
    if temperature != 1.0:
        scaled.div_(temperature)
    return scaled


def _entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """-sum p log p per row from log-probs; 0·log 0 = 0 for -inf logits, NaN stays NaN."""
    probs = log_probs.exp()
    impossible = probs == 0
    probs.mul_(log_probs).masked_fill_(impossible, 0.0)
    return -probs.sum(-1)


# ----------------------------------------------------------------------------- per-token log-probs
# Chunks of rows, each with about two fp32 temporaries of the chunk alive at once.

def logprobs_forward(logits, labels, ignore_index, temperature, with_entropy):
    num_rows, vocab = logits.shape
    acc = accumulation_dtype(logits.dtype)
    logprobs = torch.empty(num_rows, dtype=acc, device=logits.device)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty(num_rows if with_entropy else 0, dtype=acc, device=logits.device)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    for start, end in _row_chunks(num_rows, vocab):
        scaled = _scaled_rows(logits[start:end], acc, temperature)
        chunk_lse = torch.logsumexp(scaled, dim=-1)
        label_logit = scaled.gather(1, safe_labels[start:end, None]).squeeze(1)
        chunk_valid = valid[start:end]
        lse[start:end] = chunk_lse
        logprobs[start:end] = torch.where(chunk_valid, label_logit - chunk_lse, 0.0)
        if with_entropy:
            log_probs = scaled.sub_(chunk_lse[:, None])
            entropy[start:end] = torch.where(chunk_valid, _entropy_from_log_probs(log_probs), 0.0)
        del scaled
    return logprobs, entropy, lse


def logprobs_backward(grad_logprobs, grad_entropy, logits, labels, lse, entropy, ignore_index,
                      temperature, inplace):
    num_rows, vocab = logits.shape
    acc = accumulation_dtype(logits.dtype)
    grad_logits = logits if inplace else torch.empty_like(logits)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    for start, end in _row_chunks(num_rows, vocab):
        chunk_valid = valid[start:end]
        log_probs = _scaled_rows(logits[start:end], acc, temperature).sub_(lse[start:end, None])
        grad = log_probs.exp()  # softmax, turned into the gradient in place below
        g_lp = torch.where(chunk_valid, grad_logprobs[start:end].to(acc), 0.0)
        if grad_entropy is not None:
            g_ent = torch.where(chunk_valid, grad_entropy[start:end].to(acc), 0.0)
            # dH/ds_v = -p_v (log p_v + H); zero where p_v == 0 (masked vocabulary), NaN kept
            impossible = grad == 0
            d_entropy = log_probs.add_(entropy[start:end, None]).mul_(grad)
            d_entropy.masked_fill_(impossible, 0.0).mul_(g_ent[:, None])
            grad.mul_(-g_lp[:, None]).sub_(d_entropy)
        else:
            grad.mul_(-g_lp[:, None])
        del log_probs
        grad.scatter_add_(1, safe_labels[start:end, None], g_lp[:, None])
        if temperature != 1.0:
            grad.div_(temperature)
        grad_logits[start:end] = grad
        del grad
    return grad_logits


logprobs = SimpleNamespace(forward=logprobs_forward, backward=logprobs_backward)


# ----------------------------------------------------------------------- fused linear + log-probs

def make_chunked_linear(logprobs_impl, default_chunk_size: int = 1024):
    """linear_logprobs primitives that hold at most ``chunk_size x V`` logits at a time.

    The matmuls run through torch; ``logprobs_impl`` (any backend's logprobs primitives) is the
    per-chunk epilogue: forward reduces a chunk's logits to (logprobs, entropy, lse), backward
    turns the recomputed chunk into its gradient in place. Gradients of hidden, weight and bias
    accumulate in fp32 whatever their dtype.
    """

    def _chunk_size(chunk_size, num_rows, vocab):
        if chunk_size is not None and chunk_size > 0:
            return int(chunk_size)
        # Aim for ~64 MiB of fp32 logits per chunk, at most default_chunk_size rows.
        return max(1, min(default_chunk_size, (1 << 24) // max(1, vocab)))

    def _chunk_logits(hidden_chunk, weight, bias):
        logits = hidden_chunk @ weight.t()
        if bias is not None:
            logits += bias
        return logits

    def forward(hidden, weight, bias, labels, ignore_index, temperature, with_entropy, chunk_size):
        num_rows = hidden.shape[0]
        vocab = weight.shape[0]
        rows = _chunk_size(chunk_size, num_rows, vocab)
        acc = accumulation_dtype(hidden.dtype)
        logprobs_out = torch.empty(num_rows, dtype=acc, device=hidden.device)
        lse = torch.empty_like(logprobs_out)
        entropy = torch.empty(num_rows if with_entropy else 0, dtype=acc, device=hidden.device)
        for start in range(0, num_rows, rows):
            end = min(num_rows, start + rows)
            chunk = _chunk_logits(hidden[start:end], weight, bias)
            lp, ent, chunk_lse = logprobs_impl.forward(chunk, labels[start:end], ignore_index,
                                                       temperature, with_entropy)
            logprobs_out[start:end] = lp
            lse[start:end] = chunk_lse
            if with_entropy:
                entropy[start:end] = ent
            del chunk
        return logprobs_out, entropy, lse

    def backward(grad_logprobs, grad_entropy, hidden, weight, bias, labels, lse, entropy,
                 ignore_index, temperature, chunk_size):
        num_rows = hidden.shape[0]
        vocab = weight.shape[0]
        rows = _chunk_size(chunk_size, num_rows, vocab)
        acc = accumulation_dtype(weight.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_bias = (torch.zeros(vocab, dtype=acc, device=weight.device)
                     if bias is not None else None)
        for start in range(0, num_rows, rows):
            end = min(num_rows, start + rows)
            chunk = _chunk_logits(hidden[start:end], weight, bias)
            # The epilogue writes d logits into the chunk buffer itself: one chunk alive.
            grad_chunk = logprobs_impl.backward(
                grad_logprobs[start:end],
                None if grad_entropy is None else grad_entropy[start:end],
                chunk, labels[start:end], lse[start:end],
                None if entropy is None else entropy[start:end],
                ignore_index, temperature, True)
            grad_hidden[start:end] = grad_chunk @ weight
            if grad_chunk.dtype == acc:
                grad_weight.addmm_(grad_chunk.t(), hidden[start:end])
            else:
                grad_weight.addmm_(grad_chunk.t().to(acc), hidden[start:end].to(acc))
            if grad_bias is not None:
                grad_bias += grad_chunk.sum(0, dtype=acc)
            del chunk, grad_chunk
        grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias

    return SimpleNamespace(forward=forward, backward=backward)


linear_logprobs = make_chunked_linear(logprobs)


# -------------------------------------------------------------------------------- KL estimators

def _k3_series(diff):
    """expm1(d) - d = d^2/2 + d^3/6 + ... + d^8/8!, accurate to 1e-11 relative for |d| < 1/8."""
    coefficient = torch.full_like(diff, 1.0 / math.factorial(8))
    for order in range(7, 1, -1):
        coefficient = coefficient * diff + 1.0 / math.factorial(order)
    return coefficient * diff * diff


def kl_forward(logprobs, ref_logprobs, mask, estimator):
    acc = accumulation_dtype(torch.promote_types(logprobs.dtype, ref_logprobs.dtype))
    diff = ref_logprobs.to(acc) - logprobs.to(acc)  # d = ref_logp - logp
    if estimator == "k1":
        kl = -diff
    elif estimator == "k2":
        kl = 0.5 * diff * diff
    else:  # k3 = expm1(d) - d, which cancels in fp32 for small |d|: the series there
        kl = torch.where(diff.abs() < 0.125, _k3_series(diff), torch.expm1(diff) - diff)
    if mask is not None:
        kl = torch.where(mask, kl, torch.zeros_like(kl))
    return kl


def kl_backward(grad_kl, logprobs, ref_logprobs, mask, estimator):
    acc = accumulation_dtype(torch.promote_types(logprobs.dtype, ref_logprobs.dtype))
    diff = ref_logprobs.to(acc) - logprobs.to(acc)
    if estimator == "k1":
        d_kl_d_diff = torch.full_like(diff, -1.0)
    elif estimator == "k2":
        d_kl_d_diff = diff
    else:
        d_kl_d_diff = torch.expm1(diff)
    grad_diff = grad_kl.to(acc) * d_kl_d_diff
    if mask is not None:
        grad_diff = torch.where(mask, grad_diff, torch.zeros_like(grad_diff))
    return (-grad_diff).to(logprobs.dtype), grad_diff.to(ref_logprobs.dtype)


kl = SimpleNamespace(forward=kl_forward, backward=kl_backward)


# -------------------------------------------------------------------------- preference losses

DISCOPOP_TAU = 0.05


def pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta,
                label_smoothing):
    """Per-pair losses [B] in fp32, differentiable by torch autograd (ALGORITHMS.md table)."""
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


def preference_forward(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss, beta,
                       label_smoothing):
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


def preference_backward(grad_losses, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                        loss, beta, label_smoothing):
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
    weights = mask.to(per_token.dtype)
    summed = (per_token * weights).sum(-1)
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


preference = SimpleNamespace(forward=preference_forward, backward=preference_backward,
                             sequence_preference_forward=sequence_preference_forward,
                             sequence_preference_backward=sequence_preference_backward)


# ------------------------------------------------------------------ multi-tensor weight updates

def _group_by_dtype(targets, sources):
    groups: dict = {}
    for target, source in zip(targets, sources):
        groups.setdefault((target.dtype, source.dtype, target.device), []).append((target, source))
    return groups.values()


@torch.no_grad()
def weights_apply_(kind, targets, sources, scalar):
    """In place over lists: ema t = s*t + (1-s)*src; lerp t = t + s*(src - t); copy t = src."""
    for pairs in _group_by_dtype(targets, sources):
        group_targets = [t for t, _ in pairs if t.numel()]
        group_sources = [s for t, s in pairs if t.numel()]
        if not group_targets:
            continue
        if kind == "copy":
            for target, source in zip(group_targets, group_sources):
                target.copy_(source)
            continue
        if kind == "ema":  # decay*t + (1-decay)*s == lerp with weight 1-decay
            weight = 1.0 - scalar
        else:
            weight = scalar
        same_dtype = group_targets[0].dtype == group_sources[0].dtype
        if same_dtype and group_targets[0].dtype == torch.float32:
            torch._foreach_lerp_(group_targets, group_sources, weight)
        else:
            # Mixed or low-precision dtypes: fp32 math, one rounding at the end.
            for target, source in zip(group_targets, group_sources):
                acc = torch.promote_types(torch.promote_types(target.dtype, source.dtype),
                                          torch.float32)
                updated = target.to(acc)
                updated.lerp_(source.to(acc), weight)
                target.copy_(updated)


weights = SimpleNamespace(apply_=weights_apply_)
