"""RL from a reward: RLOO (REINFORCE with a leave-one-out baseline and a KL penalty in the reward)
and GRPO (group-normalised advantages, the KL term in the loss), with any policy loss of the
registry, optionally with Elastic Reset (``pyalign.refmodel.ElasticReset``).

Each step samples ``samples_per_prompt`` (k) completions for each of ``batch_size`` prompts
from the current policy and scores them with the reward function (the task's proxy reward by
default; a non-finite reward stops the run before the step is applied). ``adv_estimator``:

- ``rloo`` (TRL's RLOOTrainer): the reward of completion i is shaped as
  ``R_i = r_i - kl_coef * sum_t kl_t`` with ``kl_t = pyalign.kl_penalty(logp_t, ref_logp_t,
  estimator=k1|k3)``, and ``A_i = R_i - mean_{j != i} R_j`` over the k completions of a prompt;
- ``grpo`` (TRL's GRPOTrainer): ``A_i = (r_i - mean_group r) / (std + 1e-4)``, the std of the
  group, of the batch or none (``scale_rewards``), and ``kl_coef`` (TRL's ``beta``) weighs the
  KL term of ``pyalign.policy_loss``.

The loss is ``pyalign.policy_loss(..., loss_type)`` on the advantages: ``rloo`` (TRL's
RLOOTrainer loss) at ratio 1 has the gradient of ``-mean_i A_i * log pi(y_i | x_i)``; any policy
loss of the registry (grpo, dapo, cispo, ...) takes the same advantages. With ``num_iterations`` > 1
each batch of rollouts serves that many optimizer steps, PPO-style: the log-probs of the first
pass (before any update on the batch) are the old log-probs, and the later passes clip the ratio
to ``[1 - epsilon, 1 + epsilon_high]``. With ``kl_target`` set, the coefficient follows the
adaptive controller of Ziegler et al. (2019): ``coef *= 1 + clip(KL / target - 1, -0.2, 0.2) *
samples / kl_horizon``, with the KL averaged over all ranks so every rank keeps the same value.

With ``sampler_dtype`` set, a copy of the policy in that dtype (re-synced from the policy before
every step's rollouts, as vLLM's weights are) samples the completions, and its own log-probs of
them are the loss's ``rollout_logprobs``: the rollout correction of pyalign/losses/rollout.py
corrects the sampler/trainer mismatch (TRL's ``vllm_importance_sampling_*`` settings). Unset, the
policy samples itself: there is no mismatch and nothing is corrected.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional

import torch

import pyalign
from pyalign import losses
from pyalign.data.rewards import RewardError
from pyalign.ops.policy import check_rollout_options
from pyalign.trainers.distributed import micro_slices, split_evenly, unsharded
from pyalign.trainers.fields import Algorithm, setting
from pyalign.trainers.scoring import ResponseScorer, masked_sum
from pyalign.trainers.seeding import make_generator
from pyalign.trainers.trainer import Trainer, TrainerConfig, frozen

ELASTIC = ("elastic_reset", (True,))
SAMPLER_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLER = ("sampler_dtype", tuple(SAMPLER_DTYPES))
# The rollout correction's metrics: PolicyLossOutput's name -> TRL's (the masked fraction is
# verl's, under TRL's prefix); the min and max reduce as such, the others as unit-weighted means.
SAMPLING_METRICS = {
    "importance_sampling_ratio_mean": "sampling/importance_sampling_ratio/mean",
    "importance_sampling_ratio_min": "sampling/importance_sampling_ratio/min",
    "importance_sampling_ratio_max": "sampling/importance_sampling_ratio/max",
    "importance_sampling_masked_fraction": "sampling/importance_sampling_masked_fraction",
    "sampling_logp_difference_mean": "sampling/sampling_logp_difference/mean",
    "sampling_logp_difference_max": "sampling/sampling_logp_difference/max",
}

KL_ESTIMATORS = ("k1", "k3")
REWARDS = ("proxy", "gold")
ADV_ESTIMATORS = ("rloo", "grpo")
SCALE_REWARDS = ("group", "batch", "none")
GRPO_STD_EPSILON = 1e-4  # TRL's: advantages / (std + 1e-4)


@dataclasses.dataclass
class RLConfig(TrainerConfig):
    batch_size: int = setting(16, "prompts per optimizer step, over all ranks", bounds=">= 1")
    micro_batch_size: int = setting(16, "prompts per rollout and forward/backward chunk on one "
                                    "rank", bounds=">= 1")
    eval_every: int = setting(0, "evaluate on fresh prompts every N steps (0: never; the training "
                              "samples give reward and KL every step)", bounds=">= 0",
                              aliases=("eval_steps",))
    samples_per_prompt: int = setting(4, "completions sampled per prompt (the group; >= 2)",
                                      bounds=">= 2", aliases=("num_generations",))
    reward: str = setting("proxy", "the embedded task's reward to train on: its proxy reward "
                          "model, or the gold reward (set by --reward proxy|gold)", choices=REWARDS,
                          flag=False)
    adv_estimator: str = setting("rloo", "rloo: the leave-one-out baseline on the KL-shaped "
                                 "reward; grpo: the group mean, scaled by scale_rewards, with the "
                                 "KL term in the loss", choices=ADV_ESTIMATORS)
    scale_rewards: str = setting("group", "grpo: divide the advantages by the std of the group, "
                                 "of the batch, or not (none)", choices=SCALE_REWARDS,
                                 applies=("adv_estimator", ("grpo",)))
    kl_coef: float = setting(0.05, "the KL coefficient: of the penalty in the reward (rloo), of "
                             "the KL term of the loss (grpo)", bounds=">= 0", aliases=("beta",))
    kl_estimator: str = setting("k1", "the KL estimator (k1: log-ratio, k3: Schulman's)",
                                choices=KL_ESTIMATORS)
    loss_type: str = setting("rloo", "the policy loss (pyalign.policy_loss)",
                             choices=losses.POLICY_NAMES)
    num_iterations: int = setting(1, "optimizer steps per batch of rollouts (> 1: PPO-style "
                                  "clipping)", bounds=">= 1")
    epsilon: float = setting(0.2, "the clip range [1 - epsilon, 1 + epsilon_high] of the ratio",
                             bounds=">= 0")
    epsilon_high: Optional[float] = setting(None, "the upper clip (unset: epsilon; cispo: the cap "
                                            "of its IS weight)", bounds=">= 0")
    kl_target: Optional[float] = setting(None, "adaptive KL coefficient towards this KL (nats per "
                                         "response; unset: a fixed coefficient)", bounds="> 0")
    kl_horizon: int = setting(10000, "the adaptive controller's horizon, in samples", bounds=">= 1")
    elastic_reset: bool = setting(False, "Elastic Reset: an EMA of the policy, and periodic "
                                  "resets of the policy to it")
    er_ema_decay: float = setting(0.95, "Elastic Reset: the EMA's decay (the paper's 0.995 is for "
                                  "runs of thousands of steps)", applies=ELASTIC)
    er_reset_every: int = setting(25, "Elastic Reset: steps between resets", applies=ELASTIC)
    er_ema_every: int = setting(1, "Elastic Reset: steps between EMA updates", applies=ELASTIC)
    er_reset_optimizer: bool = setting(False, "Elastic Reset: reset AdamW's moments at each reset",
                                       applies=ELASTIC)
    sampler_dtype: Optional[str] = setting(None, "sample from a copy of the policy in this dtype "
                                           "(re-synced every step), whose log-probs of its "
                                           "samples feed the rollout correction: a sampler that "
                                           "differs from the trainer, as vLLM's does (unset: the "
                                           "policy samples itself, nothing to correct)",
                                           choices=tuple(SAMPLER_DTYPES))
    vllm_importance_sampling_correction: bool = setting(
        True, "weight the policy term by the importance ratio trainer/sampler", applies=SAMPLER)
    vllm_importance_sampling_mode: str = setting(
        "sequence_mask", "the importance ratio: per token or sequence, truncated to or masked "
        "outside [clip_min, clip_max]; geometric_reject: verl's geometric-mean rejection",
        choices=losses.ROLLOUT_MODES, applies=SAMPLER)
    vllm_importance_sampling_clip_max: Optional[float] = setting(
        3.0, "the importance ratio's upper bound (unset: none)", bounds="> 0", applies=SAMPLER)
    vllm_importance_sampling_clip_min: Optional[float] = setting(
        None, "its lower bound (unset: none; geometric_reject: 1 / clip_max)", bounds=">= 0",
        applies=SAMPLER)
    off_policy_mask_threshold: Optional[float] = setting(
        None, "drop the policy term of completions with A < 0 whose mean log-ratio sampler/policy "
        "exceeds this (DeepSeek-V3.2's off-policy sequence mask; unset: off)")

    def validate(self) -> None:
        super().validate()
        if self.loss_type == "cispo" and (self.epsilon if self.epsilon_high is None
                                          else self.epsilon_high) <= 0:
            raise ValueError("config key 'epsilon_high' must be > 0 for cispo (its IS-weight cap)")
        pyalign.refmodel.elastic_reset_settings(
            self.er_ema_decay, self.er_reset_every, self.er_ema_every,
            keys=("config key 'er_ema_decay'", "config key 'er_reset_every'",
                  "config key 'er_ema_every'"))
        if self.sampler_dtype is not None and self.fsdp:
            raise ValueError("config key 'sampler_dtype' takes a full copy of the policy: not with "
                             "fsdp (the policy sharded)")
        self.rollout_options()  # the rollout correction's checks (pyalign.policy_loss's)

    def rollout_options(self) -> dict:
        """pyalign.policy_loss's rollout-correction options of this run, checked."""
        options = {name: getattr(self, name) for name in (
            "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
            "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min",
            "off_policy_mask_threshold")}
        check_rollout_options(losses.get_policy(self.loss_type), self.sampler_dtype is not None,
                              **options)
        return options


class RLTrainer(Trainer):
    """RLOO with a KL penalty (and Elastic Reset); see RLConfig."""

    algo = "rloo"
    family = "rl"
    config_class = RLConfig
    config: RLConfig

    def __init__(self, task, config: RLConfig, *, reward_fn: Optional[Callable] = None, **kwargs):
        self.reward_fn = reward_fn
        super().__init__(task, config, **kwargs)
        if self.reward_fn is None:
            self.reward_fn = task.gold_reward if config.reward == "gold" else task.proxy_reward
        self.kl_coef = float(config.kl_coef)
        self.sampler = self.sampler_scorer = None
        if config.sampler_dtype is not None:
            self.sampler = frozen(copy.deepcopy(self.policy)).to(SAMPLER_DTYPES[config.sampler_dtype])
            self.sampler_scorer = self._wrap(ResponseScorer(
                self.sampler, fused_linear=config.fused_linear, backend=config.backend,
                temperature=config.temperature, padding_free=config.padding_free), trainable=False)

    def _score_temperature(self) -> float:
        # the policy's log-probs of its own samples, at the temperature they were drawn with
        return self.config.temperature

    def _make_strategy(self):
        cfg = self.config
        if cfg.elastic_reset:
            # the EMA resets to the initial model, which is also the KL reference: one copy
            return pyalign.refmodel.ElasticReset(self.policy, ema_decay=cfg.er_ema_decay,
                                                 reset_every=cfg.er_reset_every, ema_every=cfg.er_ema_every,
                                                 init=self.init_model, reset_optimizer=cfg.er_reset_optimizer,
                                                 backend=cfg.backend)
        return pyalign.refmodel.Frozen(self.ref_model)

    def _extra_state(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def _load_extra_state(self, state: dict) -> None:
        self.kl_coef = float(state["kl_coef"])

    def train_step(self, step: int) -> dict:
        cfg, task = self.config, self.task
        k = cfg.samples_per_prompt
        local = split_evenly(cfg.batch_size, self.dist.world_size, "batch_size")
        prompts = task.prompts(cfg.batch_size, make_generator(cfg.seed, "rl-prompts", step))
        offset = self.dist.rank * local
        slices = micro_slices(local, cfg.micro_batch_size)
        samples_per_rank = local * k
        if self.sampler is not None:  # the sampler gets the policy's weights, as vLLM's would
            pyalign.copy_(self.sampler, self.policy, backend=cfg.backend)
        rollouts = []
        for part in slices:
            chunk_prompts = prompts[offset + part.start: offset + part.stop].to(self.dist.device)
            chunk_index = (offset + part.start) // (part.stop - part.start)
            rollouts.append(self._rollout(step, chunk_index, chunk_prompts))
        self._check_rewards(rollouts, step)
        if cfg.adv_estimator == "grpo":
            self._grpo_advantages(rollouts)
        tokens_per_rank = float(sum(float(r["mask"].sum()) for r in rollouts))
        sums: dict[str, float] = {}
        sampling: dict[str, list] = {}
        for iteration in range(cfg.num_iterations):
            clip = 0.0
            for i, rollout in enumerate(rollouts):
                with self._accumulating(last=i == len(rollouts) - 1):
                    values = self._update(rollout, iteration, samples_per_rank, tokens_per_rank)
                clip += values.pop("clip_ratio")
                if iteration == 0:
                    for name, value in values.pop("sampling", {}).items():
                        sampling.setdefault(name, []).append(value)
                    for name, value in values.items():
                        sums[name] = sums.get(name, 0.0) + value
            grad_norm = self._optimizer_step(step)
        resets_before = getattr(self.ref_strategy, "num_resets", 0)
        self.ref_strategy.step(step, self.optimizer)  # True after an EMA update too
        reset = getattr(self.ref_strategy, "num_resets", 0) > resets_before
        counts = dict(loss="n", policy_loss="n", reward="n", proxy_reward="n", kl_penalty="n",
                      kl_to_init="n", entropy="tokens", tokens="n", advantage_abs="n")
        if cfg.num_iterations > 1:  # the clipped fraction of the last pass over the batch
            sums["clip_ratio"] = clip
            counts["clip_ratio"] = "n"
        if "gold_reward" in sums:
            counts["gold_reward"] = "n"
        record = self._reduce_means(sums, counts)
        record["response_length"] = record.pop("tokens")
        tokens = self.dist.all_reduce_sum(torch.tensor([sums["all_tokens"]], dtype=torch.float64))
        record.update(kl_coef=self.kl_coef, grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"],
                      _tokens=float(tokens))
        record.update(self._sampling_metrics(sampling))
        if cfg.elastic_reset:
            record["reset"] = reset
        if cfg.kl_target is not None:
            error = max(-0.2, min(0.2, record["kl_penalty"] / cfg.kl_target - 1.0))
            self.kl_coef *= 1.0 + error * (cfg.batch_size * k) / cfg.kl_horizon
        return record

    def _sampling_metrics(self, sampling: dict) -> dict:
        """The rollout correction's metrics of the step under TRL's names: over the micro-batches
        and ranks, min and max as such, the rest weighted by the units they counted."""
        if not sampling:
            return {}
        units = sum(count for _, count in sampling["importance_sampling_ratio_mean"])
        tokens = sum(count for _, count in sampling["sampling_logp_difference_mean"])
        sums = {name: sum(value * count for value, count in values) for name, values in sampling.items()
                if not name.endswith(("_min", "_max"))}
        totals = self.dist.all_reduce_sum(torch.tensor(
            [units, tokens, *sums.values()], dtype=torch.float64)).tolist()
        record = {}
        for (name, _), total in zip(sums.items(), totals[2:], strict=True):
            count = totals[1] if name.startswith("sampling_logp") else totals[0]
            record[SAMPLING_METRICS[name]] = total / max(count, 1.0)
        for name, reduce in (("importance_sampling_ratio_min", min),
                             ("importance_sampling_ratio_max", max),
                             ("sampling_logp_difference_max", max)):
            value = torch.tensor([float(reduce(v for v, _ in sampling[name]))], dtype=torch.float64)
            sign = -1.0 if reduce is min else 1.0
            record[SAMPLING_METRICS[name]] = sign * float(self.dist.all_reduce_max(sign * value)[0])
        return record

    def _check_rewards(self, rollouts: list, step: int) -> None:
        """RewardError on every rank when a reward of this step is not finite, before anything
        of the step is applied (a NaN would reach the weights, then the next step's sampling)."""
        rewards = torch.cat([rollout["rewards"] for rollout in rollouts])
        bad = rewards[~torch.isfinite(rewards)]
        flag = torch.tensor([float(bad.numel())], dtype=torch.float64, device=rewards.device)
        if not float(self.dist.all_reduce_sum(flag)[0]):
            return
        value = f"{float(bad[0])}" if bad.numel() else "a non-finite value (on another rank)"
        name = getattr(self.task, "reward_name", "the reward function")
        raise RewardError(f"{name} returned {value} for a completion of step {step}: the run stops "
                          f"before applying that step (its last checkpoint is unchanged)")

    def _grpo_advantages(self, rollouts: list) -> None:
        """GRPO's advantages (TRL's GRPOTrainer; docs/algorithms.md, "GRPO advantages"): each
        reward minus its group's mean, divided by the std (unbiased) of its group, of the whole
        batch over all ranks, or by nothing (``scale_rewards``), plus 1e-4."""
        k, scale = self.config.samples_per_prompt, self.config.scale_rewards
        rewards = torch.cat([rollout["rewards"] for rollout in rollouts]).double().view(-1, k)
        centred = rewards - rewards.mean(-1, keepdim=True)
        if scale == "group":
            centred = centred / (rewards.std(-1, keepdim=True) + GRPO_STD_EPSILON)
        elif scale == "batch":
            sums = self.dist.all_reduce_sum(torch.stack(
                [rewards.new_tensor(rewards.numel()), rewards.sum(), (rewards ** 2).sum()]))
            count, total, squares = sums.tolist()
            variance = (squares - total * total / count) / max(count - 1, 1)
            centred = centred / (max(variance, 0.0) ** 0.5 + GRPO_STD_EPSILON)
        advantages = centred.reshape(-1).to(torch.float32).split([r["rewards"].numel() for r in rollouts])
        for rollout, part in zip(rollouts, advantages, strict=True):
            rollout["advantages"] = part

    def _rollout(self, step: int, chunk_index: int, prompts: torch.Tensor) -> dict:
        """Sample k completions per prompt and score them (no gradient): what every pass over the
        batch reuses."""
        cfg, task = self.config, self.task
        # rows i*k .. i*k+k-1 share prompt i
        repeated = prompts.repeat_interleave(cfg.samples_per_prompt, dim=0)
        generator = make_generator(cfg.seed, "rollout", step, chunk_index)
        with torch.no_grad():
            if self.sampler is not None:
                responses = task.generate(self.sampler, repeated, temperature=cfg.temperature,
                                          generator=generator).to(self.dist.device)
            else:
                self.policy.eval()
                try:
                    with unsharded(self.scorer):
                        responses = task.generate(self.policy, repeated, temperature=cfg.temperature,
                                                  generator=generator).to(self.dist.device)
                finally:
                    self.policy.train()
            mask = self.response_mask(responses)
            # rewards take CPU tensors (the task API); the proxy and gold are logged whatever
            # reward the policy is trained on
            prompts_cpu, responses_cpu = repeated.cpu(), responses.cpu()
            rewards = self.reward_fn(prompts_cpu, responses_cpu).to(torch.float32).to(self.dist.device)
            proxy = getattr(task, "proxy_reward", None)
            if proxy is not None:  # the trained-on reward is not computed twice
                proxy = rewards.cpu() if proxy == self.reward_fn else proxy(prompts_cpu, responses_cpu)
            gold = task.gold_reward(prompts_cpu, responses_cpu) if hasattr(task, "gold_reward") else None
            ref_logprobs = self.ref_scorer(repeated, responses, mask)
            # the sampler's log-probs of its samples (vLLM returns them with the tokens)
            rollout_logprobs = (None if self.sampler_scorer is None else
                                self.sampler_scorer(repeated, responses, mask).float())
        return dict(prompts=prompts, repeated=repeated, responses=responses, mask=mask,
                    rewards=rewards, proxy=proxy, gold=gold, ref_logprobs=ref_logprobs,
                    rollout_logprobs=rollout_logprobs)

    def _update(self, rollout: dict, iteration: int, samples_per_rank: int,
                tokens_per_rank: float) -> dict:
        """One forward/backward of the policy loss on a micro-batch of rollouts. The first pass
        (iteration 0) shapes the rewards, takes the advantages and records the old log-probs."""
        cfg = self.config
        k = cfg.samples_per_prompt
        repeated, responses, mask = rollout["repeated"], rollout["responses"], rollout["mask"]
        logprobs, entropy = self.scorer(repeated, responses, mask, entropy=True)
        if iteration == 0:
            with torch.no_grad():
                ref_logprobs = rollout["ref_logprobs"]
                penalty = pyalign.kl_penalty(logprobs.detach(), ref_logprobs, estimator=cfg.kl_estimator,
                                             mask=mask, backend=cfg.backend).sum(-1)
                kl_to_init = (penalty if cfg.kl_estimator == "k3" else pyalign.kl_penalty(
                    logprobs.detach(), ref_logprobs, estimator="k3", mask=mask,
                    backend=cfg.backend).sum(-1))
                if cfg.adv_estimator == "rloo":  # the KL-shaped reward, leave-one-out baseline
                    shaped = (rollout["rewards"] - self.kl_coef * penalty).view(-1, k)
                    leave_one_out = (shaped.sum(-1, keepdim=True) - shaped) / (k - 1)
                    rollout["advantages"] = (shaped - leave_one_out).reshape(-1)
                else:  # grpo: the advantages of _grpo_advantages; the KL is in the loss
                    shaped = rollout["rewards"]
            rollout.update(penalty=penalty, kl_to_init=kl_to_init, shaped=shaped)
            if cfg.num_iterations > 1:
                rollout["old_logprobs"] = logprobs.detach()
        advantages = rollout["advantages"]
        kl_in_loss = cfg.adv_estimator == "grpo" and self.kl_coef > 0
        out = pyalign.policy_loss(
            logprobs, rollout.get("old_logprobs") if iteration > 0 else None, advantages, mask,
            loss_type=cfg.loss_type, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
            ref_logprobs=rollout["ref_logprobs"] if kl_in_loss else None,
            beta=self.kl_coef if kl_in_loss else 0.0, kl_estimator=cfg.kl_estimator,
            max_completion_length=responses.shape[1], num_items_in_batch=tokens_per_rank,
            rollout_logprobs=rollout["rollout_logprobs"], backend=cfg.backend,
            **cfg.rollout_options())
        rows = responses.shape[0]
        # policy_loss averages over this micro-batch (or divides by the rank's token count):
        # weight it by its share of the rank's samples
        share = 1.0 if losses.get_policy(cfg.loss_type).normalisation == "num_items" else \
            rows / samples_per_rank
        (out.loss * share).backward()
        values = {"clip_ratio": float(out.clip_ratio_region) * rows}
        if iteration > 0:
            return values
        shaped, penalty, kl_to_init = rollout["shaped"], rollout["penalty"], rollout["kl_to_init"]
        # the REINFORCE surrogate -A_i * log pi(y_i | x_i), whose gradient the loss has at ratio 1
        sequence = pyalign.sequence_logprobs(logprobs.detach(), mask)
        surrogate = -(advantages * sequence).sum()
        values.update({
            "loss": float(surrogate), "policy_loss": float(out.loss.detach()) * rows,
            "n": float(rows), "reward": float(shaped.sum()),
            "kl_penalty": float(penalty.double().sum()), "kl_to_init": float(kl_to_init.double().sum()),
            "entropy": masked_sum(entropy, mask), "tokens": float(mask.sum()),
            "advantage_abs": float(advantages.abs().sum()),
            "all_tokens": float(rows * (rollout["prompts"].shape[1] + responses.shape[1]))})
        if rollout["rollout_logprobs"] is not None and cfg.vllm_importance_sampling_correction:
            values["sampling"] = self._sampling_values(out, rows, float(mask.sum()))
        if rollout["proxy"] is not None:
            values["proxy_reward"] = float(rollout["proxy"].double().sum())
        if rollout["gold"] is not None:
            values["gold_reward"] = float(rollout["gold"].double().sum())
        return values


    def _sampling_values(self, out, rows: int, tokens: float) -> dict:
        """The micro-batch's rollout-correction metrics, each with the units it counted (the
        importance ratio's: tokens or rows, as its mode's level; the log-prob gap's: tokens)."""
        level = losses.ROLLOUT_CORRECTIONS[self.config.vllm_importance_sampling_mode].level
        units = tokens if level == "token" else float(rows)
        return {name: (float(getattr(out, name)), tokens if name.startswith("sampling_logp")
                       else units) for name in SAMPLING_METRICS}


# --algo presets. The embedded task's tuned values run about a minute on 2 CPU cores; on one's
# own model (--model) the defaults are TRL 1.16's: RLOOConfig for rloo and elastic-reset,
# GRPOConfig for grpo (learning_rate 1e-6, per_device_train_batch_size 8 completions,
# gradient_accumulation_steps 1, num_train_epochs 3, lr_scheduler_type "linear", max_grad_norm
# 1.0, temperature 1.0, epsilon 0.2, num_iterations 1, max_completion_length 512; RLOO:
# num_generations 2, beta 0.05 in the reward (k1); GRPO: num_generations 8, beta 0.0 in the loss
# (k3), loss_type "dapo", scale_rewards "group"), no evaluation. Elastic Reset on one's own
# model takes the paper's decay 0.995 and reset period 260.
EMBEDDED_STEPS = 60
TRL_DEFAULTS = dict(lr=1e-6, per_device_batch_size=8, gradient_accumulation_steps=1, num_epochs=3.0,
                    lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                    temperature=1.0, epsilon=0.2, num_iterations=1, max_completion_length=512,
                    eval_every=0, final_eval_batch_size=0)
TRL_RLOO = dict(TRL_DEFAULTS, samples_per_prompt=2, kl_coef=0.05, kl_estimator="k1", loss_type="rloo")
TRL_GRPO = dict(TRL_DEFAULTS, samples_per_prompt=8, kl_coef=0.0, kl_estimator="k3", loss_type="dapo",
                scale_rewards="group")
ELASTIC_RESET_PAPER = dict(er_ema_decay=0.995, er_reset_every=260)

ALGORITHMS = (
    Algorithm("rloo", RLTrainer, "RLOO: leave-one-out baseline, KL penalty in the reward",
              fixed={"adv_estimator": "rloo"}, tuned={"steps": EMBEDDED_STEPS}, trl=TRL_RLOO),
    Algorithm("grpo", RLTrainer, "GRPO: group-normalised advantages, KL term in the loss (any "
              "--loss-type)", fixed={"adv_estimator": "grpo"},
              defaults={"loss_type": "dapo", "kl_estimator": "k3"},
              tuned={"steps": EMBEDDED_STEPS}, trl=TRL_GRPO),
    Algorithm("elastic-reset", RLTrainer, "Elastic Reset on RLOO (or, with --adv-estimator grpo, "
              "on GRPO): an EMA of the policy and periodic resets", fixed={"elastic_reset": True},
              tuned={"steps": EMBEDDED_STEPS}, trl={**TRL_RLOO, **ELASTIC_RESET_PAPER}),
)
