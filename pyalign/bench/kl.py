"""The kl_penalty case: the eager estimator formula (k1, k2 or k3), torch.compile of it, and
pyalign on every available backend."""
from __future__ import annotations

import torch

import pyalign
from pyalign.bench.common import backend_candidates, clear_grads, compile_candidate, seeded_generator
from pyalign.bench.harness import Candidate, Case


def naive_kl_k3(logprobs, ref_logprobs):
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def kl_case(num_tokens: int = 1 << 20, device="cpu", *, estimator: str = "k3",
            compile: bool = True) -> Case:
    device = torch.device(device)
    generator = seeded_generator(device, 2)
    logprobs = (-torch.rand(num_tokens, device=device, generator=generator) * 5
                ).requires_grad_(True)
    ref_logprobs = (-torch.rand(num_tokens, device=device, generator=generator) * 5
                    ).requires_grad_(True)
    grad_kl = torch.randn(num_tokens, device=device, generator=generator)
    clear = clear_grads(logprobs, ref_logprobs)
    naive = {"k1": lambda lp, ref: lp - ref,
             "k2": lambda lp, ref: 0.5 * (ref - lp) ** 2,
             "k3": naive_kl_k3}[estimator]

    def eager():
        naive(logprobs, ref_logprobs).backward(grad_kl)

    candidates = [Candidate(f"eager {estimator} formula", eager, setup=clear, kind="baseline",
                            backend="eager"),
                  compile_candidate(f"torch.compile {estimator} formula", naive,
                                     (logprobs, ref_logprobs), grad_kl, clear, compile)]
    def fused(name):
        pyalign.kl_penalty(logprobs, ref_logprobs, estimator=estimator,
                           backend=name).backward(grad_kl)
    ours, notes = backend_candidates("kl", device, "pyalign kl_penalty", fused, clear)
    candidates += ours
    return Case("kl_penalty fwd+bwd", {"N": num_tokens, "estimator": estimator,
                                       "device": device.type},
                candidates, ratio_to={"vs eager": f"eager {estimator} formula",
                                      "vs compile": f"torch.compile {estimator} formula"},
                notes=notes)
