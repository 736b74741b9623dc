"""RL from a reward: REINFORCE with a leave-one-out baseline (RLOO) and a per-token KL penalty
to the initial model, optionally with Elastic Reset (``pyalign.refmodel.ElasticReset``).

Each step samples ``samples_per_prompt`` (k) completions for each of ``batch_size`` prompts
from the current policy, scores them with the reward function (the task's proxy reward by
default), and shapes the reward of completion i as ``R_i = r_i - kl_coef * sum_t kl_t`` with
``kl_t = pyalign.kl_penalty(logp_t, ref_logp_t, estimator=k1|k3)``. The advantage is
``A_i = R_i - mean_{j != i} R_j`` over the k completions of the same prompt, and the loss is
``pyalign.policy_loss(..., loss_type)`` on it: by default ``rloo`` (TRL's RLOOTrainer loss), which at
ratio 1 has the gradient of ``-mean_i A_i * log pi(y_i | x_i)``; any policy loss of the registry
(``loss_type``: grpo, dapo, cispo, ...) takes the same advantages. With ``num_iterations`` > 1
each batch of rollouts serves that many optimizer steps, PPO-style: the log-probs of the first
pass (before any update on the batch) are the old log-probs, and the later passes clip the ratio
to ``[1 - epsilon, 1 + epsilon_high]``. With ``kl_target`` set, the coefficient follows the
adaptive controller of Ziegler et al. (2019): ``coef *= 1 + clip(KL / target - 1, -0.2, 0.2) *
samples / kl_horizon``, with the KL averaged over all ranks so every rank keeps the same value.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

import pyalign
from pyalign import losses
from pyalign.trainers.distributed import micro_slices, split_evenly
from pyalign.trainers.scoring import masked_sum
from pyalign.trainers.trainer import Trainer, TrainerConfig, check_range, make_generator

KL_ESTIMATORS = ("k1", "k3")
REWARDS = ("proxy", "gold")


@dataclasses.dataclass
class RLConfig(TrainerConfig):
    batch_size: int = 16  # prompts per optimizer step (all ranks)
    micro_batch_size: int = 16  # prompts per rollout + forward/backward chunk on one rank
    eval_every: int = 0  # the training samples already give reward and KL every step
    samples_per_prompt: int = 4  # k of RLOO (>= 2)
    reward: str = "proxy"  # the task's "proxy" reward model, or the "gold" reward
    kl_coef: float = 0.05  # initial KL penalty coefficient
    kl_estimator: str = "k1"
    loss_type: str = "rloo"  # a policy loss of the registry (pyalign.losses.POLICY_NAMES)
    num_iterations: int = 1  # optimizer steps per batch of rollouts (> 1: PPO-style clipping)
    epsilon: float = 0.2  # the clip range [1 - epsilon, 1 + epsilon_high] of the ratio
    epsilon_high: Optional[float] = None  # None: epsilon (cispo: the cap of its IS weight)
    kl_target: Optional[float] = None  # adaptive coefficient when set (nats per response)
    kl_horizon: int = 10000  # adaptive controller horizon, in samples
    elastic_reset: bool = False
    er_ema_decay: float = 0.95  # the paper's 0.995 is for runs of thousands of steps
    er_reset_every: int = 25
    er_ema_every: int = 1
    er_reset_optimizer: bool = False

    def validate(self) -> None:
        super().validate()
        check_range(self, "samples_per_prompt", ">= 2 (the leave-one-out baseline needs two)",
                    lambda v: v >= 2)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"config key 'kl_estimator' must be one of {KL_ESTIMATORS}, "
                             f"got {self.kl_estimator!r}")
        if self.loss_type not in losses.POLICY_NAMES:
            raise ValueError(f"config key 'loss_type' must be one of {losses.POLICY_NAMES}, "
                             f"got {self.loss_type!r}")
        check_range(self, "num_iterations", ">= 1", lambda v: v >= 1)
        check_range(self, "epsilon", ">= 0", lambda v: v >= 0)
        if self.epsilon_high is not None:
            check_range(self, "epsilon_high", ">= 0 (or unset: epsilon)", lambda v: v >= 0)
        if self.loss_type == "cispo" and (self.epsilon if self.epsilon_high is None
                                          else self.epsilon_high) <= 0:
            raise ValueError("config key 'epsilon_high' must be > 0 for cispo (its IS-weight cap)")
        if self.reward not in REWARDS:
            raise ValueError(f"config key 'reward' must be one of {REWARDS}, got {self.reward!r}")
        check_range(self, "kl_coef", ">= 0", lambda v: v >= 0)
        if self.kl_target is not None:
            check_range(self, "kl_target", "> 0 (or unset for a fixed coefficient)", lambda v: v > 0)
        check_range(self, "kl_horizon", ">= 1", lambda v: v >= 1)
        check_range(self, "er_ema_decay", "in [0, 1)", lambda v: 0 <= v < 1)
        for name in ("er_reset_every", "er_ema_every"):
            check_range(self, name, ">= 1", lambda v: v >= 1)


class RLTrainer(Trainer):
    """RLOO with a KL penalty (and Elastic Reset); see RLConfig."""

    algo = "rloo"
    config: RLConfig

    def __init__(self, task, config: RLConfig, *, reward_fn: Optional[Callable] = None, **kwargs):
        self.reward_fn = reward_fn
        super().__init__(task, config, **kwargs)
        if self.reward_fn is None:
            self.reward_fn = task.gold_reward if config.reward == "gold" else task.proxy_reward
        self.kl_coef = float(config.kl_coef)

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
        rollouts = []
        for part in slices:
            chunk_prompts = prompts[offset + part.start: offset + part.stop].to(self.dist.device)
            chunk_index = (offset + part.start) // (part.stop - part.start)
            rollouts.append(self._rollout(step, chunk_index, chunk_prompts))
        tokens_per_rank = float(sum(float(r["mask"].sum()) for r in rollouts))
        sums: dict[str, float] = {}
        for iteration in range(cfg.num_iterations):
            clip = 0.0
            for i, rollout in enumerate(rollouts):
                with self._accumulating(last=i == len(rollouts) - 1):
                    values = self._update(rollout, iteration, samples_per_rank, tokens_per_rank)
                clip += values.pop("clip_ratio")
                if iteration == 0:
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
        if cfg.elastic_reset:
            record["reset"] = reset
        if cfg.kl_target is not None:
            error = max(-0.2, min(0.2, record["kl_penalty"] / cfg.kl_target - 1.0))
            self.kl_coef *= 1.0 + error * (cfg.batch_size * k) / cfg.kl_horizon
        return record

    def _rollout(self, step: int, chunk_index: int, prompts: torch.Tensor) -> dict:
        """Sample k completions per prompt and score them (no gradient): what every pass over the
        batch reuses."""
        cfg, task = self.config, self.task
        # rows i*k .. i*k+k-1 share prompt i
        repeated = prompts.repeat_interleave(cfg.samples_per_prompt, dim=0)
        generator = make_generator(cfg.seed, "rollout", step, chunk_index)
        with torch.no_grad():
            self.policy.eval()
            try:
                with self._unsharded(self.scorer):
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
        return dict(prompts=prompts, repeated=repeated, responses=responses, mask=mask,
                    rewards=rewards, proxy=proxy, gold=gold, ref_logprobs=ref_logprobs)

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
                shaped = (rollout["rewards"] - self.kl_coef * penalty).view(-1, k)
                leave_one_out = (shaped.sum(-1, keepdim=True) - shaped) / (k - 1)
                advantages = (shaped - leave_one_out).reshape(-1)
            rollout.update(advantages=advantages, penalty=penalty, kl_to_init=kl_to_init,
                           shaped=shaped)
            if cfg.num_iterations > 1:
                rollout["old_logprobs"] = logprobs.detach()
        advantages = rollout["advantages"]
        out = pyalign.policy_loss(
            logprobs, rollout.get("old_logprobs") if iteration > 0 else None, advantages, mask,
            loss_type=cfg.loss_type, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
            max_completion_length=responses.shape[1], num_items_in_batch=tokens_per_rank,
            backend=cfg.backend)
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
        if rollout["proxy"] is not None:
            values["proxy_reward"] = float(rollout["proxy"].double().sum())
        if rollout["gold"] is not None:
            values["gold_reward"] = float(rollout["gold"].double().sum())
        return values
