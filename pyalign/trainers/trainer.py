"""The step loop every pyalign trainer shares (``Trainer``), the settings common to every
trainer (``TrainerConfig``) and the seeding of the loop's random draws. Evaluation (gold/proxy
reward and KL to the initial model on policy samples), JSONL + tqdm logging and checkpoints
run from here; their pieces live in the sibling modules ``scoring``, ``metrics``,
``checkpoint`` and ``distributed``.

Determinism: every random draw of the training loop comes from a ``torch.Generator`` seeded by
``(seed, purpose, step, chunk)`` (see ``make_generator``), never from a stateful stream, so a run
resumed from a checkpoint, or split over more ranks, draws exactly what an uninterrupted
single-process run draws. The global RNG states are checkpointed too, for user code and models
that use them (dropout).

Backend: ``TrainerConfig.backend`` goes to every pyalign op the trainers call (the scorer's
log-prob ops, the losses, ``kl_penalty``, the reference strategies' weight ops).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
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
from pyalign.trainers.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    RESUMABLE_CHANGES,
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    resolve_resume_path,
    restore_rng_state,
    save_checkpoint,
)
from pyalign.trainers.distributed import (
    DistContext,
    _decoder_layers,
    full_model_state,
    full_optimizer_state,
    gather_strategy_state,
    init_distributed,
    load_full_model_state,
    load_full_optimizer_state,
    shard_strategy_state,
    split_evenly,
)
from pyalign.trainers.metrics import MetricsLog, plot_reward_vs_kl, read_metrics
from pyalign.trainers.scoring import ResponseScorer, masked_sum, response_mask


@dataclasses.dataclass
class TrainerConfig:
    """Settings common to every trainer. Batch sizes are global (summed over ranks)."""

    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    batch_size: int = 32  # examples (preference) or prompts (RL) per optimizer step, all ranks
    micro_batch_size: int = 32  # per forward/backward on one rank; gradient accumulation fills the rest
    max_grad_norm: float = 1.0  # 0 disables clipping
    temperature: float = 1.0  # sampling temperature (RL rollouts and evaluation)
    eval_every: int = 1  # evaluate gold/proxy reward and KL on policy samples every N steps (0: never)
    eval_batch_size: int = 64  # prompts per evaluation
    final_eval_batch_size: int = 256  # prompts in the evaluation after the last step
    # Periodic checkpoints, so a killed run (kill -9, preemption) loses at most a few minutes:
    # one every checkpoint_every steps and one whenever checkpoint_minutes have passed since the
    # last (0 disables either; both 0: only the final checkpoint). The newest keep_checkpoints
    # files are kept.
    checkpoint_every: int = 50
    checkpoint_minutes: float = 10.0
    keep_checkpoints: int = 2
    bf16: bool = False  # bf16 autocast for the policy and reference forwards
    backend: str = "auto"  # pyalign op backend
    fused_linear: bool = True  # log-probs from the last hidden state and lm_head (no logits tensor)
    fsdp: bool = False  # shard the policy/reference with FSDP2 (fully_shard) instead of DDP
    mask_after_eos: bool = False  # score responses only up to their first EOS (the embedded task
    # scores all response_len tokens, so by default every token counts)
    progress: bool = True

    def validate(self) -> None:
        check_types(self)
        for name in ("lr", "temperature"):
            check_range(self, name, "> 0", lambda v: v > 0)
        for name in ("batch_size", "micro_batch_size", "eval_batch_size", "final_eval_batch_size",
                     "keep_checkpoints"):
            check_range(self, name, ">= 1", lambda v: v >= 1)
        for name in ("seed", "weight_decay", "warmup_steps", "eval_every", "checkpoint_every",
                     "checkpoint_minutes"):
            check_range(self, name, ">= 0", lambda v: v >= 0)
        check_range(self, "max_grad_norm", ">= 0 (0 disables clipping)", lambda v: v >= 0)
        if self.micro_batch_size < self.batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"config key 'micro_batch_size' must be a divisor of batch_size "
                             f"({self.batch_size}) or be at least it, got {self.micro_batch_size!r}")
        choices = pyalign.backends.CHOICES
        if self.backend not in choices:
            raise ValueError(f"config key 'backend': backend must be one of {choices}, got {self.backend!r}")


def as_field_type(value, expected) -> tuple[bool, Any]:
    """``(True, value)`` when ``value`` fits a config field declared ``expected`` (an int for a
    float field becomes a float), else ``(False, what the field must be)``. ``Optional[X]``
    admits None; bool is never an int; a float must be finite. The CLI checks file and flag
    values with it too, so a type means the same everywhere."""
    import types
    import typing
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        if value is None:
            return True, None
        members = [t for t in typing.get_args(expected) if t is not type(None)]
        if len(members) > 1:  # e.g. Union[str, list]: the first member the value fits
            results = [as_field_type(value, member) for member in members]
            fits = [result for result in results if result[0]]
            return fits[0] if fits else (False, " or ".join(what for _, what in results))
        expected = members[0]
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return True, float(value)
        return False, "float (a finite number)"
    if expected is int:
        return (True, value) if isinstance(value, int) and not isinstance(value, bool) else (False, "int")
    return (True, value) if isinstance(value, expected) else (False, expected.__name__)


def check_types(config) -> None:
    """Every field of a config dataclass has its declared type (``as_field_type``)."""
    import typing
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        ok, what = as_field_type(value, hints[field.name])
        if not ok:
            raise ValueError(f"config key {field.name!r} must be {what}, got {value!r}")


def check_range(config, name: str, accepted: str, ok) -> None:
    value = getattr(config, name)
    if not ok(value):
        raise ValueError(f"config key {name!r} must be {accepted}, got {value!r}")


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------------------------
# randomness


def stable_seed(*keys) -> int:
    """A 63-bit seed from any printable keys, the same in every process and Python version."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(*keys) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*keys))


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
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
        self.init_model = _freeze(self.model_factory().to(self.dist.device))
        self.ref_model = self._make_reference()
        temperature = self._score_temperature()

        def scorer_for(model):
            return ResponseScorer(model, fused_linear=config.fused_linear, backend=config.backend,
                                  temperature=temperature, bf16=config.bf16)

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
        self._final_prompts = eval_prompts(config.final_eval_batch_size,
                                           make_generator(config.seed, "final-eval-prompts"))
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
        """DDP for the trained scorer; under FSDP2 every model is sharded the same way (layers,
        then the scorer as root) so reference updates between them stay shard-local."""
        if not self.dist.distributed:
            return scorer
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard
            for layer in _decoder_layers(scorer.model):
                fully_shard(layer)
            # reshard the root after forward too (its default is to keep it gathered for the
            # backward): the reference/EMA updates must see every model as shards.
            fully_shard(scorer, reshard_after_forward=True)
            # One forward through the root before anything calls the bare model (generate):
            # FSDP2 initialises its root on the first forward and refuses a layer-first one.
            with torch.no_grad():
                token = torch.full((1, 1), self.task.bos_id, dtype=torch.long, device=self.dist.device)
                scorer(token, token, torch.ones_like(token, dtype=torch.bool))
            return scorer
        if not trainable:
            return scorer
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(scorer, device_ids=device_ids)

    @contextlib.contextmanager
    def _unsharded(self, scorer: torch.nn.Module):
        """Plain (gathered) parameters for code that calls the bare model outside the scorer's
        forward (task.generate). A no-op without FSDP."""
        if not hasattr(scorer, "unshard"):
            yield
            return
        scorer.unshard()
        try:
            yield
        finally:
            scorer.reshard()

    @contextlib.contextmanager
    def _accumulating(self, last: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch."""
        if not last and hasattr(self.scorer, "no_sync"):
            with self.scorer.no_sync():
                yield
        elif not last and hasattr(self.scorer, "set_requires_gradient_sync"):
            self.scorer.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.scorer.set_requires_gradient_sync(True)
        else:
            yield

    # -- optimisation ---------------------------------------------------------------------------
    def _optimizer_step(self, step: int) -> float:
        cfg = self.config
        lr = cfg.lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
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
    @torch.no_grad()
    def evaluate(self, prompts: torch.Tensor, key: Any) -> dict:
        """Sample from the policy on ``prompts`` (this rank's share), score them; global means.

        Sampling is chunked by micro_batch_size with one generator per global chunk, so the
        numbers do not depend on the number of ranks.
        """
        cfg, task = self.config, self.task
        local = split_evenly(prompts.shape[0], self.dist.world_size, "the evaluation batch")
        offset = self.dist.rank * local
        sums = dict(gold=0.0, proxy=0.0, kl=0.0, entropy=0.0, tokens=0.0, n=0.0)
        chunk_size = min(cfg.micro_batch_size, local)
        self.policy.eval()
        try:
            for start in range(0, local, chunk_size):
                chunk = prompts[offset + start: offset + min(start + chunk_size, local)].to(self.dist.device)
                generator = make_generator(cfg.seed, "eval", key, (offset + start) // chunk_size)
                with self._unsharded(self.scorer):
                    responses = task.generate(self.policy, chunk, temperature=cfg.temperature,
                                              generator=generator).to(self.dist.device)
                mask = self.response_mask(responses)
                logprobs, entropy = self._scorer_module()(chunk, responses, mask, entropy=True)
                init_logprobs = self.init_scorer(chunk, responses, mask)
                kl = pyalign.kl_penalty(logprobs, init_logprobs, estimator="k3", mask=mask,
                                        backend=cfg.backend)
                if hasattr(task, "gold_reward"):
                    sums["gold"] += float(task.gold_reward(chunk.cpu(), responses.cpu()).double().sum())
                if hasattr(task, "proxy_reward"):  # user data without --reward has none
                    sums["proxy"] += float(task.proxy_reward(chunk.cpu(), responses.cpu()).double().sum())
                sums["kl"] += float(kl.double().sum())
                sums["entropy"] += masked_sum(entropy, mask)
                sums["tokens"] += float(mask.sum())
                sums["n"] += chunk.shape[0]
        finally:
            self.policy.train()
        counts = dict(kl="n", entropy="tokens", tokens="n")
        if hasattr(task, "proxy_reward"):
            counts["proxy"] = "n"
        if hasattr(task, "gold_reward"):
            counts["gold"] = "n"
        means = self._reduce_means(sums, counts)
        renamed = dict(gold="gold_reward", proxy="proxy_reward", kl="kl_to_init",
                       entropy="sample_entropy", tokens="response_length")
        return {renamed[k]: v for k, v in means.items()}

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
        saved, current = payload["config"], config_to_dict(self.config)
        changed = sorted(k for k in set(saved) | set(current)
                         if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise CheckpointError(f"checkpoint {path} was written with a different config ({diffs}); "
                                  f"resume with the same settings")
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
    def train(self, steps: int, *, resume: Optional[str | bool] = None,
              progress: Optional[bool] = None) -> dict:
        """Run to ``steps`` optimizer steps in total (continuing a checkpoint with ``resume``)."""
        cfg = self.config
        if resume:
            if not self.checkpoint_dir and not isinstance(resume, str):
                raise CheckpointError("resume needs an output directory or a checkpoint path")
            self.load(resolve_resume_path(resume, self.checkpoint_dir or ""))
        if steps < self.step:
            raise CheckpointError(f"the checkpoint is at step {self.step}, past the {steps} steps asked for")
        writes = self.out_dir and self.dist.is_main
        metrics_path = os.path.join(self.out_dir, "metrics.jsonl") if writes else None
        log = MetricsLog(metrics_path, resume_step=self.step if resume else None)
        show = cfg.progress if progress is None else progress
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=self.step, file=sys.stderr, desc=f"pyalign {self.algo}",
                   disable=not (show and self.dist.is_main), dynamic_ncols=True, leave=False)
        last_record: dict = {}
        last_save = time.monotonic()
        try:
            while self.step < steps:
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
                last_record = record
                bar.update(1)
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "gold_reward", "kl_to_init")
                                 if k in record})
                if step < steps and self._checkpoint_due(step, last_save):
                    self.save()
                    last_save = time.monotonic()
        finally:
            bar.close()
        checkpoint = self.save()
        final = self.evaluate(self._final_prompts, "final")
        final_record = {"step": self.step, "final": True, **final}
        log.write(final_record)
        plot = None
        if metrics_path:
            plot = plot_reward_vs_kl(read_metrics(metrics_path),
                                     os.path.join(self.out_dir, "reward_vs_kl.png"),
                                     f"{self.algo}: gold reward vs KL to the initial model")
        return {"algo": self.algo, "steps": self.step, **final, "last_step": last_record,
                "checkpoint": checkpoint, "metrics": metrics_path, "plot": plot}


__all__ = ["TrainerConfig", "Trainer", "config_to_dict", "stable_seed", "make_generator"]
