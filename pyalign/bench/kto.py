"""The KTO case: linear_kto_loss from the hidden states of policy and reference (pyalign's 3-matmul
path with the reference from hidden states or precomputed, and its 4-matmul recompute path; never
the [B*T, V] logits) against the eager full-logits path and Liger-Kernel's LigerFusedLinearKTOLoss
where installed; the KL reference point is precomputed, as Liger takes it."""
from __future__ import annotations

import torch

import pyalign
from pyalign.bench.common import (
    benchmark_backends,
    clear_grads,
    dtype_name,
    fused_loss_candidates,
    liger_chunked_loss,
    seeded_generator,
)
from pyalign.bench.harness import Candidate, Case, ratio_columns, third_party_notes
from pyalign.bench.linear_logprobs import naive_linear_token_logprobs


def naive_kto_loss(policy_logps, ref_logps, desirable, kl, beta: float = 0.1):
    """KTO (TRL's loss_type="kto", unit weights) with z0 = max(mean(kl), 0) detached."""
    z0 = kl.detach().mean().clamp(min=0)
    log_ratio = policy_logps - ref_logps
    losses = torch.where(desirable, 1 - torch.sigmoid(beta * (log_ratio - z0)),
                         1 - torch.sigmoid(beta * (z0 - log_ratio)))
    return losses.mean()


def linear_kto_case(batch: int = 8, seq_len: int = 256, hidden_size: int = 512, vocab: int = 32000,
                    dtype=torch.float32, device="cpu", *, beta: float = 0.1) -> Case:
    """KTO on B completions, half desirable, from the last hidden states of the policy and of the
    reference model (same lm_head weight; the reference without gradient)."""
    device = torch.device(device)
    generator = seeded_generator(device, 5)
    hidden = torch.randn(batch, seq_len, hidden_size, device=device, generator=generator
                         ).to(dtype).requires_grad_(True)
    ref_hidden = torch.randn(batch, seq_len, hidden_size, device=device, generator=generator).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=generator)
              / hidden_size ** 0.5).to(dtype).requires_grad_(True)
    ref_weight = weight.detach()
    labels = torch.randint(0, vocab, (batch, seq_len), device=device, generator=generator)
    labels[:, : seq_len // 4] = -100  # the prompt
    desirable = torch.arange(batch, device=device) % 2 == 0
    kl = torch.rand(batch, device=device, generator=generator)
    clear = clear_grads(hidden, weight)
    mask = labels != -100
    safe_labels = labels.clamp(min=0)

    def eager():
        policy = (naive_linear_token_logprobs(hidden, weight, safe_labels) * mask).sum(-1)
        with torch.no_grad():
            ref = (naive_linear_token_logprobs(ref_hidden, ref_weight, safe_labels) * mask).sum(-1)
        naive_kto_loss(policy, ref, desirable, kl, beta).backward()

    candidates = [Candidate("eager full logits + KTO", eager, setup=clear, kind="baseline",
                            backend="eager")]
    notes = []
    candidates += liger_chunked_loss(
        "LigerFusedLinearKTOLoss", dict(beta=beta, use_ref_model=True),
        lambda loss: loss(hidden, weight, labels, preference_labels=desirable, ref_input=ref_hidden,
                          ref_weight=ref_weight, kl=kl.mean().clamp(min=0)), clear, notes)
    names, backend_notes = benchmark_backends("linear_logprobs", device)
    notes += backend_notes
    with torch.no_grad():  # the precomputed reference (outside the timing, as a trainer would)
        ref_logps = pyalign.sequence_logprobs(
            pyalign.linear_token_logprobs(ref_hidden, ref_weight, labels), mask)
    references = {"ref from hidden": dict(ref_hidden=ref_hidden, ref_weight=ref_weight),
                  "precomputed ref": dict(ref_logps=ref_logps)}

    def run_loss(backend, reduction, **reference):
        return pyalign.linear_kto_loss(hidden, weight, labels, desirable, kl=kl, beta=beta,
                                       backend=backend, reduction=reduction, **reference)

    rows, recompute_name = fused_loss_candidates(run_loss, names, references, clear)
    candidates += rows
    notes += third_party_notes()
    columns = dict(vs_eager="eager full logits + KTO")
    if recompute_name:
        columns["vs_4-matmul"] = recompute_name
    return Case("linear_kto_loss (KTO from hidden states) fwd+bwd",
                {"B": batch, "T": seq_len, "H": hidden_size, "V": vocab, "dtype": dtype_name(dtype),
                 "device": device.type},
                candidates, ratio_to=ratio_columns(candidates, **columns), notes=notes)
