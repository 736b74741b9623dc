"""The vocab-parallel head: an lm_head sharded by vocabulary rows across the ranks of a group.

Each rank holds the rows [offset, offset + V_r) of the head (a tensor-parallel ``lm_head``, the
shards in rank order, any sizes) and the same hidden states and labels (global vocabulary ids).
A rank streams only its shard through the usual backend primitives and the per-token results are
combined with all-reduces of [N]-sized vectors (docs/algorithms.md, "Vocab-parallel head"):

- MAX of the shards' row maxima m_r -> m;
- SUM of S_r = exp(L_r + (m_r - m)/T) (the shard's share of sum exp(z/T), relative to m), of
  the label term (only the owner of the label adds it), and of the entropy, log sum p^2 and mean
  parts; then L = log S, log p_y = (z_y - m)/T - L, H = (sum_r S_r (H_r - log S_r))/S + log S;
- with is_top1 a MIN over the shards holding the global maximum: the first, and whether its first
  maximum is the label.

Backward needs no [N, V] exchange: d log p / d z_v depends on the row only through (m, L) and H,
so each rank turns its own logits into their gradient with the global stats, keeps its weight
and bias gradients, and the hidden gradient (a sum over the vocabulary) is the SUM over ranks.
On a rank, a token whose label another rank owns gets the local label ``shard.size`` (outside
the shard: no label term) and ignored tokens get ``LOCAL_IGNORE``, so no local label can be
mistaken for ``ignore_index``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

# The ignore_index every backend call of a shard sees: owned labels are >= 0 and the others'
# is the shard's size, so -1 never collides with a kept token.
LOCAL_IGNORE = -1
# hidden's shape, compared across ranks, in a fixed-length vector (the collective needs one
# length on every rank): the number of dimensions, up to this many of them (-1 past the last),
# then the product of the rest.
_SHAPE_SLOTS = 6


class VocabShard(NamedTuple):
    group: object  # a torch.distributed ProcessGroup
    rank: int
    world: int
    offset: int   # the first vocabulary id of this rank's rows
    size: int     # this rank's rows
    total: int    # the whole vocabulary: the sum of every rank's rows
    largest: int  # the largest shard (chunk budgets must agree across ranks)


def _shape_signature(shape) -> list[int]:
    dims = list(shape)
    head = dims[:_SHAPE_SLOTS] + [-1] * (_SHAPE_SLOTS - min(len(dims), _SHAPE_SLOTS))
    return [len(dims), *head, math.prod(dims[_SHAPE_SLOTS:])]


def vocab_shard(process_group, name: str, weight: torch.Tensor, hidden: torch.Tensor,
                labels: torch.Tensor, ignore_index: int, *, hidden_name: str = "hidden",
                labels_name: str = "labels") -> VocabShard:
    """Validate ``process_group`` and the shards, in one all-reduce: every rank's shard size
    (the offsets and the total), and hidden's shape on every rank. Raises on every rank alike
    (they all see the reduced values): a non-initialised torch.distributed, hidden (and so
    labels) of different shapes across ranks, a label outside the total vocabulary."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{name} is given but torch.distributed is not initialised: call "
                           f"torch.distributed.init_process_group first (or pass {name}=None for "
                           f"an unsharded head)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD or "
                        f"one from dist.new_group) or None, got {type(process_group).__name__}")
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    signature = _shape_signature(hidden.shape)
    sizes = [0] * world
    sizes[rank] = weight.shape[0]
    # MAX of (sizes one-hot, shape, -shape): the sizes, and the largest and smallest of each
    # shape entry (equal on every rank iff the shapes agree)
    # on weight's device: the group's backend takes the tensors the combine will reduce
    info = torch.tensor(sizes + signature + [-s for s in signature], dtype=torch.int64,
                        device=weight.device)
    dist.all_reduce(info, op=dist.ReduceOp.MAX, group=process_group)
    info = info.tolist()
    sizes = info[:world]
    largest_shape = info[world:world + len(signature)]
    smallest_shape = [-s for s in info[world + len(signature):]]
    if largest_shape != smallest_shape:
        raise ValueError(f"{hidden_name} and {labels_name} must have the same shape on every rank of "
                         f"{name} (the vocab-parallel head shards the weight, not the tokens): this "
                         f"rank has {hidden_name} {tuple(hidden.shape)}, another rank differs")
    total = sum(sizes)
    invalid = (labels != ignore_index) & ((labels < 0) | (labels >= total))
    if labels.numel() and bool(invalid.any()):
        value = int(labels.reshape(-1)[invalid.reshape(-1).nonzero()[0, 0]])
        raise ValueError(f"{labels_name} out of range for the vocab-parallel head: label {value} is "
                         f"outside [0, {total}), the vocabulary the shards' rows add up to across "
                         f"the ranks of {name} (rows per rank: {sizes}), and is not "
                         f"ignore_index={ignore_index}")
    return VocabShard(process_group, rank, world, sum(sizes[:rank]), sizes[rank], total, max(sizes))


def local_labels(shard: VocabShard, labels: torch.Tensor, ignore_index: int):
    """(labels of the shard's rows for the backend calls, owned: this rank has the label's row).
    Owned tokens get label - offset, the other kept ones ``shard.size`` (outside the shard),
    ignored ones LOCAL_IGNORE."""
    local = labels - shard.offset
    valid = labels != ignore_index
    owned = valid & (local >= 0) & (local < shard.size)
    out = torch.where(owned, local, torch.where(valid, shard.size, LOCAL_IGNORE))
    return out, owned


def _all_reduce(tensor: torch.Tensor, op: str, shard: VocabShard) -> torch.Tensor:
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op), group=shard.group)
    return tensor


class CombinedRows(NamedTuple):
    """Per-token results of the whole vocabulary, the same on every rank; None where not asked."""
    logprobs: torch.Tensor
    stats: torch.Tensor  # [N, 2] (m, L) of the whole rows, for the backward primitives
    entropy: Optional[torch.Tensor] = None
    log_sum_sq: Optional[torch.Tensor] = None
    mean: Optional[torch.Tensor] = None
    top1: Optional[torch.Tensor] = None


def combine_rows(shard: VocabShard, owned: torch.Tensor, valid: torch.Tensor,
                 logprobs: torch.Tensor, stats: torch.Tensor, inv_temperature: float, *,
                 entropy: Optional[torch.Tensor] = None, log_sum_sq: Optional[torch.Tensor] = None,
                 mean: Optional[torch.Tensor] = None, top1: Optional[torch.Tensor] = None
                 ) -> CombinedRows:
    """The whole vocabulary's per-token results from this shard's (a backend forward's outputs
    on the shard, ``stats`` = its (m_r, L_r) in the units where log p = (z - m)·inv_T - L).
    Two all-reduces (MAX, SUM; a third, MIN, with ``top1``), in float64; [N] vectors only."""
    f64 = torch.float64
    out_dtype = stats.dtype
    zero = torch.zeros((), dtype=f64, device=stats.device)
    peak, log_sum = stats[:, 0].to(f64), stats[:, 1].to(f64)
    # a shard whose row holds only -inf logits has no mass (L_r = -inf): its max does not count
    peak = torch.where(torch.isneginf(log_sum), -math.inf, peak)
    row_max = _all_reduce(peak.clone(), "MAX", shard)
    shift = torch.where(torch.isneginf(row_max), zero, row_max)
    log_share = log_sum + (peak - shift) * inv_temperature  # log S_r
    share = log_share.exp()
    has_mass = share > 0
    # the label term, from its owner only (a shard of -inf logits only: the label's is -inf too)
    label = torch.where(has_mass, logprobs.to(f64) + log_share, -math.inf)
    parts = [share, torch.where(owned, label, zero)]
    if entropy is not None:
        parts.append(torch.where(has_mass, share * (entropy.to(f64) - log_share), zero))
    if log_sum_sq is not None:
        parts.append(torch.where(has_mass, (2 * log_share + log_sum_sq.to(f64)).exp(), zero))
    if mean is not None:
        parts.append(mean.to(f64) * (shard.size / shard.total))
    sums = _all_reduce(torch.stack(parts), "SUM", shard)
    total = sums[0].log()
    result = {"stats": torch.stack([shift, total], 1).to(out_dtype)}
    logprobs_out = (sums[1] - total).clamp(max=0.0)
    result["logprobs"] = torch.where(valid, logprobs_out, zero).to(out_dtype)
    index = 2
    if entropy is not None:
        value = (sums[index] / sums[0] + total).clamp(min=0.0)
        result["entropy"] = torch.where(valid, value, zero).to(entropy.dtype)
        index += 1
    if log_sum_sq is not None:
        result["log_sum_sq"] = torch.where(valid, sums[index].log() - 2 * total,
                                           zero).to(log_sum_sq.dtype)
        index += 1
    if mean is not None:
        result["mean"] = torch.where(valid, sums[index], zero).to(mean.dtype)
    if top1 is not None:
        # the label is the first maximum of the whole row iff it is its shard's first maximum and
        # no earlier shard (rank order is column order) reaches the global maximum
        # reaches the global maximum: MIN of 2·rank + (0 if this shard's first maximum is the
        # label, else 1) over the shards reaching it picks the first and says whether it wins
        mine = (top1 & owned).to(torch.int64)
        code = torch.where(peak == row_max, 2 * shard.rank + 1 - mine, 2 * shard.world)
        code = _all_reduce(code, "MIN", shard)
        result["top1"] = (code % 2 == 0) & (code < 2 * shard.world) & valid & ~torch.isnan(total)
    return CombinedRows(**result)


def sum_over_ranks(tensor: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """The hidden gradient of the whole head: the SUM of every shard's, in place (summed in
    fp32 for bf16/fp16 gradients: not every backend reduces them, and fp32 adds exactly)."""
    if tensor.dtype in (torch.float32, torch.float64):
        return _all_reduce(tensor, "SUM", shard)
    return tensor.copy_(_all_reduce(tensor.float(), "SUM", shard))


def shard_logits_gradient_(implementation, grad_logprobs: torch.Tensor, logits: torch.Tensor,
                           labels: torch.Tensor, stats: torch.Tensor, temperature: float, *,
                           grad_entropy: Optional[torch.Tensor] = None,
                           entropy: Optional[torch.Tensor] = None):
    """A logprobs implementation's backward, in place, on a shard's logits with the whole rows'
    ``stats`` (and entropies, when ``grad_entropy`` is given) and ``local_labels``: the ones
    outside the shard add no label term. That is ``backward_columns`` at column 0 where the
    backend has it (the cpu kernel's plain backward refuses labels outside [0, V)), else
    ``backward`` (eager's and Triton's match no column)."""
    columns = getattr(implementation, "backward_columns", None)
    if columns is not None:
        return columns(grad_logprobs, grad_entropy, logits, labels, stats, entropy, LOCAL_IGNORE,
                       temperature, 0)
    return implementation.backward(grad_logprobs, grad_entropy, logits, labels, stats, entropy,
                                   LOCAL_IGNORE, temperature, True)
