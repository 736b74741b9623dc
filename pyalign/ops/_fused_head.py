"""Scalar losses from the last hidden state in 3 matmuls: gradients computed during the forward.

When a head ends in a loss that is known in the forward pass (a preference or KTO loss reduced to
a scalar), its gradients need not wait for backward. Per chunk of whole *units* (a pair: chosen
row i with rejected row i + B; or one sequence), so that each chunk's loss is complete:

1. logits = hidden_chunk · Wᵀ (+ b)                                        (matmul 1)
2. the backend's logprobs forward primitive: per-token log-probs and row stats (and the
   per-token entropies, for a plan ``with_entropy``: the policy losses' entropy bonus)
3. the caller's ``chunk_loss`` on the chunk's [rows, T] log-probs (the same torch code as the
   recompute path: registry pair math, f-divergences, ld_alpha, WPO weights, policy terms),
   differentiated by autograd on those small tensors: per-token coefficients ∂L/∂log p (and
   ∂L/∂H when the loss uses the entropies)
4. the backend's logprobs backward primitive turns the logits buffer into d-logits in place
5. grad_hidden_chunk = d-logits · W                                         (matmul 2)
   grad_W += d-logitsᵀ · hidden_chunk, grad_b += Σ d-logits                (matmul 3)

Backward only multiplies the stored gradients by the upstream scalar: no recompute. Only the
kept (label != ignore_index) tokens enter the matmuls, so prompt and padding cost nothing and a
NaN hidden row there is never read. Memory: one chunk's logits (reused as its d-logits), the
reference's chunk logits before them (freed first), and gradient buffers of hidden's and W's
size (W's in fp32), which backward scales in place and hands over unless the graph is kept
(retain_graph=True: it scales copies). The reference (``ref_hidden`` + ``ref_weight``) is
scored in the same loop, no grad.
docs/algorithms.md, "3-matmul scalar losses".

The path runs eagerly (autograd inside the forward is not traceable): under torch.compile the
callers take their recompute path.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from pyalign import backends
from pyalign._utils import accumulation_dtype, gradients_wanted
from pyalign.ops import _checks, _vocab_parallel

# Default token budget of a chunk: about 64 MiB of fp32 logits (at least one whole unit).
_LOGITS_BUDGET = 1 << 24


class ReferenceHead(NamedTuple):
    hidden: torch.Tensor  # [R, T, H], scored without gradient
    weight: torch.Tensor
    bias: Optional[torch.Tensor]


class FusedHeadPlan(NamedTuple):
    """Everything but the differentiable tensors. ``unit_rows`` [U, k] int64: the rows of each
    unit (k = 2 for pairs, chosen first); ``chunk_loss(rows, token_logps, mask, ref_token_logps,
    log_sum_sq)`` -> (unit losses [u], metrics: tuple of [u, ...] tensors) for the chunk's rows
    (its units' first rows, then their second rows); ``ref_token_logps`` and ``log_sum_sq`` are
    [rows, T] or None. With ``with_entropy`` it also gets ``entropy=`` the per-token entropies
    [rows, T], differentiable like the log-probs (their gradient goes through the head too).
    ``loss_scale``: ∂(reduced loss)/∂(unit loss), 1/U for a mean.
    ``vocab_shard``: for a vocab-parallel head, this rank's shard (weight, bias and the
    reference's head are its vocabulary rows: the caller's ``_vocab_parallel.vocab_shard``),
    or None."""
    labels: torch.Tensor  # [R, T]
    unit_rows: torch.Tensor
    chunk_loss: Callable
    reduction: str
    ignore_index: int
    temperature: float
    chunk_size: Optional[int]  # kept tokens per chunk (None: the default budget)
    backend: str
    reference: Optional[ReferenceHead] = None
    with_log_sum_sq: bool = False
    with_entropy: bool = False
    vocab_shard: Optional[_vocab_parallel.VocabShard] = None


def applies(reduction: str, *tensors) -> bool:
    """Whether the 3-matmul path runs: a scalar loss, gradients wanted, not being traced."""
    return (reduction in ("mean", "sum") and gradients_wanted(*tensors)
            and not torch.compiler.is_compiling())


def _logprobs_backend(backend: str) -> str:
    """The logprobs family's backend for a backend named for linear_logprobs."""
    return backend if backend == "auto" or backends.has("logprobs", backend) else "auto"


def _chunks(token_counts: list[int], budget: int):
    """Consecutive unit ranges [start, end) whose kept tokens fit ``budget`` (at least 1 unit)."""
    start, used = 0, 0
    for index, count in enumerate(token_counts):
        if index > start and used + count > budget:
            yield start, index
            start, used = index, 0
        used += count
    if start < len(token_counts):
        yield start, len(token_counts)


def _head_logits(hidden_rows, weight, bias):
    logits = hidden_rows @ weight.t()
    if bias is not None:
        logits += bias
    return logits


def _scatter(values, kept_local, shape, dtype):
    """Per kept token values -> [rows, T], exactly 0 elsewhere."""
    out = torch.zeros(shape[0] * shape[1], dtype=dtype, device=values.device)
    out[kept_local] = values.to(dtype)
    return out.view(shape)


def _run(plan: FusedHeadPlan, hidden, weight, bias, needs_grad):
    labels = plan.labels
    shard = plan.vocab_shard
    rows_total, seq_len, hidden_size = hidden.shape
    vocab = weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    lp_backend = _logprobs_backend(plan.backend)
    mask = labels != plan.ignore_index
    flat_hidden = hidden.reshape(-1, hidden_size)
    flat_labels = labels.reshape(-1).to(torch.int64)
    reference = plan.reference
    ref_flat = None if reference is None else reference.hidden.reshape(-1, hidden_size)
    need_hidden, need_weight, need_bias = needs_grad
    grad_hidden = torch.zeros_like(flat_hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=accumulation_dtype(weight.dtype),
                              device=weight.device) if need_weight else None
    grad_bias = (torch.zeros(vocab, dtype=accumulation_dtype(weight.dtype), device=weight.device)
                 if need_bias and bias is not None else None)
    unit_rows = plan.unit_rows
    counts = mask.sum(-1)[unit_rows].sum(-1).tolist() if unit_rows.numel() else []
    # a vocab shard: every rank must cut the same chunks (their collectives pair up)
    budget = plan.chunk_size or max(1, _LOGITS_BUDGET // max(vocab if shard is None else shard.largest, 1))
    positions = torch.arange(seq_len, device=hidden.device)
    losses, metrics = [], []
    for start, end in _chunks(counts, budget):
        rows = unit_rows[start:end].t().reshape(-1)  # first rows of the units, then second rows
        chunk_mask = mask[rows]
        kept_local = chunk_mask.reshape(-1).nonzero().squeeze(-1)
        flat_index = (rows[:, None] * seq_len + positions).reshape(-1)[kept_local]
        chunk_labels = flat_labels[flat_index]
        shape = (rows.numel(), seq_len)
        forward_labels, forward_ignore = chunk_labels, plan.ignore_index
        if shard is not None:  # every token here is kept: the others' label is a dummy in forward
            chunk_labels, owned = _vocab_parallel.local_labels(shard, chunk_labels, plan.ignore_index)
            forward_labels = torch.where(owned, chunk_labels, 0)
            forward_ignore = _vocab_parallel.LOCAL_IGNORE  # never a local label
            kept_tokens = torch.ones_like(owned)
        ref_tokens = None
        if reference is not None:
            with torch.no_grad():
                ref_logits = _head_logits(ref_flat[flat_index], reference.weight, reference.bias)
                ref_impl = backends.implementation("logprobs", lp_backend, ref_logits)
                ref_lp, _, ref_stats = ref_impl.forward(ref_logits, forward_labels, forward_ignore,
                                                        plan.temperature, False)
                del ref_logits
                if shard is not None:
                    ref_lp = _vocab_parallel.combine_rows(shard, owned, kept_tokens, ref_lp, ref_stats,
                                                          1.0 / plan.temperature).logprobs
                ref_tokens = _scatter(ref_lp, kept_local, shape,
                                      accumulation_dtype(reference.hidden.dtype))
        chunk_hidden = flat_hidden[flat_index]
        logits = _head_logits(chunk_hidden, weight, bias)  # matmul 1
        impl = backends.implementation("logprobs", lp_backend, logits)
        token_lp, entropy, stats = impl.forward(logits, forward_labels, forward_ignore,
                                                plan.temperature, plan.with_entropy)
        log_sum_sq = None
        if plan.with_log_sum_sq:
            from pyalign.ops.preference import log_sum_sq_probs
            log_sum_sq = log_sum_sq_probs(logits, plan.temperature)
        if shard is not None:  # the whole vocabulary's log-probs, stats (and log Σ p²)
            combined = _vocab_parallel.combine_rows(shard, owned, kept_tokens, token_lp, stats,
                                                    1.0 / plan.temperature, log_sum_sq=log_sum_sq,
                                                    entropy=entropy if plan.with_entropy else None)
            token_lp, stats, log_sum_sq = combined.logprobs, combined.stats, combined.log_sum_sq
            if plan.with_entropy:
                entropy = combined.entropy
        if log_sum_sq is not None:
            log_sum_sq = _scatter(log_sum_sq, kept_local, shape, torch.float32)
        with torch.enable_grad():
            leaf = _scatter(token_lp, kept_local, shape, acc).requires_grad_(True)
            leaves, extra = [leaf], {}
            if plan.with_entropy:
                extra["entropy"] = _scatter(entropy, kept_local, shape, acc).requires_grad_(True)
                leaves.append(extra["entropy"])
            unit_losses, unit_metrics = plan.chunk_loss(rows, leaf, chunk_mask, ref_tokens,
                                                        log_sum_sq, **extra)
            coefficients, *entropy_coefficients = torch.autograd.grad(
                unit_losses, leaves, grad_outputs=torch.ones_like(unit_losses), allow_unused=True)
        losses.append(unit_losses.detach())
        metrics.append(tuple(m.detach() for m in unit_metrics))
        if grad_hidden is None and grad_weight is None and grad_bias is None:
            continue
        if coefficients is None:
            coefficients = torch.zeros_like(leaf)
        grad_tokens = coefficients.reshape(-1)[kept_local].to(acc).contiguous()
        grad_entropy = None  # None unless the loss uses the entropy: the backward skips its term
        if entropy_coefficients and entropy_coefficients[0] is not None:
            grad_entropy = entropy_coefficients[0].reshape(-1)[kept_local].to(acc).contiguous()
        if plan.reduction == "mean":
            grad_tokens = grad_tokens / unit_rows.shape[0]
            if grad_entropy is not None:
                grad_entropy = grad_entropy / unit_rows.shape[0]
        if shard is None:
            grad_logits = impl.backward(grad_tokens, grad_entropy, logits, chunk_labels, stats,
                                        None if grad_entropy is None else entropy, plan.ignore_index,
                                        plan.temperature, True)  # in place
        else:
            grad_logits = _vocab_parallel.shard_logits_gradient_(
                impl, grad_tokens, logits, chunk_labels, stats, plan.temperature,
                grad_entropy=grad_entropy, entropy=None if grad_entropy is None else entropy)
        if grad_hidden is not None:
            grad_hidden[flat_index] = (grad_logits @ weight).to(grad_hidden.dtype)  # matmul 2
        if grad_weight is not None:  # matmul 3
            if grad_logits.dtype == grad_weight.dtype:
                grad_weight.addmm_(grad_logits.t(), chunk_hidden)
            else:
                grad_weight.addmm_(grad_logits.t().to(grad_weight.dtype),
                                   chunk_hidden.to(grad_weight.dtype))
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0, dtype=grad_bias.dtype)
        del logits, grad_logits
    loss_dtype = losses[0].dtype if losses else acc
    per_unit = torch.cat(losses) if losses else hidden.new_zeros(0, dtype=loss_dtype)
    if losses:
        merged = tuple(torch.cat(parts) for parts in zip(*metrics))
    else:  # an empty batch: run the loss on nothing for the metrics' shapes
        nothing = hidden.new_zeros((0, seq_len), dtype=acc)
        extra = {"entropy": nothing} if plan.with_entropy else {}
        with torch.enable_grad():
            _, empty = plan.chunk_loss(unit_rows.new_zeros(0), nothing, mask[:0], None, None,
                                       **extra)
        merged = tuple(m.detach() for m in empty)
    # the units' order: chunks are consecutive unit ranges, so the concatenation is in order
    if grad_hidden is not None:
        if shard is not None:  # Σ over the vocabulary: over the ranks' shards
            _vocab_parallel.sum_over_ranks(grad_hidden, shard)
        grad_hidden = grad_hidden.view(hidden.shape)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return per_unit, merged, (grad_hidden, grad_weight, grad_bias)


class FusedHeadLossFunction(torch.autograd.Function):
    """(hidden, weight, bias, plan) -> (per-unit losses [U] detached, reduced loss, *metrics);
    only the reduced loss is differentiable. Backward scales the gradients the forward stored."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: FusedHeadPlan):
        per_unit, metrics, grads = _run(plan, hidden, weight, bias, ctx.needs_input_grad[:3])
        if per_unit.numel() == 0:
            loss = per_unit.sum()
        else:
            loss = per_unit.mean() if plan.reduction == "mean" else per_unit.sum()
        ctx.grads = grads
        ctx.mark_non_differentiable(*metrics)
        return (loss, *metrics)

    @staticmethod
    def backward(ctx, grad_loss, *_metrics):
        if ctx.grads is None:
            raise RuntimeError("backward through a 3-matmul loss a second time: the first "
                               "backward handed its stored gradients over; pass "
                               "retain_graph=True to it to backward again")
        if _graph_is_kept() or torch.is_grad_enabled():
            # a later backward needs the stored gradients (or create_graph: a graph through
            # grad_loss): scale a copy
            scaled = tuple(None if grad is None else grad * grad_loss.to(grad.dtype)
                           for grad in ctx.grads)
            return (*scaled, None)
        # The last backward through this graph: scale the stored buffers in place and hand them
        # over (ctx lets go, so autograd adopts them as .grad): a copy of W's size would be the
        # peak of the whole loss.
        grads, ctx.grads = ctx.grads, None
        return (*(None if grad is None else grad.mul_(grad_loss.to(grad.dtype))
                  for grad in grads), None)


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True, create_graph=True). The
    engine's flag has no public accessor; without it, assume kept (a copy: correct, more memory)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else bool(keep_graph())


def fused_head_loss(hidden, weight, bias, plan: FusedHeadPlan) -> tuple[torch.Tensor, ...]:
    """(reduced loss, *metrics) of ``plan`` on the head hidden·Wᵀ (+ b), in 3 matmuls."""
    if plan.vocab_shard is None:  # a shard's labels were checked against the whole vocabulary
        _checks.check_labels_in_range(plan.labels, weight.shape[0], plan.ignore_index)
    return FusedHeadLossFunction.apply(hidden, weight, bias, plan)
