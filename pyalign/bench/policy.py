"""The policy_loss case: the GRPO loss (token-level ratio, PPO clip, k3 KL with TRL's bias
correction, per-sequence then batch mean) from per-token log-probs, as TRL 1.16's GRPOTrainer
writes it in eager PyTorch, torch.compile of that, and pyalign.policy_loss on every available
backend. The loss is a scalar: there is no per-token upstream gradient to feed. Liger-Kernel's
LigerFusedLinearGRPOLoss starts from the hidden states (a fused-head op: other work), so it is
not a row here."""
from __future__ import annotations

import torch

import pyalign
from pyalign.bench.common import backend_candidates, clear_grads, compile_candidate, seeded_generator
from pyalign.bench.harness import Candidate, Case


def naive_grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, beta: float = 0.04,
                    epsilon: float = 0.2):
    """The GRPO loss as TRL writes it (masks multiplied in)."""
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
    log_ratio = ref_logprobs - logprobs
    per_token = per_token + beta * (torch.exp(log_ratio) - log_ratio - 1) * ratio
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def policy_case(batch: int = 64, seq_len: int = 1024, device="cpu", *, beta: float = 0.04,
                compile: bool = True) -> Case:
    device = torch.device(device)
    generator = seeded_generator(device, 5)
    logprobs = (-torch.rand(batch, seq_len, device=device, generator=generator) * 4
                ).requires_grad_(True)
    old = logprobs.detach() + 0.3 * torch.randn(batch, seq_len, device=device, generator=generator)
    ref = logprobs.detach() + 0.5 * torch.randn(batch, seq_len, device=device, generator=generator)
    advantages = torch.randn(batch, device=device, generator=generator)
    lengths = torch.randint(seq_len // 4, seq_len + 1, (batch,), device=device, generator=generator)
    mask = torch.arange(seq_len, device=device)[None, :] < lengths[:, None]
    float_mask = mask.float()
    clear = clear_grads(logprobs)

    def eager():
        naive_grpo_loss(logprobs, old, ref, advantages, float_mask, beta).backward()

    candidates = [Candidate("eager GRPO formula (TRL's)", eager, setup=clear, kind="baseline",
                            backend="eager"),
                  compile_candidate("torch.compile GRPO formula", naive_grpo_loss,
                                    (logprobs, old, ref, advantages, float_mask, beta), None, clear,
                                    compile)]

    def fused(name):
        pyalign.policy_loss(logprobs, old, advantages, mask, loss_type="grpo", ref_logprobs=ref,
                            beta=beta, backend=name).loss.backward()
    ours, notes = backend_candidates("policy", device, "pyalign policy_loss grpo", fused, clear)
    candidates += ours
    return Case("policy_loss (GRPO + k3 KL) fwd+bwd",
                {"B": batch, "T": seq_len, "device": device.type}, candidates,
                ratio_to={"vs eager": "eager GRPO formula (TRL's)",
                          "vs compile": "torch.compile GRPO formula"},
                notes=notes + ["scalar loss: no per-token upstream gradient (N/A)",
                               "Liger-Kernel's LigerFusedLinearGRPOLoss is a fused-head op "
                               "(from hidden states): not the same work, not a row"])
