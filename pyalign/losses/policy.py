"""The policy-gradient losses of the loss registry (pyalign/losses/): ``pyalign.policy_loss``'s
``loss_type`` (TRL 1.16's GRPOTrainer ``loss_type``s and RLOOTrainer's loss), each declared once
as a ``PolicyLoss``: its per-token policy term P(w, A) on the importance ratio w and the
advantage A, the two derivatives the kernels need, how w is formed and how the per-token terms
are normalised (data, read by every backend).

  w      importance ratio π/π_old: per token exp(logp − old_logp) ("token"), or per sequence
         exp(mean_t of the masked log-ratios) ("sequence", GSPO) or exp(their sum) (RLOO),
         broadcast over the row
  P      the per-token policy term; the op adds β·kl (times w with use_bias_correction_kl) and
         reduces Σ_t m_t·(em_t·P_t + β·kl_t) with the normalisation's token weights
  dP/dw  its derivative through the ratio;  D = ∂P/∂logp at fixed w (cispo and vespo weight a
         detached coefficient onto logp itself)

A factor of zero slope or value contributes exactly 0 whatever the ratio holds: ``times`` takes
0·∞ as 0 (the ratio overflows fp32 from a log-ratio of 89 on), so a clipped branch, A = 0 or a
zero weight gives a 0 term and a 0 gradient where torch's (and TRL's) product gives NaN.

Also the KL estimators (``KL_ESTIMATOR_IDS``: the KL term's, and ``pyalign.kl_penalty``'s) and
the per-row stats every policy backend returns (``POLICY_ROW_STATS``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from pyalign.losses.preference import sigmoid_prime

_sig = torch.sigmoid

POLICY_RATIO_LEVELS = ("token", "sequence")  # importance_sampling_level of the GRPO losses
# The KL estimators of d = ref_logp − logp (k1 = −d, k2 = d²/2, k3 = exp(d) − d − 1) and their
# kernel ids, for the policy losses' KL term and pyalign.kl_penalty.
KL_ESTIMATOR_IDS = {"k1": 1, "k2": 2, "k3": 3}
# How Σ_t m_t·term_t is normalised, as the weight of one kept token of row b: n_b = kept tokens of
# the row, N = kept tokens of the batch, B rows, L = max_completion_length, I = num_items_in_batch.
POLICY_NORMALISATIONS = {
    "sequence_mean": "1 / (B·max(n_b, 1))",  # per-sequence mean, then the batch mean
    "tokens": "1 / max(N, 1)",  # mean over the batch's kept tokens
    "max_length": "1 / (B·L)",  # a constant: B times max_completion_length
    "num_items": "1 / max(I, 1)",  # the (global) number of active tokens, given
    "batch": "1 / B",  # per-sequence sums, then the batch mean
}


@dataclasses.dataclass(frozen=True)
class PolicyParams:
    """The scalar hyper-parameters of the policy terms (TRL 1.16's GRPOConfig names and
    defaults); ``delta`` None: no two-sided clip."""
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: Optional[float] = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def as_list(self) -> list[float]:
        """The floats the kernels take, in field order (delta None as +inf)."""
        return [math.inf if value is None else float(value)
                for value in dataclasses.astuple(self)]

    @classmethod
    def from_list(cls, values) -> "PolicyParams":
        params = cls(*[float(value) for value in values])
        return params if math.isfinite(params.delta) else dataclasses.replace(params, delta=None)


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    name: str
    paper: str  # arXiv id
    # (ratio, advantages, logprobs, log_ratio_sum, params) -> P per token; the docstring is the
    # equation. log_ratio_sum: the row's Σ_t m_t·clamp(logp − old_logp, ±20) (vespo's weight).
    forward: Callable
    grad: Callable  # same arguments -> (dP/dw, D = ∂P/∂logp at fixed w)
    normalisation: str  # a key of POLICY_NORMALISATIONS
    ratio: str = "argument"  # "argument": importance_sampling_level; "sequence_sum": RLOO's
    clip_metric: Optional[str] = "ppo"  # "ppo", "cispo" or None (the clip-fraction metrics)
    # the rollout IS weight ρ (pyalign/losses/rollout.py) enters the loss's sequence weight
    # (token-level ρ only) instead of multiplying P
    rollout_in_sequence_weight: bool = False
    kernel_id: int = 0  # the policy-term branch of pyalign/kernels/policy.py and csrc/cpu/policy.cpp

    @property
    def equation(self) -> str:
        return (self.forward.__doc__ or "").strip()


def times(a, b):
    """a·b, except that 0·∞ (either way round) is 0: a zero factor (a slope, an advantage or a
    weight of 0) contributes exactly 0 whatever the other holds, an overflowed ratio included
    (torch's and TRL's 0·∞ is NaN). NaN still propagates."""
    product = a * b
    zero_times_inf = ((a == 0) & torch.isinf(b)) | (torch.isinf(a) & (b == 0))
    return torch.where(zero_times_inf, torch.zeros_like(product), product)


def _ppo_clip(ratio, advantages, logprobs, log_ratio_sum, p):
    """PPO clip: −min(c1·A, c2·A),  c1 = min(w, δ) (δ: two-sided clip, INTELLECT-2; none by
    default), c2 = clamp(w, 1 − ε_low, 1 + ε_high); c·A is 0 at A = 0 whatever w (``times``)."""
    c1 = ratio if p.delta is None else torch.clamp(ratio, max=p.delta)
    c2 = torch.clamp(ratio, 1 - p.epsilon_low, 1 + p.epsilon_high)
    return -torch.minimum(times(advantages, c1), times(advantages, c2))


def _ppo_clip_grad(ratio, advantages, logprobs, log_ratio_sum, p):
    # the branch min() takes; at a tie (w inside the clip range) torch.minimum splits the
    # gradient in halves, so each side's slope counts half
    c1 = ratio if p.delta is None else torch.clamp(ratio, max=p.delta)
    c2 = torch.clamp(ratio, 1 - p.epsilon_low, 1 + p.epsilon_high)
    one, zero = torch.ones_like(ratio), torch.zeros_like(ratio)
    slope1 = one if p.delta is None else torch.where(ratio <= p.delta, one, zero)
    slope2 = torch.where((ratio >= 1 - p.epsilon_low) & (ratio <= 1 + p.epsilon_high), one, zero)
    a, b = times(advantages, c1), times(advantages, c2)
    slope = torch.where(a < b, slope1, torch.where(a > b, slope2, 0.5 * (slope1 + slope2)))
    return -advantages * slope, torch.zeros_like(ratio)


def _cispo(ratio, advantages, logprobs, log_ratio_sum, p):
    """CISPO: −sg(min(w, ε_high))·A·logp (the clipped IS weight, stop-gradient, times the
    log-prob: ε_high is the absolute cap ε_max, 5.0 in ScaleRL)."""
    return -torch.clamp(ratio, max=p.epsilon_high).detach() * advantages * logprobs


def _cispo_grad(ratio, advantages, logprobs, log_ratio_sum, p):
    return torch.zeros_like(ratio), -torch.clamp(ratio, max=p.epsilon_high) * advantages


def _sapo_temperature(advantages, p):
    # in the advantages' dtype (TRL's torch.where of two Python floats rounds them to fp32)
    return torch.where(advantages > 0, torch.full_like(advantages, p.sapo_temperature_pos),
                       torch.full_like(advantages, p.sapo_temperature_neg))


def _sapo(ratio, advantages, logprobs, log_ratio_sum, p):
    """SAPO soft gate: −σ(τ·(w − 1))·(4/τ)·A,  τ = τ_pos where A > 0, else τ_neg."""
    tau = _sapo_temperature(advantages, p)
    return -_sig(tau * (ratio - 1)) * (4 / tau) * advantages


def _sapo_grad(ratio, advantages, logprobs, log_ratio_sum, p):
    tau = _sapo_temperature(advantages, p)
    return -4 * sigmoid_prime(tau * (ratio - 1)) * advantages, torch.zeros_like(ratio)


VESPO_LOG_RATIO_CLAMP = 20.0
VESPO_MIN_LOG_WEIGHT = math.log(1e-8)


def _vespo_weight(advantages, log_ratio_sum, p):
    log_w = torch.clamp(log_ratio_sum, VESPO_MIN_LOG_WEIGHT, VESPO_LOG_RATIO_CLAMP)
    nonneg = advantages >= 0
    k = torch.where(nonneg, p.vespo_k_pos, p.vespo_k_neg)
    lam = torch.clamp(torch.where(nonneg, p.vespo_lambda_pos, p.vespo_lambda_neg), min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def _vespo(ratio, advantages, logprobs, log_ratio_sum, p):
    """VESPO: −sg(φ)·A·logp,  φ = exp(λ + k·log w_s − λ·w_s), w_s = exp(clamp(Σ_t m_t·clamp(
    logp − old_logp, ±20), log 1e−8, 20)) per sequence, (k, λ) = (k_pos, λ_pos) where A ≥ 0 else
    (k_neg, λ_neg)."""
    return -_vespo_weight(advantages, log_ratio_sum, p).detach() * advantages * logprobs


def _vespo_grad(ratio, advantages, logprobs, log_ratio_sum, p):
    return torch.zeros_like(ratio), -_vespo_weight(advantages, log_ratio_sum, p) * advantages


POLICY_REGISTRY: dict[str, PolicyLoss] = {entry.name: entry for entry in (
    PolicyLoss("grpo", "2402.03300", _ppo_clip, _ppo_clip_grad, "sequence_mean"),
    PolicyLoss("bnpo", "2506.02864", _ppo_clip, _ppo_clip_grad, "tokens"),
    PolicyLoss("dr_grpo", "2503.20783", _ppo_clip, _ppo_clip_grad, "max_length"),
    PolicyLoss("dapo", "2503.14476", _ppo_clip, _ppo_clip_grad, "num_items"),
    PolicyLoss("cispo", "2506.13585", _cispo, _cispo_grad, "num_items", clip_metric="cispo",
               kernel_id=1),
    PolicyLoss("sapo", "2511.20347", _sapo, _sapo_grad, "sequence_mean", clip_metric=None,
               kernel_id=2),
    PolicyLoss("luspo", "2602.05261", _ppo_clip, _ppo_clip_grad, "batch"),
    PolicyLoss("vespo", "2602.10693", _vespo, _vespo_grad, "num_items", clip_metric=None,
               rollout_in_sequence_weight=True, kernel_id=3),
    PolicyLoss("rloo", "2402.14740", _ppo_clip, _ppo_clip_grad, "sequence_mean",
               ratio="sequence_sum"),
)}

POLICY_NAMES = tuple(POLICY_REGISTRY)
POLICY_KERNEL_BRANCHES = 4  # ppo clip, cispo, sapo, vespo


def get_policy(name: str) -> PolicyLoss:
    """The policy-loss entry of ``name``; ValueError naming ``loss_type`` otherwise."""
    entry = POLICY_REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"loss_type must be one of {POLICY_NAMES}, got {name!r}")
    return entry


def policy_clip_flags(entry: PolicyLoss, ratio, advantages, p: PolicyParams):
    """(clipped low, clipped high) per element, as TRL 1.16 counts them: ppo: w < 1 − ε_low
    with A < 0, and min(w, δ) > 1 + ε_high with A > 0; cispo: w > ε_high with A > 0 (high only);
    none for the losses without a clip. The region is their union."""
    if entry.clip_metric is None:
        return torch.zeros_like(ratio, dtype=torch.bool), torch.zeros_like(ratio, dtype=torch.bool)
    if entry.clip_metric == "cispo":
        return torch.zeros_like(ratio, dtype=torch.bool), (ratio > p.epsilon_high) & (advantages > 0)
    c1 = ratio if p.delta is None else torch.clamp(ratio, max=p.delta)
    return (c1 < 1 - p.epsilon_low) & (advantages < 0), (c1 > 1 + p.epsilon_high) & (advantages > 0)


def policy_kernel_ids() -> dict[str, int]:
    """{name: policy-term branch}; asserts the branches 0..POLICY_KERNEL_BRANCHES-1 all occur."""
    ids = {name: entry.kernel_id for name, entry in POLICY_REGISTRY.items()}
    assert sorted(set(ids.values())) == list(range(POLICY_KERNEL_BRANCHES)), ids
    return ids

# The per-row reduction pieces every policy backend's forward returns ([B, len] in the
# accumulation dtype), from which the op forms the loss and the metrics: m = mask, em = the
# tokens the policy term acts on (mask, and the entropy mask), w = the ratio, kl = the KL term as
# it enters the loss (times w with the bias correction).
POLICY_ROW_STATS = (
    "tokens",  # Σ m
    "log_ratio",  # s_b: the row's masked mean of logp − old_logp (its sum for "sequence_sum")
    "log_ratio_clamped_sum",  # Σ m·clamp(logp − old_logp, ±20) (vespo's weight)
    "policy",  # Σ m·em·P
    "kl",  # Σ m·kl
    "clip_low",  # Σ m·[clipped low]
    "clip_high",  # Σ m·[clipped high]
    "clip_region",  # Σ m·[clipped low or high]
    "ratio",  # Σ m·w
    "entropy",  # Σ m·H
    "entropy_kept",  # Σ m·em·H
    "kept",  # Σ m·em
)
