"""The linear_token_logprobs case (log-probs from the last hidden state, fwd+bwd with a random
per-token upstream gradient; with ``entropy=True`` also a random one for the entropy): naive eager
(full [N, V] logits, log_softmax, gather), torch.compile of it, pyalign on every available
backend, pyalign's cpu backend with a memory budget that keeps every token's logits for backward
(3 matmuls instead of 4), for bf16 / fp16 the fp32 head (``head_dtype=float32``) beside each
backend's plain row and TRL's own fp32 head, the peers that run here (Liger-Kernel's
LigerFusedLinearScaledCrossEntropyFunction, TRL's ChunkedLogProbFunction, Cut Cross-Entropy's
``impl="torch_compile"``), and the floors: the three bare matmuls of forward and backward (into
preallocated outputs; and as autograd runs them, each output allocated per call), and the four
of the default path (its vocabulary slices, the forward matmul recomputed in backward).

On CUDA the peers are their GPU paths (Liger's Triton fused linear cross-entropy with
``reduction="none"`` as well, Cut Cross-Entropy's ``impl="cce"``), and where
``linear_token_logprobs`` takes a ``strategy`` argument the triton backend has one row per
strategy, the ``auto`` row noting which one it chose. ``anchor_builders`` gives the GPU
check's cases: docs/gpu.md's anchor shapes (pyalign.bench.gpu_cost), bf16."""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import types

import torch

import pyalign
from pyalign._chunked_head import slice_width as default_slice_width
from pyalign.bench.common import (
    backend_candidates,
    clear_grads,
    compile_candidate,
    dtype_name,
    logits_memory_need,
    seeded_generator,
)
from pyalign.bench.gpu_cost import ANCHOR_HIDDEN, ANCHOR_TOKENS, ANCHOR_VOCAB
from pyalign.bench.harness import Candidate, Case, optional_module, ratio_columns, third_party_notes
from pyalign.bench.logprobs import naive_token_logprobs

# TRL's default vocabulary tile (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)
TRL_CHUNK_SIZE = 32768

# Peak extra memory of one call in fp32 [N, V] logits (without, with entropy): this case's
# probe at N=1024, H=64, V=8000 (eager 3.0 / 5.0, compile 2.0 / 3.0, memory_budget 1.07, Liger
# 3.1 / 3.6, TRL 11.4 / 12.4), rounded up. At N=4096, V=128256 one copy is 1.96 GiB: run_case
# skips, with the reason, what would not fit (TRL's ~24 GiB there).
LOGITS_COPIES = {"eager": (3.5, 5.5), "compile": (2.5, 3.5), "memory_budget": (1.25, 1.25),
                 "liger": (3.5, 4.0), "trl": (12.0, 13.0), "allocating floor": (1.25, 1.25)}
# The peers whose GPU paths chunk the logits: on CUDA their CPU-measured estimates above do not
# hold, and running out of GPU memory is an exception the harness reports, not a dead process.
CHUNKED_PEERS = ("liger", "trl")

# linear_token_logprobs's CUDA strategies (docs/gpu.md), timed side by side where the function
# takes a ``strategy`` argument; PYALIGN_HEAD_STRATEGY forces one process-wide.
HEAD_STRATEGIES = ("fused", "chunked", "auto")
STRATEGY_ENV = "PYALIGN_HEAD_STRATEGY"
# linear_token_logprobs's modes (bool arguments), each timed on its own row where it takes them.
HEAD_MODES = ("batch_invariant", "deterministic")
# Where the bench asks which strategy ``auto`` chose for a call's tensors, when pyalign has it:
# ``pyalign.backends.<name>(hidden, weight) -> str``.
AUTO_CHOICE_HOOK = "chosen_head_strategy"


def naive_linear_token_logprobs(hidden, weight, labels, temperature: float = 1.0):
    """The usual eager code: full [N, V] logits from the lm_head, then log_softmax + gather."""
    return naive_token_logprobs(hidden @ weight.t(), labels, temperature)


def naive_linear_logprobs_and_entropy(hidden, weight, labels):
    """The usual eager code with the entropy: one log_softmax, gather, -sum p log p."""
    log_probs = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return torch.stack([log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1), entropy])


def _trl_function():
    """TRL's ChunkedLogProbFunction, or None. Its backward imports trl.trainer.utils for
    maybe_gather_lm_head_ctx (a null context without DeepSpeed ZeRO-3); where that module cannot
    import (pandas, accelerate missing), a null context stands in. Returns (function, note)."""
    module = optional_module("trl.kernels.chunked_logprob")
    if module is None:
        return None, "TRL ChunkedLogProbFunction: not importable"
    note = None
    try:
        import trl.trainer.utils  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure: stand in for the one helper
        sys.modules["trl.trainer.utils"] = types.SimpleNamespace(
            maybe_gather_lm_head_ctx=lambda *params: contextlib.nullcontext())
        note = (f"TRL: trl.trainer.utils does not import here ({type(exc).__name__}); its "
                "maybe_gather_lm_head_ctx (a null context without ZeRO-3) is stood in for")
    return module.ChunkedLogProbFunction, note


def linear_logprobs_case(num_tokens: int = 4096, hidden_size: int = 1024, vocab: int = 32000,
                         dtype=torch.float32, device="cpu", *, compile: bool = True,
                         entropy: bool = False, peers: bool = True) -> Case:
    device = torch.device(device)
    generator = seeded_generator(device, 1)
    hidden = (torch.randn(num_tokens, hidden_size, device=device, generator=generator)
              ).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=generator)
              / hidden_size ** 0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (num_tokens,), device=device, generator=generator)
    grad_logprobs = torch.randn(num_tokens, device=device, generator=generator)
    grad_entropy = torch.randn(num_tokens, device=device, generator=generator)
    upstream = torch.stack([grad_logprobs, grad_entropy]) if entropy else grad_logprobs
    clear = clear_grads(hidden, weight)
    naive = naive_linear_logprobs_and_entropy if entropy else naive_linear_token_logprobs

    def need(kind):
        if device.type == "cuda" and kind in CHUNKED_PEERS:
            return None
        return logits_memory_need(LOGITS_COPIES[kind][entropy], num_tokens, hidden_size, vocab)

    def eager():
        naive(hidden, weight, labels).backward(upstream)

    def backward_pair(logprobs, entropy_out):
        if entropy:
            torch.autograd.backward([logprobs, entropy_out], [grad_logprobs, grad_entropy])
        else:
            logprobs.backward(grad_logprobs)

    candidates = [Candidate("eager matmul+log_softmax+gather", eager, setup=clear,
                            kind="baseline", backend="eager", memory_need=need("eager")),
                  compile_candidate("torch.compile matmul+log_softmax+gather", naive,
                                    (hidden, weight, labels), upstream, clear, compile,
                                    memory_need=need("compile"))]
    notes = []
    outputs = ("entropy",) if entropy else ()

    def fused(name, **options):
        out = pyalign.linear_token_logprobs(hidden, weight, labels, outputs=outputs,
                                            backend=name, **options)
        backward_pair(out.log_probs, out.entropy)
    ours, backend_notes = backend_candidates("linear_logprobs", device,
                                             "pyalign linear_token_logprobs", fused, clear)
    candidates += _with_strategies(ours, fused, clear, hidden, weight, notes)
    candidates += _fp32_head_candidates(ours, fused, clear, hidden, weight, labels, entropy,
                                        backward_pair, need("trl"))
    candidates += _mode_rows(ours, fused, clear, notes)
    notes += backend_notes
    if device.type == "cpu" and any(c.backend == "cpu" for c in ours):
        budget = num_tokens * vocab * hidden.element_size()
        candidates.append(Candidate(
            f"pyalign linear_token_logprobs [cpu] memory_budget={budget / 2 ** 20:.3g} MiB (all logits)",
            lambda: fused("cpu", memory_budget=budget), setup=clear, backend="cpu",
            memory_need=need("memory_budget")))
    if peers:
        candidates += _peer_candidates(hidden, weight, labels, entropy, backward_pair, clear,
                                       compile, notes, need)
    plain_hidden, plain_weight = hidden.detach(), weight.detach()
    # one [N, V] buffer (held for the whole case: 1.96 GiB at N=4096, V=128256): the forward
    # writes the logits into it, the backward matmuls read them as the logits' gradient
    logits_out = torch.randn(num_tokens, vocab, device=device, generator=generator).to(dtype)
    grad_hidden_out = torch.empty_like(plain_hidden)
    grad_weight_out = torch.empty_like(plain_weight)

    def floor():
        torch.mm(plain_hidden, plain_weight.t(), out=logits_out)  # forward
        torch.mm(logits_out, plain_weight, out=grad_hidden_out)  # backward: d hidden
        torch.mm(logits_out.t(), plain_hidden, out=grad_weight_out)  # backward: d weight
    candidates.append(Candidate("floor: the 3 bare matmuls", floor, kind="floor"))

    def floor_allocating():
        # as autograd runs them: every output a fresh tensor. On CPU a large one comes fresh from
        # the kernel (mmap), so each call pays the page faults of its [N, V] logits and the
        # weight gradient (measured 1.12x the floor above, N=2048, V=32000), as every candidate
        # pays them for the gradients it returns.
        logits = plain_hidden @ plain_weight.t()
        return logits @ plain_weight, logits.t() @ plain_hidden
    candidates.append(Candidate("the 3 bare matmuls, outputs allocated per call", floor_allocating,
                                kind="floor", memory_need=need("allocating floor")))

    # The floor of the default (memory-bounded, exact) path: its 4 matmuls, in its vocabulary
    # slices (the forward's, then in backward the recompute and the two gradient matmuls),
    # without the epilogue that turns logits into log-probs and gradients.
    slice_width = default_slice_width(num_tokens, vocab)

    def floor_sliced_recompute():
        buffer = plain_hidden.new_empty(num_tokens * slice_width)
        grad_hidden = torch.empty_like(plain_hidden)
        grad_weight = torch.empty_like(plain_weight)
        for backward in (False, True):
            for v0 in range(0, vocab, slice_width):
                v1 = min(vocab, v0 + slice_width)
                block = buffer[:num_tokens * (v1 - v0)].view(num_tokens, v1 - v0)
                torch.mm(plain_hidden, plain_weight[v0:v1].t(), out=block)
                if backward:
                    if v0:
                        grad_hidden.addmm_(block, plain_weight[v0:v1])
                    else:
                        torch.mm(block, plain_weight[v0:v1], out=grad_hidden)
                    torch.mm(block.t(), plain_hidden, out=grad_weight[v0:v1])
        return grad_hidden, grad_weight
    candidates.append(Candidate(f"the 4 bare matmuls of the default path ({slice_width}-column "
                                "slices, recompute)", floor_sliced_recompute, kind="floor"))
    notes += third_party_notes()
    flops = 3 * 2 * num_tokens * hidden_size * vocab
    notes.append(f"matmul work: {flops / 1e9:.3g} GFLOP per fwd+bwd (3 matmuls); a chunked "
                 "backend recomputes the forward matmul in backward (4 matmuls) unless a "
                 "memory_budget keeps the logits")
    return Case("linear_token_logprobs fwd+bwd" + (" (with entropy)" if entropy else ""),
                {"N": num_tokens, "H": hidden_size, "V": vocab, "dtype": dtype_name(dtype),
                 "device": device.type},
                candidates,
                ratio_to=ratio_columns(candidates, vs_eager="eager matmul+log_softmax+gather",
                                       vs_compile="torch.compile matmul+log_softmax+gather"),
                floor="floor: the 3 bare matmuls", notes=notes)


def _fp32_head_candidates(ours: list, fused, clear, hidden, weight, labels, entropy,
                          backward_pair, trl_memory_need) -> list:
    """For a bf16 / fp16 case, the fp32 head beside each backend's plain row: the same head and
    hidden state with ``head_dtype=float32`` (every logit an fp32 product; TRL's
    cast_lm_head_to_fp32), and TRL's own fp32 head (its ChunkedLogProbFunction on the hidden
    state upcast, as its cast_lm_head_to_fp32 forward calls it) where it imports."""
    if hidden.dtype not in (torch.bfloat16, torch.float16):
        return []
    rows = [Candidate(f"{c.name} head_dtype=float32 (fp32 head)",
                      functools.partial(fused, c.backend, head_dtype=torch.float32), setup=clear,
                      backend=c.backend) for c in ours]
    trl_function, _ = _trl_function()
    if trl_function is not None:
        def trl_fp32_head():
            out = trl_function.apply(hidden.float(), weight, None, labels, 1.0, TRL_CHUNK_SIZE,
                                     None, 1.0, ("entropy",) if entropy else ())
            backward_pair(out[0], out[1])
        # not named "TRL ...": the "vs TRL" column stays the plain TRL row's
        rows.append(Candidate("cast_lm_head_to_fp32: TRL ChunkedLogProbFunction (fp32 head)",
                              trl_fp32_head, setup=clear, kind="baseline",
                              memory_need=trl_memory_need))
    return rows


def head_strategies() -> tuple[str, ...]:
    """The strategies to time: HEAD_STRATEGIES where linear_token_logprobs takes ``strategy``
    (a look at its signature), else none (one row per backend, as before strategies)."""
    parameters = inspect.signature(pyalign.linear_token_logprobs).parameters
    return HEAD_STRATEGIES if "strategy" in parameters else ()


def _with_strategies(ours: list, fused, clear, hidden, weight, notes: list) -> list:
    """pyalign's rows, the triton one split into one row per strategy (and the chunked one
    with every token's logits kept for backward). The ``auto`` row adds to ``notes``, after
    its first call, the strategy it chose (AUTO_CHOICE_HOOK), or where to read it."""
    strategies = head_strategies()
    if not strategies:
        return ours
    if os.environ.get(STRATEGY_ENV):
        notes.append(f"{STRATEGY_ENV}={os.environ[STRATEGY_ENV]} is set: it forces every "
                     "strategy row to that one")
    chosen = getattr(pyalign.backends, AUTO_CHOICE_HOOK, None)
    rows = []
    for candidate in ours:
        if candidate.backend != "triton":
            rows.append(candidate)
            continue
        for strategy in strategies:
            run = functools.partial(fused, "triton", strategy=strategy)
            if strategy == "auto":
                run = _noting_choice(run, chosen, hidden, weight, notes)
            rows.append(Candidate(f"{candidate.name} strategy={strategy}", run, setup=clear,
                                  backend="triton"))
        budget = hidden.shape[0] * weight.shape[0] * hidden.element_size()
        rows.append(Candidate(f"{candidate.name} strategy=chunked memory_budget=all logits",
                              functools.partial(fused, "triton", strategy="chunked",
                                                memory_budget=budget),
                              setup=clear, backend="triton"))
    return rows


def head_modes() -> tuple[str, ...]:
    """The modes to time (HEAD_MODES) where linear_token_logprobs takes them, else none."""
    parameters = inspect.signature(pyalign.linear_token_logprobs).parameters
    return tuple(mode for mode in HEAD_MODES if mode in parameters)


def _mode_rows(ours: list, fused, clear, notes: list) -> list:
    """One row per backend with ``batch_invariant=True`` (its cost against the backend's plain
    row), and on triton one with ``deterministic=True`` (the chunked strategy there; cpu and
    eager are deterministic as they are: no row)."""
    modes = head_modes()
    rows = []
    for candidate in ours:
        for mode in modes:
            if mode == "deterministic" and candidate.backend != "triton":
                continue
            rows.append(Candidate(f"{candidate.name} {mode}=True",
                                  functools.partial(fused, candidate.backend, **{mode: True}),
                                  setup=clear, backend=candidate.backend))
    if "deterministic" in modes:
        notes.append("deterministic=True: a row on triton only (the chunked strategy there); cpu "
                     "and eager are deterministic by default")
    return rows


def _noting_choice(run, chosen, hidden, weight, notes: list):
    """``run``, adding "strategy auto chose: <strategy>" to ``notes`` after its first call."""
    def run_and_note():
        run()
        if not any(note.startswith("strategy auto chose") for note in notes):
            notes.append("strategy auto chose: " + (
                chosen(hidden, weight) if chosen is not None else
                f"see `pyalign doctor` (pyalign.backends has no {AUTO_CHOICE_HOOK}())"))
    return run_and_note


def anchor_builders(tokens=ANCHOR_TOKENS, hidden_size: int = ANCHOR_HIDDEN,
                    vocab: int = ANCHOR_VOCAB, dtype=torch.bfloat16, device="cuda", *,
                    entropy=(False, True), compile: bool = False, peers: bool = True) -> list:
    """The GPU check's head cases, ``[(tokens, entropy, build)]``: docs/gpu.md's anchor shapes,
    every token count without entropy first, then with, so that a run cut short by its time
    budget loses the least compared (torch.compile rows off by default: a compile per shape)."""
    return [(n, with_entropy, functools.partial(
                linear_logprobs_case, n, hidden_size, vocab, dtype, device, compile=compile,
                entropy=with_entropy, peers=peers))
            for with_entropy in entropy for n in tokens]


def _peer_candidates(hidden, weight, labels, entropy, backward_pair, clear, compile, notes,
                     need):
    """Liger, TRL and CCE rows, each where it imports (and computes what is asked);
    ``need(kind)``: a row's estimated memory."""
    candidates = _liger_candidates(hidden, weight, labels, entropy, backward_pair, clear, notes,
                                   need)
    trl_function, trl_note = _trl_function()
    if trl_note:
        notes.append(trl_note)
    if trl_function is not None:
        def trl():
            out = trl_function.apply(hidden, weight, None, labels, 1.0, TRL_CHUNK_SIZE, None, 1.0,
                                     ("entropy",) if entropy else ())
            backward_pair(out[0], out[1])
        candidates.append(Candidate("TRL ChunkedLogProbFunction", trl, setup=clear,
                                    kind="baseline", memory_need=need("trl")))
    candidates += _cce_candidates(hidden, weight, labels, entropy, backward_pair, clear, compile,
                                  notes)
    return candidates


def _liger_candidates(hidden, weight, labels, entropy, backward_pair, clear, notes, need):
    """Liger's per-token head (LigerFusedLinearScaledCrossEntropyFunction: log-probs and
    entropy) and, on CUDA without entropy, its Triton fused linear cross-entropy with
    ``reduction="none"`` (per-token NLL, gradients recomputed in backward)."""
    liger_ops = optional_module("liger_kernel.ops")
    if liger_ops is None or not hasattr(liger_ops, "LigerFusedLinearScaledCrossEntropyFunction"):
        notes.append("Liger-Kernel LigerFusedLinearScaledCrossEntropyFunction: not installed")
        return []
    name = "Liger LigerFusedLinearScaledCrossEntropyFunction"
    scaled_ce, reason = liger_ops.LigerFusedLinearScaledCrossEntropyFunction, None
    try:  # Liger's own dispatch: on an sm90 GPU it loads its CuTe DSL kernel
        module = sys.modules[scaled_ce.__module__]
        getattr(module, "_resolve_implementation", lambda device: None)(hidden.device)
    except Exception as exc:  # noqa: BLE001 - whatever stops it loading: the row says what
        reason = f"{type(exc).__name__}: {exc}"
    candidates = []
    if reason is None:
        def liger():
            out = scaled_ce.apply(hidden, weight, labels, 1.0, -100, 1, entropy)
            nll, ent = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
            backward_pair(-nll, ent)
        candidates.append(Candidate(name, liger, setup=clear, kind="baseline",
                                    memory_need=need("liger")))
    else:
        candidates.append(Candidate(name, kind="baseline", status=(
            f"skipped: on this GPU Liger runs its CuTe DSL kernel, which does not load here "
            f"({reason}): nvidia-cutlass-dsl's CUDA 13 libraries are a 92 MB wheel, more than "
            "the GPU check carries")))
    flce = getattr(liger_ops, "LigerFusedLinearCrossEntropyFunction", None)
    if flce is not None and hidden.device.type == "cuda" and not entropy:
        def liger_triton():
            nll = flce.apply(hidden, weight, labels, None, None, -100, 0.0, 0.0, "none")[0]
            backward_pair(-nll, None)
        candidates.append(Candidate('Liger LigerFusedLinearCrossEntropyFunction (Triton, '
                                    'reduction="none")', liger_triton, setup=clear,
                                    kind="baseline"))
    return candidates


def _cce_candidates(hidden, weight, labels, entropy, backward_pair, clear, compile, notes):
    """Cut Cross-Entropy's per-token NLL: its Triton kernels (``impl="cce"``, default gradient
    filtering) on CUDA, its torch.compile path on CPU."""
    cce = optional_module("cut_cross_entropy")
    if cce is None:
        notes.append("Cut Cross-Entropy: not installed")
        return []
    if entropy:
        notes.append("Cut Cross-Entropy: no entropy output, not in the entropy table")
        return []
    impl = "cce" if hidden.device.type == "cuda" else "torch_compile"
    name = f'Cut Cross-Entropy impl="{impl}"'
    if impl == "torch_compile" and not compile:
        return [Candidate(name, kind="baseline", status="skipped (--no-compile)")]

    def cut_cross_entropy():
        nll = cce.linear_cross_entropy(hidden, weight, labels, reduction="none", impl=impl)
        backward_pair(-nll, None)
    return [Candidate(name, cut_cross_entropy, setup=clear, kind="baseline",
                      compiled=impl == "torch_compile")]
