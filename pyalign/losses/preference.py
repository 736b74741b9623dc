"""The preference losses of the loss registry (pyalign/losses/): the DPO family and the unpaired
(KTO) losses, each declared once.

Each ``Loss`` entry holds the name (TRL's ``loss_type``), the paper (arXiv id), the forward on
the log-ratios (``r_w = π_w − ρ_w``, ``r_l = π_l − ρ_l``; its docstring states the equation of
docs/algorithms.md), the closed-form gradient ``(∂L/∂r_w, ∂L/∂r_l)`` that the custom ops need
(they run below autograd), and flags: whether it uses label smoothing, the ε it substitutes for
0, whether it is pairwise (or unpaired, as KTO: then whether it uses the KL reference point),
and its Triton kernel id (``None``: eager only, the Triton backend hands it to eager).

Beyond the per-pair math, an entry declares what it needs from the batch, so that every API
derives its inputs and its error messages from here: ``f_divergence`` (it runs on TRL's
f-divergence *scores* of the log-ratios, ``F_DIVERGENCES``, and so accepts a non-default one),
``length_normalized`` (it divides the scores by the completion token counts: ``"always"`` or
``"when_given"``), ``needs`` (the ``PairBatch`` fields it cannot run without), ``batch_step`` (a
batch-level torch step, differentiable by autograd, that replaces the per-pair log-ratios: aot's
sort, sft's token mean), ``pair_math`` (the entry whose forward, gradient and kernel branch run
on its ratios: sigmoid_norm and aot are the sigmoid branch on other inputs) and
``pair_weights`` (False: per-pair WPO weights do not apply, the loss sorts the batch).
A ``reference_free`` entry (SimPO, CPO, ORPO; sft) runs on the policy's log-probs alone: the
ops need no reference for it, and a given one does not enter its value. ``target_margin``: SimPO's
γ shifts its scores. pyalign/losses/pair_batch.py holds the ``PairBatch``, the f-divergences, the
batch steps and ``pair_ratios``, the one function that turns a batch into an entry's
(r_w, r_l) (``pair_inputs``: into the four inputs of the backends' pair primitive).

Everything else derives from here: the ops' validation (``PAIRWISE_NAMES``,
``UNPAIRED_NAMES``), the trainers' and the CLI's choices, ``LOSS_IDS`` of
pyalign/kernels/preference.py (checked against the kernel's branches by ``kernel_ids``), the eager
backend's ``pair_losses``/``pair_loss_ratio_grads``, and the tests' parametrization.

Numerics: the forwards and gradients are written to stay finite wherever the value is finite,
for |β·h| up to 1e4 and beyond in fp32: log-sigmoids via ``F.logsigmoid``, ``1 − σ(u)`` as
``σ(−u)`` and ``σ'(u)`` as ``σ(u)·σ(−u)`` (no cancellation near 1), discopop's ``σ(x/τ)·exp(−x)``
as ``exp(logσ(x/τ) − x)`` (no ``0·inf``), a label-smoothing term skipped when ``ε = 0`` and
exo_pair's ``σ(∓x)·logσ(∓x)`` taken as 0 where ``σ(∓x) = 0`` (``0·logσ(−x)`` is ``0·(−inf)`` =
NaN at ``x = +inf``, e.g. a rejected log-prob of ``−inf``, where the loss is finite), ORPO's
log-odds with ``log(1 − e^p)`` as ``log(−expm1(p))`` near 0 and ``log1p(−e^p)`` below, and its
gradient as ratios of sums of positive terms (finite at a chosen log-prob of exactly 0).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from pyalign.losses.pair_batch import aot_step, aot_unpaired_step, sft_step

DISCOPOP_TAU = 0.05  # TRL's default discopop_tau

_sig, _logsig = torch.sigmoid, F.logsigmoid


def sigmoid_prime(u):
    """σ'(u) as σ(u)·σ(−u): no cancellation near σ = 1."""
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
    kernel_id: Optional[int] = None  # branch of pyalign/kernels/preference.py; None: eager only
    uses_kl_reference: bool = False  # unpaired: the loss needs KTO's KL reference point z0
    f_divergence: bool = False  # runs on f-divergence scores: accepts f_divergence != reverse_kl
    length_normalized: str = "never"  # "always" | "when_given": scores / completion token counts
    needs: tuple[str, ...] = ()  # PairBatch fields it cannot run without
    batch_step: Optional[Callable] = None  # (PairBatch) -> (r_w, r_l): a batch-level step
    pair_math: Optional[str] = None  # the entry whose forward/grad/kernel run on its ratios
    pair_weights: bool = True  # False: per-pair (WPO) weights do not apply to it
    doc: str = ""  # the equation, for an entry that reuses another entry's pair math
    reference_free: bool = False  # runs on the policy's log-probs alone (ρ = 0)
    target_margin: bool = False  # SimPO: r_w − simpo_gamma/β (x = β·(r_w − r_l) − γ)
    probabilities: bool = False  # its inputs are log-probabilities, <= 0 (ORPO's odds)
    chunks: bool = False  # its batch step also takes a chunk of the batch (PairBatch.whole_batch)

    @property
    def equation(self) -> str:
        if self.forward is None:
            return self.doc
        return (self.forward.__doc__ or "").strip()

    @property
    def math(self) -> "Loss":
        """The entry whose per-pair forward, gradient and kernel branch this loss runs."""
        return REGISTRY[self.pair_math] if self.pair_math else self

    @property
    def elementwise(self) -> bool:
        """Per pair a function of its four sequence log-probs alone (no batch step, no lengths):
        what the backends' pair primitives compute for it, under its own name."""
        return self.pairwise and self.pair_math is None and self.batch_step is None and not self.needs


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
    d = beta * _weighted(sigmoid_prime(x), x - math.log((1 - eps) / eps))
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
    return -beta * sigmoid_prime(beta * rw), beta * sigmoid_prime(beta * rl)


def _apo_down(rw, rl, beta, eps):
    """APO-down: σ(β·r_w) + 1 − σ(x), evaluated as σ(β·r_w) + σ(−x)."""
    return _sig(beta * rw) + _sig(-beta * (rw - rl))


def _apo_down_grad(rw, rl, beta, eps):
    x = beta * (rw - rl)
    d_margin = sigmoid_prime(x)
    return beta * (sigmoid_prime(beta * rw) - d_margin), beta * d_margin


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


def _log1mexp(p):
    """log(1 − e^p) for p <= 0: log(−expm1(p)) above −log 2, log1p(−e^p) below (no cancellation)."""
    return torch.where(p > -math.log(2), torch.log(-torch.expm1(p)), torch.log1p(-torch.exp(p)))


def _orpo(rw, rl, beta, eps):
    """ORPO (odds ratio): −β·logσ(z), z = log(odds_w/odds_l) = (p_w − p_l) − (log(1 − e^p_w) −
    log(1 − e^p_l)), odds = e^p/(1 − e^p) of the length-averaged log-probs p (r_w, r_l: the
    policy's own, no reference); β is ORPO's λ."""
    z = (rw - _log1mexp(rw)) - (rl - _log1mexp(rl))
    return -beta * _logsig(z)


def _orpo_grad(rw, rl, beta, eps):
    # ∂L/∂p_w = −β·σ(−z)/(1 − e^p_w) = −β/(1 − e^p_w + e^(p_w − ℓ_l)), ℓ = log odds: finite at
    # p_w = 0 (odds_w = inf, where σ(−z)/(1 − e^p_w) is 0/0); ∂L/∂p_l = β·σ(−z)/(1 − e^p_l).
    rejected_log_odds = rl - _log1mexp(rl)
    z = (rw - _log1mexp(rw)) - rejected_log_odds
    d_chosen = -beta / (-torch.expm1(rw) + torch.exp(rw - rejected_log_odds))
    return d_chosen, beta * _sig(-z) / (0.0 - torch.expm1(rl))  # +inf at p_l = 0, not -inf


def _sft(rw, rl, beta, eps):
    """SFT: the NLL of the chosen completions, a mean over every chosen completion token of the
    batch, −Σ_{b,t} log π(y_w,t)/Σ_b |y_w| (the same value for every pair). The batch step puts
    that value in r_w; the pair math passes it through (no kernel branch: nothing to fuse)."""
    return rw.clone()


def _sft_grad(rw, rl, beta, eps):
    return torch.ones_like(rw), torch.zeros_like(rl)


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
    Loss("sigmoid", "2305.18290", _sigmoid, _sigmoid_grad, uses_label_smoothing=True, kernel_id=0,
         f_divergence=True),
    Loss("ipo", "2310.12036", _ipo, _ipo_grad, kernel_id=1, f_divergence=True,
         length_normalized="when_given"),
    Loss("hinge", "2305.10425", _hinge, _hinge_grad, kernel_id=2, f_divergence=True),
    Loss("robust", "2403.00409", _robust, _robust_grad, uses_label_smoothing=True, kernel_id=3,
         f_divergence=True),
    Loss("exo_pair", "2402.00856", _exo_pair, _exo_pair_grad, uses_label_smoothing=True,
         zero_smoothing_substitute=1e-3, kernel_id=4, f_divergence=True),
    Loss("nca_pair", "2402.05369", _nca_pair, _nca_pair_grad, kernel_id=5),
    Loss("bco_pair", "2404.04656", _bco_pair, _bco_pair_grad, kernel_id=6),
    Loss("sppo_hard", "2405.00675", _sppo_hard, _sppo_hard_grad, kernel_id=7),
    Loss("apo_zero", "2408.06266", _apo_zero, _apo_zero_grad, kernel_id=8),
    Loss("apo_down", "2408.06266", _apo_down, _apo_down_grad, kernel_id=9),
    Loss("discopop", "2406.08414", _discopop, _discopop_grad, kernel_id=10, f_divergence=True),
    Loss("aot", "2406.05882", None, None, uses_label_smoothing=True, batch_step=aot_step,
         pair_math="sigmoid", pair_weights=False, doc=aot_step.__doc__.strip()),
    Loss("aot_unpaired", "2406.05882", None, None, uses_label_smoothing=True,
         batch_step=aot_unpaired_step, pair_math="sigmoid", pair_weights=False,
         doc=aot_unpaired_step.__doc__.strip()),
    Loss("sft", "2411.10442", _sft, _sft_grad, f_divergence=True, needs=("chosen_lengths",),
         batch_step=sft_step, reference_free=True, chunks=True),
    Loss("sigmoid_norm", "2411.15124", None, None, uses_label_smoothing=True, f_divergence=True,
         length_normalized="always", needs=("chosen_lengths", "rejected_lengths"),
         pair_math="sigmoid",
         doc="length-normalised DPO: sigmoid (cDPO) on x = β·(s_w/|y_w| − s_l/|y_l|), s the "
             "f-divergence scores of the log-ratios, |y| the completion token counts."),
    # reference-free: TRL's CPOTrainer (loss_type sigmoid, simpo) and ORPOTrainer add
    # cpo_alpha (ORPO: 1) x sft to these, which the trainer's presets do: loss=[name, "sft"]
    Loss("simpo", "2405.14734", None, None, uses_label_smoothing=True, reference_free=True,
         length_normalized="when_given", target_margin=True, pair_math="sigmoid",
         doc="SimPO: sigmoid (cDPO) on x = β·(π_w/|y_w| − π_l/|y_l|) − γ, the policy's "
             "length-averaged log-probs, no reference; γ = simpo_gamma."),
    Loss("cpo", "2401.08417", None, None, uses_label_smoothing=True, reference_free=True,
         pair_math="sigmoid",
         doc="CPO (its preference term): sigmoid (cDPO) on x = β·(π_w − π_l), the policy's "
             "summed log-probs, no reference."),
    Loss("orpo", "2403.07691", _orpo, _orpo_grad, kernel_id=11, reference_free=True,
         length_normalized="when_given", probabilities=True),
    Loss("kto", "2402.01306", _kto, None, pairwise=False, uses_kl_reference=True),
    Loss("apo_zero_unpaired", "2408.06266", _apo_zero_unpaired, None, pairwise=False),
)}

NAMES = tuple(REGISTRY)  # every loss a trainer accepts
PAIRWISE_NAMES = tuple(name for name, entry in REGISTRY.items() if entry.pairwise)
UNPAIRED_NAMES = tuple(name for name, entry in REGISTRY.items() if not entry.pairwise)
LABEL_SMOOTHING_NAMES = tuple(name for name in PAIRWISE_NAMES if REGISTRY[name].uses_label_smoothing)
# per pair a function of its four sequence log-probs: what the backends' pair primitives take
ELEMENTWISE_NAMES = tuple(name for name in PAIRWISE_NAMES if REGISTRY[name].elementwise)
F_DIVERGENCE_LOSSES = tuple(name for name in PAIRWISE_NAMES if REGISTRY[name].f_divergence)
REFERENCE_FREE_NAMES = tuple(name for name in PAIRWISE_NAMES if REGISTRY[name].reference_free)
SIMPO_GAMMA_LOSSES = tuple(name for name in PAIRWISE_NAMES if REGISTRY[name].target_margin)


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
