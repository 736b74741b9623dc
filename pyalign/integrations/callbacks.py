"""Trust-region (TR-DPO), Elastic Reset and BEMA reference updates as ``transformers`` Trainer
callbacks, for plain ``transformers.Trainer`` and TRL's trainers, with exact resume.

    trainer = DPOTrainer(model, ref_model=ref, args=DPOConfig(..., sync_ref_model=False), ...)
    trainer.add_callback(TrustRegionCallback(trainer.ref_model, alpha=0.6, tau=512))
    trainer.train()          # or trainer.train(resume_from_checkpoint=True)

- ``TrustRegionCallback(ref_model=None, *, alpha, tau)``: TRL's ``sync_ref_model``
  (``SyncRefModelCallback``: every ``tau`` = ``ref_model_sync_steps`` optimizer steps
  ``ref <- alpha * policy + (1 - alpha) * ref``, alpha = ``ref_model_mixup_alpha``), run by
  ``pyalign.refmodel.TrustRegion`` on each parameter's local shard (no gather under FSDP2).
  Callbacks are not handed the trainer's reference model, so it is passed explicitly, as TRL's
  own callback takes it (with TRL's DPOTrainer: ``trainer.ref_model`` once the trainer is built).
  ``ref_model=None`` with a peft policy: the reference is a second adapter of the same
  ``PeftModel`` (``adapter_name``, default ``"ref"``, TRL's name for it), whose LoRA weights are
  lerped toward the active (policy) adapter's. TRL's DPOTrainer computes the reference
  log-probs with an adapter of that name whenever the model has one; elsewhere use
  ``use_reference_adapter(model)``. A missing adapter is added at the start of training as a
  copy of the policy adapter (``add_reference_adapter``; call it yourself before the model is
  sharded).
- ``ElasticResetCallback(*, ema_decay, reset_every, ema_every=1, ...)``: Elastic Reset
  (``pyalign.refmodel.ElasticReset``): an EMA of the trainable parameters; every
  ``reset_every`` steps ``policy <- EMA`` then ``EMA <- initial weights``, optionally dropping
  the optimizer state of the reset parameters (``reset_optimizer=True``).
- ``BEMACallback(update_freq=400, ema_power=0.5, ...)``: TRL 1.16's ``BEMACallback`` (same
  parameters in the same order, same defaults and schedule) run by ``pyalign.refmodel.BEMA``
  (one fused pass per update). Its weights go into ``ref_model=`` (the trainer's reference, as
  TRL's experimental ``update_ref_model=True``), a peft policy's reference adapter, or else, as
  TRL's, a frozen copy ``running_model`` saved to ``args.output_dir/bema`` at train end.

All build their strategy in ``on_train_begin`` from the Trainer's model and step it in
``on_step_end`` (after the optimizer step, before that step's checkpoint is written). In
``on_save`` each writes its state (the reference or EMA and initial tensors, and the step
counters) to ``STATE_FILES[kind]`` inside ``args.output_dir/checkpoint-{global_step}/``
(one file per rank, ``..._rank{i}.pt``, when training on several processes: each rank holds its
own shards), atomically and as plain tensors and numbers (``torch.load(weights_only=True)``
opens it). A resumed run (``state.global_step > 0`` at ``on_train_begin``) restores it: the
Trainer does not tell callbacks which checkpoint it resumes, so the file is looked for in
``args.resume_from_checkpoint`` (when set) then in ``args.output_dir/checkpoint-{global_step}``,
which covers ``train(resume_from_checkpoint=True)`` and any checkpoint under ``output_dir``;
resuming from elsewhere needs ``TrainingArguments(resume_from_checkpoint=path)``. A resume whose
state file cannot be found raises rather than continuing from a wrong reference.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import os
from collections.abc import Mapping

import torch
from torch import nn
from transformers import TrainerCallback

from pyalign import backends
from pyalign._bema import BEMASchedule
from pyalign._utils import atomic_write
from pyalign.refmodel import (
    BEMA,
    ElasticReset,
    TrustRegion,
    elastic_reset_settings,
    trust_region_settings,
)

__all__ = ["TrustRegionCallback", "ElasticResetCallback", "BEMACallback", "add_reference_adapter",
           "use_reference_adapter", "STATE_FILES"]

# File stem of each callback's state inside a checkpoint folder.
STATE_FILES = {"TrustRegion": "pyalign_trust_region", "ElasticReset": "pyalign_elastic_reset",
               "BEMA": "pyalign_bema"}


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _check_peft_model(model, what: str):
    if not _is_peft_model(model):
        raise TypeError(f"{what} needs a peft PeftModel (the reference is one of its adapters), "
                        f"got {type(model).__name__}")


def _adapter_pairs(model, ref_adapter: str) -> tuple[dict, dict]:
    """(policy, ref): the active adapter's parameters and the reference adapter's counterparts,
    both keyed by the policy parameter's name."""
    policy_adapter = model.active_adapter
    if ref_adapter == policy_adapter:
        raise ValueError(f"adapter_name={ref_adapter!r} is the active (policy) adapter: the "
                         f"reference needs its own adapter")
    named = dict(model.named_parameters())
    policy, ref = {}, {}
    for name, param in named.items():
        parts = name.split(".")
        if policy_adapter not in parts:
            continue
        ref_name = ".".join(ref_adapter if part == policy_adapter else part for part in parts)
        if ref_name not in named:
            raise ValueError(f"the reference adapter {ref_adapter!r} has no counterpart of "
                             f"{name!r} (it must use the policy adapter's config)")
        policy[name], ref[name] = param, named[ref_name]
    if not policy:
        raise ValueError(f"the active adapter {policy_adapter!r} has no parameters")
    return policy, ref


def add_reference_adapter(model, adapter_name: str = "ref") -> None:
    """Add ``adapter_name`` to a peft model as a frozen copy of its active (policy) adapter:
    the trust-region reference. Does nothing when the model already has that adapter."""
    _check_peft_model(model, "add_reference_adapter")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
    if adapter_name in model.peft_config:
        return
    policy_adapter = model.active_adapter
    cuda_devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    # peft initialises the new adapter randomly; that draw must not shift the training RNG
    # (dropout, sampling) against a run that resumes with the adapter already loaded.
    with torch.random.fork_rng(devices=cuda_devices):
        model.add_adapter(adapter_name, copy.deepcopy(model.peft_config[policy_adapter]))
    model.set_adapter(policy_adapter)
    import pyalign
    policy, ref = _adapter_pairs(model, adapter_name)
    pyalign.copy_([p.data for p in ref.values()], [p.data for p in policy.values()])
    for param in ref.values():
        param.requires_grad_(False)


@contextlib.contextmanager
def use_reference_adapter(model, adapter_name: str = "ref"):
    """Run a block with the reference adapter active and gradients off (reference log-probs),
    restoring the policy adapter after."""
    _check_peft_model(model, "use_reference_adapter")
    if adapter_name not in model.peft_config:
        raise ValueError(f"the model has no adapter {adapter_name!r} (adapters: "
                         f"{sorted(model.peft_config)}); see add_reference_adapter")
    policy_adapter = model.active_adapter
    model.set_adapter(adapter_name)
    try:
        with torch.no_grad():
            yield model
    finally:
        # set_adapter also makes the active adapter trainable and the others frozen: restoring
        # the policy adapter restores that too.
        model.set_adapter(policy_adapter)


def _check_moving_reference(args, callback: str) -> None:
    """Refuse TRL settings that contradict a reference the callback moves."""
    if getattr(args, "sync_ref_model", False):
        raise ValueError(f"{callback} updates the reference itself: set the TRL config's "
                         "sync_ref_model=False (TRL's SyncRefModelCallback would update it a "
                         "second time)")
    if getattr(args, "precompute_ref_log_probs", False):
        raise ValueError(f"{callback} moves the reference: precomputed reference log-probs "
                         "would be stale; set precompute_ref_log_probs=False")


def _reference_adapter_pairs(model, adapter_name: str) -> tuple[dict, dict]:
    """(policy, ref) parameters of a peft policy whose reference is its adapter
    ``adapter_name``, added as a copy of the policy adapter when missing."""
    add_reference_adapter(model, adapter_name)
    return _adapter_pairs(model, adapter_name)


class _StrategyCallback(TrainerCallback):
    """Builds a ``pyalign.refmodel`` strategy at train begin, steps it after every optimizer
    step, saves it with each checkpoint and restores it on resume."""

    kind: str          # the strategy's state_dict "kind", a key of STATE_FILES
    strategy = None

    def _build(self, model):
        raise NotImplementedError

    def _check_args(self, args) -> None:
        pass

    def state_file(self, args) -> str:
        """The state file's name in a checkpoint folder (per rank on several processes)."""
        stem = STATE_FILES[self.kind]
        return f"{stem}.pt" if args.world_size <= 1 else f"{stem}_rank{args.process_index}.pt"

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._check_args(args)
        if model is None:
            raise ValueError(f"{type(self).__name__}: the Trainer passed no model to on_train_begin")
        self.strategy = self._build(model)
        if state.global_step > 0:
            self._restore(args, state)
        return control

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.strategy is None:
            raise RuntimeError(f"{type(self).__name__}: on_step_end before on_train_begin (add "
                               f"the callback before trainer.train())")
        self.strategy.step(state.global_step, optimizer=optimizer)
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.strategy is None:
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        buffer = io.BytesIO()
        torch.save({**self.strategy.state_dict(), "global_step": state.global_step}, buffer)
        atomic_write(os.path.join(folder, self.state_file(args)), buffer.getvalue())
        return control

    def _restore(self, args, state) -> None:
        name = self.state_file(args)
        folders = []
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            folders.append(args.resume_from_checkpoint)
        folders.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for folder in folders:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                continue
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if int(saved.get("global_step", -1)) != state.global_step:
                continue
            self.strategy.load_state_dict(saved)
            return
        raise FileNotFoundError(
            f"{type(self).__name__}: resuming at global step {state.global_step}, but no {name} "
            f"of that step in {folders}. The Trainer does not tell callbacks which checkpoint it "
            f"resumes: resume from a checkpoint under args.output_dir, or set "
            f"TrainingArguments(resume_from_checkpoint=<path>) to it.")


class TrustRegionCallback(_StrategyCallback):
    """TR-DPO reference updates (TRL's ``sync_ref_model``) as a Trainer callback: every ``tau``
    optimizer steps ``ref <- alpha * policy + (1 - alpha) * ref``.

    ref_model: the reference model (paired with the policy by parameter name), or None for a
    peft policy whose reference is the adapter ``adapter_name`` of the same model.
    With a TRL trainer, TRL's own ``sync_ref_model`` must be off (it would update the reference
    a second time), and the reference log-probs cannot be precomputed.
    backend: the pyalign backend of the weight ops (``"auto"`` or a ``pyalign.backends`` name).
    """

    kind = "TrustRegion"

    def __init__(self, ref_model: nn.Module | None = None, *, alpha: float = 0.6, tau: int = 512,
                 adapter_name: str = "ref", backend: str = "auto"):
        if ref_model is not None and not isinstance(ref_model, nn.Module):
            raise TypeError(f"ref_model must be an nn.Module or None (a peft policy's reference "
                            f"adapter), got {type(ref_model).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
        self.alpha, self.tau = trust_region_settings(alpha, tau)
        self.ref_model = ref_model
        self.adapter_name = adapter_name
        self.backend = backends.check_name(backend)

    def _check_args(self, args) -> None:
        _check_moving_reference(args, type(self).__name__)

    def _build(self, model) -> TrustRegion:
        if self.ref_model is not None:
            return TrustRegion(model, self.ref_model, self.alpha, self.tau, backend=self.backend)
        if not _is_peft_model(model):
            raise ValueError(f"TrustRegionCallback(ref_model=None) needs a peft policy (the "
                             f"reference is then its adapter {self.adapter_name!r}); got a "
                             f"{type(model).__name__}: pass ref_model=")
        policy, ref = _reference_adapter_pairs(model, self.adapter_name)
        return TrustRegion(policy, ref, self.alpha, self.tau, backend=self.backend)

    def __repr__(self) -> str:
        ref = "adapter " + repr(self.adapter_name) if self.ref_model is None else "ref_model"
        return f"TrustRegionCallback(alpha={self.alpha}, tau={self.tau}, {ref})"


class ElasticResetCallback(_StrategyCallback):
    """Elastic Reset as a Trainer callback: every ``ema_every`` optimizer steps
    ``ema <- ema_decay * ema + (1 - ema_decay) * policy``; every ``reset_every`` steps (after
    that step's EMA update) ``policy <- ema``, ``ema <- init``.

    init: the initial weights (a module, e.g. the KL reference model, or a mapping of tensors);
    None snapshots the policy at the start of training (saved with the checkpoints).
    reset_optimizer: drop the optimizer state (moments, step counts) of the reset parameters
    (the Trainer's optimizer).
    trainable_only, ema_dtype, backend: as ``pyalign.refmodel.ElasticReset``.
    """

    kind = "ElasticReset"

    def __init__(self, *, ema_decay: float, reset_every: int, ema_every: int = 1, init=None,
                 reset_optimizer: bool = False, trainable_only: bool = True,
                 ema_dtype: torch.dtype | None = None, backend: str = "auto"):
        self.ema_decay, self.reset_every, self.ema_every = elastic_reset_settings(
            ema_decay, reset_every, ema_every)
        if ema_dtype is not None and not (isinstance(ema_dtype, torch.dtype)
                                          and ema_dtype.is_floating_point):
            raise TypeError(f"ema_dtype must be a floating torch.dtype or None, got {ema_dtype!r}")
        if init is not None and not isinstance(init, (nn.Module, Mapping)):
            raise TypeError(f"init must be None, an nn.Module or a mapping of tensors, got "
                            f"{type(init).__name__}")
        self.init = init
        self.reset_optimizer = bool(reset_optimizer)
        self.trainable_only = bool(trainable_only)
        self.ema_dtype = ema_dtype
        self.backend = backends.check_name(backend)

    def _build(self, model) -> ElasticReset:
        return ElasticReset(model, self.ema_decay, self.reset_every, ema_every=self.ema_every,
                            init=self.init, reset_optimizer=self.reset_optimizer,
                            trainable_only=self.trainable_only, ema_dtype=self.ema_dtype,
                            backend=self.backend)

    def __repr__(self) -> str:
        return (f"ElasticResetCallback(ema_decay={self.ema_decay}, reset_every={self.reset_every}, "
                f"ema_every={self.ema_every})")


class BEMACallback(_StrategyCallback):
    """BEMA (bias-corrected EMA, arXiv 2508.00180) as a Trainer callback: TRL 1.16's
    ``BEMACallback`` parameters, in its order, with its defaults and schedule
    (``pyalign._bema.BEMASchedule``, docs/algorithms.md "BEMA"), run by
    ``pyalign.refmodel.BEMA`` in one fused pass per update, resumable from checkpoints.

    Where the BEMA weights go: ``ref_model`` (the trainer's reference; TRL's experimental
    callback with ``update_ref_model=True`` and the reference updated at every BEMA update); with
    ``ref_model=None``, a peft policy's reference adapter ``adapter_name`` (as
    TrustRegionCallback), or else, as TRL's ``BEMACallback``, ``self.running_model``: a frozen
    copy of the policy made at train begin and saved with ``save_pretrained`` to
    ``args.output_dir/bema`` at train end. Only parameters with requires_grad are tracked.

    device: where the EMA and the initial snapshot live; None (default) keeps them beside each
    parameter, where the fused kernel updates them with no transfer (TRL defaults to "cpu":
    pass ``device="cpu"`` to save accelerator memory; each update then copies the policy there).
    ema_dtype: the dtype of the EMA and snapshot (default: each parameter's own, as TRL).
    backend: the pyalign backend of the weight ops.
    """

    kind = "BEMA"

    def __init__(self, update_freq: int = 400, ema_power: float = 0.5, bias_power: float = 0.2,
                 lag: float = 10, update_after: int = 0, multiplier: float = 1.0,
                 min_ema_multiplier: float = 0.0, device: str | torch.device | None = None, *,
                 ref_model: nn.Module | None = None, adapter_name: str = "ref",
                 ema_dtype: torch.dtype | None = None, backend: str = "auto"):
        self.schedule = BEMASchedule(update_freq, ema_power, bias_power, lag, update_after,
                                     multiplier, min_ema_multiplier)
        if ref_model is not None and not isinstance(ref_model, nn.Module):
            raise TypeError(f"ref_model must be an nn.Module or None, got {type(ref_model).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
        if ema_dtype is not None and not (isinstance(ema_dtype, torch.dtype)
                                          and ema_dtype.is_floating_point):
            raise TypeError(f"ema_dtype must be a floating torch.dtype or None, got {ema_dtype!r}")
        self.device = None if device is None else torch.device(device)
        self.ref_model, self.adapter_name = ref_model, adapter_name
        self.ema_dtype = ema_dtype
        self.backend = backends.check_name(backend)
        self.running_model = None

    def _moves_trainer_reference(self, model) -> bool:
        return self.ref_model is not None or _is_peft_model(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self._moves_trainer_reference(model):
            _check_moving_reference(args, type(self).__name__)
        return super().on_train_begin(args, state, control, model=model, **kwargs)

    def _build(self, model) -> BEMA:
        if self.ref_model is not None:
            policy, ref = model, self.ref_model
        elif _is_peft_model(model):
            policy, ref = _reference_adapter_pairs(model, self.adapter_name)
        else:
            self.running_model = copy.deepcopy(model).requires_grad_(False)
            if self.device is not None:
                self.running_model.to(self.device)
            policy, ref = model, self.running_model
        return BEMA(policy, ref, *dataclasses.astuple(self.schedule), ema_dtype=self.ema_dtype,
                    device=self.device, backend=self.backend)

    def on_train_end(self, args, state, control, **kwargs):
        if self.running_model is not None and state.is_world_process_zero:
            self.running_model.save_pretrained(os.path.join(args.output_dir, "bema"))
        return control

    def __repr__(self) -> str:
        target = ("ref_model" if self.ref_model is not None
                  else f"adapter {self.adapter_name!r} or running_model")
        return f"BEMACallback({self.schedule}, {target})"
