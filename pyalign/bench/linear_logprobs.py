"""The linear_token_logprobs case (log-probs from the last hidden state): naive eager (full
[N, V] logits, log_softmax, gather), torch.compile of it, Liger-Kernel's fused linear cross
entropy (GPU, where installed), pyalign on every available backend, and the floor: the three
bare matmuls of forward and backward."""
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
from pyalign.bench.logprobs import naive_token_logprobs


def naive_linear_token_logprobs(hidden, weight, labels, temperature: float = 1.0):
    """The usual eager code: full [N, V] logits from the lm_head, then log_softmax + gather."""
    return naive_token_logprobs(hidden @ weight.t(), labels, temperature)


def linear_logprobs_case(num_tokens: int = 4096, hidden_size: int = 1024, vocab: int = 32000,
                         dtype=torch.float32, device="cpu", *, compile: bool = True) -> Case:
    device = torch.device(device)
    generator = seeded_generator(device, 1)
    hidden = (torch.randn(num_tokens, hidden_size, device=device, generator=generator)
              ).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=generator)
              / hidden_size ** 0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (num_tokens,), device=device, generator=generator)
    grad_logprobs = torch.randn(num_tokens, device=device, generator=generator)
    clear = clear_grads(hidden, weight)

    def eager():
        naive_linear_token_logprobs(hidden, weight, labels).backward(grad_logprobs)

    candidates = [Candidate("eager matmul+log_softmax+gather", eager, setup=clear,
                            kind="baseline", backend="eager"),
                  compile_candidate("torch.compile matmul+log_softmax+gather",
                                     naive_linear_token_logprobs, (hidden, weight, labels),
                                     grad_logprobs, clear, compile)]
    notes = []
    liger_functional = optional_module("liger_kernel.transformers.functional")
    if liger_functional is not None and device.type == "cuda":
        def liger_flce():
            # per-token cross entropy = -logprob (reduction "none")
            loss = liger_functional.liger_fused_linear_cross_entropy(hidden, weight, labels,
                                                                     reduction="none")
            (-loss).backward(grad_logprobs)
        candidates.append(Candidate("Liger fused_linear_cross_entropy", liger_flce, setup=clear,
                                    kind="baseline"))
    elif liger_functional is not None:
        notes.append("Liger-Kernel fused_linear_cross_entropy: Triton kernels, GPU only: not run")
    def fused(name):
        pyalign.linear_token_logprobs(hidden, weight, labels, backend=name).backward(grad_logprobs)
    ours, backend_notes = backend_candidates("linear_logprobs", device,
                                             "pyalign linear_token_logprobs", fused, clear)
    candidates += ours
    notes += backend_notes
    plain_hidden, plain_weight = hidden.detach(), weight.detach()
    logits_out = torch.empty(num_tokens, vocab, device=device, dtype=dtype)
    grad_logits = torch.randn(num_tokens, vocab, device=device, generator=generator).to(dtype)
    grad_hidden_out = torch.empty_like(plain_hidden)
    grad_weight_out = torch.empty_like(plain_weight)

    def floor():
        torch.mm(plain_hidden, plain_weight.t(), out=logits_out)  # forward
        torch.mm(grad_logits, plain_weight, out=grad_hidden_out)  # backward: d hidden
        torch.mm(grad_logits.t(), plain_hidden, out=grad_weight_out)  # backward: d weight
    candidates.append(Candidate("floor: the 3 bare matmuls", floor, kind="floor"))
    notes += third_party_notes()
    flops = 3 * 2 * num_tokens * hidden_size * vocab
    notes.append(f"matmul work: {flops / 1e9:.3g} GFLOP per fwd+bwd (3 matmuls); a chunked "
                 "backend recomputes the forward matmul in backward (4 matmuls)")
    return Case("linear_token_logprobs fwd+bwd",
                {"N": num_tokens, "H": hidden_size, "V": vocab, "dtype": dtype_name(dtype),
                 "device": device.type},
                candidates,
                ratio_to=ratio_columns(candidates, vs_eager="eager matmul+log_softmax+gather",
                                        vs_compile="torch.compile matmul+log_softmax+gather"),
                floor="floor: the 3 bare matmuls", notes=notes)
