"""linear_token_logprobs: log-probs of the labels straight from the last hidden state.

logits = hidden @ weight.T (+ bias), optionally scaled and soft-capped (TRL's head options), are
never materialised whole: the eager and C++ backends hold at most ``chunk_size x V`` of them at a
time (forward and backward, which recomputes them) plus the rows a ``memory_budget`` keeps for
backward; the Triton backend keeps tiles on chip. Also TRL's per-token metrics (log sum p^2, mean
logit, is-top-1). Family "linear_logprobs" of pyalign/backends.py.
"""
from __future__ import annotations

from typing import Literal, NamedTuple, Optional, overload

import torch

from pyalign import backends
from pyalign._head_strategy import HeadMode
from pyalign._utils import accumulation_dtype, gradients_wanted, head_logits_dtype
from pyalign.ops import _checks, _vocab_parallel

OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Metrics: per-token values without a gradient (TRL marks them non-differentiable too).
METRIC_OUTPUTS = OPTIONAL_OUTPUTS[1:]


class LinearLogprobsOutput(NamedTuple):
    """Per-token outputs of ``linear_token_logprobs(..., outputs=...)``, named as TRL's
    ``FusedCausalLMOutput``; a field not asked for is None. ``log_probs`` and ``entropy`` carry
    gradients, the metrics (``log_sum_sq_probs``, ``mean_logits``, ``is_top1``) do not."""

    log_probs: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None


def _kept_rows(memory_budget: Optional[int], hidden: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor], backend: str, mode: HeadMode) -> int:
    """How many tokens' logits ``memory_budget`` bytes keep from forward to backward: none
    without a backward to come (they would be dead weight) or where the implementation that
    runs the head keeps none (the fused Triton kernels, a batch-invariant forward)."""
    if not memory_budget or not gradients_wanted(hidden, weight, bias):
        return 0
    if not backends.head_keeps_logits(backend, hidden, weight, mode):
        return 0
    itemsize = head_logits_dtype(hidden.dtype, weight.dtype).itemsize  # the kept logits'
    return min(hidden.shape[0], memory_budget // (weight.shape[0] * itemsize))


# Outputs: logprobs, entropy, the [N, 2] row stats (m, log-sum-exp), the three metrics ([N] or
# [0]) and the kept raw logits [keep_rows, V].
@torch.library.custom_op("pyalign::linear_logprobs_head_fwd", mutates_args=())
def _linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, ignore_index: int, temperature: float,
                         with_entropy: bool, chunk_size: int, softcap: float, logit_scale: float,
                         with_log_sum_sq: bool, with_mean: bool, with_top1: bool, keep_rows: int,
                         backend: str, strategy: str, deterministic: bool, batch_invariant: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor, torch.Tensor, torch.Tensor]:
    _checks.check_labels_in_range(labels, weight.shape[0], ignore_index)
    implementation = backends.head_implementation(
        backend, hidden, weight, HeadMode(strategy, deterministic, batch_invariant),
        primitive="forward", keeps=keep_rows > 0)
    outputs = implementation.forward(hidden, weight, bias, labels, ignore_index, temperature,
                                     with_entropy, chunk_size or None, softcap or None,
                                     logit_scale, (with_log_sum_sq, with_mean, with_top1),
                                     keep_rows)
    return tuple(outputs)


@_linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, with_entropy, chunk_size, softcap,
      logit_scale, with_log_sum_sq, with_mean, with_top1, keep_rows, backend, strategy,
      deterministic, batch_invariant):
    acc = accumulation_dtype(hidden.dtype)
    rows = hidden.shape[0]

    def per_row(wanted, dtype=acc):
        return hidden.new_empty(rows if wanted else 0, dtype=dtype)

    return (per_row(True), per_row(with_entropy), hidden.new_empty((rows, 2), dtype=acc),
            per_row(with_log_sum_sq), per_row(with_mean), per_row(with_top1, torch.bool),
            hidden.new_empty((keep_rows, weight.shape[0]),
                             dtype=head_logits_dtype(hidden.dtype, weight.dtype)))


# The backward writes the gradient of the logits into the kept logits (no second copy).
@torch.library.custom_op("pyalign::linear_logprobs_head_bwd", mutates_args=("kept",))
def _linear_logprobs_bwd(grad_logprobs: torch.Tensor, grad_entropy: Optional[torch.Tensor],
                         hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, stats: torch.Tensor, entropy: Optional[torch.Tensor],
                         kept: torch.Tensor, ignore_index: int, temperature: float,
                         chunk_size: int, softcap: float, logit_scale: float, backend: str,
                         strategy: str, deterministic: bool, batch_invariant: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    implementation = backends.head_implementation(
        backend, hidden, weight, HeadMode(strategy, deterministic, batch_invariant),
        primitive="backward", keeps=kept.shape[0] > 0)
    grad_hidden, grad_weight, grad_bias = implementation.backward(
        grad_logprobs, grad_entropy, hidden, weight, bias, labels, stats, entropy, ignore_index,
        temperature, chunk_size or None, softcap or None, logit_scale, kept)
    if grad_bias is None:  # custom ops return tensors; an empty one stands for "no bias"
        grad_bias = weight.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


@_linear_logprobs_bwd.register_fake
def _(grad_logprobs, grad_entropy, hidden, weight, bias, labels, stats, entropy, kept,
      ignore_index, temperature, chunk_size, softcap, logit_scale, backend, strategy,
      deterministic, batch_invariant):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else weight.new_empty(0))


_SECOND_BACKWARD = ("linear_token_logprobs: a second backward through a call with memory_budget: "
                    "the first one turned the kept logits into their gradient; use "
                    "memory_budget=None (recompute) to backward more than once")


def _take_kept(ctx):
    """The forward's kept logits, handed to the one backward that may overwrite them: a second
    backward through a call that kept rows raises _SECOND_BACKWARD."""
    if ctx.kept_consumed:
        raise RuntimeError(_SECOND_BACKWARD)
    kept = ctx.kept
    if kept.shape[0] > 0:
        ctx.kept, ctx.kept_consumed = None, True
    return kept


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, temperature, with_entropy,
                chunk_size, softcap, logit_scale, metrics, keep_rows, backend, mode):
        logprobs, entropy, stats, log_sum_sq, mean, top1, kept = _linear_logprobs_fwd(
            hidden, weight, bias, labels, ignore_index, temperature, with_entropy, chunk_size,
            softcap, logit_scale, *metrics, keep_rows, backend, *mode)
        ctx.save_for_backward(hidden, weight, bias, labels, stats, entropy)
        ctx.config = (ignore_index, temperature, with_entropy, chunk_size, softcap, logit_scale,
                      backend, mode)
        # Held on ctx, not saved: the backward overwrites it with its gradient (a saved tensor's
        # version check would refuse) and drops it, so it is freed as soon as it is used.
        ctx.kept = kept
        ctx.kept_consumed = False
        ctx.mark_non_differentiable(log_sum_sq, mean, top1)
        return logprobs, entropy, log_sum_sq, mean, top1

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_metric_grads):
        hidden, weight, bias, labels, stats, entropy = ctx.saved_tensors
        (ignore_index, temperature, with_entropy, chunk_size, softcap, logit_scale, backend,
         mode) = ctx.config
        kept = _take_kept(ctx)
        if grad_logprobs is None:
            grad_logprobs = stats.new_zeros(stats.shape[0])  # stats: [N, 2] (m, log-sum-exp) per row
        if not with_entropy:
            grad_entropy, entropy = None, None
        grad_hidden, grad_weight, grad_bias = _linear_logprobs_bwd(
            grad_logprobs.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
            hidden, weight, bias, labels, stats, entropy, kept, ignore_index, temperature,
            chunk_size, softcap, logit_scale, backend, *mode)
        return (grad_hidden, grad_weight, grad_bias if bias is not None else None,
                *([None] * 11))


def epilogue_inverse_temperature(temperature: float, softcap: float, logit_scale: float) -> float:
    """1 / T of the stats the primitives return: log p = (z - m)·this - L (without a softcap the
    logit scale is folded into the temperature, backends.py)."""
    return (1.0 if softcap else logit_scale) / temperature


class VocabParallelLinearLogprobsFunction(torch.autograd.Function):
    """linear_token_logprobs on this rank's vocabulary shard, combined across the ranks
    (pyalign/ops/_vocab_parallel.py). Runs the backend primitives directly: the collectives
    between them are not traceable custom ops."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, shard, ignore_index, temperature, with_entropy,
                chunk_size, softcap, logit_scale, metrics, keep_rows, backend, mode):
        local, owned = _vocab_parallel.local_labels(shard, labels, ignore_index)
        implementation = backends.head_implementation(backend, hidden, weight, mode,
                                                      primitive="forward", keeps=keep_rows > 0)
        logprobs, entropy, stats, log_sum_sq, mean, top1, kept = implementation.forward(
            hidden, weight, bias, local, _vocab_parallel.LOCAL_IGNORE, temperature, with_entropy,
            chunk_size or None, softcap or None, logit_scale, metrics, keep_rows)
        combined = _vocab_parallel.combine_rows(
            shard, owned, labels != ignore_index, logprobs, stats,
            epilogue_inverse_temperature(temperature, softcap, logit_scale),
            entropy=entropy if with_entropy else None, log_sum_sq=log_sum_sq if metrics[0] else None,
            mean=mean if metrics[1] else None, top1=top1 if metrics[2] else None)

        def given(value, default):
            return default if value is None else value

        entropy = given(combined.entropy, entropy)
        ctx.save_for_backward(hidden, weight, bias, local, combined.stats,
                              entropy if with_entropy else None)
        ctx.config = (temperature, with_entropy, chunk_size, softcap, logit_scale, backend, shard,
                      mode)
        ctx.kept = kept  # as in LinearTokenLogprobsFunction: overwritten by the backward
        ctx.kept_consumed = False
        extra = (given(combined.log_sum_sq, log_sum_sq), given(combined.mean, mean),
                 given(combined.top1, top1))
        ctx.mark_non_differentiable(*extra)
        return (combined.logprobs, entropy, *extra)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_metric_grads):
        hidden, weight, bias, local, stats, entropy = ctx.saved_tensors
        temperature, with_entropy, chunk_size, softcap, logit_scale, backend, shard, mode = ctx.config
        kept = _take_kept(ctx)
        if grad_logprobs is None:
            grad_logprobs = stats.new_zeros(stats.shape[0])
        if not with_entropy:
            grad_entropy = None
        # an fp32 head's bf16 / fp16 hidden state, upcast as its head upcasts it: its gradient is
        # summed over the ranks in fp32, then rounded once
        rows = hidden.float() if hidden.dtype != weight.dtype else hidden
        implementation = backends.head_implementation(backend, rows, weight, mode,
                                                      primitive="backward",
                                                      keeps=kept.shape[0] > 0, vocab_shard=True)
        # the whole rows' stats and entropy: each rank's logits become their own gradient
        grad_hidden, grad_weight, grad_bias = implementation.backward(
            grad_logprobs.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
            rows, weight, bias, local, stats, entropy if grad_entropy is not None else None,
            _vocab_parallel.LOCAL_IGNORE, temperature, chunk_size or None, softcap or None,
            logit_scale, kept, vocab_shard=True)
        _vocab_parallel.sum_over_ranks(grad_hidden, shard)
        return (grad_hidden.to(hidden.dtype), grad_weight, grad_bias if bias is not None else None,
                *([None] * 12))


@torch.compiler.disable  # collectives between backend calls: a graph break, never traced
def _vocab_parallel_apply(*args):
    return VocabParallelLinearLogprobsFunction.apply(*args)


def _check_head_tensors(hidden, weight, bias, labels, head_dtype) -> None:
    """hidden [..., H], weight [V, H] (V > 0) and bias [V] of one dtype or an fp32 head
    (_checks.check_head_dtypes), labels hidden.shape[:-1], on one device."""
    _checks.check_tensor("hidden", hidden, floating=True)
    _checks.check_tensor("weight", weight, floating=True)
    _checks.check_tensor("labels", labels, integer=True)
    if bias is not None:
        _checks.check_tensor("bias", bias, floating=True)
    _checks.check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have a non-empty last (hidden size) dimension, got shape "
                         f"{tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension")
    if bias is not None:
        _checks.check_shape("bias", bias, (weight.shape[0],), "[V]")
    _checks.check_head_dtypes(hidden, weight, bias, head_dtype)
    _checks.check_shape("labels", labels, hidden.shape[:-1], "hidden.shape[:-1]")


def _check_mode(strategy, deterministic, batch_invariant) -> HeadMode:
    """The head's strategy and modes, checked (torch.use_deterministic_algorithms(True) turns
    ``deterministic`` on where the call runs: pyalign/backends.py)."""
    strategy = backends.check_head_strategy(strategy)
    deterministic = _checks.check_bool("deterministic", deterministic)
    batch_invariant = _checks.check_bool("batch_invariant", batch_invariant)
    if strategy == "fused" and deterministic:
        raise ValueError("strategy='fused' is not deterministic (its backward adds into the "
                         "gradients with atomics); with deterministic=True use strategy='chunked' "
                         "or 'auto'")
    return HeadMode(strategy, deterministic, batch_invariant)


def _check_outputs(outputs) -> tuple[bool, tuple[bool, bool, bool]]:
    """(entropy wanted, (log_sum_sq_probs, mean_logits, is_top1) wanted) from ``outputs``."""
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list, set, frozenset)):
        raise TypeError(f"outputs must be a tuple of names among {OPTIONAL_OUTPUTS} (\"log_probs\" "
                        f"is always computed), got {type(outputs).__name__} {outputs!r}")
    for name in outputs:
        if name not in OPTIONAL_OUTPUTS and name != "log_probs":
            raise ValueError(f"outputs: unknown name {name!r}; expected names among "
                             f"{('log_probs',) + OPTIONAL_OUTPUTS}")
    return "entropy" in outputs, tuple(name in outputs for name in METRIC_OUTPUTS)


@overload
def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = ..., ignore_index: int = ...,
                          temperature: float = ..., entropy: Literal[False] = ...,
                          outputs: None = ..., softcap: Optional[float] = ...,
                          logit_scale: float = ..., head_dtype: Optional[torch.dtype] = ...,
                          chunk_size: Optional[int] = ...,
                          memory_budget: Optional[int] = ..., backend: str = ...,
                          process_group=..., strategy: str = ..., deterministic: bool = ...,
                          batch_invariant: bool = ...) -> torch.Tensor: ...
@overload
def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = ..., ignore_index: int = ...,
                          temperature: float = ..., entropy: Literal[True],
                          outputs: None = ..., softcap: Optional[float] = ...,
                          logit_scale: float = ..., head_dtype: Optional[torch.dtype] = ...,
                          chunk_size: Optional[int] = ...,
                          memory_budget: Optional[int] = ..., backend: str = ...,
                          process_group=..., strategy: str = ..., deterministic: bool = ...,
                          batch_invariant: bool = ...
                          ) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = ..., ignore_index: int = ...,
                          temperature: float = ..., entropy: Literal[False] = ...,
                          outputs: tuple[str, ...], softcap: Optional[float] = ...,
                          logit_scale: float = ..., head_dtype: Optional[torch.dtype] = ...,
                          chunk_size: Optional[int] = ...,
                          memory_budget: Optional[int] = ..., backend: str = ...,
                          process_group=..., strategy: str = ..., deterministic: bool = ...,
                          batch_invariant: bool = ...
                          ) -> LinearLogprobsOutput: ...


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                          temperature: float = 1.0, entropy: bool = False,
                          outputs: Optional[tuple[str, ...]] = None,
                          softcap: Optional[float] = None, logit_scale: float = 1.0,
                          head_dtype: Optional[torch.dtype] = None,
                          chunk_size: Optional[int] = None, memory_budget: Optional[int] = None,
                          backend: str = "auto", process_group=None, strategy: str = "auto",
                          deterministic: bool = False, batch_invariant: bool = False):
    """Per-token log-probs of ``labels`` under softmax(z), z = softcap(logit_scale * (hidden @
    weight.T + bias)) / temperature, never holding the [N, V] logits whole.

    hidden: [..., H]; weight: [V, H] (an lm_head); bias: [V] or None; labels: hidden.shape[:-1].
    Returns fp32 logprobs shaped like labels; with ``entropy=True`` the pair (logprobs, entropy).
    Gradients flow to hidden, weight and bias, accumulated in fp32. Positions whose label is
    ``ignore_index`` give 0 (False) in every output and nothing to any gradient.

    Packed (padding-free) batches: the tokens of all sequences flattened, hidden [N, H] and
    labels [N] the next token of each position, with ``ignore_index`` at every sequence's last
    position (the token after it starts the next sequence, which nothing before it predicts):

        hidden = last_hidden[0, :-1]; labels = input_ids[0, 1:].clone()  # one packed row
        labels[position_ids[0, 1:] == 0] = -100       # no label across a sequence boundary
        logprobs = linear_token_logprobs(hidden, lm_head.weight, labels)

    The hidden states themselves must come from attention kept inside each sequence
    (``pyalign.integrations.transformers.causal_lm_logprobs(position_ids=...)`` sees to it for a
    Hugging Face model; docs/algorithms.md, "Packed sequences").

    The head, in TRL's order (``trl.kernels.ChunkedLogProbFunction``, docs/algorithms.md):
    ``logit_scale`` multiplies the logits first (Cohere's ``logit_scale``, Granite's
    1/``logits_scaling``, Falcon-H1's ``lm_head_multiplier``: finite, > 0), then ``softcap``
    (None, or finite > 0) applies ``softcap * tanh(x / softcap)`` (Gemma 2/3's
    ``final_logit_softcapping``), then the temperature divides (finite, >= 1e-4). Gradients of
    logprobs and entropy flow through all three.

    The fp32 head (TRL's ``cast_lm_head_to_fp32``, vLLM's ``head_dtype``): a bfloat16 / float16
    ``hidden`` with a float32 ``weight`` (and ``bias``), or ``head_dtype=torch.float32`` to run a
    bfloat16 / float16 head in fp32 for this call only. Every logit is then an fp32 product of
    the upcast operands (IEEE in the Triton kernels; torch's fp32 matmuls on the chunked
    backends, IEEE unless TF32 is enabled for CUDA matmuls), as with fp32 inputs; the gradients
    come back in each input's own dtype. The narrower operand is widened tile by tile (Triton)
    or slice by slice (the weight on the chunked backends); the chunked backends upcast a bf16
    hidden state once per direction (an N x H fp32 temporary), and ``head_dtype`` on a bf16 /
    fp16 pair upcasts it for the call (as TRL does). Any other mix of dtypes is refused
    (docs/algorithms.md, "The fp32 head").

    ``outputs``: a tuple of names among "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"
    ("log_probs" is accepted and always computed); then the result is a ``LinearLogprobsOutput``
    NamedTuple (fields as TRL's ``FusedCausalLMOutput``, None where not asked for; do not also
    pass ``entropy=True``). All come from the same streaming pass over each chunk's logits:
    ``log_sum_sq_probs`` = log sum_v p_v^2, ``mean_logits`` = mean_v z_v (after scale, softcap and
    temperature), ``is_top1`` (bool) = whether the label is the first maximum of z (False for a
    row holding NaN). Those three have no gradient (as in TRL); each costs one more pass over the
    chunk (the cpu backend: torch reductions; Triton: a few registers).

    Cost and memory (the chunked heads: eager, cpu, and the triton backend's "chunked" strategy;
    the "fused" one keeps tiles on chip and uses neither option). By default about 16 MiB of
    fp32 logits exist at a time on CPU, 4096 tokens' worth (at most 1 GiB) in the inputs' dtype
    on a GPU (``chunk_size`` tokens' worth when given: an int >= 1, or None): both directions
    walk the vocabulary in slices of every token's logits, forward reducing them to row stats,
    backward recomputing them (4 matmuls of N x H x V: the floor for bounded memory with an
    arbitrary per-token upstream gradient; its time against the 3 bare matmuls is in
    benchmarks/README.md). Peak memory: one slice plus the fp32 weight gradient every path
    returns.
    ``memory_budget`` (bytes: an int >= 0, or None = 0) keeps the raw logits of the first
    ``memory_budget // (V * itemsize)`` tokens from forward to backward, where they become their
    own gradient in place: those tokens cost 3 matmuls, not 4, and their logits stay allocated
    between forward and backward (N * V * itemsize bytes for all of them: 250 MiB at N = 2048,
    V = 32000, fp32). Such a call supports one backward (a second one raises), and a call without
    one to come (no_grad, or no input requiring grad) keeps nothing. With a softcap, one more fp32
    slice (two in backward) holds the transformed logits. On CPU the kept logits' buffer, once the backward
    has used it, stays cached for the next call (a fresh one would fault in every page,
    pyalign/_workspace.py); ``pyalign.empty_cache()`` frees it.

    ``process_group`` (a torch.distributed ProcessGroup, or None): the vocab-parallel head of a
    tensor-parallel ``lm_head``. ``weight`` (and ``bias``) on each rank are that rank's rows of
    the vocabulary, the shards in rank order (any sizes, adding up to the vocabulary); hidden and
    labels (global vocabulary ids) are the same on every rank, and so must the upstream gradients
    be (the loss computed alike on every rank). Every rank streams its shard and gets the same
    full result; the per-token stats are combined by all-reduces of [N]-sized vectors and
    backward exchanges no [N, V] data: each rank's weight and bias gradients are those of its
    shard, the hidden gradient is summed across ranks (docs/algorithms.md, "Vocab-parallel
    head"). One all-reduce checks the setup first, after every rank's own argument checks, so a
    bad argument on one rank raises on all of them (none waits in a collective). Under
    torch.compile the sharded call is a graph break (its collectives run between the backend
    calls).

    ``strategy`` ("auto", "fused" or "chunked"; docs/gpu.md): how the triton backend runs the
    head. "fused": Triton kernels holding logit tiles on chip, whose backward adds into the
    gradients with fp32 atomics. "chunked": cuBLAS matmuls over vocabulary slices of every token
    with the Triton log-prob epilogue between them, the only one that keeps logits for a
    ``memory_budget``. "auto" times both once per (GPU, dtype, token-count bucket) on first use
    and caches the faster on disk (``pyalign doctor`` lists the cache); it is "chunked" wherever
    a mode below or a memory budget asks for it, and "fused" on CPU tensors (the Triton
    interpreter: nothing to time). ``PYALIGN_HEAD_STRATEGY=fused|chunked`` replaces "auto"
    process-wide. The cpu and eager backends are chunked by nature: they accept any strategy
    and run as they are.

    ``deterministic`` (also on under ``torch.use_deterministic_algorithms(True)``): the same
    bits for values and gradients on every run (same inputs, device and thread count). The cpu
    and eager backends hold it already (no atomics, reductions in a fixed order); on the triton
    backend it means the chunked strategy (``strategy="fused"`` with it is an error), so it
    costs what chunked costs against fused at the call's shape (the bench's rows; docs/gpu.md
    expects chunked to be the faster at the anchor shapes). cuBLAS wants
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` for deterministic results, as torch says.

    ``batch_invariant``: a token's log-prob and entropy are the same bits whatever else is in
    the batch (alone or among other rows, at any position, with any padding). The fused Triton
    forward holds it by construction (one program per block of rows, one tile shape for every
    row), so on the triton backend the forward is then the fused kernel's whatever the strategy
    (the backward follows ``strategy``: chunked when deterministic). The chunked heads do not
    hold it by default (a matmul over another number of rows may take another code path and
    round differently: a row scored alone differs from itself in a batch by ~5e-7); with it they
    run the forward in blocks of 128 rows, the last padded with ignored zero rows, each copied
    into one buffer, so every matmul and reduction a row goes through has one shape. That costs
    the padding (up to 127 rows: a call of a few tokens pays for 128), the weight read once per
    block of rows instead of once per vocabulary slice, and the memory budget (no logits are
    kept): the bench's batch_invariant rows. Gradients are not batch-invariant in any mode
    (they sum over the batch).
    """
    with _vocab_parallel.ShardChecks(process_group, "process_group") as shard_checks:
        head_dtype = _checks.check_head_dtype(head_dtype)
        _check_head_tensors(hidden, weight, bias, labels, head_dtype)
        chunk_size = _checks.check_optional_positive_int("chunk_size", chunk_size)
        temperature = _checks.check_temperature(temperature)
        ignore_index = _checks.check_int("ignore_index", ignore_index)
        entropy = _checks.check_bool("entropy", entropy)
        if softcap is not None:
            softcap = _checks.check_finite_range("softcap", softcap, low=0.0, low_inclusive=False,
                                                 what="None or a finite number > 0")
        logit_scale = _checks.check_finite_range("logit_scale", logit_scale, low=0.0,
                                                 low_inclusive=False, what="a finite number > 0")
        if memory_budget is not None:
            memory_budget = _checks.check_int("memory_budget", memory_budget, minimum=0,
                                              what="None or an int >= 0 (bytes)")
        named = outputs is not None
        if named:
            if entropy:
                raise ValueError("pass either entropy=True or outputs=(...), not both: with outputs, "
                                 "ask for \"entropy\" among them")
            entropy, metrics = _check_outputs(outputs)
        else:
            metrics = (False, False, False)
        backends.check_name(backend)
        mode = _check_mode(strategy, deterministic, batch_invariant)
    # everything that decides the collectives a rank runs, or what they exchange
    shard = shard_checks.shard(weight, hidden, labels, ignore_index, agreed=dict(
        op="linear_token_logprobs", entropy=entropy, log_sum_sq_probs=metrics[0],
        mean_logits=metrics[1], is_top1=metrics[2], temperature=temperature, softcap=softcap,
        logit_scale=logit_scale, ignore_index=ignore_index, hidden_dtype=hidden.dtype,
        head_dtype=_checks.logits_dtype(hidden, weight, head_dtype),
        gradients=gradients_wanted(hidden, weight, bias)))
    hidden = _checks.head_hidden(hidden, weight, head_dtype)
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    labels_1d = labels.reshape(-1).to(torch.int64)
    keep = _kept_rows(memory_budget, hidden_2d, weight, bias, backend, mode)
    chunk_size = chunk_size or backends.default_head_chunk(hidden.device, weight.shape[0],
                                                           hidden.element_size())
    if shard is None:
        logprobs, entropy_out, log_sum_sq, mean, top1 = LinearTokenLogprobsFunction.apply(
            hidden_2d, weight, bias, labels_1d, ignore_index, temperature, entropy, chunk_size or 0,
            softcap or 0.0, logit_scale, metrics, keep, backend, mode)
    else:
        logprobs, entropy_out, log_sum_sq, mean, top1 = _vocab_parallel_apply(
            hidden_2d, weight, bias, labels_1d, shard, ignore_index, temperature, entropy,
            chunk_size or 0, softcap or 0.0, logit_scale, metrics, keep, backend, mode)
    logprobs = logprobs.view(labels.shape)
    if named:
        wanted = (entropy, *metrics)
        extra = [value.view(labels.shape) if want else None
                 for want, value in zip(wanted, (entropy_out, log_sum_sq, mean, top1), strict=True)]
        return LinearLogprobsOutput(logprobs, *extra)
    if entropy:
        return logprobs, entropy_out.view(labels.shape)
    return logprobs
