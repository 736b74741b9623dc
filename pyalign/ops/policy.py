"""policy_loss: the policy-gradient losses of TRL 1.16's GRPOTrainer (``loss_type`` grpo, bnpo,
dr_grpo, dapo, cispo, sapo, luspo, vespo) and RLOOTrainer (rloo), from per-token log-probs.

Per token, with the ratio w (token or sequence level), the registry's policy term P(w, A)
(pyalign/losses.py, "policy losses"), an optional KL term β·kl (times w with the bias correction,
TRL's default), an entropy mask (top_entropy_quantile) on P and an entropy bonus:

    loss = Σ_b Σ_t weight_b·m_bt·(em_bt·P_bt + β·kl_bt) − entropy_coef·Σ m·em·H / max(Σ m·em, 1)

weight_b from the loss's normalisation (losses.POLICY_NORMALISATIONS). The metrics are the
masked means TRL logs, detached. Gradients flow to ``logprobs`` (and ``entropy`` when
entropy_coef != 0); none to old_logprobs, ref_logprobs or advantages. Family "policy" of
pyalign/backends.py; the formulas are in docs/algorithms.md ("Policy-gradient losses"). The
loss is the sum of per-row losses with batch-global weights (loss_weights), which is what lets
linear_policy_loss (pyalign/ops/linear_policy.py) compute it chunk by chunk from hidden states.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from pyalign import backends, losses
from pyalign._utils import accumulation_dtype
from pyalign.ops import _checks

_STAT = {name: index for index, name in enumerate(losses.POLICY_ROW_STATS)}


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # the scalar to backpropagate
    policy_loss: torch.Tensor  # the loss without the entropy bonus (TRL's "policy_loss"), detached
    clip_ratio_low: torch.Tensor  # TRL's clip_ratio/low_mean (the PPO-clip losses; 0 otherwise)
    clip_ratio_high: torch.Tensor  # clip_ratio/high_mean (cispo: cispo_clip_ratio)
    clip_ratio_region: torch.Tensor  # clip_ratio/region_mean
    mean_kl: torch.Tensor  # masked mean of the KL term (NaN without ref_logprobs)
    mean_entropy: torch.Tensor  # masked mean entropy (NaN without entropy)
    mean_ratio: torch.Tensor  # masked mean of the importance ratio w
    # the rollout correction (rollout_logprobs; NaN without it), TRL's sampling/... metrics:
    importance_sampling_ratio_mean: torch.Tensor  # importance_sampling_ratio/mean of ρ
    importance_sampling_ratio_min: torch.Tensor  # .../min
    importance_sampling_ratio_max: torch.Tensor  # .../max
    importance_sampling_masked_fraction: torch.Tensor  # the units ρ's bounds set to 0 (verl's)
    sampling_logp_difference_mean: torch.Tensor  # mean |old_logp − rollout_logp| (kept tokens)
    sampling_logp_difference_max: torch.Tensor  # its max


@torch.library.custom_op("pyalign::policy_loss_fwd", mutates_args=())
def _policy_fwd(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, entropy_mask: Optional[torch.Tensor],
                ref_logprobs: Optional[torch.Tensor], entropy: Optional[torch.Tensor],
                policy_weights: Optional[torch.Tensor], sampler_log_weights: Optional[torch.Tensor],
                loss: str, level: str, params: list[float], beta: float, kl_estimator: str,
                bias_correction: bool, backend: str) -> torch.Tensor:
    impl = backends.implementation("policy", backend, logprobs, old_logprobs, ref_logprobs)
    return impl.forward(logprobs, old_logprobs, advantages, mask, entropy_mask, ref_logprobs,
                        entropy, policy_weights, sampler_log_weights, loss, level, params, beta,
                        kl_estimator, bias_correction)


@_policy_fwd.register_fake
def _(logprobs, old_logprobs, advantages, mask, entropy_mask, ref_logprobs, entropy,
      policy_weights, sampler_log_weights, loss, level, params, beta, kl_estimator,
      bias_correction, backend):
    acc = accumulation_dtype(logprobs, old_logprobs, ref_logprobs)
    return logprobs.new_empty((logprobs.shape[0], len(losses.POLICY_ROW_STATS)), dtype=acc)


@torch.library.custom_op("pyalign::policy_loss_bwd", mutates_args=())
def _policy_bwd(row_weights: torch.Tensor, entropy_weights: Optional[torch.Tensor],
                logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, entropy_mask: Optional[torch.Tensor],
                ref_logprobs: Optional[torch.Tensor], entropy: Optional[torch.Tensor],
                policy_weights: Optional[torch.Tensor], sampler_log_weights: Optional[torch.Tensor],
                loss: str, level: str, params: list[float], beta: float, kl_estimator: str,
                bias_correction: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = backends.implementation("policy", backend, logprobs, old_logprobs, ref_logprobs)
    grad, grad_entropy = impl.backward(row_weights, entropy_weights, logprobs, old_logprobs,
                                       advantages, mask, entropy_mask, ref_logprobs, entropy,
                                       policy_weights, sampler_log_weights, loss, level, params,
                                       beta, kl_estimator, bias_correction)
    return grad, (logprobs.new_empty(0) if grad_entropy is None else grad_entropy)


@_policy_bwd.register_fake
def _(row_weights, entropy_weights, logprobs, old_logprobs, advantages, mask, entropy_mask,
      ref_logprobs, entropy, policy_weights, sampler_log_weights, loss, level, params, beta,
      kl_estimator, bias_correction, backend):
    with_entropy = entropy is not None and entropy_weights is not None
    return (torch.empty_like(logprobs),
            torch.empty_like(entropy) if with_entropy else logprobs.new_empty(0))


def _row_weights(tokens, normalisation, max_completion_length, num_items_in_batch):
    """The weight of one kept token of each row (losses.POLICY_NORMALISATIONS), from the rows'
    kept-token counts ``tokens`` [B]."""
    rows = max(tokens.shape[0], 1)
    if normalisation == "sequence_mean":
        return 1.0 / (rows * tokens.clamp(min=1))
    if normalisation == "tokens":
        return (1.0 / tokens.sum().clamp(min=1)).expand_as(tokens)
    if normalisation == "max_length":
        return torch.full_like(tokens, 1.0 / (rows * max_completion_length))
    if normalisation == "num_items":
        count = tokens.sum() if num_items_in_batch is None else torch.as_tensor(
            num_items_in_batch, dtype=tokens.dtype, device=tokens.device)
        return (1.0 / count.clamp(min=1)).expand_as(tokens)
    return torch.full_like(tokens, 1.0 / rows)  # "batch"


def loss_weights(mask, entropy_mask, normalisation, max_completion_length, num_items_in_batch,
                 entropy_coef, dtype):
    """(row_weights [B], entropy_weight []): ∂loss/∂(a row's Σ m·em·P + β·Σ m·kl) and
    ∂loss/∂(Σ m·em·H), from the whole batch's mask. Both are batch-global (the batch's row and
    token counts), so with them a row's loss is a complete contribution: the loss is the sum of
    the rows' losses however the rows are split (linear_policy_loss's chunks)."""
    tokens = mask.sum(-1, dtype=dtype)
    row_weights = _row_weights(tokens, normalisation, max_completion_length, num_items_in_batch)
    if entropy_coef == 0:
        return row_weights, tokens.new_zeros(())
    kept = tokens.sum() if entropy_mask is None else (mask & entropy_mask).sum(dtype=dtype)
    return row_weights, -entropy_coef / kept.clamp(min=1)


class PolicyLossFunction(torch.autograd.Function):
    """(logprobs, entropy, ..., row_weights, entropy_weight, config) -> (per-row losses [B],
    row stats); the loss is the sum of the per-row losses (loss_weights). ``corrections``: the
    rollout correction's (policy_weights, sampler_log_weights) (losses.rollout_terms)."""

    @staticmethod
    def forward(ctx, logprobs, entropy, old_logprobs, advantages, mask, entropy_mask, ref_logprobs,
                corrections, row_weights, entropy_weight, config):
        loss, level, params, beta, estimator, bias, entropy_coef, backend = config
        stats = _policy_fwd(logprobs, old_logprobs, advantages, mask, entropy_mask, ref_logprobs,
                            entropy, *corrections, loss, level, params, beta, estimator, bias,
                            backend)
        row_losses = row_weights * (stats[:, _STAT["policy"]] + beta * stats[:, _STAT["kl"]])
        if entropy_coef != 0:
            row_losses = row_losses + entropy_weight * stats[:, _STAT["entropy_kept"]]
        ctx.save_for_backward(logprobs, entropy, old_logprobs, advantages, mask, entropy_mask,
                              ref_logprobs, *corrections, row_weights, entropy_weight)
        ctx.config = config
        ctx.mark_non_differentiable(stats)
        return row_losses, stats

    @staticmethod
    def backward(ctx, grad_row_losses, _grad_stats):
        (logprobs, entropy, old_logprobs, advantages, mask, entropy_mask, ref_logprobs,
         policy_weights, sampler_log_weights, row_weights, entropy_weight) = ctx.saved_tensors
        loss, level, params, beta, estimator, bias, entropy_coef, backend = ctx.config
        grad_row_losses = grad_row_losses.to(row_weights.dtype)
        entropy_weights = None
        if entropy_coef != 0 and entropy is not None:
            entropy_weights = (entropy_weight * grad_row_losses).contiguous()
        grad, grad_entropy = _policy_bwd((row_weights * grad_row_losses).contiguous(),
                                         entropy_weights, logprobs, old_logprobs, advantages,
                                         mask, entropy_mask, ref_logprobs, entropy, policy_weights,
                                         sampler_log_weights, loss, level, params, beta, estimator,
                                         bias, backend)
        grad_entropy = grad_entropy if entropy_weights is not None else None
        return grad, grad_entropy, *([None] * 9)


def _check_per_token(name, tensor, shape):
    _checks.check_tensor(name, tensor, floating=True)
    _checks.check_shape(name, tensor, shape, "logprobs.shape")


def _entropy_mask(entropy, mask, top_entropy_quantile):
    """TRL's high-entropy mask: kept tokens whose entropy is at least the (1 − q) quantile of the
    kept tokens' entropies (torch.quantile's linear interpolation); none when no token is kept.
    Written with a sort and gathers (no boolean indexing), so torch.compile keeps one graph."""
    work_dtype = accumulation_dtype(entropy)
    values = torch.where(mask, entropy.detach().to(work_dtype), math.inf).reshape(-1)
    ordered = values.sort().values  # the kept values first
    count = mask.sum().to(work_dtype)
    position = ((1.0 - top_entropy_quantile) * (count - 1)).clamp(min=0)
    below = position.floor()
    above = torch.minimum(below + 1, (count - 1).clamp(min=0))
    low_value = ordered.gather(0, below.long().reshape(1))
    high_value = ordered.gather(0, above.long().reshape(1))
    threshold = torch.lerp(low_value, high_value, (position - below).reshape(1))
    return mask & (entropy.detach().to(work_dtype) >= threshold)


def _metrics(entry, level, stats, advantages, params, has_kl, has_entropy):
    """The detached metrics, as TRL logs them: masked means over the kept tokens; the clip
    fractions and the mean ratio over the rows when the ratio is one per sequence (and the
    advantages one per row)."""
    tokens = stats[:, _STAT["tokens"]].sum().clamp(min=1)
    nan = torch.full((), math.nan, dtype=stats.dtype, device=stats.device)
    mean_kl = stats[:, _STAT["kl"]].sum() / tokens if has_kl else nan
    mean_entropy = stats[:, _STAT["entropy"]].sum() / tokens if has_entropy else nan
    if level == "token" or advantages.dim() == 2:
        low, high, region = (stats[:, _STAT[name]].sum() / tokens
                             for name in ("clip_low", "clip_high", "clip_region"))
        mean_ratio = stats[:, _STAT["ratio"]].sum() / tokens
    else:
        rows = max(stats.shape[0], 1)
        ratio = torch.exp(stats[:, _STAT["log_ratio"]])
        low_flags, high_flags = losses.policy_clip_flags(
            entry, ratio, advantages.to(stats.dtype), params)
        low, high, region = (flags.to(stats.dtype).sum() / rows
                             for flags in (low_flags, high_flags, low_flags | high_flags))
        mean_ratio = ratio.sum() / rows
    return low, high, region, mean_kl, mean_entropy, mean_ratio


def policy_loss(logprobs: torch.Tensor, old_logprobs: Optional[torch.Tensor],
                advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "grpo",
                ref_logprobs: Optional[torch.Tensor] = None,
                rollout_logprobs: Optional[torch.Tensor] = None,
                vllm_importance_sampling_correction: bool = True,
                vllm_importance_sampling_mode: str = "sequence_mask",
                vllm_importance_sampling_clip_max: Optional[float] = 3.0,
                vllm_importance_sampling_clip_min: Optional[float] = None,
                off_policy_mask_threshold: Optional[float] = None, beta: float = 0.0,
                kl_estimator: str = "k3", use_bias_correction_kl: bool = True,
                epsilon: float = 0.2, epsilon_high: Optional[float] = None,
                delta: Optional[float] = None, importance_sampling_level: Optional[str] = None,
                sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
                entropy: Optional[torch.Tensor] = None, entropy_coef: float = 0.0,
                top_entropy_quantile: float = 1.0, max_completion_length: Optional[int] = None,
                num_items_in_batch=None, backend: str = "auto") -> PolicyLossOutput:
    """The policy-gradient loss ``loss_type`` and its metrics (a PolicyLossOutput).

    ``logprobs`` [B, T]: the policy's log-probs of the sampled tokens (differentiable);
    ``old_logprobs`` [B, T] or None (num_iterations == 1: logprobs.detach(), ratio 1);
    ``advantages`` [B] or [B, T]; ``mask`` [B, T] bool, or 0/1 in any dtype (a completion token;
    other values are refused, named). Masked positions are inert whatever they hold.

    Options (TRL 1.16's GRPOConfig names and defaults, except loss_type): ``epsilon`` /
    ``epsilon_high`` (None: epsilon) the clip range [1 − ε, 1 + ε_high] (cispo: ε_high is the cap of
    the IS weight); ``delta`` (> 1) the two-sided clip of the PPO-clip losses;
    ``importance_sampling_level`` "token" (default) or "sequence" (GSPO; rloo's ratio is always
    the sequence sum, the option does not apply); ``ref_logprobs`` and ``beta`` the KL term with
    ``kl_estimator`` (TRL: k3) and ``use_bias_correction_kl`` (TRL's default True: the KL term times
    w); ``entropy`` [B, T] the per-token entropies, for ``top_entropy_quantile`` < 1 (the policy term
    only on the kept tokens of highest entropy) and the bonus ``entropy_coef``;
    ``max_completion_length`` the constant of dr_grpo (required there);
    ``num_items_in_batch`` the active-token count dapo/cispo/vespo divide by (default: this
    batch's; TRL uses num_items_in_batch · gradient_accumulation_steps / (num_processes ·
    steps_per_generation)). Gradient accumulation scaling is the caller's.

    Rollout correction (pyalign/losses/rollout.py; TRL's names and defaults): ``rollout_logprobs``
    [B, T] the sampler's log-probs of the sampled tokens (vLLM's, a bf16 generate's; NaN where it
    did not score one), None when the old policy sampled. With it and
    ``vllm_importance_sampling_correction`` (True) the policy term is weighted by ρ, the importance
    weight old/sampler of ``vllm_importance_sampling_mode`` (token_truncate, token_mask,
    sequence_truncate, sequence_mask (default), geometric_reject) bounded by
    ``vllm_importance_sampling_clip_min`` / ``..._clip_max`` (None: unbounded; 3.0); vespo takes ρ
    into its sequence weight (token modes only). ``off_policy_mask_threshold`` (None: off) drops
    the policy term of the rows with A < 0 whose mean of rollout_logp − logp (old_logp without
    rollout_logprobs) exceeds it. Metrics: ``importance_sampling_ratio_*``,
    ``importance_sampling_masked_fraction``, ``sampling_logp_difference_*``.
    """
    _checks.check_tensor("logprobs", logprobs, floating=True)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be 2-D [B, T], got shape {tuple(logprobs.shape)}")
    shape = tuple(logprobs.shape)
    if old_logprobs is not None:
        _check_per_token("old_logprobs", old_logprobs, shape)
    _checks.check_tensor("advantages", advantages, floating=True)
    check_advantages(advantages, shape)
    mask = _checks.check_mask("mask", mask)
    _checks.check_shape("mask", mask, shape, "logprobs.shape")
    if ref_logprobs is not None:
        _check_per_token("ref_logprobs", ref_logprobs, shape)
    if entropy is not None:
        _check_per_token("entropy", entropy, shape)
    if rollout_logprobs is not None:
        _check_per_token("rollout_logprobs", rollout_logprobs, shape)
    _checks.check_same_device(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
                              mask=mask, ref_logprobs=ref_logprobs, entropy=entropy,
                              rollout_logprobs=rollout_logprobs)
    options = check_options(
        ref_logprobs is not None, entropy is not None, rollout_logprobs is not None,
        vllm_importance_sampling_correction=vllm_importance_sampling_correction,
        vllm_importance_sampling_mode=vllm_importance_sampling_mode,
        vllm_importance_sampling_clip_max=vllm_importance_sampling_clip_max,
        vllm_importance_sampling_clip_min=vllm_importance_sampling_clip_min,
        off_policy_mask_threshold=off_policy_mask_threshold, loss_type=loss_type, beta=beta,
        kl_estimator=kl_estimator, use_bias_correction_kl=use_bias_correction_kl, epsilon=epsilon,
        epsilon_high=epsilon_high, delta=delta, importance_sampling_level=importance_sampling_level,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg, entropy_coef=entropy_coef,
        top_entropy_quantile=top_entropy_quantile, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch)
    backends.check_name(backend)

    mask = mask.to(torch.bool).contiguous()
    entropy_mask = (_entropy_mask(entropy, mask, options.top_entropy_quantile)
                    if options.top_entropy_quantile < 1 else None)
    logprobs = logprobs.contiguous()
    old = logprobs.detach() if old_logprobs is None else old_logprobs.detach().contiguous()
    ref = None if ref_logprobs is None else ref_logprobs.detach().contiguous()
    advantages = advantages.detach().contiguous()
    if entropy is not None:
        entropy = entropy.contiguous()
    row_weights, entropy_weight = options.weights(mask, entropy_mask,
                                                  accumulation_dtype(logprobs, old, ref))
    rollout = None if rollout_logprobs is None else rollout_logprobs.detach()
    *corrections, rollout_stats = options.corrections(logprobs.detach(), old, rollout, advantages,
                                                      mask)
    row_losses, stats = PolicyLossFunction.apply(logprobs, entropy, old, advantages, mask,
                                                 entropy_mask, ref, tuple(corrections),
                                                 row_weights, entropy_weight,
                                                 options.config(backend))
    return options.output(row_losses.sum(), row_weights, stats, advantages, ref is not None,
                          entropy is not None, rollout_stats)


def check_advantages(advantages, shape):
    """advantages: one per sequence [B] or one per token [B, T] (``shape``)."""
    if tuple(advantages.shape) not in ((shape[0],), shape):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({shape[0]},) "
                         f"or {shape} (one per sequence or one per token)")


class PolicyOptions(NamedTuple):
    """policy_loss's scalar options, checked (check_options), and what derives from them."""
    entry: losses.PolicyLoss
    level: str
    params: losses.PolicyParams
    beta: float
    kl_estimator: str
    bias_correction: bool
    entropy_coef: float
    top_entropy_quantile: float
    max_completion_length: Optional[int]
    num_items_in_batch: Optional[float]
    rollout: losses.RolloutOptions

    def config(self, backend):
        """PolicyLossFunction's config."""
        return (self.entry.name, self.level, self.params.as_list(), self.beta, self.kl_estimator,
                self.bias_correction, self.entropy_coef, backend)

    def weights(self, mask, entropy_mask, dtype):
        return loss_weights(mask, entropy_mask, self.entry.normalisation,
                            self.max_completion_length, self.num_items_in_batch,
                            self.entropy_coef, dtype)

    def corrections(self, logprobs, old, rollout, advantages, mask):
        """(policy_weights, sampler_log_weights, rollout row stats) of a batch's rows
        (losses.rollout_terms): the backends' inputs and the rollout metrics' pieces."""
        return losses.rollout_terms(self.rollout, self.entry.rollout_in_sequence_weight,
                                    logprobs, old, rollout, advantages, mask)

    def output(self, loss, row_weights, stats, advantages, has_kl, has_entropy, rollout_stats):
        """The PolicyLossOutput of the loss, from the whole batch's row stats."""
        stats = stats.detach()
        policy_only = (row_weights * (stats[:, _STAT["policy"]]
                                      + self.beta * stats[:, _STAT["kl"]])).sum()
        metrics = _metrics(self.entry, self.level, stats, advantages, self.params, has_kl,
                           has_entropy)
        return PolicyLossOutput(loss, policy_only, *metrics,
                                *losses.rollout_metrics(rollout_stats, stats))


def check_options(has_ref: bool, has_entropy: bool, has_rollout: bool, *,
                  ref_name="ref_logprobs", loss_type, beta, kl_estimator, use_bias_correction_kl,
                  epsilon, epsilon_high, delta, importance_sampling_level, sapo_temperature_pos,
                  sapo_temperature_neg, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
                  vespo_lambda_neg, entropy_coef, top_entropy_quantile, max_completion_length,
                  num_items_in_batch, **rollout) -> PolicyOptions:
    """policy_loss's scalar options (its signature holds their defaults), checked; ``has_ref``,
    ``has_entropy``, ``has_rollout``: whether the reference log-probs (the caller's argument
    ``ref_name``), the entropies and the sampler's log-probs are there; ``rollout``: the rollout
    correction's options (check_rollout_options)."""
    entry = losses.get_policy(loss_type)
    rollout = check_rollout_options(entry, has_rollout, **rollout)
    beta = _checks.check_finite_range("beta", beta, low=0.0, what="a finite number >= 0")
    if beta > 0 and not has_ref:
        raise ValueError(f"beta > 0 needs {ref_name} (the KL term's reference log-probs)")
    _checks.check_choice("kl_estimator", kl_estimator, tuple(losses.KL_ESTIMATOR_IDS))
    bias = _checks.check_bool("use_bias_correction_kl", use_bias_correction_kl)
    epsilon = _checks.check_finite_range("epsilon", epsilon, low=0.0, what="a finite number >= 0")
    epsilon_high = epsilon if epsilon_high is None else _checks.check_finite_range(
        "epsilon_high", epsilon_high, low=0.0, what="a finite number >= 0 (or None: epsilon)")
    if entry.clip_metric == "cispo" and epsilon_high <= 0:
        raise ValueError(f"cispo caps the IS weight at epsilon_high, which must be > 0, got {epsilon_high}")
    if delta is not None:
        delta = _checks.check_finite_range("delta", delta, low=1.0, low_inclusive=False,
                                           what="a finite number > 1 (or None)")
        if entry.clip_metric != "ppo":
            raise ValueError(f"delta (the two-sided clip) applies to the PPO-clip losses, not "
                             f"{loss_type!r}")
    if entry.ratio == "sequence_sum":
        if importance_sampling_level is not None:
            raise ValueError("importance_sampling_level does not apply to rloo: its ratio is "
                             "always exp(sum of the sequence's log-ratios)")
        level = "sequence_sum"
    else:
        level = "token" if importance_sampling_level is None else _checks.check_choice(
            "importance_sampling_level", importance_sampling_level, losses.POLICY_RATIO_LEVELS)
    for name, value in (("sapo_temperature_pos", sapo_temperature_pos),
                        ("sapo_temperature_neg", sapo_temperature_neg)):
        _checks.check_positive(name, value)
    for name, value in (("vespo_k_pos", vespo_k_pos), ("vespo_lambda_pos", vespo_lambda_pos),
                        ("vespo_k_neg", vespo_k_neg), ("vespo_lambda_neg", vespo_lambda_neg)):
        _checks.check_finite_range(name, value)
    entropy_coef = _checks.check_finite_range("entropy_coef", entropy_coef)
    top_entropy_quantile = _checks.check_finite_range(
        "top_entropy_quantile", top_entropy_quantile, low=0.0, high=1.0, low_inclusive=False)
    if (entropy_coef != 0 or top_entropy_quantile < 1) and not has_entropy:
        raise ValueError("entropy_coef != 0 and top_entropy_quantile < 1 need entropy (the "
                         "per-token entropies, e.g. pyalign.token_logprobs(..., entropy=True))")
    if max_completion_length is not None:
        max_completion_length = _checks.check_int("max_completion_length", max_completion_length,
                                                  minimum=1, what=">= 1 (an int)")
    if entry.normalisation == "max_length" and max_completion_length is None:
        raise ValueError(f"{loss_type} divides by B * max_completion_length: pass "
                         "max_completion_length (TRL's GRPOConfig value)")
    if num_items_in_batch is not None:
        num_items_in_batch = _checks.check_finite_range("num_items_in_batch", num_items_in_batch,
                                                        low=0.0, what="a finite number >= 0")
    params = losses.PolicyParams(epsilon, epsilon_high, delta, float(sapo_temperature_pos),
                                   float(sapo_temperature_neg), float(vespo_k_pos),
                                   float(vespo_lambda_pos), float(vespo_k_neg),
                                   float(vespo_lambda_neg))
    return PolicyOptions(entry, level, params, beta, kl_estimator, bias, entropy_coef,
                         top_entropy_quantile, max_completion_length, num_items_in_batch, rollout)


def check_rollout_options(entry, has_rollout, *, vllm_importance_sampling_correction,
                          vllm_importance_sampling_mode, vllm_importance_sampling_clip_max,
                          vllm_importance_sampling_clip_min,
                          off_policy_mask_threshold) -> losses.RolloutOptions:
    """The rollout correction's options (TRL 1.16's GRPOConfig checks), as losses.RolloutOptions."""
    correction = _checks.check_bool("vllm_importance_sampling_correction",
                                    vllm_importance_sampling_correction)
    mode = _checks.check_choice("vllm_importance_sampling_mode", vllm_importance_sampling_mode,
                                losses.ROLLOUT_MODES)
    low = None if vllm_importance_sampling_clip_min is None else _checks.check_finite_range(
        "vllm_importance_sampling_clip_min", vllm_importance_sampling_clip_min, low=0.0,
        what="a finite number >= 0 (or None: no lower bound)")
    high = None if vllm_importance_sampling_clip_max is None else _checks.check_finite_range(
        "vllm_importance_sampling_clip_max", vllm_importance_sampling_clip_max, low=0.0,
        low_inclusive=False, what="a finite number > 0 (or None: no upper bound)")
    if low is not None and high is not None and low >= high:
        raise ValueError(f"vllm_importance_sampling_clip_min ({low}) must be less than "
                         f"vllm_importance_sampling_clip_max ({high})")
    if (correction and low is None and high is None
            and losses.ROLLOUT_CORRECTIONS[mode].bounds != "mask"):
        raise ValueError(f"vllm_importance_sampling_mode {mode!r} needs "
                         "vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max")
    if off_policy_mask_threshold is not None:
        off_policy_mask_threshold = _checks.check_finite_range(
            "off_policy_mask_threshold", off_policy_mask_threshold,
            what="a finite number (or None: no off-policy mask)")
    level = losses.ROLLOUT_CORRECTIONS[mode].level
    if entry.rollout_in_sequence_weight and has_rollout and correction and level != "token":
        raise ValueError(f"{entry.name} takes the importance weight into its sequence weight per "
                         f"token: vllm_importance_sampling_mode must be token_truncate or "
                         f"token_mask, got {mode!r}")
    return losses.RolloutOptions(correction, mode, low, high, off_policy_mask_threshold)
