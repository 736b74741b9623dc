"""The token_logprobs case: naive eager log_softmax+gather, torch.compile of it, TRL's
selective_log_softmax and Liger-Kernel's cross entropy (where installed), pyalign on every
available backend (and with inplace_backward), and two floors (two passes of torch.exp; one read
forward, one read + write backward)."""
from __future__ import annotations

import torch

import pyalign
from pyalign.bench.common import (
    backend_candidates,
    clear_grads,
    compile_candidate,
    dtype_name,
    seeded_generator,
)
from pyalign.bench.harness import Candidate, Case, optional_module, ratio_columns, third_party_notes


def naive_token_logprobs(logits, labels, temperature: float = 1.0):
    """The usual eager code: full fp32 log_softmax, then gather the label."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(
        -1, labels.unsqueeze(-1)).squeeze(-1)


def logprobs_case(num_tokens: int = 4096, vocab: int = 32000, dtype=torch.float32,
                  device="cpu", *, temperature: float = 1.0, compile: bool = True) -> Case:
    device = torch.device(device)
    generator = seeded_generator(device)
    logits = torch.randn(num_tokens, vocab, device=device, dtype=dtype, generator=generator)
    logits.requires_grad_(True)
    labels = torch.randint(0, vocab, (num_tokens,), device=device, generator=generator)
    grad_logprobs = torch.randn(num_tokens, device=device, generator=generator)
    clear = clear_grads(logits)

    def eager():
        naive_token_logprobs(logits, labels, temperature).backward(grad_logprobs)

    candidates = [Candidate("eager log_softmax+gather", eager, setup=clear, kind="baseline",
                            backend="eager")]
    candidates.append(compile_candidate("torch.compile log_softmax+gather", naive_token_logprobs,
                                         (logits, labels, temperature), grad_logprobs, clear,
                                         compile))
    notes = []
    trl_utils = optional_module("trl.trainer.utils")
    if trl_utils is not None and hasattr(trl_utils, "selective_log_softmax"):
        def trl_selective():
            trl_utils.selective_log_softmax(logits, labels, temperature=temperature
                                            ).backward(grad_logprobs)
        candidates.append(Candidate("TRL selective_log_softmax", trl_selective, setup=clear,
                                    kind="baseline"))
    liger_functional = optional_module("liger_kernel.transformers.functional")
    if liger_functional is not None and device.type == "cuda":
        def liger_ce():
            # per-token cross entropy = -logprob; Liger takes no temperature: T = 1 only
            (-liger_functional.liger_cross_entropy(logits, labels, reduction="none")
             ).backward(grad_logprobs)
        if temperature == 1.0:
            candidates.append(Candidate("Liger cross_entropy (reduction=none)", liger_ce,
                                        setup=clear, kind="baseline"))
    elif liger_functional is not None:
        notes.append("Liger-Kernel cross_entropy: Triton kernels, GPU only: not run")
    def fused(name):
        pyalign.token_logprobs(logits, labels, temperature=temperature,
                               backend=name).backward(grad_logprobs)
    ours, backend_notes = backend_candidates("logprobs", device, "pyalign token_logprobs", fused,
                                             clear)
    candidates += ours
    notes += backend_notes
    names = [candidate.backend for candidate in ours]
    # In-place backward writes d logits into the logits buffer: each call gets its own copy of
    # the logits, made outside the timing. The copy is a non-leaf (as logits out of an lm_head
    # are): on a leaf token_logprobs refuses to overwrite the caller's tensor and runs out of place.
    inplace_names = [name for name in names if name != "eager"]
    if inplace_names:
        producer = logits.detach().clone().requires_grad_(True)
        fresh = {}

        def refill():
            producer.grad = None
            fresh["logits"] = producer.clone()

        for name in inplace_names:
            def fused_inplace(name=name):
                pyalign.token_logprobs(fresh["logits"], labels, temperature=temperature,
                                       backend=name, inplace_backward=True).backward(grad_logprobs)
            candidates.append(Candidate(f"pyalign token_logprobs [{name}] inplace_backward",
                                        fused_inplace, setup=refill, backend=name))
    exp_out = torch.empty_like(logits, requires_grad=False)
    plain_logits = logits.detach()

    def floor():
        torch.exp(plain_logits, out=exp_out)  # forward: one pass over the logits
        torch.exp(plain_logits, out=exp_out)  # backward: one more read and a write
    candidates.append(Candidate("floor: 2 passes of torch.exp", floor, kind="floor"))

    def memory_floor():
        plain_logits.sum()  # forward: one read
        exp_out.copy_(plain_logits)  # backward: one read, one write
    candidates.append(Candidate("memory floor: sum + copy_ (1 read; 1 read + 1 write)",
                                memory_floor, kind="floor"))
    notes += third_party_notes()
    return Case("token_logprobs fwd+bwd",
                {"N": num_tokens, "V": vocab, "dtype": dtype_name(dtype), "T": temperature,
                 "device": device.type},
                candidates,
                ratio_to=ratio_columns(candidates, vs_eager="eager log_softmax+gather",
                                        vs_compile="torch.compile log_softmax+gather"),
                floor="floor: 2 passes of torch.exp", notes=notes)
