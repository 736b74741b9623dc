"""Reference-model strategies: Frozen, TrustRegion (TR-DPO/IPO/KTO), ElasticReset and BEMA.

Each strategy has ``step(global_step, optimizer=None) -> bool`` (call it after every optimizer
step with the number of optimizer steps done so far; it says whether it changed any weights),
``state_dict()`` / ``load_state_dict()`` for exact resume. To drive one from a
``transformers.Trainer`` (or a TRL trainer), with its state saved in and restored from the
Trainer's checkpoints, use ``pyalign.integrations.callbacks`` (``TrustRegionCallback``,
``ElasticResetCallback``, ``BEMACallback``).

    ref = TrustRegion(policy, ref_model, alpha=0.6, tau=512)
    for global_step in range(1, total_steps + 1):
        ...; optimizer.step()
        ref.step(global_step)

The weight updates run through ``pyalign.lerp_`` / ``pyalign.ema_`` / ``pyalign.copy_`` on each
parameter's local tensor (``param.data``, or the local shard of a DTensor under FSDP2), so under
DDP/FSDP each rank updates its own shards with no communication: the policy and the reference
must be sharded alike. Parameters are paired by name (``module.`` and ``_orig_mod.`` prefixes left
by DDP and torch.compile are ignored); a mapping name -> parameter can stand for a module (two
adapters of one peft model, paired by the caller). The rules (docs/algorithms.md):

- TrustRegion: every ``tau`` steps ``ref <- alpha * policy + (1 - alpha) * ref``; alpha=1 is the
  hard update ``ref <- policy``.
- ElasticReset: every ``ema_every`` steps ``ema <- decay * ema + (1 - decay) * policy``; every
  ``reset_every`` steps (after that step's EMA update) ``policy <- ema`` then ``ema <- init``.
- BEMA: every ``update_freq`` steps after ``update_after``, ``ema <- (1 - beta_t) ema + beta_t
  policy`` and ``ref <- ema + alpha_t (policy - init)`` in one ``pyalign.bema_`` pass.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import nn

from pyalign import backends
from pyalign._bema import BEMASchedule
from pyalign._utils import canonical_param_name, check_int, local_shard, named_tensors

__all__ = ["ReferenceStrategy", "Frozen", "TrustRegion", "ElasticReset", "BEMA"]


def _named_params(model, what: str) -> dict[str, nn.Parameter]:
    if isinstance(model, Mapping):
        bad = [k for k, v in model.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"{what}: a mapping must hold tensors, {bad[0]!r} does not")
        return {canonical_param_name(k): v for k, v in model.items()}
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} must be an nn.Module or a mapping name -> parameter, got "
                        f"{type(model).__name__}")
    return named_tensors(model, what)


def _check_period(name: str, value) -> int:
    return check_int(name, value, minimum=1, what="an int >= 1", error=ValueError)


def trust_region_settings(alpha, tau, *, keys=("alpha", "tau")) -> tuple[float, int]:
    """``(alpha, tau)`` checked: alpha in (0, 1] (1 = hard update), tau an int >= 1; ``keys``
    name them in the error (a trainer's config keys)."""
    alpha = float(alpha)
    if not math.isfinite(alpha) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"{keys[0]} must be in (0, 1] (1 = hard update), got {alpha}")
    return alpha, _check_period(keys[1], tau)


def elastic_reset_settings(ema_decay, reset_every, ema_every, *,
                           keys=("ema_decay", "reset_every", "ema_every")) -> tuple[float, int, int]:
    """``(ema_decay, reset_every, ema_every)`` checked: decay in [0, 1), periods ints >= 1;
    ``keys`` name them in the error (a trainer's config keys)."""
    ema_decay = float(ema_decay)
    if not math.isfinite(ema_decay) or not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"{keys[0]} must be in [0, 1), got {ema_decay}")
    return ema_decay, _check_period(keys[1], reset_every), _check_period(keys[2], ema_every)


def _check_step(global_step) -> int:
    if isinstance(global_step, torch.Tensor):
        global_step = int(global_step)
    if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
        raise ValueError(f"global_step must be an int >= 0 (optimizer steps done), got "
                         f"{global_step!r}")
    return global_step


def _pair_names(policy_params: dict, other: dict, what: str, names: list[str]) -> None:
    missing = [n for n in names if n not in other]
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} parameter(s) of the policy, e.g. "
                         f"{missing[:3]}")
    for name in names:
        a, b = local_shard(policy_params[name]), local_shard(other[name])
        if a.shape != b.shape:
            raise ValueError(f"parameter {name!r}: policy shape {tuple(a.shape)} != {what} "
                             f"shape {tuple(b.shape)}")


def _optimizer_state(optimizer):
    """The per-parameter state dict of a torch optimizer (or of a wrapper around one)."""
    seen = 0
    while optimizer is not None and seen < 4:
        state = getattr(optimizer, "state", None)
        if isinstance(state, Mapping) or hasattr(state, "pop"):
            return state
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    raise TypeError("could not find the optimizer's per-parameter state (.state)")


class ReferenceStrategy:
    """Common interface. Subclasses implement ``step``, ``state_dict``, ``load_state_dict``."""

    #: the model to compute reference log-probs with (None where the strategy has none)
    ref: nn.Module | None = None

    def step(self, global_step: int, optimizer=None) -> bool:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def _check_kind(self, state: dict) -> None:
        if not isinstance(state, Mapping) or state.get("kind") != type(self).__name__:
            got = state.get("kind") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"state is not a {type(self).__name__} state_dict (kind={got!r})")


class Frozen(ReferenceStrategy):
    """The usual fixed reference: ``step`` never changes anything."""

    def __init__(self, ref: nn.Module):
        if not isinstance(ref, nn.Module):
            raise TypeError(f"ref must be an nn.Module, got {type(ref).__name__}")
        self.ref = ref

    def step(self, global_step: int, optimizer=None) -> bool:
        _check_step(global_step)
        return False

    def state_dict(self) -> dict:
        return {"kind": "Frozen"}

    def load_state_dict(self, state: dict) -> None:
        self._check_kind(state)

    def __repr__(self) -> str:
        return "Frozen()"


class TrustRegion(ReferenceStrategy):
    """TR-DPO reference updates: every ``tau`` optimizer steps ``ref <- alpha*policy +
    (1-alpha)*ref`` (``pyalign.lerp_``); ``alpha=1`` is the hard update (``pyalign.copy_``).

    policy, ref: modules paired by parameter name, or mappings name -> parameter (e.g. the LoRA
    weights of a peft model's policy adapter and of its reference adapter, under the same keys).

    trainable_only: update only the reference parameters whose policy counterpart has
    requires_grad (adapters trained on a shared frozen base). ``state_dict`` holds the current
    reference weights (references, not copies) so that a resumed run is exact.
    backend: the pyalign backend of the weight ops (``"auto"``, or a name from
    ``pyalign.backends.BACKENDS``).
    """

    def __init__(self, policy: nn.Module, ref: nn.Module, alpha: float = 0.6, tau: int = 512, *,
                 trainable_only: bool = False, backend: str = "auto"):
        self.alpha, self.tau = trust_region_settings(alpha, tau)
        self.backend = backends.check_name(backend)
        if policy is ref:
            raise ValueError("policy and ref are the same module: the reference needs its own weights")
        policy_params = _named_params(policy, "policy")
        ref_params = _named_params(ref, "ref")
        self.names = [n for n, p in policy_params.items() if p.requires_grad or not trainable_only]
        _pair_names(policy_params, ref_params, "ref", self.names)
        if not trainable_only and set(ref_params) != set(policy_params):
            extra = sorted(set(ref_params) - set(policy_params))
            raise ValueError(f"ref has parameters the policy lacks, e.g. {extra[:3]}")
        self.policy, self.ref = policy, ref
        self.trainable_only = trainable_only
        self.last_update_step = 0
        self.num_updates = 0

    def _tensors(self, model: nn.Module) -> list[torch.Tensor]:
        params = _named_params(model, "model")
        return [local_shard(params[n]) for n in self.names]

    def update(self) -> None:
        """Apply the update now (what ``step`` does on schedule)."""
        import pyalign
        ref_tensors, policy_tensors = self._tensors(self.ref), self._tensors(self.policy)
        if self.alpha == 1.0:
            pyalign.copy_(ref_tensors, policy_tensors, backend=self.backend)
        else:
            pyalign.lerp_(ref_tensors, policy_tensors, self.alpha, backend=self.backend)
        self.num_updates += 1

    def step(self, global_step: int, optimizer=None) -> bool:
        global_step = _check_step(global_step)
        if global_step == 0 or global_step % self.tau or global_step == self.last_update_step:
            return False
        self.update()
        self.last_update_step = global_step
        return True

    def state_dict(self) -> dict:
        return {"kind": "TrustRegion", "alpha": self.alpha, "tau": self.tau,
                "last_update_step": self.last_update_step, "num_updates": self.num_updates,
                "ref": dict(zip(self.names, self._tensors(self.ref), strict=True))}

    def load_state_dict(self, state: dict) -> None:
        self._check_kind(state)
        ref_tensors = dict(zip(self.names, self._tensors(self.ref), strict=True))
        _check_tensor_dict(state["ref"], ref_tensors, "ref")
        with torch.no_grad():
            for name, tensor in ref_tensors.items():
                tensor.copy_(state["ref"][name])
        self.last_update_step = int(state["last_update_step"])
        self.num_updates = int(state["num_updates"])

    def __repr__(self) -> str:
        return (f"TrustRegion(alpha={self.alpha}, tau={self.tau}, tensors={len(self.names)}, "
                f"updates={self.num_updates})")


class ElasticReset(ReferenceStrategy):
    """Elastic Reset: an EMA of the policy; periodically the policy is reset to its EMA and the
    EMA to the initial weights.

    Every ``ema_every`` optimizer steps: ``ema <- ema_decay * ema + (1 - ema_decay) * policy``.
    Every ``reset_every`` steps, after that step's EMA update: ``policy <- ema``, ``ema <- init``,
    and, with ``reset_optimizer=True``, the optimizer state of the reset parameters is dropped
    (the optimizer comes from ``step(..., optimizer=)`` or the ``optimizer`` argument).

    init: the initial weights, an nn.Module (pass the KL reference model when it holds them: it
    is read, never written, and no copy is made) or a state-dict-like mapping; None snapshots the
    policy's weights now (one more copy of the updated parameters).
    trainable_only: the EMA and resets cover only parameters with requires_grad (LoRA/PEFT).
    ema_dtype: dtype of the EMA tensors (default: each parameter's own), e.g. float32 for a bf16
    policy.
    backend: the pyalign backend of the weight ops (``"auto"``, or a name from
    ``pyalign.backends.BACKENDS``).
    """

    def __init__(self, policy: nn.Module, ema_decay: float = 0.995, reset_every: int = 260, *,
                 ema_every: int = 1, init=None, reset_optimizer: bool = False,
                 trainable_only: bool = True, ema_dtype: torch.dtype | None = None,
                 optimizer=None, backend: str = "auto"):
        self.ema_decay, self.reset_every, self.ema_every = elastic_reset_settings(
            ema_decay, reset_every, ema_every)
        self.backend = backends.check_name(backend)
        if init is policy:
            raise ValueError("init is the policy itself: pass the reference model or None")
        policy_params = _named_params(policy, "policy")
        self.names = [n for n, p in policy_params.items() if p.requires_grad or not trainable_only]
        if not self.names:
            raise ValueError("the policy has no parameters to track (none requires grad?)")
        self.policy = policy
        self.trainable_only = trainable_only
        self.reset_optimizer = bool(reset_optimizer)
        self.optimizer = optimizer
        policy_tensors = self._policy_tensors()
        if init is None:
            self._init_tensors = [t.clone() for t in policy_tensors]
            self.owns_init = True
            self.ref = None
        elif isinstance(init, nn.Module):
            init_params = _named_params(init, "init")
            _pair_names(policy_params, init_params, "init", self.names)
            self._init_tensors = [local_shard(init_params[n]) for n in self.names]
            self.owns_init = False
            self.ref = init
        elif isinstance(init, Mapping):
            mapping = {canonical_param_name(k): v for k, v in init.items()}
            _check_tensor_dict(mapping, dict(zip(self.names, policy_tensors, strict=True)), "init",
                               allow_extra=True)
            self._init_tensors = [local_shard(mapping[n]).to(t.device) for n, t in
                                  zip(self.names, policy_tensors, strict=True)]
            self.owns_init = False
            self.ref = None
        else:
            raise TypeError(f"init must be None, an nn.Module or a mapping of tensors, got "
                            f"{type(init).__name__}")
        self.ema_tensors = [init_t.to(dtype=ema_dtype or p.dtype, device=p.device, copy=True)
                            for init_t, p in zip(self._init_tensors, policy_tensors, strict=True)]
        self.last_step = 0
        self.num_ema_updates = 0
        self.num_resets = 0

    def _policy_tensors(self) -> list[torch.Tensor]:
        params = _named_params(self.policy, "policy")
        return [local_shard(params[n]) for n in self.names]

    def update_ema(self) -> None:
        """``ema <- decay * ema + (1 - decay) * policy`` now."""
        import pyalign
        pyalign.ema_(self.ema_tensors, self._policy_tensors(), self.ema_decay, backend=self.backend)
        self.num_ema_updates += 1

    def reset(self, optimizer=None) -> None:
        """``policy <- ema``, ``ema <- init`` now (and the optimizer state, if configured)."""
        import pyalign
        optimizer = optimizer if optimizer is not None else self.optimizer
        if self.reset_optimizer and optimizer is None:
            raise ValueError("reset_optimizer=True needs the optimizer: pass "
                             "step(..., optimizer=opt) or ElasticReset(..., optimizer=opt)")
        pyalign.copy_(self._policy_tensors(), self.ema_tensors, backend=self.backend)
        pyalign.copy_(self.ema_tensors, self._init_tensors, backend=self.backend)
        if self.reset_optimizer:
            self.reset_optimizer_state(optimizer)
        self.num_resets += 1

    def reset_optimizer_state(self, optimizer) -> int:
        """Drop the optimizer state (moments, step counts) of the tracked policy parameters.
        Returns how many parameters had state."""
        state = _optimizer_state(optimizer)
        params = _named_params(self.policy, "policy")
        dropped = 0
        for name in self.names:
            if state.pop(params[name], None) is not None:
                dropped += 1
        return dropped

    def step(self, global_step: int, optimizer=None) -> bool:
        global_step = _check_step(global_step)
        if self.reset_optimizer and optimizer is None and self.optimizer is None:
            raise ValueError("reset_optimizer=True needs the optimizer: pass "
                             "step(..., optimizer=opt) or ElasticReset(..., optimizer=opt)")
        if global_step == 0 or global_step == self.last_step:
            return False
        self.last_step = global_step
        changed = False
        if global_step % self.ema_every == 0:
            self.update_ema()
            changed = True
        if global_step % self.reset_every == 0:
            self.reset(optimizer)
            changed = True
        return changed

    def state_dict(self) -> dict:
        state = {"kind": "ElasticReset", "ema_decay": self.ema_decay,
                 "reset_every": self.reset_every, "ema_every": self.ema_every,
                 "last_step": self.last_step, "num_ema_updates": self.num_ema_updates,
                 "num_resets": self.num_resets, "ema": dict(zip(self.names, self.ema_tensors, strict=True))}
        if self.owns_init:
            state["init"] = dict(zip(self.names, self._init_tensors, strict=True))
        return state

    def load_state_dict(self, state: dict) -> None:
        self._check_kind(state)
        ema = dict(zip(self.names, self.ema_tensors, strict=True))
        _check_tensor_dict(state["ema"], ema, "ema")
        if self.owns_init:
            if "init" not in state:
                raise ValueError("state has no 'init' tensors, but this ElasticReset owns its "
                                 "init copy (init=None)")
            _check_tensor_dict(state["init"], dict(zip(self.names, self._init_tensors, strict=True)), "init")
        with torch.no_grad():
            for name, tensor in ema.items():
                tensor.copy_(state["ema"][name])
            if self.owns_init:
                for name, tensor in zip(self.names, self._init_tensors, strict=True):
                    tensor.copy_(state["init"][name])
        self.last_step = int(state["last_step"])
        self.num_ema_updates = int(state["num_ema_updates"])
        self.num_resets = int(state["num_resets"])

    def __repr__(self) -> str:
        return (f"ElasticReset(ema_decay={self.ema_decay}, reset_every={self.reset_every}, "
                f"ema_every={self.ema_every}, tensors={len(self.names)}, "
                f"resets={self.num_resets})")


class BEMA(ReferenceStrategy):
    """Bias-corrected EMA reference (BEMA, Block & Zhang, arXiv 2508.00180; TRL 1.16's
    ``BEMACallback``: same names, defaults and schedule, ``pyalign._bema.BEMASchedule``;
    docs/algorithms.md "BEMA").

    At ``global_step == update_after`` the policy is snapshotted: ``init <- policy``,
    ``ema <- policy`` (construction takes the first snapshot). Every ``update_freq`` steps after
    that, with ``t = global_step``, ``beta_t = max((lag + multiplier t)^-ema_power,
    min_ema_multiplier)`` and ``alpha_t = (lag + multiplier t)^-bias_power``::

        ema <- (1 - beta_t) ema + beta_t policy;   ref <- ema + alpha_t (policy - init)

    in one ``pyalign.bema_`` pass (a fused kernel on cpu and cuda). Between updates ``ref`` does
    not move. Tracks the parameters with requires_grad (``trainable_only=False``: all), paired
    with ``ref`` (a module or a mapping name -> parameter) by name; ``ref``'s other parameters
    are left alone. ``ema`` and ``init`` are held in ``ema_dtype`` (default: each parameter's
    own, as TRL) on ``device`` (default: each parameter's own, where the fused kernel runs; TRL
    keeps them on the CPU: ``device="cpu"`` does too, copying the policy there at each update).
    ``state_dict`` holds ref, ema and init (references, not copies) and the counters, so a
    resumed run is exact.
    """

    def __init__(self, policy: nn.Module, ref: nn.Module, update_freq: int = 400,
                 ema_power: float = 0.5, bias_power: float = 0.2, lag: float = 10,
                 update_after: int = 0, multiplier: float = 1.0, min_ema_multiplier: float = 0.0,
                 *, trainable_only: bool = True, ema_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, backend: str = "auto"):
        self.schedule = BEMASchedule(update_freq, ema_power, bias_power, lag, update_after,
                                     multiplier, min_ema_multiplier)
        self.backend = backends.check_name(backend)
        if policy is ref:
            raise ValueError("policy and ref are the same module: the reference needs its own weights")
        policy_params, ref_params = _named_params(policy, "policy"), _named_params(ref, "ref")
        self.names = [n for n, p in policy_params.items() if p.requires_grad or not trainable_only]
        if not self.names:
            raise ValueError("the policy has no parameters to track (none requires grad?)")
        _pair_names(policy_params, ref_params, "ref", self.names)
        self.policy, self.ref = policy, ref
        self.device = None if device is None else torch.device(device)
        self.ema_tensors = [t.detach().to(dtype=ema_dtype or t.dtype, device=self.device or t.device,
                                          copy=True) for t in self._tensors(policy)]
        self.init_tensors = [t.clone() for t in self.ema_tensors]
        self.last_update_step = 0
        self.num_updates = 0

    def _tensors(self, model) -> list[torch.Tensor]:
        params = _named_params(model, "model")
        return [local_shard(params[n]) for n in self.names]

    def snapshot(self) -> None:
        """``init <- policy``, ``ema <- policy`` now (what ``step`` does at ``update_after``)."""
        with torch.no_grad():
            for state in (self.init_tensors, self.ema_tensors):
                torch._foreach_copy_(state, self._tensors(self.policy))

    def update(self, global_step: int) -> None:
        """Apply the BEMA update of step ``global_step`` now (what ``step`` does on schedule)."""
        import pyalign
        alpha, beta = self.schedule.coefficients(global_step)
        refs, state = self._tensors(self.ref), self.ema_tensors
        # a policy or ref tensor on another device than the state is staged beside it
        params = [p.to(e.device) for p, e in zip(self._tensors(self.policy), state, strict=True)]
        targets = [r if r.device == e.device else torch.empty_like(e, dtype=r.dtype)
                   for r, e in zip(refs, state, strict=True)]
        pyalign.bema_(targets, state, params, self.init_tensors, alpha=alpha, beta=beta,
                      backend=self.backend)
        with torch.no_grad():
            for ref, target in zip(refs, targets, strict=True):
                if target is not ref:
                    ref.copy_(target)
        self.num_updates += 1

    def step(self, global_step: int, optimizer=None) -> bool:
        global_step = _check_step(global_step)
        action = self.schedule.action(global_step)
        if action == "snapshot":
            self.snapshot()
        if action != "update" or global_step == self.last_update_step:
            return False
        self.update(global_step)
        self.last_update_step = global_step
        return True

    def _state_tensors(self) -> dict:
        return {key: dict(zip(self.names, tensors, strict=True)) for key, tensors in
                (("ref", self._tensors(self.ref)), ("ema", self.ema_tensors), ("init", self.init_tensors))}

    def state_dict(self) -> dict:
        return {"kind": "BEMA", **dataclasses.asdict(self.schedule),
                "last_update_step": self.last_update_step, "num_updates": self.num_updates,
                **self._state_tensors()}

    def load_state_dict(self, state: dict) -> None:
        self._check_kind(state)
        targets = self._state_tensors()
        for key, tensors in targets.items():
            _check_tensor_dict(state.get(key), tensors, key)
        with torch.no_grad():
            for key, tensors in targets.items():
                for name, tensor in tensors.items():
                    tensor.copy_(state[key][name])
        self.last_update_step = int(state["last_update_step"])
        self.num_updates = int(state["num_updates"])

    def __repr__(self) -> str:
        return f"BEMA({self.schedule}, tensors={len(self.names)}, updates={self.num_updates})"


def _check_tensor_dict(given, expected: dict, what: str, allow_extra: bool = False) -> None:
    if not isinstance(given, Mapping):
        raise ValueError(f"{what}: expected a mapping of tensors, got {type(given).__name__}")
    missing = [n for n in expected if n not in given]
    extra = [n for n in given if n not in expected]
    if missing or (extra and not allow_extra):
        raise ValueError(f"{what}: names do not match (missing {missing[:3]}, unexpected "
                         f"{extra[:3]})")
    for name, tensor in expected.items():
        if tuple(given[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{what}[{name!r}]: shape {tuple(given[name].shape)} != "
                             f"{tuple(tensor.shape)}")
