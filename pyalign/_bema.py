"""BEMA's schedule (docs/algorithms.md "BEMA"; Block & Zhang, arXiv 2508.00180): its settings by
TRL 1.16's ``BEMACallback`` names and defaults, checked once, and what happens at each optimizer
step. Shared by pyalign.refmodel.BEMA, pyalign.integrations.callbacks.BEMACallback and the
preference trainer's ``reference="bema"``."""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class BEMASchedule:
    """``update_freq`` (phi) steps between updates, ``ema_power`` (kappa), ``bias_power`` (eta),
    ``lag`` (rho), ``update_after`` (tau, the burn-in), ``multiplier`` (gamma),
    ``min_ema_multiplier`` (beta_t's floor). TRL's defaults."""

    update_freq: int = 400
    ema_power: float = 0.5
    bias_power: float = 0.2
    lag: float = 10
    update_after: int = 0
    multiplier: float = 1.0
    min_ema_multiplier: float = 0.0

    def __post_init__(self):
        for name in ("update_freq", "update_after"):
            value, low = getattr(self, name), 1 if name == "update_freq" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("ema_power", "bias_power", "lag", "multiplier", "min_ema_multiplier"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.min_ema_multiplier > 1:
            raise ValueError(f"min_ema_multiplier must be in [0, 1], got {self.min_ema_multiplier}")
        first = self.lag + self.multiplier * (self.update_after + self.update_freq)
        if first < 1:  # the base only grows with t: >= 1 at the first update keeps it there
            raise ValueError(f"lag + multiplier * (update_after + update_freq) = {first} < 1: "
                             f"beta_t = (lag + multiplier * t)^-ema_power would exceed 1")

    def action(self, global_step: int) -> str | None:
        """What happens after optimizer step ``global_step`` (TRL's on_step_end): "snapshot"
        at ``update_after`` (init and EMA <- policy), "update" every ``update_freq`` steps
        after it, None otherwise."""
        if global_step < self.update_after:
            return None
        if global_step == self.update_after:
            return "snapshot"
        return None if (global_step - self.update_after) % self.update_freq else "update"

    def coefficients(self, global_step: int) -> tuple[float, float]:
        """``(alpha_t, beta_t)`` at ``t = global_step``, in TRL's float arithmetic:
        alpha_t = (lag + multiplier t)^-bias_power, beta_t = max((lag + multiplier t)^-ema_power,
        min_ema_multiplier)."""
        base = self.lag + self.multiplier * global_step
        return base ** -self.bias_power, max(base ** -self.ema_power, self.min_ema_multiplier)
