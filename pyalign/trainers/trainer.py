"""The step loop every pyalign trainer shares (``Trainer``), the settings common to every
trainer (``TrainerConfig``) and the seeding of the loop's random draws. Evaluation (gold/proxy
reward and KL to the initial model on policy samples), JSONL + tqdm logging and checkpoints
run from here; their pieces live in the sibling modules ``scoring``, ``metrics``,
``checkpoint`` and ``distributed``.

Determinism: every random draw of the training loop comes from a generator seeded by its
purpose (``pyalign.trainers.seeding``), so a run resumed from a checkpoint, or split over more
ranks, draws exactly what an uninterrupted single-process run draws. The global RNG states are
checkpointed too, for user code and models that use them (dropout).

Backend: ``TrainerConfig.backend`` goes to every pyalign op the trainers call (the scorer's
log-prob ops, the losses, ``kl_penalty``, the reference strategies' weight ops).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

import pyalign
from pyalign._utils import canonical_param_name
from pyalign.backends import CHOICES as BACKEND_CHOICES
from pyalign.trainers.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    capture_rng_state,
    check_resumable,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    resolve_resume_path,
    restore_rng_state,
    save_checkpoint,
)
from pyalign.trainers.distributed import (
    DistContext,
    accumulating,
    full_model_state,
    full_optimizer_state,
    gather_strategy_state,
    init_distributed,
    load_full_model_state,
    load_full_optimizer_state,
    shard_strategy_state,
    wrap_scorer,
)
from pyalign.trainers.evaluation import sample_and_score
from pyalign.trainers.fields import check_fields, setting
from pyalign.trainers.metrics import MetricsLog, plot_reward_vs_kl, read_metrics
from pyalign.trainers.scoring import ResponseScorer, response_mask
from pyalign.trainers.seeding import make_generator, stable_seed

LR_SCHEDULES = ("constant", "linear")


@dataclasses.dataclass
class TrainerConfig:
    """Settings common to every trainer (``fields.setting``: each carries its help and checks).
    Batch sizes are global (summed over ranks). The defaults are those tuned on the embedded
    task; a run on one's own model starts from TRL's (``fields.Algorithm.trl``)."""

    seed: int = setting(0, "training seed: every random draw of the run derives from it",
                        bounds=">= 0")
    lr: float = setting(1e-3, "AdamW's peak learning rate", bounds="> 0",
                        aliases=("learning_rate",))
    weight_decay: float = setting(0.0, "AdamW's weight decay", bounds=">= 0")
    warmup_steps: int = setting(0, "linear warmup over the first N optimizer steps", bounds=">= 0")
    warmup_ratio: float = setting(0.0, "linear warmup over this fraction of the run's steps "
                                  "(instead of warmup_steps)", bounds="in [0, 1)")
    lr_scheduler_type: str = setting("constant", "the learning rate after warmup: constant, or "
                                     "linear decay to 0 at the last step (transformers' "
                                     "'linear')", choices=LR_SCHEDULES)
    batch_size: int = setting(32, "examples (preference) or prompts (RL) per optimizer step, "
                              "over all ranks", bounds=">= 1")
    micro_batch_size: int = setting(32, "examples or prompts per forward/backward on one rank; "
                                    "gradient accumulation fills the rest", bounds=">= 1")
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (0: no clipping)",
                                   bounds=">= 0")
    temperature: float = setting(1.0, "sampling temperature (rollouts and evaluations)",
                                 bounds="> 0")
    eval_every: int = setting(1, "evaluate (reward, KL to the initial model and entropy of "
                              "policy samples) every N steps (0: never)", bounds=">= 0",
                              aliases=("eval_steps",))
    eval_batch_size: int = setting(64, "prompts per evaluation", bounds=">= 1")
    final_eval_batch_size: int = setting(256, "prompts of the evaluation after the last step "
                                         "(0: none)", bounds=">= 0")
    # Periodic checkpoints, so that a killed run (kill -9, preemption) loses at most a few minutes.
    checkpoint_every: int = setting(50, "write a checkpoint every N steps (0: not by steps)",
                                    bounds=">= 0", aliases=("save_steps",))
    checkpoint_minutes: float = setting(10.0, "write a checkpoint whenever this many minutes "
                                        "have passed since the last (0: not by time)", bounds=">= 0")
    keep_checkpoints: int = setting(2, "keep the newest N checkpoints", bounds=">= 1",
                                    aliases=("save_total_limit",))
    bf16: bool = setting(False, "bf16 autocast for the model forwards")
    backend: str = setting("auto", "pyalign op backend", choices=BACKEND_CHOICES)
    fused_linear: bool = setting(True, "log-probs from the last hidden state and lm_head, no "
                                 "logits tensor")
    fsdp: bool = setting(False, "under torchrun: shard the models with FSDP2 instead of DDP")
    mask_after_eos: bool = setting(False, "score responses only up to their first eos (the "
                                   "embedded task scores every token)")
    padding_free: bool = setting(False, "score each batch's rows packed into one sequence "
                                 "(TRL's padding_free): no compute on padding, attention kept "
                                 "inside each row (pyalign/integrations/packing.py)")
    progress: bool = setting(True, "a tqdm progress bar")

    def validate(self) -> None:
        check_fields(self)
        if self.micro_batch_size < self.batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"config key 'micro_batch_size' must be a divisor of batch_size "
                             f"({self.batch_size}) or be at least it, got {self.micro_batch_size!r}")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("config keys 'warmup_steps' and 'warmup_ratio' are two ways of one "
                             "setting: set one of them")


def learning_rate(config: TrainerConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based) of a run of ``total_steps``: a
    linear warmup (``step / warmup``) over the first ``warmup_steps`` (or ``warmup_ratio`` of the
    run), then constant or, with ``lr_scheduler_type = "linear"``, transformers' linear decay
    ``(total - step + 1) / (total - warmup)``, which reaches ``lr / (total - warmup)`` at the last."""
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    if warmup and step <= warmup:
        return config.lr * step / warmup
    if config.lr_scheduler_type == "linear":
        return config.lr * max(0.0, (total_steps - step + 1) / max(1, total_steps - warmup))
    return config.lr


# What the reward-vs-KL plot calls each reward of the embedded task; a task may name its own
# (``reward_labels``: the user's --reward).
REWARD_LABELS = {"gold_reward": "gold reward (the task's true reward)",
                 "proxy_reward": "proxy reward (the task's reward model)"}


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with no parameter requiring a gradient (a reference model)."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class Trainer:
    """The loop shared by PreferenceTrainer and RLTrainer.

    ``task`` is the embedded task (pyalign.tasks.Task) or its stand-in for the user's data
    (pyalign.data.DatasetTask); the trainers use ``prompts``, ``generate``, ``preference_pairs``
    or ``unpaired``, ``bos_id``/``eos_id`` and, where the task has them, ``eval_prompts``,
    ``proxy_reward`` and ``gold_reward`` (a metric the task cannot give is not logged). Token
    tensors may pad with negative ids (prompts on the left, responses on the right).

    Subclasses implement ``_make_reference``, ``_make_strategy``, ``_build_data``,
    ``train_step(step)`` returning a
    dict of global (all-rank) metrics, and ``_extra_state`` / ``_load_extra_state``.
    """

    algo = "trainer"

    def __init__(self, task, config: TrainerConfig, *, algo: Optional[str] = None,
                 out_dir: Optional[str] = None, model_factory: Optional[Callable[[], torch.nn.Module]] = None,
                 dist_ctx: Optional[DistContext] = None, run_settings: Optional[dict] = None):
        config.validate()
        self.task = task
        self.config = config
        if algo is not None:
            self.algo = algo
        self.out_dir = out_dir
        # What built this trainer (``pyalign train``'s run settings: model dir, LoRA spec, task
        # sizes...), plain types: stored in every checkpoint so a run directory describes itself.
        self.run_settings = dict(run_settings or {})
        self.dist = dist_ctx or init_distributed()
        self.model_factory = model_factory or task.new_policy
        self.step = 0
        torch.manual_seed(stable_seed(config.seed, "init"))
        random.seed(stable_seed(config.seed, "python"))
        np.random.seed(stable_seed(config.seed, "numpy") % (2 ** 32))

        self.policy = self.model_factory().to(self.dist.device)
        self.policy.train()
        self.init_model = frozen(self.model_factory().to(self.dist.device))
        self.ref_model = self._make_reference()
        temperature = self._score_temperature()

        def scorer_for(model):
            return ResponseScorer(model, fused_linear=config.fused_linear, backend=config.backend,
                                  temperature=temperature, bf16=config.bf16,
                                  padding_free=config.padding_free)

        self.scorer = self._wrap(scorer_for(self.policy), trainable=True)
        self.ref_scorer = self._wrap(scorer_for(self.ref_model), trainable=False)
        self.init_scorer = (self.ref_scorer if self.init_model is self.ref_model
                            else self._wrap(scorer_for(self.init_model), trainable=False))
        # Built after wrapping: FSDP2 replaces parameters by DTensors, which the strategies hold.
        self.ref_strategy = self._make_strategy()
        self.optimizer = torch.optim.AdamW([p for p in self.policy.parameters() if p.requires_grad],
                                           lr=config.lr, weight_decay=config.weight_decay)
        # a dataset task draws them from its --eval-data (pyalign.data.DatasetTask)
        eval_prompts = getattr(task, "eval_prompts", task.prompts)
        self._eval_prompts = eval_prompts(config.eval_batch_size, make_generator(config.seed, "eval-prompts"))
        self._final_prompts = eval_prompts(config.final_eval_batch_size, make_generator(
            config.seed, "final-eval-prompts")) if config.final_eval_batch_size else None
        self.total_steps: Optional[int] = None  # the steps of the run train() makes
        self._build_data()

    # -- hooks for subclasses -----------------------------------------------------------------
    def _make_reference(self) -> torch.nn.Module:
        """The model the loss/penalty compares against; self.init_model unless it moves."""
        return self.init_model

    def _make_strategy(self):
        return pyalign.refmodel.Frozen(self.ref_model)

    def _build_data(self) -> None:
        pass

    def _score_temperature(self) -> float:
        return 1.0

    def train_step(self, step: int) -> dict:
        raise NotImplementedError

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    # -- distributed wrapping -----------------------------------------------------------------
    @property
    def _sharded(self) -> bool:
        return self.config.fsdp and self.dist.distributed

    def _wrap(self, scorer: ResponseScorer, *, trainable: bool) -> torch.nn.Module:
        return wrap_scorer(scorer, self.dist, fsdp=self.config.fsdp, trainable=trainable,
                           bos_id=self.task.bos_id)

    def _accumulating(self, last: bool):
        return accumulating(self.scorer, last)

    # -- optimisation ---------------------------------------------------------------------------
    def _optimizer_step(self, step: int) -> float:
        cfg = self.config
        lr = learning_rate(cfg, step, self.total_steps or step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None])))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _reduce_means(self, sums: dict[str, float], counts: dict[str, str]) -> dict:
        """All-reduce metric sums (and their counts) over ranks; return means keyed by name."""
        names = sorted(sums)
        totals = self.dist.all_reduce_sum(torch.tensor([float(sums[n]) for n in names], dtype=torch.float64))
        by_name = dict(zip(names, totals.tolist(), strict=True))
        out = {}
        for name, count_name in counts.items():
            if by_name.get(count_name, 0) > 0 and name in by_name:
                out[name] = by_name[name] / by_name[count_name]
        return out

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, prompts: torch.Tensor, key: Any) -> dict:
        """Means over ``prompts`` of policy samples' rewards, KL to the initial model and
        entropy (``pyalign.trainers.evaluation.sample_and_score``)."""
        return sample_and_score(self, prompts, key)

    def response_mask(self, responses: torch.Tensor) -> torch.Tensor:
        return response_mask(responses, self.task.eos_id if self.config.mask_after_eos else None)

    def _scorer_module(self) -> torch.nn.Module:
        return getattr(self.scorer, "module", self.scorer)

    # -- checkpoints --------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Optional[str]:
        return os.path.join(self.out_dir, "checkpoints") if self.out_dir else None

    def state_payload(self) -> dict:
        """Everything needed to continue bit-for-bit (collective under FSDP: call on all ranks)."""
        payload = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "algo": self.algo,
            "step": self.step, "world_size": self.dist.world_size,
            "config": config_to_dict(self.config),
            "policy": full_model_state(self._scorer_module(), self._sharded),
            "optimizer": full_optimizer_state(self.scorer, self.optimizer, self._sharded),
            "rng": capture_rng_state(),
            "trainer": self._extra_state(),
            "run": self.run_settings,
        }
        # The strategy's state holds the moving weights (trust-region reference, EMA) by itself.
        payload["reference_strategy"] = self._strategy_state()
        return payload


    def _policy_params(self) -> dict:
        # the strategies name tensors by the policy's parameter names, wrapper prefixes removed
        return {canonical_param_name(name): param for name, param in self.policy.named_parameters()}

    def _strategy_state(self) -> dict:
        """The strategy's state; under FSDP2 its per-rank shards are gathered to full tensors
        (a collective), so the checkpoint does not depend on the number of ranks."""
        state = self.ref_strategy.state_dict()
        return gather_strategy_state(state, self._policy_params()) if self._sharded else state

    def _load_strategy_state(self, state: dict) -> None:
        if self._sharded:
            state = shard_strategy_state(state, self._policy_params())
        self.ref_strategy.load_state_dict(state)

    def save(self) -> Optional[str]:
        if not self.checkpoint_dir:
            return None
        payload = self.state_payload()
        path = checkpoint_path(self.checkpoint_dir, self.step)
        if self.dist.is_main:
            save_checkpoint(path, payload)
            for _, old in list_checkpoints(self.checkpoint_dir)[:-self.config.keep_checkpoints]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(old)
        self.dist.barrier()
        return path

    def load(self, path: str) -> int:
        payload = load_checkpoint(path)
        if payload["algo"] != self.algo:
            raise CheckpointError(f"checkpoint {path} is from a {payload['algo']} run, not {self.algo}")
        check_resumable(path, payload, config_to_dict(self.config), self.run_settings)
        try:
            load_full_model_state(self._scorer_module(), payload["policy"], self._sharded)
            self._load_strategy_state(payload["reference_strategy"])
            load_full_optimizer_state(self.scorer, self.optimizer, payload["optimizer"], self._sharded)
            self._load_extra_state(payload["trainer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this model/trainer: {exc}") from exc
        restore_rng_state(payload["rng"])
        self.step = int(payload["step"])
        return self.step

    def _checkpoint_due(self, step: int, last_save: float) -> bool:
        """Every checkpoint_every steps, and whenever checkpoint_minutes have passed since the
        last save (rank 0's clock decides for every rank: saving is collective)."""
        cfg = self.config
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            return True
        if not cfg.checkpoint_minutes:
            return False
        due = time.monotonic() - last_save >= cfg.checkpoint_minutes * 60
        if self.dist.distributed:
            flag = torch.tensor([1.0 if due and self.dist.is_main else 0.0], device=self.dist.device)
            due = bool(self.dist.all_reduce_sum(flag).item())
        return due

    # -- the loop -----------------------------------------------------------------------------
    def _stop_agreed(self, stop) -> bool:
        """Whether to stop after this step: a stop was asked on any rank (every rank stops at
        the same step; a collective under torchrun)."""
        if stop is None:
            return False
        asked = stop.requested is not None
        if self.dist.distributed:
            flag = torch.tensor([1.0 if asked else 0.0], device=self.dist.device)
            asked = bool(self.dist.all_reduce_sum(flag).item())
        return asked

    def train(self, steps: int, *, resume: Optional[str | bool] = None,
              progress: Optional[bool] = None, stop=None, trackers: tuple = (),
              schedule_steps: Optional[int] = None) -> dict:
        """Run to ``steps`` optimizer steps in total (continuing a checkpoint with ``resume``).
        ``schedule_steps``: the run's length for the learning-rate schedule (warmup ratio, linear
        decay), where training to ``steps`` is one stop on the way (a study's evaluations).

        ``stop`` (``pyalign.trainers.stop.StopSignals``): once it holds a request, the current
        step finishes, a checkpoint is written and the summary says ``interrupted``; ``trackers``
        (``pyalign.trainers.tracking``) get every record metrics.jsonl gets."""
        cfg = self.config
        if resume:
            if not self.checkpoint_dir and not isinstance(resume, str):
                raise CheckpointError("resume needs an output directory or a checkpoint path")
            self.load(resolve_resume_path(resume, self.checkpoint_dir or ""))
        if steps < self.step:
            raise CheckpointError(f"the checkpoint is at step {self.step}, past the {steps} steps asked for")
        self.total_steps = schedule_steps or steps
        writes = self.out_dir and self.dist.is_main
        metrics_path = os.path.join(self.out_dir, "metrics.jsonl") if writes else None
        log = MetricsLog(metrics_path, resume_step=self.step if resume else None,
                         trackers=trackers if self.dist.is_main else ())
        show = cfg.progress if progress is None else progress
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=self.step, file=sys.stderr, desc=f"pyalign {self.algo}",
                   disable=not (show and self.dist.is_main), dynamic_ncols=True, leave=False)
        last_record: dict = {}
        last_save = time.monotonic()
        try:
            while self.step < steps:
                last_record = self._logged_step(log)
                bar.update(1)
                bar.set_postfix({k: f"{last_record[k]:.3g}" for k in ("loss", "gold_reward", "kl_to_init")
                                 if k in last_record})
                if self._stop_agreed(stop):
                    return {"algo": self.algo, "steps": self.step, "total_steps": steps,
                            "interrupted": stop.requested or "a stop on another rank",
                            "last_step": last_record, "checkpoint": self.save(),
                            "metrics": metrics_path, "plot": None}
                if self.step < steps and self._checkpoint_due(self.step, last_save):
                    self.save()
                    last_save = time.monotonic()
        finally:
            bar.close()
        checkpoint = self.save()
        final = self.evaluate(self._final_prompts, "final") if self._final_prompts is not None else {}
        log.write({"step": self.step, "final": True, **final})
        plot = None
        if metrics_path:
            labels = {**REWARD_LABELS, **getattr(self.task, "reward_labels", {})}
            plot = plot_reward_vs_kl(read_metrics(metrics_path),
                                     os.path.join(self.out_dir, "reward_vs_kl.png"), self.algo, labels)
        return {"algo": self.algo, "steps": self.step, **final, "last_step": last_record,
                "checkpoint": checkpoint, "metrics": metrics_path, "plot": plot}

    def _logged_step(self, log: MetricsLog) -> dict:
        """One optimizer step, its evaluation when one is due, and its record logged."""
        cfg = self.config
        step = self.step + 1
        started = time.perf_counter()
        record = {"step": step}
        record.update(self.train_step(step))
        self.step = step
        if cfg.eval_every and step % cfg.eval_every == 0:
            for key, value in self.evaluate(self._eval_prompts, step).items():
                record["eval_" + key if key in record else key] = value
        elapsed = time.perf_counter() - started
        record["tokens_per_s"] = record.pop("_tokens", 0.0) / max(elapsed, 1e-9)
        record["step_time_s"] = elapsed
        log.write(record)
        return record


__all__ = ["TrainerConfig", "Trainer", "config_to_dict", "learning_rate", "frozen", "stable_seed",
           "make_generator", "LR_SCHEDULES", "REWARD_LABELS"]
