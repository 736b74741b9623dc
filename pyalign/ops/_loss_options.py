"""What a preference or unpaired loss call is configured with, checked once for every entry point
(pyalign/ops/preference.py, linear_preference.py, kto.py): the loss terms of the registry
(pyalign/losses/), the scalar options against the losses they go with, and the reduction."""
from __future__ import annotations

from typing import NamedTuple

import torch

from pyalign import losses
from pyalign.ops import _checks

REDUCTIONS = ("mean", "sum", "none")


class LossSpec(NamedTuple):
    """A validated loss configuration: (entry, weight, effective label smoothing) per term, and
    the options of the scores the terms run on (losses.pair_ratios reads them)."""
    terms: tuple
    beta: float
    f_divergence: str
    alpha: float
    simpo_gamma: float = losses.SIMPO_GAMMA

    @property
    def reference_free(self) -> bool:
        """No term uses the reference: the entry points need none."""
        return all(entry.reference_free for entry, _, _ in self.terms)


def check_loss_spec(loss, loss_weights, beta, label_smoothing, reduction, f_divergence,
                     f_alpha_divergence_coef, simpo_gamma=losses.SIMPO_GAMMA) -> LossSpec:
    """Every scalar argument of a loss configuration, before any tensor is looked at."""
    names = [loss] if isinstance(loss, str) else loss
    if not isinstance(names, (list, tuple)) or not names:
        raise TypeError(f"loss must be a name of {losses.PAIRWISE_NAMES} or a non-empty list of them, got "
                        f"{type(loss).__name__} {loss!r}")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"loss must be a str, one of {losses.PAIRWISE_NAMES}, got {type(name).__name__} "
                            f"{name!r}")
        if name not in losses.PAIRWISE_NAMES:
            where = "" if isinstance(loss, str) else f" in loss={list(names)}"
            raise ValueError(f"unknown preference loss {name!r}{where}; expected one of "
                             f"{losses.PAIRWISE_NAMES}")
    if loss_weights is None:
        weights = [1.0] * len(names)
    else:
        if not isinstance(loss_weights, (list, tuple)) or len(loss_weights) != len(names):
            raise ValueError(f"loss_weights must be a list of {len(names)} weights, one per loss of "
                             f"{list(names)}, got {loss_weights!r}")
        weights = [_checks.check_finite_range("loss_weights", weight, low=0.0,
                                              what="finite numbers >= 0")
                   for weight in loss_weights]
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    beta = _checks.check_positive("beta", beta)
    label_smoothing = _checks.check_finite_range("label_smoothing", label_smoothing, low=0.0, high=0.5,
                                                 high_inclusive=False)
    _checks.check_choice("f_divergence", f_divergence, losses.F_DIVERGENCE_NAMES)
    alpha = _checks.check_finite_range("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if f_divergence != "reverse_kl":
        refused = [name for name in names if not losses.REGISTRY[name].f_divergence]
        if refused:
            raise ValueError(f"f_divergence={f_divergence!r} applies only to the losses built on the "
                             f"chosen-rejected score difference {losses.F_DIVERGENCE_LOSSES}, not "
                             f"to {refused}; use f_divergence='reverse_kl' with them")
    simpo_gamma = _checks.check_finite_range("simpo_gamma", simpo_gamma)
    if simpo_gamma != losses.SIMPO_GAMMA and not set(names) & set(losses.SIMPO_GAMMA_LOSSES):
        raise ValueError(f"simpo_gamma applies only to {losses.SIMPO_GAMMA_LOSSES} (SimPO's target "
                         f"margin), not to {list(names)}")
    # exo_pair needs eps > 0; TRL substitutes 1e-3 for 0 (the entry's zero_smoothing_substitute)
    terms = tuple((losses.REGISTRY[name], weight,
                   losses.effective_label_smoothing(name, label_smoothing))
                  for name, weight in zip(names, weights))
    return LossSpec(terms, beta, f_divergence, alpha, simpo_gamma)


def check_reference(spec: LossSpec, given: bool, arguments: str) -> None:
    """The reference (``arguments``, as the entry point names them) is given unless every term
    is reference-free (losses.REFERENCE_FREE_NAMES)."""
    if not given and not spec.reference_free:
        needing = [entry.name for entry, _, _ in spec.terms if not entry.reference_free]
        raise ValueError(f"loss {needing} needs the reference log-probs: give {arguments} (only "
                         f"the reference-free losses {losses.REFERENCE_FREE_NAMES} run without)")


def check_needs(spec: LossSpec, given: dict, remedy: str) -> None:
    """Each term's ``needs`` (registry) against the inputs given (name -> tensor or None)."""
    for entry, _, _ in spec.terms:
        missing = [name for name in entry.needs if given.get(name) is None]
        if missing:
            raise ValueError(f"loss {entry.name!r} needs {' and '.join(missing)} (the completion "
                             f"token counts [B] its sequence log-probs sum over); {remedy}")


def check_token_options(spec: LossSpec, ld_alpha, use_weighting, average) -> tuple:
    """ld_alpha (None or in [0, 1]) and use_weighting against the losses they go with."""
    if ld_alpha is not None:
        ld_alpha = _checks.check_finite_range("ld_alpha", ld_alpha, low=0.0, high=1.0)
        if average:
            raise ValueError("ld_alpha weights the tokens of summed log-probs (LD-DPO); it is not "
                             "defined with average_log_prob=True")
    use_weighting = _checks.check_bool("use_weighting", use_weighting)
    if use_weighting:
        refused = [entry.name for entry, _, _ in spec.terms if not entry.pair_weights]
        if refused:
            raise ValueError(f"use_weighting (WPO) cannot weight {refused}: they sort the batch, "
                             f"which would misalign the per-pair weights")
    return ld_alpha, use_weighting


def check_lengths(name: str, lengths, pairs: int, device) -> None:
    _checks.check_tensor(name, lengths)
    if lengths.dtype == torch.bool or lengths.dtype.is_complex:
        raise TypeError(f"{name} must be an integer or floating tensor of token counts, got "
                        f"{lengths.dtype}")
    _checks.check_shape(name, lengths, (pairs,), "[B]")
    if lengths.device != device:
        raise ValueError(f"{name} is on {lengths.device}, the log-probs on {device}")
    # data-dependent: checked eagerly; under torch.compile it would break the graph, so it is
    # left to the eager run (negative counts clamp to 1 in the losses that divide by them)
    if (lengths.numel() and not torch.compiler.is_compiling()
            and not bool(((lengths >= 0) & torch.isfinite(lengths.double())).all())):
        raise ValueError(f"{name} must hold finite token counts >= 0")


def reduced(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """``values`` reduced as ``reduction`` (a name of REDUCTIONS) says."""
    if reduction == "none":
        return values
    if values.numel() == 0:  # an empty batch: a zero loss that still has a graph
        return values.sum()
    return values.mean() if reduction == "mean" else values.sum()
