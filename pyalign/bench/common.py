"""Pieces every benchmark case is built from: dtype names, one row per backend that can run the
op family on the device, the torch.compile row of an eager baseline, seeded inputs and gradient
clearing between calls."""
from __future__ import annotations

import functools
from typing import Callable

import torch

from pyalign import backends
from pyalign.bench.harness import Candidate, optional_module

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def benchmark_backends(family: str, device: torch.device) -> tuple[list[str], list[str]]:
    """(backends to time for ``family`` on ``device``, notes on the ones left out)."""
    names, notes = [], []
    for name in backends.BACKENDS:
        ok, reason = backends.status(family, name, device.type)
        if name == "triton" and device.type == "cpu":
            notes.append("triton backend: on CPU it runs only in the Triton interpreter (tests); "
                         "timed on CUDA only")
        elif ok:
            names.append(name)
        elif not (device.type == "cpu" and name == "cuda") and not (
                device.type == "cuda" and name == "cpu"):  # the other device's backend: no note
            notes.append(f"{name} backend unavailable: {reason}")
    return names, notes


def backend_candidates(family: str, device: torch.device, label: str, run_on: Callable,
                       setup) -> tuple[list[Candidate], list[str]]:
    """One candidate per pyalign backend that can run ``family`` on ``device`` (``run_on(name)``
    runs its forward + backward), and the notes on the backends left out."""
    names, notes = benchmark_backends(family, device)
    candidates = [Candidate(f"{label} [{name}]", functools.partial(run_on, name), setup=setup,
                            backend=name) for name in names]
    return candidates, notes


def seeded_generator(device: torch.device, seed: int = 0) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def clear_grads(*tensors: torch.Tensor) -> Callable[[], None]:
    def clear():
        for tensor in tensors:
            tensor.grad = None
    return clear


def logits_memory_need(logits_copies: float, num_tokens: int, hidden_size: int,
                       vocab: int) -> int:
    """Estimated peak extra bytes of a head call that holds ``logits_copies`` fp32 [N, V]
    buffers at once, plus fp32 gradients of hidden [N, H] and weight [V, H] and a copy of each
    (Candidate.memory_need)."""
    return int(logits_copies * num_tokens * vocab * 4 + 2 * (num_tokens + vocab) * hidden_size * 4)


def compile_candidate(name: str, fn: Callable, args: tuple, grad_output, setup,
                      enabled: bool, memory_need: int | None = None) -> Candidate:
    """torch.compile of the eager baseline ``fn`` (compiled once, timed after warm-up)."""
    if not enabled:
        return Candidate(name, kind="baseline", status="skipped (--no-compile)")
    compiled = torch.compile(fn, dynamic=False)

    def run():
        out = compiled(*args)
        out.backward(grad_output)
    return Candidate(name, run, setup=setup, kind="baseline", compiled=True,
                     memory_need=memory_need)


def fused_loss_candidates(run_loss: Callable, names: list[str], references: dict,
                          setup: Callable) -> tuple[list[Candidate], str | None]:
    """pyalign's rows of a fused-head loss case: per backend, the 3-matmul path with each reference
    (label -> keyword arguments) and the 4-matmul recompute path (reduction="none" takes it) with
    the first one. ``run_loss(backend, reduction, **reference)`` returns the op's output.
    Returns (the rows, the first recompute row's name, or None without a backend)."""
    candidates, recompute_name = [], None
    first_label, first_reference = next(iter(references.items()))
    for name in names:
        for label, reference in references.items():
            def fused(name=name, reference=reference):
                run_loss(name, "mean", **reference).loss.backward()
            candidates.append(Candidate(f"pyalign 3-matmul, {label} [{name}]", fused, setup=setup,
                                        backend=name))

        def recompute(name=name):
            run_loss(name, "none", **first_reference).loss.mean().backward()
        label = f"pyalign 4-matmul recompute, {first_label} [{name}]"
        recompute_name = recompute_name or label
        candidates.append(Candidate(label, recompute, setup=setup, backend=name))
    return candidates, recompute_name


def liger_chunked_loss(class_name: str, options: dict, call: Callable, setup: Callable,
                       notes: list[str], memory_need=None) -> list[Candidate]:
    """Liger-Kernel's fused-linear loss ``class_name`` (liger_kernel.chunked_loss) built with
    ``options``, as a candidate that runs ``call(loss)`` and its backward; none where Liger is
    not installed or lacks the class, and a note where its constructor refuses ``options`` (an
    API this code does not know: the other candidates still run)."""
    module = optional_module("liger_kernel.chunked_loss")
    if module is None or not hasattr(module, class_name):
        return []
    try:
        loss = getattr(module, class_name)(**options)
    except Exception as exc:  # noqa: BLE001 - any refusal is a note, not a failed benchmark
        notes.append(f"Liger-Kernel {class_name}: could not construct ({exc})")
        return []

    def run():
        out = call(loss)
        (out[0] if isinstance(out, tuple) else out).backward()
    return [Candidate(f"Liger {class_name}", run, setup=setup, kind="baseline", compiled=True,
                      memory_need=memory_need)]
