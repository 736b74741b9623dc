"""The policy-loss cases. ``policy``: the GRPO loss (token-level ratio, PPO clip, k3 KL with TRL's
bias correction, per-sequence then batch mean) from per-token log-probs, as TRL 1.16's
GRPOTrainer writes it in eager PyTorch, torch.compile of that, and pyalign.policy_loss on every
available backend; the same with the rollout correction (the sampler's log-probs, TRL's default
sequence_mask importance weight) as TRL writes it and through policy_loss's rollout_logprobs;
the loss is a scalar: there is no per-token upstream gradient to feed.
``linear_policy``: the same loss from the last hidden states (the fused-head op): the eager
full-logits path and its torch.compile, Liger-Kernel's LigerFusedLinearGRPOLoss (where
installed), and pyalign.linear_policy_loss's 3-matmul path (with and without the entropy bonus,
whose gradient goes through the head) and its 4-matmul recompute path."""
from __future__ import annotations

import torch

import pyalign
from pyalign.bench.common import (
    backend_candidates,
    benchmark_backends,
    clear_grads,
    compile_candidate,
    dtype_name,
    liger_chunked_loss,
    seeded_generator,
)
from pyalign.bench.harness import Candidate, Case, ratio_columns, third_party_notes
from pyalign.bench.linear_logprobs import naive_linear_token_logprobs


def naive_grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, beta: float = 0.04,
                    epsilon: float = 0.2):
    """The GRPO loss as TRL writes it (masks multiplied in)."""
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
    log_ratio = ref_logprobs - logprobs
    per_token = per_token + beta * (torch.exp(log_ratio) - log_ratio - 1) * ratio
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def naive_sequence_mask_weight(old_logprobs, rollout_logprobs, mask, clip_max: float = 3.0):
    """TRL's default rollout correction (vllm_importance_sampling_mode="sequence_mask"), as it
    writes it: exp of the row's summed old − sampler log-ratio, 0 above clip_max; [B, 1]."""
    diff = torch.nan_to_num((old_logprobs - rollout_logprobs) * mask, nan=0.0)
    ratio = torch.exp(diff.sum(-1, keepdim=True))
    return ratio.masked_fill(ratio > clip_max, 0.0)


def naive_grpo_is_loss(logprobs, old_logprobs, ref_logprobs, rollout_logprobs, advantages, mask,
                       beta: float = 0.04, epsilon: float = 0.2):
    """naive_grpo_loss with TRL's importance weight on the policy term (not on the KL term)."""
    weight = naive_sequence_mask_weight(old_logprobs, rollout_logprobs, mask)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None]) * weight
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
    # the sampler's log-probs: a bf16 sampler's few-hundredths-of-a-nat mismatch
    rollout = old + 0.02 * torch.randn(batch, seq_len, device=device, generator=generator)
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

    def eager_is():
        naive_grpo_is_loss(logprobs, old, ref, rollout, advantages, float_mask, beta).backward()
    candidates.append(Candidate("eager GRPO + sequence_mask IS (TRL's)", eager_is, setup=clear,
                                kind="baseline", backend="eager"))

    def fused_is(name):
        pyalign.policy_loss(logprobs, old, advantages, mask, loss_type="grpo", ref_logprobs=ref,
                            rollout_logprobs=rollout, beta=beta, backend=name).loss.backward()
    ours, _ = backend_candidates("policy", device, "pyalign policy_loss grpo + rollout IS",
                                 fused_is, clear)
    candidates += ours
    return Case("policy_loss (GRPO + k3 KL; + rollout correction) fwd+bwd",
                {"B": batch, "T": seq_len, "device": device.type}, candidates,
                ratio_to={"vs eager": "eager GRPO formula (TRL's)",
                          "vs compile": "torch.compile GRPO formula",
                          "vs eager IS": "eager GRPO + sequence_mask IS (TRL's)"},
                notes=notes + ["scalar loss: no per-token upstream gradient (N/A)",
                               "Liger-Kernel's LigerFusedLinearGRPOLoss is a fused-head op "
                               "(from hidden states): a row of the linear_policy case"])


def naive_linear_grpo_loss(hidden, weight, labels, old_logprobs, ref_logprobs, advantages, mask,
                           beta: float = 0.04):
    """The eager code: full [B, T, V] logits from the lm_head, log-probs, then the GRPO formula."""
    logprobs = naive_linear_token_logprobs(hidden, weight, labels)
    return naive_grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, beta)


def linear_policy_case(batch: int = 8, seq_len: int = 256, hidden_size: int = 512,
                       vocab: int = 32000, dtype=torch.float32, device="cpu", *,
                       beta: float = 0.04, entropy_coef: float = 0.01, compile: bool = True) -> Case:
    """GRPO with a k3 KL to precomputed reference log-probs, from the policy's last hidden states
    [B, T, H] and its lm_head [V, H]; completions of random lengths (padding ignored)."""
    device = torch.device(device)
    generator = seeded_generator(device, 5)
    hidden = torch.randn(batch, seq_len, hidden_size, device=device, generator=generator
                         ).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=generator)
              / hidden_size ** 0.5).to(dtype).requires_grad_(True)
    lengths = torch.randint(seq_len // 4, seq_len + 1, (batch,), device=device, generator=generator)
    mask = torch.arange(seq_len, device=device)[None, :] < lengths[:, None]
    safe_labels = torch.randint(0, vocab, (batch, seq_len), device=device, generator=generator)
    labels = safe_labels.masked_fill(~mask, -100)
    with torch.no_grad():  # sampling-time and reference log-probs near the policy's
        logprobs = pyalign.linear_token_logprobs(hidden, weight, labels)
    old = logprobs + 0.3 * torch.randn(batch, seq_len, device=device, generator=generator)
    ref = logprobs + 0.5 * torch.randn(batch, seq_len, device=device, generator=generator)
    advantages = torch.randn(batch, device=device, generator=generator)
    float_mask = mask.float()
    clear = clear_grads(hidden, weight)
    eager_args = (hidden, weight, safe_labels, old, ref, advantages, float_mask, beta)

    def eager():
        naive_linear_grpo_loss(*eager_args).backward()

    candidates = [Candidate("eager full logits + GRPO", eager, setup=clear, kind="baseline",
                            backend="eager"),
                  compile_candidate("torch.compile full logits + GRPO", naive_linear_grpo_loss,
                                    eager_args, None, clear, compile)]
    notes = []
    candidates += liger_chunked_loss(
        "LigerFusedLinearGRPOLoss", dict(beta=beta, loss_type="grpo", use_ref_model=True,
                                         use_bias_correction_kl=True),
        lambda loss: loss(hidden, weight, safe_labels, mask.long(), advantages,
                          ref_per_token_logps=ref, old_per_token_logps=old), clear, notes)
    names, backend_notes = benchmark_backends("linear_logprobs", device)
    notes += backend_notes
    recompute_name = None
    for name in names:
        for label, bonus in (("no entropy bonus", 0.0), ("entropy bonus", entropy_coef)):
            def fused(name=name, bonus=bonus):
                pyalign.linear_policy_loss(hidden, weight, labels, advantages, old, ref, beta=beta,
                                           entropy_coef=bonus, backend=name).loss.backward()
            candidates.append(Candidate(f"pyalign 3-matmul, {label} [{name}]", fused,
                                        setup=clear, backend=name))

        def recompute(name=name):
            token_logps, entropy = pyalign.linear_token_logprobs(hidden, weight, labels,
                                                                 entropy=True, backend=name)
            pyalign.policy_loss(token_logps, old, advantages, mask, ref_logprobs=ref, beta=beta,
                                entropy=entropy).loss.backward()
        label = f"pyalign 4-matmul recompute, no entropy bonus [{name}]"
        recompute_name = recompute_name or label
        candidates.append(Candidate(label, recompute, setup=clear, backend=name))
    notes += third_party_notes()
    notes.append(f"entropy bonus: entropy_coef={entropy_coef} (its gradient through the head); "
                 "Liger's GRPO loss has no entropy term")
    columns = {"vs_eager": "eager full logits + GRPO", "vs_compile": "torch.compile full logits + GRPO"}
    if recompute_name:
        columns["vs_4-matmul"] = recompute_name
    return Case("linear_policy_loss (GRPO + k3 KL from hidden states) fwd+bwd",
                {"B": batch, "T": seq_len, "H": hidden_size, "V": vocab, "dtype": dtype_name(dtype),
                 "device": device.type},
                candidates, ratio_to=ratio_columns(candidates, **columns), notes=notes)
