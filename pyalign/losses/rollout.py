"""The rollout corrections of the policy losses (part of the loss registry, pyalign/losses/): how
the policy term is reweighted when the completions were drawn by a sampler other than the
trainer's old policy (vLLM or SGLang, ``generate`` in another precision), declared once for every
backend and for linear_policy_loss:

- ``ROLLOUT_CORRECTIONS``: the importance weight ρ between the trainer's old policy and the
  sampler, by ``vllm_importance_sampling_mode``: TRL 1.16 GRPOTrainer's token or sequence ×
  truncate or mask, and verl's geometric-mean rejection (``geometric_reject``);
- the off-policy sequence mask of DeepSeek-V3.2 (TRL's ``off_policy_mask_threshold``).

Per kept token t of row b (m the mask, n_b the row's kept tokens), d_t = old_logp_t −
rollout_logp_t, taken as 0 where it is NaN (a token the sampler did not score, as TRL):

  level    token: r_t = exp(d_t);  sequence: r_b = exp(Σ_t m_t·d_t);
           geometric: r_b = exp(Σ_t m_t·d_t / max(n_b, 1))
  bounds   truncate: ρ = clamp(r, C_min, C_max);  mask: ρ = r inside [C_min, C_max], else 0;
           reject: ρ = 1 inside [C_min, C_max], else 0
  keep     keep_b = [A_b ≥ 0 or Σ_t m_t·(s_t − logp_t) / max(n_b, 1) ≤ δ_off]  (s: the rollout
           log-probs, or the old ones; per token with per-token advantages)

The policy term P becomes keep·ρ·P (vespo: keep·P, with Σ_t m_t·clamp(log ρ_t, log 1e−8, 20)
added to the log of its sequence weight, as TRL); the KL term is not reweighted. ρ and keep carry
no gradient: the op computes them here once, each backend multiplies (pyalign/eager/policy.py).
docs/algorithms.md, "Rollout correction".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from pyalign._utils import accumulation_dtype


@dataclasses.dataclass(frozen=True)
class RolloutCorrection:
    name: str
    level: str  # "token", "sequence" (the product of the token ratios) or "geometric" (their mean)
    bounds: str  # "truncate", "mask" or "reject"
    source: str  # whose mode it is


ROLLOUT_CORRECTIONS: dict[str, RolloutCorrection] = {entry.name: entry for entry in (
    RolloutCorrection("token_truncate", "token", "truncate", "TRL 1.16; verl's token TIS"),
    RolloutCorrection("token_mask", "token", "mask", "TRL 1.16"),
    RolloutCorrection("sequence_truncate", "sequence", "truncate", "TRL 1.16; verl's sequence TIS"),
    RolloutCorrection("sequence_mask", "sequence", "mask", "TRL 1.16 (its default); verl's "
                      "sequence MIS"),
    RolloutCorrection("geometric_reject", "geometric", "reject", "verl's rollout_rs='geometric' "
                      "(C_min defaults to 1/C_max, as verl's)"),
)}
ROLLOUT_MODES = tuple(ROLLOUT_CORRECTIONS)
SAMPLER_LOG_WEIGHT_CLAMP = (math.log(1e-8), 20.0)  # vespo's clamp of log ρ_t (TRL's)

# The per-row pieces the rollout metrics are reduced from ([B, len] in the accumulation dtype);
# a unit is a kept token (token level) or the row (sequence levels), as TRL counts them.
ROLLOUT_ROW_STATS = (
    "units",  # counted units
    "weight_sum",  # Σ ρ over the units
    "weight_min",  # min ρ (+inf without a unit)
    "weight_max",  # max ρ (0 without a unit: ρ ≥ 0)
    "masked",  # units whose ρ the bounds set to 0 (mask, reject)
    "difference_sum",  # Σ |old_logp − rollout_logp| over the kept tokens where it is a number
    "difference_count",  # those tokens
    "difference_max",  # their max (0 without one)
)
_R = {name: index for index, name in enumerate(ROLLOUT_ROW_STATS)}


@dataclasses.dataclass(frozen=True)
class RolloutOptions:
    """policy_loss's rollout options (TRL 1.16's GRPOConfig names and defaults), checked."""
    correction: bool = True  # vllm_importance_sampling_correction
    mode: str = "sequence_mask"  # vllm_importance_sampling_mode
    clip_min: Optional[float] = None  # vllm_importance_sampling_clip_min
    clip_max: Optional[float] = 3.0  # vllm_importance_sampling_clip_max
    off_policy_mask_threshold: Optional[float] = None

    @property
    def entry(self) -> RolloutCorrection:
        return ROLLOUT_CORRECTIONS[self.mode]

    def bounds(self) -> tuple[float, float]:
        """[C_min, C_max], an unset bound ±inf (geometric: C_min 1/C_max when unset)."""
        low, high = self.clip_min, self.clip_max
        if low is None and high is not None and self.entry.level == "geometric":
            low = 1.0 / high
        return (-math.inf if low is None else low, math.inf if high is None else high)


def _log_ratio(old, rollout, mask, acc):
    """d_t = old_logp_t − rollout_logp_t on kept tokens, 0 where masked or NaN."""
    diff = old.to(acc) - rollout.to(acc)
    return torch.where(mask & ~torch.isnan(diff), diff, torch.zeros((), dtype=acc,
                                                                    device=diff.device))


def importance_weights(options: RolloutOptions, log_ratio, mask):
    """(ρ [B, T] (token level) or [B, 1] (sequence levels), the units the bounds set to 0)."""
    entry, (low, high) = options.entry, options.bounds()
    if entry.level == "token":
        log_r = log_ratio
    else:
        log_r = log_ratio.sum(-1, keepdim=True)
        if entry.level == "geometric":
            log_r = log_r / mask.sum(-1, keepdim=True).clamp(min=1)
    ratio = torch.exp(log_r)
    if entry.bounds == "truncate":
        return torch.clamp(ratio, min=options.clip_min, max=options.clip_max), \
            torch.zeros_like(ratio, dtype=torch.bool)
    outside = (ratio < low) | (ratio > high)
    kept_value = ratio if entry.bounds == "mask" else torch.ones_like(ratio)
    return torch.where(outside, torch.zeros_like(ratio), kept_value), outside


def off_policy_keep(threshold, advantages, logprobs, sampling, mask, acc):
    """keep [B, 1] (or [B, T] for per-token advantages): A ≥ 0 or the row's mean of
    sampling_logp − logp at most ``threshold`` (TRL's get_off_policy_mask)."""
    kl = _log_ratio(sampling, logprobs.detach(), mask, acc)
    mean = kl.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).to(acc).clamp(min=1)
    advantages = advantages[:, None] if advantages.dim() == 1 else advantages
    return (advantages >= 0) | (mean <= threshold)


def _row_stats(weights, outside, log_ratio_raw, mask, acc):
    """ROLLOUT_ROW_STATS [B, 8] of ρ (``weights``, [B, T] or [B, 1]) and the raw differences."""
    units = mask if weights.shape[-1] != 1 else torch.ones_like(weights, dtype=torch.bool)
    zero = torch.zeros((), dtype=acc, device=mask.device)
    difference = log_ratio_raw.abs()
    scored = mask & ~torch.isnan(difference)

    def row_extreme(values, keep, identity, reduce):
        # the identity as an extra column: a row without a unit (or T = 0) gives it
        column = torch.full((values.shape[0], 1), identity, dtype=acc, device=mask.device)
        return reduce(torch.cat([torch.where(keep, values, column), column], -1), -1)
    return torch.stack([units.sum(-1).to(acc), torch.where(units, weights, zero).sum(-1),
                        row_extreme(weights, units, math.inf, torch.amin),
                        row_extreme(weights, units, 0.0, torch.amax),
                        (units & outside).sum(-1).to(acc),
                        torch.where(scored, difference, zero).sum(-1), scored.sum(-1).to(acc),
                        row_extreme(difference, scored, 0.0, torch.amax)], -1)


def rollout_terms(options: RolloutOptions, in_sequence_weight: bool, logprobs, old, rollout,
                  advantages, mask):
    """(policy_weights [B, T] or None, sampler_log_weights [B] or None, row stats [B, 8] or None)
    for the backends and the metrics: keep·ρ per token (keep only for a loss whose sequence
    weight takes ρ: ``in_sequence_weight``, vespo), that loss's Σ_t m·clamp(log ρ_t, log 1e−8,
    20), and ROLLOUT_ROW_STATS. ``rollout`` None: no correction (the off-policy mask, if set,
    reads the old log-probs); nothing to apply: (None, None, None)."""
    acc = accumulation_dtype(logprobs, old, rollout)
    weights = log_weights = stats = None
    if rollout is not None and options.correction:
        raw = old.to(acc) - rollout.to(acc)
        rho, outside = importance_weights(options, _log_ratio(old, rollout, mask, acc), mask)
        stats = _row_stats(rho, outside, raw, mask, acc)
        rho = rho.expand_as(mask)
        if in_sequence_weight:
            low, high = SAMPLER_LOG_WEIGHT_CLAMP
            log_rho = torch.clamp(torch.log(rho), low, high)
            log_weights = torch.where(mask, log_rho, torch.zeros_like(log_rho)).sum(-1)
        else:
            weights = rho
    if options.off_policy_mask_threshold is not None:
        sampling = old if rollout is None else rollout
        keep = off_policy_keep(options.off_policy_mask_threshold, advantages, logprobs, sampling,
                               mask, acc).expand_as(mask).to(acc)
        weights = keep if weights is None else keep * weights
    return (None if weights is None else weights.contiguous()), log_weights, stats


def rollout_metrics(stats, like):
    """(importance_sampling_ratio mean, min, max, masked fraction, sampling_logp_difference mean,
    max) from the whole batch's ROLLOUT_ROW_STATS, 0-d tensors like ``like``: NaN each without
    stats (no correction), 0 where nothing was counted (TRL's)."""
    if stats is None:
        return (torch.full((), math.nan, dtype=like.dtype, device=like.device),) * 6
    if stats.shape[0] == 0:
        return (stats.new_zeros(()),) * 6
    units = stats[:, _R["units"]].sum()
    count = stats[:, _R["difference_count"]].sum()
    zero = stats.new_zeros(())

    def over(value, total):
        return torch.where(total > 0, value, zero)
    return (over(stats[:, _R["weight_sum"]].sum() / units.clamp(min=1), units),
            over(stats[:, _R["weight_min"]].min(), units),
            over(stats[:, _R["weight_max"]].max(), units),
            over(stats[:, _R["masked"]].sum() / units.clamp(min=1), units),
            over(stats[:, _R["difference_sum"]].sum() / count.clamp(min=1), count),
            over(stats[:, _R["difference_max"]].max(), count))
