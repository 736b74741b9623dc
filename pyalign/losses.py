"""The loss registry: every preference loss of pyalign declared once.

Each ``Loss`` entry holds the name (TRL's ``loss_type``), the paper (arXiv id), the forward on
the log-ratios (``r_w = π_w − ρ_w``, ``r_l = π_l − ρ_l``; its docstring states the equation of
docs/algorithms.md), the closed-form gradient ``(∂L/∂r_w, ∂L/∂r_l)`` that the custom ops need
(they run below autograd), and flags: whether it uses label smoothing, the ε it substitutes for
0, whether it is pairwise (or unpaired, as KTO: then whether it uses the KL reference point),
and its Triton kernel id (``None``: eager only, the Triton backend hands it to eager).

Everything else derives from here: ``pyalign.ops.preference.LOSS_NAMES`` (validation), the
trainers' ``PAIRWISE_LOSSES``/``LOSSES`` and the CLI's choices, ``LOSS_IDS`` of
kernels/preference.py (checked against the kernel's branches by ``kernel_ids``), the eager
backend's ``pair_losses``/``pair_loss_ratio_grads``, and the tests' parametrization.

Numerics: the forwards and gradients are written to stay finite wherever the value is finite,
for |β·h| up to 1e4 and beyond in fp32: log-sigmoids via ``F.logsigmoid``, ``1 − σ(u)`` as
``σ(−u)`` and ``σ'(u)`` as ``σ(u)·σ(−u)`` (no cancellation near 1), discopop's ``σ(x/τ)·exp(−x)``
as ``exp(logσ(x/τ) − x)`` (no ``0·inf``), a label-smoothing term skipped when ``ε = 0`` and
exo_pair's ``σ(∓x)·logσ(∓x)`` taken as 0 where ``σ(∓x) = 0`` (``0·logσ(−x)`` is ``0·(−inf)`` =
NaN at ``x = +inf``, e.g. a rejected log-prob of ``−inf``, where the loss is finite).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

DISCOPOP_TAU = 0.05  # TRL's default discopop_tau

_sig, _logsig = torch.sigmoid, F.logsigmoid


def _sig_prime(u):
    return _sig(u) * _sig(-u)


@dataclasses.dataclass(frozen=True)
class Loss:
    name: str
    paper: str  # arXiv id of the paper the loss comes from
    forward: Callable  # (r_w, r_l, beta, eps) -> per-pair loss; the docstring is the equation
    grad: Optional[Callable]  # (r_w, r_l, beta, eps) -> (dL/dr_w, dL/dr_l); None: autograd only
    uses_label_smoothing: bool = False
    zero_smoothing_substitute: Optional[float] = None  # the eps used for label_smoothing = 0
    pairwise: bool = True  # False: not a preference_loss name (kto: unpaired examples)
    kernel_id: Optional[int] = None  # branch of kernels/preference.py; None: eager only
    uses_kl_reference: bool = False  # unpaired: the loss needs KTO's KL reference point z0

    @property
    def equation(self) -> str:
        return (self.forward.__doc__ or "").strip()


# ------------------------------------------------------------------------- the pair losses
# Each forward and gradient takes the log-ratios in the accumulation dtype (fp32 or fp64) and
# python floats beta, eps.

def _weighted(weight, value):
    """weight * value, 0 where the weight is 0 (value may be -inf there: logσ(−x) at x = +inf)."""
    return torch.where(weight == 0, 0.0, weight * value)


def _smoothing_term(eps, term):
    """eps * term, skipped for eps = 0: term may be -inf where the loss itself is finite."""
    return eps * term() if eps != 0 else 0.0


def _sigmoid(rw, rl, beta, eps):
    """DPO / cDPO: −(1−ε)·logσ(x) − ε·logσ(−x),  x = β·(r_w − r_l)."""
    x = beta * (rw - rl)
    return -(1 - eps) * _logsig(x) - _smoothing_term(eps, lambda: _logsig(-x))


def _sigmoid_grad(rw, rl, beta, eps):
    x = beta * (rw - rl)
    d = beta * (-(1 - eps) * _sig(-x) + eps * _sig(x))
    return d, -d


def _ipo(rw, rl, beta, eps):
    """IPO: (h − 1/(2β))²,  h = r_w − r_l."""
    return (rw - rl - 1 / (2 * beta)) ** 2


def _ipo_grad(rw, rl, beta, eps):
    d = 2 * ((rw - rl) - 1 / (2 * beta))
    return d, -d


def _hinge(rw, rl, beta, eps):
    """SLiC-HF: max(0, 1 − x)."""
    return torch.relu(1 - beta * (rw - rl))


def _hinge_grad(rw, rl, beta, eps):
    x = beta * (rw - rl)
    # 0 at the kink, as torch.relu; -beta in x's dtype (a python-scalar where is fp32)
    d = torch.where(1 - x > 0, torch.full_like(x, -beta), torch.zeros_like(x))
    return d, -d


def _robust(rw, rl, beta, eps):
    """rDPO: [−(1−ε)·logσ(x) + ε·logσ(−x)] / (1 − 2ε)."""
    x = beta * (rw - rl)
    return (-(1 - eps) * _logsig(x) + _smoothing_term(eps, lambda: _logsig(-x))) / (1 - 2 * eps)


def _robust_grad(rw, rl, beta, eps):
    x = beta * (rw - rl)
    d = beta * (-(1 - eps) * _sig(-x) - eps * _sig(x)) / (1 - 2 * eps)
    return d, -d


def _exo_pair(rw, rl, beta, eps):
    """EXO (pairwise): σ(x)·(logσ(x) − log(1−ε)) + σ(−x)·(logσ(−x) − log ε)."""
    x = beta * (rw - rl)
    return (_weighted(_sig(x), _logsig(x) - math.log(1 - eps))
            + _weighted(_sig(-x), _logsig(-x) - math.log(eps)))


def _exo_pair_grad(rw, rl, beta, eps):
    x = beta * (rw - rl)
    d = beta * _weighted(_sig_prime(x), x - math.log((1 - eps) / eps))
    return d, -d


def _nca_pair(rw, rl, beta, eps):
    """NCA (pairwise): −logσ(β·r_w) − ½·logσ(−β·r_w) − ½·logσ(−β·r_l)."""
    return -_logsig(beta * rw) - 0.5 * _logsig(-beta * rw) - 0.5 * _logsig(-beta * rl)


def _nca_pair_grad(rw, rl, beta, eps):
    u_w, u_l = beta * rw, beta * rl
    return beta * (-_sig(-u_w) + 0.5 * _sig(u_w)), beta * 0.5 * _sig(u_l)


def _bco_pair(rw, rl, beta, eps):
    """BCO (pairwise, running mean δ = 0): −logσ(β·r_w) − logσ(−β·r_l)."""
    return -_logsig(beta * rw) - _logsig(-beta * rl)


def _bco_pair_grad(rw, rl, beta, eps):
    return -beta * _sig(-beta * rw), beta * _sig(beta * rl)


def _sppo_hard(rw, rl, beta, eps):
    """SPPO (hard labels): (r_w − 1/(2β))² + (r_l + 1/(2β))²."""
    return (rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2


def _sppo_hard_grad(rw, rl, beta, eps):
    return 2 * (rw - 1 / (2 * beta)), 2 * (rl + 1 / (2 * beta))


def _apo_zero(rw, rl, beta, eps):
    """APO-zero: 1 − σ(β·r_w) + σ(β·r_l), evaluated as σ(−β·r_w) + σ(β·r_l)."""
    return _sig(-beta * rw) + _sig(beta * rl)


def _apo_zero_grad(rw, rl, beta, eps):
    return -beta * _sig_prime(beta * rw), beta * _sig_prime(beta * rl)


def _apo_down(rw, rl, beta, eps):
    """APO-down: σ(β·r_w) + 1 − σ(x), evaluated as σ(β·r_w) + σ(−x)."""
    return _sig(beta * rw) + _sig(-beta * (rw - rl))


def _apo_down_grad(rw, rl, beta, eps):
    x = beta * (rw - rl)
    d_margin = _sig_prime(x)
    return beta * (_sig_prime(beta * rw) - d_margin), beta * d_margin


def _discopop(rw, rl, beta, eps):
    """DiscoPOP: m = σ(x/τ), τ = 0.05: (1−m)·(−logσ(x)) + m·exp(−x); evaluated as
    σ(−x/τ)·(−logσ(x)) + exp(logσ(x/τ) − x) (no 0·inf at very negative x)."""
    x = beta * (rw - rl)
    z = x / DISCOPOP_TAU
    return _sig(-z) * (-_logsig(x)) + torch.exp(_logsig(z) - x)


def _discopop_grad(rw, rl, beta, eps):
    # dL/dx = m'·(logσ(x) + exp(−x)) − (1−m)·σ(−x) − m·exp(−x),  m' = m(1−m)/τ; the products
    # with exp(−x) are taken in log space.
    x = beta * (rw - rl)
    z = x / DISCOPOP_TAU
    log_mix, log_one_minus = _logsig(z), _logsig(-z)
    d_mix = torch.exp(log_mix + log_one_minus) / DISCOPOP_TAU
    d_mix_exp = torch.exp(log_mix + log_one_minus - x) / DISCOPOP_TAU
    d = beta * (d_mix * _logsig(x) + d_mix_exp - torch.exp(log_one_minus) * _sig(-x)
                - torch.exp(log_mix - x))
    return d, -d


# -------------------------------------------------------------------- the unpaired losses
# Each forward takes the per-example log-ratio r = π − ρ (accumulation dtype), the KL reference
# point z0 (a 0-d tensor, detached and clamped by the op; unused where uses_kl_reference is
# False), the bool desirable mask and python floats β, λ_D, λ_U. They run under autograd (no
# closed-form gradient). 1 − σ(u) is taken as σ(−u).

def _kto(log_ratio, reference_point, desirable, beta, desirable_weight, undesirable_weight):
    """KTO (unpaired): desirable λ_D·(1 − σ(β·(r − z0))), undesirable λ_U·(1 − σ(β·(z0 − r))),
    z0 = max(mean(kl), 0) detached; evaluated as λ_D·σ(β·(z0 − r)) and λ_U·σ(β·(r − z0))."""
    desirable_losses = desirable_weight * _sig(beta * (reference_point - log_ratio))
    undesirable_losses = undesirable_weight * _sig(beta * (log_ratio - reference_point))
    return torch.where(desirable, desirable_losses, undesirable_losses)


def _apo_zero_unpaired(log_ratio, reference_point, desirable, beta, desirable_weight,
                       undesirable_weight):
    """APO-zero (unpaired): desirable λ_D·(1 − σ(β·r)), undesirable λ_U·σ(β·r); no reference
    point. Evaluated as λ_D·σ(−β·r) and λ_U·σ(β·r)."""
    desirable_losses = desirable_weight * _sig(-beta * log_ratio)
    undesirable_losses = undesirable_weight * _sig(beta * log_ratio)
    return torch.where(desirable, desirable_losses, undesirable_losses)


REGISTRY: dict[str, Loss] = {entry.name: entry for entry in (
    Loss("sigmoid", "2305.18290", _sigmoid, _sigmoid_grad, uses_label_smoothing=True, kernel_id=0),
    Loss("ipo", "2310.12036", _ipo, _ipo_grad, kernel_id=1),
    Loss("hinge", "2305.10425", _hinge, _hinge_grad, kernel_id=2),
    Loss("robust", "2403.00409", _robust, _robust_grad, uses_label_smoothing=True, kernel_id=3),
    Loss("exo_pair", "2402.00856", _exo_pair, _exo_pair_grad, uses_label_smoothing=True,
         zero_smoothing_substitute=1e-3, kernel_id=4),
    Loss("nca_pair", "2402.05369", _nca_pair, _nca_pair_grad, kernel_id=5),
    Loss("bco_pair", "2404.04656", _bco_pair, _bco_pair_grad, kernel_id=6),
    Loss("sppo_hard", "2405.00675", _sppo_hard, _sppo_hard_grad, kernel_id=7),
    Loss("apo_zero", "2408.06266", _apo_zero, _apo_zero_grad, kernel_id=8),
    Loss("apo_down", "2408.06266", _apo_down, _apo_down_grad, kernel_id=9),
    Loss("discopop", "2406.08414", _discopop, _discopop_grad, kernel_id=10),
    Loss("kto", "2402.01306", _kto, None, pairwise=False, uses_kl_reference=True),
    Loss("apo_zero_unpaired", "2408.06266", _apo_zero_unpaired, None, pairwise=False),
)}

NAMES = tuple(REGISTRY)  # every loss a trainer accepts
PAIRWISE_NAMES = tuple(name for name, entry in REGISTRY.items() if entry.pairwise)
UNPAIRED_NAMES = tuple(name for name, entry in REGISTRY.items() if not entry.pairwise)
LABEL_SMOOTHING_NAMES = tuple(name for name in PAIRWISE_NAMES if REGISTRY[name].uses_label_smoothing)


def get(name: str, pairwise: bool = True) -> Loss:
    """The entry of ``name``; ValueError for a name that is not (pairwise, by default) a loss."""
    entry = REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None or (pairwise and not entry.pairwise):
        raise ValueError(f"unknown preference loss {name!r}; expected one of "
                         f"{PAIRWISE_NAMES if pairwise else NAMES}")
    return entry


def effective_label_smoothing(name: str, label_smoothing: float) -> float:
    """The ε a loss runs with: exo_pair substitutes 1e-3 for 0, as TRL does."""
    substitute = get(name).zero_smoothing_substitute
    return substitute if substitute is not None and label_smoothing == 0.0 else label_smoothing


def kernel_ids(num_branches: int) -> dict[str, int]:
    """{name: kernel id} of the pairwise losses a kernel with branches 0..num_branches-1 runs;
    asserts that every branch belongs to exactly one entry (the others are eager only)."""
    ids = {name: REGISTRY[name].kernel_id for name in PAIRWISE_NAMES
           if REGISTRY[name].kernel_id is not None}
    assert sorted(ids.values()) == list(range(num_branches)), (
        f"the kernel has branches 0..{num_branches - 1} but the registry's kernel ids are {ids}")
    return ids
