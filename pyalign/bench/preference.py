"""The preference cases: preference_loss (DPO) on sequence log-probs (eager formula,
torch.compile, pyalign backends), linear_preference_loss from the hidden states of policy and
reference (pyalign's fused path vs the eager full-logits path and Liger-Kernel's
LigerFusedLinearDPOLoss where installed), and the reference-free ORPO from the policy's alone
(vs LigerFusedLinearORPOLoss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import pyalign
from pyalign.bench.common import (
    benchmark_backends,
    clear_grads,
    compile_candidate,
    dtype_name,
    fused_loss_candidates,
    liger_chunked_loss,
    logits_memory_need,
    seeded_generator,
)
from pyalign.bench.harness import Candidate, Case, ratio_columns, third_party_notes
from pyalign.bench.linear_logprobs import naive_linear_token_logprobs


def naive_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def preference_case(batch: int = 4096, device="cpu", *, beta: float = 0.1,
                    compile: bool = True) -> Case:
    device = torch.device(device)
    generator = seeded_generator(device, 3)
    sequence_logps = [(-torch.rand(batch, device=device, generator=generator) * 100
                       ).requires_grad_(True) for _ in range(4)]
    clear = clear_grads(*sequence_logps)

    def eager():
        naive_dpo_loss(*sequence_logps, beta).backward()

    candidates = [Candidate("eager DPO formula", eager, setup=clear, kind="baseline",
                            backend="eager"),
                  compile_candidate("torch.compile DPO formula", naive_dpo_loss,
                                     (*sequence_logps, beta), None, clear, compile)]
    names, notes = benchmark_backends("preference", device)
    for name in names:
        def fused(name=name):
            pyalign.preference_loss(*sequence_logps, loss="sigmoid", beta=beta,
                                    backend=name).loss.backward()
        candidates.append(Candidate(f"pyalign preference_loss sigmoid [{name}]", fused,
                                    setup=clear, backend=name))
    return Case("preference_loss (DPO) fwd+bwd", {"B": batch, "device": device.type}, candidates,
                ratio_to={"vs eager": "eager DPO formula",
                          "vs compile": "torch.compile DPO formula"}, notes=notes)


# Peak extra memory of one call in fp32 [2B·T, V] logits: this case's probe at B=2, T=128,
# H=64, V=8000 (eager 4.0, the floor's two kept-token products 1.6, Liger 2.1), rounded up; at
# B=4, T=256, V=128256 one copy is 1.0 GiB.
DPO_LOGITS_COPIES = {"eager": 4.5, "floor": 2.0, "liger": 2.5}


def linear_preference_case(pairs: int = 4, seq_len: int = 256, hidden_size: int = 512,
                           vocab: int = 32000, dtype=torch.float32, device="cpu", *,
                           beta: float = 0.1) -> Case:
    """DPO from the last hidden states of the policy and of the reference model (same lm_head
    weight; the reference without gradient), a quarter of each row prompt: pyalign's 3-matmul path
    (reference from hidden states, and precomputed reference log-probs, which Liger's DPO cannot
    take), its 4-matmul recompute path (reduction="none", reduced outside), Liger-Kernel's
    LigerFusedLinearDPOLoss (which compiles its chunk step itself) and the eager full-logits path;
    the floor is the 4 bare matmuls over the kept tokens (3 of the policy, 1 of the reference)."""
    device = torch.device(device)
    generator = seeded_generator(device, 4)
    rows = 2 * pairs
    hidden = torch.randn(rows, seq_len, hidden_size, device=device, generator=generator
                         ).to(dtype).requires_grad_(True)
    ref_hidden = torch.randn(rows, seq_len, hidden_size, device=device, generator=generator
                             ).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=generator)
              / hidden_size ** 0.5).to(dtype).requires_grad_(True)
    ref_weight = weight.detach()
    labels = torch.randint(0, vocab, (rows, seq_len), device=device, generator=generator)
    labels[:, : seq_len // 4] = -100  # the prompt
    clear = clear_grads(hidden, weight)
    mask = labels != -100
    safe_labels = labels.clamp(min=0)
    with torch.no_grad():  # the precomputed reference (outside the timing, as a trainer would)
        ref_logps = pyalign.sequence_logprobs(
            pyalign.linear_token_logprobs(ref_hidden, ref_weight, labels), mask)

    def eager():
        policy = (naive_linear_token_logprobs(hidden, weight, safe_labels) * mask).sum(-1)
        with torch.no_grad():
            ref = (naive_linear_token_logprobs(ref_hidden, ref_weight, safe_labels) * mask).sum(-1)
        naive_dpo_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], beta).backward()

    kept = mask.reshape(-1).nonzero().squeeze(-1)

    def bare_matmuls():
        kept_hidden, kept_ref = hidden.detach().reshape(-1, hidden_size)[kept], ref_hidden.reshape(
            -1, hidden_size)[kept]
        logits = kept_hidden @ weight.detach().t()
        _ = kept_ref @ ref_weight.t()
        _ = logits @ weight.detach(), logits.t() @ kept_hidden

    def need(kind):
        return logits_memory_need(DPO_LOGITS_COPIES[kind], rows * seq_len, hidden_size, vocab)

    candidates = [Candidate("eager full logits + DPO", eager, setup=clear, kind="baseline",
                            backend="eager", memory_need=need("eager")),
                  Candidate("floor: 4 bare matmuls of the kept tokens", bare_matmuls, kind="floor",
                            memory_need=need("floor"))]
    notes = []
    candidates += liger_chunked_loss(
        "LigerFusedLinearDPOLoss", dict(beta=beta, use_ref_model=True),
        lambda loss: loss(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight),
        clear, notes, memory_need=need("liger"))
    names, backend_notes = benchmark_backends("linear_logprobs", device)
    notes += backend_notes
    # The named backend runs the per-token part; the loss part falls back to "auto" where the
    # backend has no loss kernel (see linear_preference_loss).
    reference_kwargs = {"ref from hidden": dict(ref_hidden=ref_hidden, ref_weight=ref_weight),
                        "precomputed ref": dict(ref_logps=ref_logps)}

    def run_loss(backend, reduction, **reference):
        return pyalign.linear_preference_loss(hidden, weight, labels, loss="sigmoid", beta=beta,
                                              backend=backend, reduction=reduction,
                                              **reference)

    rows, recompute_name = fused_loss_candidates(run_loss, names, reference_kwargs, clear)
    candidates += rows
    notes += third_party_notes()
    columns = dict(vs_eager="eager full logits + DPO")
    if recompute_name:
        columns["vs_4-matmul"] = recompute_name
    return Case("linear_preference_loss (DPO from hidden states) fwd+bwd",
                {"B": pairs, "T": seq_len, "H": hidden_size, "V": vocab,
                 "dtype": dtype_name(dtype), "device": device.type},
                candidates, ratio_to=ratio_columns(candidates, **columns),
                floor="floor: 4 bare matmuls of the kept tokens", notes=notes)


def naive_orpo_loss(token_logps, mask, beta: float = 0.1):
    """ORPO + the chosen tokens' NLL from per-token log-probs [2B, T] (chosen rows first), the
    usual eager code (TRL's odds_ratio_loss on per-token means)."""
    pairs = token_logps.shape[0] // 2
    means = (token_logps * mask).sum(-1) / mask.sum(-1)
    log_odds = means - torch.log(-torch.expm1(means))
    odds_ratio = -beta * F.logsigmoid(log_odds[:pairs] - log_odds[pairs:]).mean()
    return odds_ratio - (token_logps[:pairs] * mask[:pairs]).sum() / mask[:pairs].sum()


def linear_orpo_case(pairs: int = 4, seq_len: int = 256, hidden_size: int = 512,
                     vocab: int = 32000, dtype=torch.float32, device="cpu", *,
                     beta: float = 0.1) -> Case:
    """ORPO (odds ratio + the chosen responses' NLL, ``loss=["orpo", "sft"]``) from the policy's
    last hidden states, no reference model, a quarter of each row prompt: pyalign's 3-matmul path
    and its 4-matmul recompute path, Liger-Kernel's LigerFusedLinearORPOLoss and the eager
    full-logits path; the floor is the 3 bare matmuls over the kept tokens."""
    device = torch.device(device)
    generator = seeded_generator(device, 5)
    rows = 2 * pairs
    hidden = torch.randn(rows, seq_len, hidden_size, device=device, generator=generator
                         ).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=generator)
              / hidden_size ** 0.5).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows, seq_len), device=device, generator=generator)
    labels[:, : seq_len // 4] = -100  # the prompt
    clear = clear_grads(hidden, weight)
    mask = labels != -100

    def eager():
        naive_orpo_loss(naive_linear_token_logprobs(hidden, weight, labels.clamp(min=0)), mask,
                        beta).backward()

    kept = mask.reshape(-1).nonzero().squeeze(-1)

    def bare_matmuls():
        kept_hidden = hidden.detach().reshape(-1, hidden_size)[kept]
        logits = kept_hidden @ weight.detach().t()
        _ = logits @ weight.detach(), logits.t() @ kept_hidden

    def need(kind):  # as DPO's, less the reference's logits
        return logits_memory_need(DPO_LOGITS_COPIES[kind], rows * seq_len, hidden_size, vocab)

    candidates = [Candidate("eager full logits + ORPO", eager, setup=clear, kind="baseline",
                            backend="eager", memory_need=need("eager")),
                  Candidate("floor: 3 bare matmuls of the kept tokens", bare_matmuls, kind="floor",
                            memory_need=need("floor"))]
    notes = []
    candidates += liger_chunked_loss(
        "LigerFusedLinearORPOLoss", dict(beta=beta), lambda loss: loss(weight, hidden, labels),
        clear, notes, memory_need=need("liger"))
    names, backend_notes = benchmark_backends("linear_logprobs", device)
    notes += backend_notes

    def run_loss(backend, reduction):
        return pyalign.linear_preference_loss(hidden, weight, labels, loss=["orpo", "sft"],
                                              beta=beta, average_log_prob=True, backend=backend,
                                              reduction=reduction)

    rows, recompute_name = fused_loss_candidates(run_loss, names, {"no reference": {}}, clear)
    candidates += rows
    notes += third_party_notes()
    columns = dict(vs_eager="eager full logits + ORPO")
    if recompute_name:
        columns["vs_4-matmul"] = recompute_name
    return Case("linear_preference_loss (ORPO from hidden states, no reference) fwd+bwd",
                {"B": pairs, "T": seq_len, "H": hidden_size, "V": vocab,
                 "dtype": dtype_name(dtype), "device": device.type},
                candidates, ratio_to=ratio_columns(candidates, **columns),
                floor="floor: 3 bare matmuls of the kept tokens", notes=notes)
