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
scored in the same loop, no grad. An fp32 head (``head_logits``: hidden and weight of different
dtypes, one float32) forms the logits and d-logits in fp32, the other operand upcast (a bf16 /
fp16 weight a block of rows at a time).
docs/algorithms.md, "3-matmul scalar losses".

The path runs eagerly (autograd inside the forward is not traceable): under torch.compile the
callers take their recompute path.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from pyalign import backends
from pyalign._chunked_head import upcast_blocks
from pyalign._utils import accumulation_dtype, gradients_wanted, head_logits_dtype
from pyalign.eager.logprobs import log_sum_sq_probs
from pyalign.ops import _checks, _vocab_parallel

# Default budget of a chunk on CPU, in logits (elements): 64 MiB of fp32; a chunk holds this many
# logits' worth of kept tokens (at least one whole unit). A GPU's chunk is larger
# (backends.default_head_chunk: 4096 tokens, docs/gpu.md).
FUSED_HEAD_CHUNK_ELEMENTS = 1 << 24


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


def head_logits(hidden_rows, weight, bias):
    """hidden_rows · Wᵀ (+ b) in the logits' dtype (pyalign._utils.head_logits_dtype): an fp32
    head upcasts a bf16 / fp16 operand, the rows whole, the weight a block of rows at a time."""
    dtype = head_logits_dtype(hidden_rows.dtype, weight.dtype)
    hidden_rows = hidden_rows.to(dtype)
    if weight.dtype == dtype:
        logits = hidden_rows @ weight.t()
    else:
        logits = hidden_rows.new_empty(hidden_rows.shape[0], weight.shape[0])
        for v0, v1, block in upcast_blocks(weight, dtype):
            torch.mm(hidden_rows, block.t(), out=logits[:, v0:v1])
    if bias is not None:
        logits += bias
    return logits


def _times_weight(grad_logits, weight):
    """grad_logits · W (matmul 2) in grad_logits's dtype, a bf16 / fp16 weight of an fp32 head
    upcast a block of rows at a time."""
    if grad_logits.dtype == weight.dtype:
        return grad_logits @ weight
    product = None
    for v0, v1, block in upcast_blocks(weight, grad_logits.dtype):
        if product is None:
            product = grad_logits[:, v0:v1] @ block
        else:
            product.addmm_(grad_logits[:, v0:v1], block)
    return product


def _scatter(values, kept_local, shape, dtype):
    """Per kept token values -> [rows, T], exactly 0 elsewhere."""
    out = torch.zeros(shape[0] * shape[1], dtype=dtype, device=values.device)
    out[kept_local] = values.to(dtype)
    return out.view(shape)


class _Chunk(NamedTuple):
    """One chunk of whole units: its rows (the units' first rows, then their second rows), their
    mask [rows, T], the kept tokens (positions in the chunk's [rows, T], and in the flat
    [R·T] tokens), their labels for the backward primitive and, for the forward primitive, the
    labels and ignore_index (a vocab shard's tokens whose label another rank holds get a dummy
    label in forward), and the shard's ``owned`` flags (None unsharded)."""
    rows: torch.Tensor
    mask: torch.Tensor
    kept_local: torch.Tensor
    flat_index: torch.Tensor
    labels: torch.Tensor
    forward_labels: torch.Tensor
    forward_ignore: int
    owned: Optional[torch.Tensor]

    @property
    def shape(self):
        return tuple(self.mask.shape)


class _Run(NamedTuple):
    """The whole call's views, fixed before the chunk loop."""
    plan: FusedHeadPlan
    mask: torch.Tensor  # [R, T]
    flat_hidden: torch.Tensor  # [R·T, H]
    flat_labels: torch.Tensor
    ref_flat: Optional[torch.Tensor]  # the reference's hidden, [R·T, H]
    lp_backend: str  # the logprobs family's backend
    acc: torch.dtype

    @classmethod
    def of(cls, plan, hidden):
        hidden_size = hidden.shape[-1]
        reference = plan.reference
        return cls(plan, plan.labels != plan.ignore_index, hidden.reshape(-1, hidden_size),
                   plan.labels.reshape(-1).to(torch.int64),
                   None if reference is None else reference.hidden.reshape(-1, hidden_size),
                   backends.backend_for("logprobs", plan.backend),
                   accumulation_dtype(hidden.dtype))

    def chunks(self, vocab: int):
        """The chunks (``_chunks`` of the units' kept-token counts, the plan's budget)."""
        plan, unit_rows = self.plan, self.plan.unit_rows
        counts = self.mask.sum(-1)[unit_rows].sum(-1).tolist() if unit_rows.numel() else []
        # a vocab shard: every rank must cut the same chunks (their collectives pair up)
        width = vocab if plan.vocab_shard is None else plan.vocab_shard.largest
        budget = (plan.chunk_size
                  or backends.default_head_chunk(self.flat_hidden.device, width,
                                                 self.flat_hidden.element_size())
                  or max(1, FUSED_HEAD_CHUNK_ELEMENTS // max(width, 1)))
        for start, end in _chunks(counts, budget):
            yield self.chunk(unit_rows[start:end].t().reshape(-1))

    def chunk(self, rows) -> _Chunk:
        plan, seq_len = self.plan, self.mask.shape[1]
        chunk_mask = self.mask[rows]
        kept_local = chunk_mask.reshape(-1).nonzero().squeeze(-1)
        positions = torch.arange(seq_len, device=rows.device)
        flat_index = (rows[:, None] * seq_len + positions).reshape(-1)[kept_local]
        labels = self.flat_labels[flat_index]
        if plan.vocab_shard is None:
            return _Chunk(rows, chunk_mask, kept_local, flat_index, labels, labels,
                          plan.ignore_index, None)
        # every token here is kept: the others' label is a dummy in forward, and LOCAL_IGNORE is
        # never a local label
        local, owned = _vocab_parallel.local_labels(plan.vocab_shard, labels, plan.ignore_index)
        return _Chunk(rows, chunk_mask, kept_local, flat_index, local,
                      torch.where(owned, local, 0), _vocab_parallel.LOCAL_IGNORE, owned)


class _Forward(NamedTuple):
    """A chunk's forward: its tokens' hidden states, their logits (turned into their gradient
    later), the logprobs implementation that ran, the per-token outputs of the kept tokens and
    the whole rows' stats."""
    hidden_rows: torch.Tensor  # the kept tokens' hidden states [kept, H]
    logits: torch.Tensor
    implementation: object
    token_logprobs: torch.Tensor
    entropy: torch.Tensor
    stats: torch.Tensor
    log_sum_sq: Optional[torch.Tensor]  # [rows, T] or None


def _reference_pass(run: _Run, chunk: _Chunk) -> Optional[torch.Tensor]:
    """The reference's per-token log-probs [rows, T] of a chunk (no gradient), or None."""
    plan, reference = run.plan, run.plan.reference
    if reference is None:
        return None
    with torch.no_grad():
        logits = head_logits(run.ref_flat[chunk.flat_index], reference.weight, reference.bias)
        implementation = backends.implementation("logprobs", run.lp_backend, logits)
        logprobs, _, stats = implementation.forward(logits, chunk.forward_labels,
                                                    chunk.forward_ignore, plan.temperature, False)
        del logits
        if plan.vocab_shard is not None:
            logprobs = _vocab_parallel.combine_rows(plan.vocab_shard, chunk.owned,
                                                    torch.ones_like(chunk.owned), logprobs, stats,
                                                    1.0 / plan.temperature).logprobs
        return _scatter(logprobs, chunk.kept_local, chunk.shape,
                        accumulation_dtype(reference.hidden.dtype))


def _forward_pass(run: _Run, chunk: _Chunk, weight, bias) -> _Forward:
    """Matmul 1 and the logprobs forward primitive on a chunk (combined over the ranks for a
    vocab shard)."""
    plan, shard = run.plan, run.plan.vocab_shard
    hidden_rows = run.flat_hidden[chunk.flat_index]
    logits = head_logits(hidden_rows, weight, bias)  # matmul 1
    implementation = backends.implementation("logprobs", run.lp_backend, logits)
    token_logprobs, entropy, stats = implementation.forward(
        logits, chunk.forward_labels, chunk.forward_ignore, plan.temperature, plan.with_entropy)
    log_sum_sq = log_sum_sq_probs(logits, plan.temperature) if plan.with_log_sum_sq else None
    if shard is not None:  # the whole vocabulary's log-probs, stats (and log Σ p², entropy)
        combined = _vocab_parallel.combine_rows(
            shard, chunk.owned, torch.ones_like(chunk.owned), token_logprobs, stats,
            1.0 / plan.temperature, log_sum_sq=log_sum_sq,
            entropy=entropy if plan.with_entropy else None)
        token_logprobs, stats, log_sum_sq = combined.logprobs, combined.stats, combined.log_sum_sq
        if plan.with_entropy:
            entropy = combined.entropy
    if log_sum_sq is not None:
        log_sum_sq = _scatter(log_sum_sq, chunk.kept_local, chunk.shape, torch.float32)
    return _Forward(hidden_rows, logits, implementation, token_logprobs, entropy, stats,
                    log_sum_sq)


def _chunk_loss(run: _Run, chunk: _Chunk, forward: _Forward, ref_tokens):
    """(unit losses, unit metrics, ∂(reduced loss)/∂log p and ∂/∂H of the kept tokens or None):
    the plan's loss on the chunk's [rows, T] tensors, differentiated by autograd."""
    plan = run.plan
    with torch.enable_grad():
        leaf = _scatter(forward.token_logprobs, chunk.kept_local, chunk.shape,
                        run.acc).requires_grad_(True)
        leaves, extra = [leaf], {}
        if plan.with_entropy:
            extra["entropy"] = _scatter(forward.entropy, chunk.kept_local, chunk.shape,
                                        run.acc).requires_grad_(True)
            leaves.append(extra["entropy"])
        unit_losses, unit_metrics = plan.chunk_loss(chunk.rows, leaf, chunk.mask, ref_tokens,
                                                    forward.log_sum_sq, **extra)
        grads = torch.autograd.grad(unit_losses, leaves, grad_outputs=torch.ones_like(unit_losses),
                                    allow_unused=True)
    def per_kept_token(grad):  # times ∂(reduced loss)/∂(unit loss)
        value = grad.reshape(-1)[chunk.kept_local].to(run.acc)
        return value / plan.unit_rows.shape[0] if plan.reduction == "mean" else value

    grad_tokens = per_kept_token(torch.zeros_like(leaf) if grads[0] is None else grads[0])
    # None unless the loss uses the entropy: the backward then skips its term
    grad_entropy = None if len(grads) < 2 or grads[1] is None else per_kept_token(grads[1])
    return (unit_losses.detach(), tuple(m.detach() for m in unit_metrics),
            (grad_tokens, grad_entropy))


def _gradient_epilogue(run: _Run, chunk: _Chunk, forward: _Forward, coefficients, grads,
                       weight) -> None:
    """The logprobs backward primitive turns the chunk's logits into d-logits in place, then
    matmuls 2 and 3 add them into the gradients of hidden, W and b."""
    plan = run.plan
    grad_tokens, grad_entropy = (None if c is None else c.contiguous() for c in coefficients)
    entropy = None if grad_entropy is None else forward.entropy
    if plan.vocab_shard is None:
        grad_logits = forward.implementation.backward(
            grad_tokens, grad_entropy, forward.logits, chunk.labels, forward.stats, entropy,
            plan.ignore_index, plan.temperature, True)  # in place
    else:
        grad_logits = _vocab_parallel.shard_logits_gradient_(
            forward.implementation, grad_tokens, forward.logits, chunk.labels, forward.stats,
            plan.temperature, grad_entropy=grad_entropy, entropy=entropy)
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        grad_rows = _times_weight(grad_logits, weight)  # matmul 2
        grad_hidden[chunk.flat_index] = grad_rows.to(grad_hidden.dtype)
    if grad_weight is not None:  # matmul 3
        hidden_rows = forward.hidden_rows
        if grad_logits.dtype == grad_weight.dtype == hidden_rows.dtype:
            grad_weight.addmm_(grad_logits.t(), hidden_rows)
        else:
            grad_weight.addmm_(grad_logits.t().to(grad_weight.dtype),
                               hidden_rows.to(grad_weight.dtype))
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0, dtype=grad_bias.dtype)


def _gradient_buffers(run: _Run, weight, bias, needs_grad):
    """Zeroed fp32 (W, b) and hidden-dtype gradients for the inputs that want one (hidden's in
    fp32 for a vocab shard: the ranks' parts are summed in fp32, then rounded once)."""
    need_hidden, need_weight, need_bias = needs_grad
    acc = accumulation_dtype(weight.dtype)
    hidden_dtype = run.flat_hidden.dtype if run.plan.vocab_shard is None else run.acc
    return (torch.zeros_like(run.flat_hidden, dtype=hidden_dtype) if need_hidden else None,
            torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None,
            torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
            if need_bias and bias is not None else None)


def _run(plan: FusedHeadPlan, hidden, weight, bias, needs_grad):
    """(per-unit losses [U], metrics, (grad_hidden, grad_weight, grad_bias)): the chunk loop."""
    run = _Run.of(plan, hidden)
    grads = _gradient_buffers(run, weight, bias, needs_grad)
    losses, metrics = [], []
    for chunk in run.chunks(weight.shape[0]):
        ref_tokens = _reference_pass(run, chunk)
        forward = _forward_pass(run, chunk, weight, bias)
        unit_losses, unit_metrics, coefficients = _chunk_loss(run, chunk, forward, ref_tokens)
        losses.append(unit_losses)
        metrics.append(unit_metrics)
        if any(grad is not None for grad in grads):
            _gradient_epilogue(run, chunk, forward, coefficients, grads, weight)
        del forward
    # the units' order: chunks are consecutive unit ranges, so the concatenation is in order
    per_unit = torch.cat(losses) if losses else hidden.new_zeros(0, dtype=run.acc)
    merged = tuple(torch.cat(parts) for parts in zip(*metrics)) if losses else _empty_metrics(run)
    return per_unit, merged, _finished(grads, plan.vocab_shard, hidden, weight, bias)


def _empty_metrics(run: _Run):
    """An empty batch: the loss run on nothing, for the metrics' shapes."""
    plan = run.plan
    nothing = torch.zeros((0, run.mask.shape[1]), dtype=run.acc, device=run.mask.device)
    extra = {"entropy": nothing} if plan.with_entropy else {}
    with torch.enable_grad():
        _, empty = plan.chunk_loss(plan.unit_rows.new_zeros(0), nothing, run.mask[:0], None, None,
                                   **extra)
    return tuple(m.detach() for m in empty)


def _finished(grads, shard, hidden, weight, bias):
    """The gradients in the inputs' shapes and dtypes (hidden's summed over a shard's ranks)."""
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        if shard is not None:  # Σ over the vocabulary: over the ranks' shards
            _vocab_parallel.sum_over_ranks(grad_hidden, shard)
        grad_hidden = grad_hidden.view(hidden.shape).to(hidden.dtype)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


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
