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
import struct
import zlib
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
# The options every rank must pass alike (``ShardChecks.shard(agreed=...)``), one int64 code
# each in a fixed number of slots (a rank whose own checks failed sends as many).
_OPTION_SLOTS = 16
# labels compared across ranks by a fingerprint: sum_i (label_i mod P) * w_i mod P, with
# w_i = i * 48271 mod P (P = 2^31 - 1): exact in int64, whatever the device.
_FINGERPRINT_PRIME = 2 ** 31 - 1


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


def _option_code(value) -> int:
    """An int64 code of an option's value, equal across ranks exactly when the values are: a
    flag or int itself, a float its bits, None, a string or a dtype a fixed code of its own."""
    if value is None:
        return -(2 ** 62) - 1
    if isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, float):
        return struct.unpack("<q", struct.pack("<d", value))[0]
    return zlib.crc32(str(value).encode()) + 2 ** 40  # a str (the op's name) or a torch.dtype


def _labels_fingerprint(labels: torch.Tensor) -> torch.Tensor:
    """The labels' fingerprint (0-d int64, on their device): equal on ranks whose labels are."""
    prime = _FINGERPRINT_PRIME
    flat = labels.reshape(-1).to(torch.int64).remainder(prime)
    weights = torch.arange(1, flat.numel() + 1, device=flat.device).mul_(48271).remainder_(prime)
    return flat.mul_(weights).remainder_(prime).sum().remainder(prime)


class ShardChecks:
    """The checks of a vocab-parallel call, made to agree across the ranks: a context manager
    around the caller's local argument checks, then ``shard()``. Every rank joins the same one
    all-reduce whether or not its own checks passed, so an error on one rank (a bad dtype, a
    label out of range on that rank only) is raised on every rank instead of leaving the others
    waiting in a collective:

        with _vocab_parallel.ShardChecks(process_group, "process_group") as checks:
            ...  # the local checks; may raise
        shard = checks.shard(weight, hidden, labels, ignore_index, agreed={...})

    The rank whose checks failed re-raises its own error (after the all-reduce); the others raise
    one that names the failing ranks. With ``process_group=None`` it does nothing and ``shard()``
    returns None. A process group that is not one, or a torch.distributed that is not
    initialised, raises at once: no collective can run then, on any rank."""

    def __init__(self, process_group, name: str):
        self.group, self.name = process_group, name
        if process_group is None:
            return
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{name} is given but torch.distributed is not initialised: call "
                               f"torch.distributed.init_process_group first (or pass {name}=None "
                               f"for an unsharded head)")
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"{name} must be a torch.distributed ProcessGroup (e.g. dist.group.WORLD "
                            f"or one from dist.new_group) or None, got {type(process_group).__name__}")
        self.rank = dist.get_rank(process_group)
        self.world = dist.get_world_size(process_group)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if self.group is not None and isinstance(exc, Exception):
            # join the others' all-reduce, flagged as failed; then this rank's error propagates
            device = (torch.device("cuda", torch.cuda.current_device())
                      if dist.get_backend(self.group) == "nccl" else torch.device("cpu"))
            self._exchange(0, [0] * len(_shape_signature(())), (-1, 0, 0),
                           [0] * _OPTION_SLOTS, device, failed=True)
        return False

    def _exchange(self, rows, signature, label_stats, codes, device, failed=False):
        """One MAX all-reduce of (failed one-hot, sizes one-hot, shape, -shape, the largest kept
        label, minus the smallest, the labels' fingerprint and its complement, the options'
        codes and their complements: a MAX of x and of ~x = -x - 1 gives the largest and the
        smallest, equal exactly when every rank has the same)."""
        one_hot = [0] * self.world
        failed_flags, sizes = list(one_hot), list(one_hot)
        failed_flags[self.rank] = int(failed)
        sizes[self.rank] = rows
        largest, smallest, fingerprint = label_stats
        info = torch.tensor(failed_flags + sizes + signature + [-s for s in signature]
                            + [largest, -smallest, fingerprint, ~fingerprint]
                            + codes + [~code for code in codes], dtype=torch.int64, device=device)
        dist.all_reduce(info, op=dist.ReduceOp.MAX, group=self.group)
        return info.tolist()

    def shard(self, weight: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor,
              ignore_index: int, *, agreed: Optional[dict] = None, hidden_name: str = "hidden",
              labels_name: str = "labels") -> Optional[VocabShard]:
        """This rank's VocabShard, from the one all-reduce: every rank's shard size (the offsets
        and the total), hidden's shape, the largest kept label, the labels' fingerprint and the
        ``agreed`` options ({name: value}: every option that decides which collectives a rank
        runs or what they exchange) on every rank. Raises on every rank alike (they all see the
        reduced values): another rank's failed checks, hidden (and so labels) of different shapes
        across ranks, labels or options that differ across ranks, a label outside the total
        vocabulary on any rank."""
        if self.group is None:
            return None
        agreed = dict(agreed or {})
        if len(agreed) > _OPTION_SLOTS:
            raise ValueError(f"at most {_OPTION_SLOTS} agreed options, got {len(agreed)}")
        kept = labels[labels != ignore_index]
        ends = torch.stack([kept.max(), kept.min()]).tolist() if kept.numel() else [-1, 0]
        label_stats = (*ends, int(_labels_fingerprint(labels)))
        codes = [_option_code(value) for value in agreed.values()]
        codes += [0] * (_OPTION_SLOTS - len(codes))
        signature = _shape_signature(hidden.shape)
        # on weight's device: the group's backend takes the tensors the combine will reduce
        info = self._exchange(weight.shape[0], signature, label_stats, codes, weight.device)
        world, width = self.world, len(signature)
        failed = [rank for rank, flag in enumerate(info[:world]) if flag]
        if failed:
            raise RuntimeError(f"the inputs of this vocab-parallel call failed their checks on "
                               f"rank(s) {failed} of {self.name} (see the error there); every rank "
                               f"stops here so that none waits in a collective")
        sizes = info[world:2 * world]
        largest_shape = info[2 * world:2 * world + width]
        smallest_shape = [-s for s in info[2 * world + width:2 * world + 2 * width]]
        if largest_shape != smallest_shape:
            raise ValueError(f"{hidden_name} and {labels_name} must have the same shape on every rank "
                             f"of {self.name} (the vocab-parallel head shards the weight, not the "
                             f"tokens): this rank has {hidden_name} {tuple(hidden.shape)}, another "
                             f"rank differs")
        labels_at = 2 * world + 2 * width
        total = sum(sizes)
        largest_label, smallest_label = info[labels_at], -info[labels_at + 1]
        if largest_label >= total or smallest_label < 0:
            value = largest_label if largest_label >= total else smallest_label
            raise ValueError(f"{labels_name} out of range for the vocab-parallel head: label "
                             f"{value} is outside [0, {total}), the vocabulary the shards' rows "
                             f"add up to across the ranks of {self.name} (rows per rank: {sizes}), "
                             f"and is not ignore_index={ignore_index}")
        self._check_agreement(info[labels_at + 2:labels_at + 4], info[labels_at + 4:], agreed,
                              labels_name)
        return VocabShard(self.group, self.rank, world, sum(sizes[:self.rank]), sizes[self.rank],
                          total, max(sizes))

    def _check_agreement(self, fingerprints, codes, agreed: dict, labels_name: str) -> None:
        """Raise (on every rank: from the reduced values) where the labels or an agreed option
        differ across the ranks: a rank asking for another output, loss path or head would run
        other collectives than the rest (a crash or a hang in gloo / NCCL) or exchange values in
        other units."""
        names = list(agreed)
        differing = [labels_name] if fingerprints[0] != ~fingerprints[1] else []
        differing += [names[slot] for slot in range(len(names))
                      if codes[slot] != ~codes[_OPTION_SLOTS + slot]]
        if not differing:
            return
        mine = ", ".join(f"{name}={agreed[name]!r}" for name in differing if name in agreed)
        raise ValueError(f"the ranks of {self.name} disagree on {', '.join(differing)}: a "
                         f"vocab-parallel call needs the same {labels_name} and the same options "
                         f"on every rank, which decide the collectives each rank runs and what "
                         f"they exchange" + (f" (this rank: {mine})" if mine else ""))


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
