"""What a pairwise loss of the registry (pyalign/losses/preference.py) runs on: a batch of pairs
(``PairBatch``), the f-divergence scores of its log-ratios (``F_DIVERGENCES``), the batch-level
steps (aot's sort, sft's token mean) and ``pair_ratios``, the one function that turns a batch
into an entry's (r_w, r_l): its batch step, or the log-ratios π − ρ (the policy's log-probs
alone for a reference-free entry) turned into f-divergence scores, divided by the completion
lengths and shifted by SimPO's target margin, as the entry's flags say. ``pair_inputs`` gives the
four inputs of the backends' pair primitive from it. Plain torch: autograd differentiates it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

SIMPO_GAMMA = 0.5  # TRL's CPOConfig.simpo_gamma default: SimPO's target reward margin γ


class PairBatch(NamedTuple):
    """What a loss sees of a batch of B pairs, [B] tensors in the accumulation dtype (fp32, or
    fp64). The four sequence log-probs are sums over completion tokens (LD-DPO-weighted sums with
    ld_alpha, per-token means with average_log_prob: then ``averaged``). The lengths are the
    completion token counts those sums ran over; ``chosen_token_sum`` the plain sum of the chosen
    per-token log-probs (sft's numerator; ``policy_chosen`` unless ld_alpha reweighted it).
    ``whole_batch``: (pairs, chosen tokens as a 0-d tensor) of the whole batch when this is one
    chunk of it (the fused head): a batch mean then gives each pair its share of the mean."""
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_lengths: Optional[torch.Tensor] = None
    rejected_lengths: Optional[torch.Tensor] = None
    chosen_token_sum: Optional[torch.Tensor] = None
    averaged: bool = False  # log-probs already per-token means: length normalisation is done
    whole_batch: Optional[tuple] = None


class ScoreOptions(NamedTuple):
    """The options that shape the scores a loss runs on (ops' LossSpec has these attributes)."""
    f_divergence: str = "reverse_kl"
    alpha: float = 0.5  # f_alpha_divergence_coef
    beta: float = 0.1
    simpo_gamma: float = SIMPO_GAMMA


DEFAULT_OPTIONS = ScoreOptions()


@dataclasses.dataclass(frozen=True)
class FDivergence:
    """f-DPO's score f'(u) at u = π/ρ, in place of the log-ratio log u (TRL's f_divergence_type)."""
    name: str
    paper: str
    transform: Callable  # (log_ratio, alpha) -> score; the docstring is f'(u) at u = exp(log_ratio)

    @property
    def equation(self) -> str:
        return (self.transform.__doc__ or "").strip()


F_DPO = "2309.16240"  # f-DPO (Wang et al.), the paper of every divergence here
ALPHA_EXPONENT_MAX = 80.0  # TRL clamps (α−1)·r at 80 before exp (fp32-representable after exp)


def _reverse_kl(ratio, alpha):
    """reverse KL (DPO): f'(u) = log u, the score is the log-ratio r itself."""
    return ratio


def _forward_kl(ratio, alpha):
    """forward KL: f'(u) = 1 − 1/u, the score is 1 − exp(−r) (as −expm1(−r))."""
    return -torch.expm1(-ratio)


def _js_divergence(ratio, alpha):
    """Jensen-Shannon: f'(u) = log(2u/(1+u)), the score is log 2 + logσ(r)."""
    return math.log(2) + F.logsigmoid(ratio)


def _alpha_divergence(ratio, alpha):
    """α-divergence: f'(u) = (u^(α−1) − 1)/(α−1), the score is expm1(min((α−1)·r, 80))/(α−1);
    |α − 1| < 1e-6 is its limit, reverse KL (as TRL). The clamp at 80 is TRL's: beyond it the
    score is constant and its gradient 0."""
    if abs(alpha - 1.0) < 1e-6:
        return ratio
    exponent = torch.clamp((alpha - 1.0) * ratio, max=ALPHA_EXPONENT_MAX)
    return torch.expm1(exponent) / (alpha - 1.0)


F_DIVERGENCES: dict[str, FDivergence] = {entry.name: entry for entry in (
    FDivergence("reverse_kl", F_DPO, _reverse_kl),
    FDivergence("forward_kl", F_DPO, _forward_kl),
    FDivergence("js_divergence", F_DPO, _js_divergence),
    FDivergence("alpha_divergence", F_DPO, _alpha_divergence),
)}
F_DIVERGENCE_NAMES = tuple(F_DIVERGENCES)


def aot_step(batch):
    """AOT (paired): the policy margins π_w − π_l and the reference margins ρ_w − ρ_l are each
    sorted over the batch; r_w = sort(π_w − π_l), r_l = sort(ρ_w − ρ_l), then sigmoid (cDPO) on
    x = β·(r_w − r_l). The gradient flows back through the permutation (autograd of sort)."""
    policy_margins = torch.sort(batch.policy_chosen - batch.policy_rejected).values
    ref_margins = torch.sort(batch.ref_chosen - batch.ref_rejected).values
    return policy_margins, ref_margins


def aot_unpaired_step(batch):
    """AOT (unpaired): r_w = sort(π_w − ρ_w) and r_l = sort(π_l − ρ_l), each sorted over the batch,
    then sigmoid (cDPO) on x = β·(r_w − r_l)."""
    return (torch.sort(batch.policy_chosen - batch.ref_chosen).values,
            torch.sort(batch.policy_rejected - batch.ref_rejected).values)


def sft_step(batch):
    """r_w = −Σ_b chosen_token_sum / max(Σ_b chosen_lengths, 1) for every pair, r_l = 0: TRL's
    mean NLL over the batch's chosen tokens (0, not NaN, when there is none). On a chunk of a
    batch (``whole_batch`` = (B, N)), pair b's share of it instead: −chosen_token_sum_b · B / N,
    whose mean over the batch's pairs is that NLL."""
    token_sum = batch.policy_chosen if batch.chosen_token_sum is None else batch.chosen_token_sum
    if batch.whole_batch is not None:
        pairs, tokens = batch.whole_batch
        return -token_sum * (pairs / tokens.clamp(min=1)), torch.zeros_like(token_sum)
    mean_nll = -token_sum.sum() / batch.chosen_lengths.sum().clamp(min=1)
    return mean_nll.expand(token_sum.shape).contiguous(), torch.zeros_like(token_sum)


def runs_on_plain_ratios(entry, f_divergence: str, has_lengths: bool, averaged: bool) -> bool:
    """The entry's pair math runs on r = π − ρ as it is: no batch step, no score transform, no
    target margin and no division by lengths (none given, or the log-probs are already per-token
    means). A reference-free entry's ρ is 0 (``pair_inputs`` passes zeros)."""
    if (entry.batch_step is not None or entry.target_margin
            or (entry.f_divergence and f_divergence != "reverse_kl")):
        return False
    return (averaged or entry.length_normalized == "never"
            or (entry.length_normalized == "when_given" and not has_lengths))


def _has_lengths(batch: PairBatch) -> bool:
    return batch.chosen_lengths is not None and batch.rejected_lengths is not None


def _own_reference(entry, batch: PairBatch) -> PairBatch:
    """The batch as ``entry`` sees it: a reference-free entry's reference log-probs are 0."""
    if not entry.reference_free:
        return batch
    return batch._replace(ref_chosen=torch.zeros_like(batch.policy_chosen),
                          ref_rejected=torch.zeros_like(batch.policy_rejected))


def pair_inputs(entry, batch: PairBatch, options=DEFAULT_OPTIONS) -> tuple[torch.Tensor, ...]:
    """The four [B] inputs (policy_chosen, policy_rejected, ref_chosen, ref_rejected) of the
    backends' pair primitive for ``entry.math``: the batch's own log-probs when the entry runs on
    the plain log-ratios (no extra [B] work), else its ``pair_ratios`` against a zero reference.
    ``options``: the f-divergence, its α, β and SimPO's γ (a ``ScoreOptions``, or the ops'
    LossSpec).

    The four are distinct tensors: torch.compile cannot trace an autograd.Function given the
    same tensor twice (a graph break, an error with fullgraph=True), so a repeated one (a
    caller's shared zero reference, say) is passed as a copy; the gradients are unchanged."""
    batch = _own_reference(entry, batch)
    if runs_on_plain_ratios(entry, options.f_divergence, _has_lengths(batch), batch.averaged):
        inputs = (batch.policy_chosen, batch.policy_rejected, batch.ref_chosen, batch.ref_rejected)
    else:
        chosen_ratio, rejected_ratio = pair_ratios(entry, batch, options)
        inputs = (chosen_ratio, rejected_ratio, torch.zeros_like(chosen_ratio),
                  torch.zeros_like(rejected_ratio))
    return _distinct(inputs)


def _distinct(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``tensors`` with each repeat of an earlier one (the same object) replaced by its clone."""
    seen: list[torch.Tensor] = []
    out = []
    for tensor in tensors:
        if any(tensor is earlier for earlier in seen):
            tensor = tensor.clone()
        seen.append(tensor)
        out.append(tensor)
    return tuple(out)


def pair_ratios(entry, batch: PairBatch,
                options=DEFAULT_OPTIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_w, r_l) [B] that ``entry.math`` runs on: its batch step, or the log-ratios π − ρ (π for
    a reference-free entry) turned into f-divergence scores (entries with ``f_divergence``),
    divided by the completion token counts (``length_normalized``: always, or when the lengths
    are given; never for log-probs that are already per-token means) and, for an entry with a
    ``target_margin`` (SimPO), r_w − γ/β: the pair math's x = β·(r_w − r_l) is then
    β·(r_w − r_l) − γ."""
    if entry.batch_step is not None:
        return entry.batch_step(batch)
    batch = _own_reference(entry, batch)
    chosen = batch.policy_chosen - batch.ref_chosen
    rejected = batch.policy_rejected - batch.ref_rejected
    if entry.f_divergence and options.f_divergence != "reverse_kl":
        transform = F_DIVERGENCES[options.f_divergence].transform
        chosen, rejected = transform(chosen, options.alpha), transform(rejected, options.alpha)
    normalize = entry.length_normalized == "always" or (entry.length_normalized == "when_given"
                                                        and _has_lengths(batch))
    if normalize and not batch.averaged:
        chosen = chosen / batch.chosen_lengths.clamp(min=1)
        rejected = rejected / batch.rejected_lengths.clamp(min=1)
    if entry.target_margin:
        chosen = chosen - options.simpo_gamma / options.beta
    return chosen, rejected
