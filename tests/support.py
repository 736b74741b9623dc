"""Test support, importable as ``support`` (tests/ is on sys.path): the test device and the
backends to run on it, input builders, the poison and thread helpers, and the independent float64
oracles.

Device: ``PYALIGN_TEST_DEVICE`` (default ``cpu``; ``cuda`` on a GPU machine) picks the device of
every op test; tests/conftest.py runs Triton in its interpreter only when that device is CPU.
The op tests (tests/ops/) build their tensors on ``DEVICE`` through torch's default device, so
the same suite runs unchanged on a GPU.

Oracles: written from the formulas of docs/algorithms.md in float64, sharing no code with
pyalign: every op test compares pyalign against these (or against autograd through them).
"""
import contextlib
import math
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from pyalign._utils import limited_threads

# ------------------------------------------------------------------------------ device, backends

DEVICE = torch.device(os.environ.get("PYALIGN_TEST_DEVICE", "cpu").strip().lower() or "cpu")
ON_CPU = DEVICE.type == "cpu"


def backends_for(family: str) -> list[str]:
    """Every backend that can run ``family`` on the test device: on CPU eager, cpu and triton
    (the interpreter, TRITON_INTERPRET=1 being set by tests/conftest.py); on a GPU triton, cuda
    (where the family has it) and eager."""
    from pyalign import backends
    return backends.available(family, DEVICE.type)


def pairwise_loss_kinds() -> list[str]:
    """One pairwise loss of each kind, for tests of the torch code around the pair primitive:
    entries whose registry flags (f-divergence, length normalisation, needs, batch step, pair
    math, label smoothing, reference-free, target margin) are equal run the same code there,
    their names aside; the first name of each kind."""
    from pyalign import losses
    kinds = {}
    for name, entry in losses.REGISTRY.items():
        if entry.pairwise:
            key = (entry.f_divergence, entry.length_normalized, entry.needs, entry.batch_step,
                   entry.pair_math, entry.uses_label_smoothing, entry.reference_free,
                   entry.target_margin)
            kinds.setdefault(key, name)
    return list(kinds.values())


def backend_cases(family: str, cases, small_cases=None):
    """pytest.param(backend, *case) for every backend of ``family`` and every case; the Triton
    interpreter (triton on CPU: slow) gets ``small_cases`` instead when given."""
    params = []
    for backend in backends_for(family):
        chosen = small_cases if (small_cases is not None and backend == "triton" and ON_CPU) else cases
        for case in chosen:
            case = case if isinstance(case, tuple) else (case,)
            params.append(pytest.param(backend, *case, id=f"{backend}-{'-'.join(map(str, case))}"))
    return params


# ------------------------------------------------------------------------------ helpers

# Run a block under a given intra-op thread count (the package's own helper: not an oracle).
torch_threads = limited_threads


def same_under_thread_counts(run_once, counts=(1, 2)):
    """Run ``run_once`` (returning a tuple/list of tensors) under each intra-op thread count and
    assert every result is bitwise equal: kernels must not depend on how work is split."""
    results = []
    for count in counts:
        with torch_threads(count):
            results.append(run_once())
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def poison_(tensor):
    """NaN-fill (max-fill for integers) an output buffer so an element a kernel forgets to write
    shows up."""
    if tensor.dtype.is_floating_point:
        return tensor.fill_(float("nan"))
    return tensor.fill_(torch.iinfo(tensor.dtype).max)


@contextlib.contextmanager
def poisoned_outputs():
    """Every output buffer a backend allocates through a poison hook starts NaN-filled, so an
    element a kernel forgets to write fails the test. The Triton kernels have the hook
    (pyalign.kernels.POISON_OUTPUTS); the C++ ops allocate inside C++ (their ``_out`` variants
    are poisoned in tests/toolchain/test_cpp_ops_direct.py) and eager writes whole tensors."""
    try:
        from pyalign import kernels
    except ImportError:  # no triton: no hook to set
        yield
        return
    before = kernels.POISON_OUTPUTS
    kernels.POISON_OUTPUTS = True
    try:
        yield
    finally:
        kernels.POISON_OUTPUTS = before


# ------------------------------------------------------------------------------ input builders

IGNORE = -100


def random_logits_labels(shape, dtype, scale=3.0, ignore_index=IGNORE):
    """Random logits [..., V] (on the test device) and labels with the awkward ones in: labels at
    V-1 and 0, and ignore_index scattered."""
    vocab = shape[-1]
    logits = (torch.randn(shape, device=DEVICE) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape[:-1], device=DEVICE)
    flat = labels.view(-1)
    if flat.numel():
        flat[0] = vocab - 1
    if flat.numel() > 2:
        flat[1] = ignore_index
        flat[-1] = 0
    if flat.numel() > 5:
        flat[3] = ignore_index
    return logits, labels


def random_pairs(batch, dtype=torch.float32, scale=3.0):
    """Sequence log-probs of a batch of preference pairs, of realistic size (-20..-80) with
    policy/reference ratios of ``scale`` nats: (policy_chosen, policy_rejected, ref_chosen,
    ref_rejected) on the test device."""
    ref_chosen = -20 - 60 * torch.rand(batch, device=DEVICE)
    ref_rejected = -20 - 60 * torch.rand(batch, device=DEVICE)
    policy_chosen = ref_chosen + torch.randn(batch, device=DEVICE) * scale
    policy_rejected = ref_rejected + torch.randn(batch, device=DEVICE) * scale
    return [t.to(dtype) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)]


def random_lengths(pairs):
    """Completion token counts [B] (int64, 0..40: a 0 where there are 3+ pairs) on the test device."""
    lengths = torch.randint(1, 41, (pairs,), device=DEVICE)
    if pairs > 2:
        lengths[2] = 0
    return lengths


# ------------------------------------------------------------------------------ float64 oracles

def token_logprobs64(logits, labels, ignore_index=IGNORE, temperature=1.0):
    """log softmax(z/T)[label] in float64; 0 where label == ignore_index."""
    scaled = logits.double() / temperature
    log_softmax = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
    valid = labels != ignore_index
    picked = log_softmax.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def entropy64(logits, labels, ignore_index=IGNORE, temperature=1.0):
    """Entropy of softmax(z/T) in float64 (0·log 0 = 0); 0 where label == ignore_index."""
    scaled = logits.double() / temperature
    log_softmax = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
    probs = log_softmax.exp()
    plogp = torch.where(probs > 0, probs * log_softmax, torch.zeros_like(probs))
    entropy = -plogp.sum(-1)
    return torch.where(labels != ignore_index, entropy, torch.zeros_like(entropy))


def kl64(logprobs, ref_logprobs, estimator, mask=None):
    d = ref_logprobs.double() - logprobs.double()
    value = {"k1": -d, "k2": d * d / 2, "k3": torch.expm1(d) - d}[estimator]
    if mask is not None:
        value = torch.where(mask, value, torch.zeros_like(value))
    return value


def _logsig(x):
    return torch.nn.functional.logsigmoid(x)


def _sig(x):
    return torch.sigmoid(x)


# Per-pair loss formulas, (r_w, r_l, h, x = beta*h, beta, eps) -> loss, straight from the loss
# table of docs/algorithms.md, in forms that stay finite in float64 wherever the loss is (for
# |x| up to 1e4: discopop's m*exp(-x) as exp(logsig(x/tau) - x)). tests/ops/test_preference.py
# checks these keys are exactly the package's (the loss registry's) pairwise loss names.
PAIR_LOSS_FORMULAS = {
    "sigmoid": lambda rw, rl, h, x, beta, eps: -(1 - eps) * _logsig(x) - eps * _logsig(-x),
    "ipo": lambda rw, rl, h, x, beta, eps: (h - 1 / (2 * beta)) ** 2,
    "hinge": lambda rw, rl, h, x, beta, eps: torch.clamp(1 - x, min=0),
    "robust": lambda rw, rl, h, x, beta, eps:
        (-(1 - eps) * _logsig(x) + eps * _logsig(-x)) / (1 - 2 * eps),
    "exo_pair": lambda rw, rl, h, x, beta, eps:
        _sig(x) * (_logsig(x) - math.log(1 - eps)) + _sig(-x) * (_logsig(-x) - math.log(eps)),
    "nca_pair": lambda rw, rl, h, x, beta, eps:
        -_logsig(beta * rw) - 0.5 * _logsig(-beta * rw) - 0.5 * _logsig(-beta * rl),
    "bco_pair": lambda rw, rl, h, x, beta, eps: -_logsig(beta * rw) - _logsig(-beta * rl),
    "sppo_hard": lambda rw, rl, h, x, beta, eps:
        (rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2,
    "apo_zero": lambda rw, rl, h, x, beta, eps: 1 - _sig(beta * rw) + _sig(beta * rl),
    "apo_down": lambda rw, rl, h, x, beta, eps: _sig(beta * rw) + 1 - _sig(x),
    "discopop": lambda rw, rl, h, x, beta, eps:
        _sig(-x / 0.05) * (-_logsig(x)) + torch.exp(_logsig(x / 0.05) - x),
    # ORPO (Hong et al. 2024, eq. 4-7), r_w, r_l: the policy's log-probs p, odds = p/(1 − p)
    "orpo": lambda rw, rl, h, x, beta, eps: -beta * _logsig(_log_odds(rw) - _log_odds(rl)),
}


def _log_odds(log_prob):
    """log(P/(1 − P)) of a log-probability, in float64: log P − log(−expm1(log P))."""
    return log_prob - torch.log(-torch.expm1(log_prob))


# TRL 1.16 DPOTrainer._compute_loss, re-derived from its source: the losses that run on the
# f-divergence scores of the log-ratios (delta_score), the score transforms, and the losses that
# are not a function of one pair (sort over the batch, a batch token mean).
SCORE_LOSSES = {"sigmoid", "ipo", "hinge", "robust", "exo_pair", "discopop", "sigmoid_norm", "sft"}
# TRL 1.16's CPOTrainer (loss_type sigmoid and simpo) and ORPOTrainer: no reference model, the
# policy's log-probs (per-token means for simpo and orpo) in place of the log-ratios
REFERENCE_FREE = {"cpo", "simpo", "orpo"}
F_DIVERGENCES64 = {
    "reverse_kl": lambda r, alpha: r,
    "forward_kl": lambda r, alpha: 1 - torch.exp(-r),
    "js_divergence": lambda r, alpha: math.log(2) + _logsig(r),
    "alpha_divergence": lambda r, alpha: r if abs(alpha - 1) < 1e-6 else
        (torch.exp(torch.clamp((alpha - 1) * r, max=80.0)) - 1) / (alpha - 1),
}
# the losses the oracle computes otherwise than by a PAIR_LOSS_FORMULAS entry on r_w, r_l
COMPOSITE_LOSSES = {"aot", "aot_unpaired", "sft", "sigmoid_norm", "simpo", "cpo"}


def _smoothed_sigmoid64(x, eps):
    return -(1 - eps) * _logsig(x) - eps * _logsig(-x)


def preference64(pc, pr, rc, rr, loss, beta, eps=0.0, chosen_lengths=None, rejected_lengths=None,
                 f_divergence="reverse_kl", alpha=0.5, chosen_token_sum=None, averaged=False,
                 gamma=0.5):
    """Per-pair losses [B] of one loss in float64 from sequence log-probs (sums over the
    completion tokens; ``averaged``: per-token means), TRL's semantics: the f-divergence scores
    for SCORE_LOSSES, ipo and sigmoid_norm divide the scores by the lengths (ipo only when they
    are given, neither when ``averaged``), aot/aot_unpaired sort over the batch, sft is the mean
    NLL of the batch's chosen tokens (``chosen_token_sum`` its numerator, default ``pc``; 0 when
    there are no tokens); REFERENCE_FREE ignore ``rc``, ``rr`` (simpo and orpo divide by the
    lengths when given; simpo's target margin is ``gamma``, TRL's simpo_gamma). KeyError for a
    loss the oracle does not know."""
    pc, pr, rc, rr = (t.double() for t in (pc, pr, rc, rr))
    rw, rl = (pc, pr) if loss in REFERENCE_FREE else (pc - rc, pr - rr)
    if loss in ("aot", "aot_unpaired"):
        if loss == "aot":
            first, second = torch.sort(pc - pr).values, torch.sort(rc - rr).values
        else:
            first, second = torch.sort(rw).values, torch.sort(rl).values
        return _smoothed_sigmoid64(beta * (first - second), eps)
    if loss == "sft":
        token_sum = pc if chosen_token_sum is None else chosen_token_sum.double()
        nll = -token_sum.sum() / torch.clamp(chosen_lengths.double().sum(), min=1)
        return nll * torch.ones_like(pc)
    if loss in SCORE_LOSSES:
        rw, rl = F_DIVERGENCES64[f_divergence](rw, alpha), F_DIVERGENCES64[f_divergence](rl, alpha)
    normalize = loss == "sigmoid_norm" or (loss in ("ipo", "simpo", "orpo")
                                           and chosen_lengths is not None)
    if normalize and not averaged:
        rw = rw / torch.clamp(chosen_lengths.double(), min=1)
        rl = rl / torch.clamp(rejected_lengths.double(), min=1)
    h = rw - rl
    if loss == "simpo":  # SimPO eq. 6: −logσ(β·(mean log π_w − mean log π_l) − γ), with cDPO's ε
        return _smoothed_sigmoid64(beta * h - gamma, eps)
    formula = PAIR_LOSS_FORMULAS["sigmoid" if loss in ("sigmoid_norm", "cpo") else loss]
    return formula(rw, rl, h, beta * h, beta, eps)


def token_preference64(policy_tokens, ref, mask, losses, beta, eps_of=lambda loss: 0.0,
                       weights=None, f_divergence="reverse_kl", alpha=0.5, ld_alpha=None,
                       log_sum_sq_probs=None, average=False, gamma=0.5):
    """Per-pair combined loss sum_k w_k * loss_k [B] in float64 from per-token log-probs [2B, T]
    (chosen rows first), the reference per token [2B, T] or per sequence [2B] and the mask: TRL's
    _compute_loss, including LD-DPO (tokens past the pair's shared length weigh ld_alpha) and
    WPO weights (exp of the mean of log p − log Σ p² per row, chosen times rejected)."""
    kept = mask.bool()
    rows = policy_tokens.shape[0]
    pairs = rows // 2
    counts = kept.double().sum(-1)
    token_weight = torch.ones(policy_tokens.shape, dtype=torch.float64)
    if ld_alpha is not None:
        position = torch.cumsum(kept.long(), -1)
        shared = torch.minimum(counts[:pairs], counts[pairs:]).repeat(2)
        token_weight = torch.where(position <= shared[:, None], 1.0, ld_alpha).double()

    def reduce(tokens):
        summed = torch.where(kept, tokens.double() * token_weight, 0.0).sum(-1)
        return summed / torch.clamp(counts, min=1) if average else summed

    policy = reduce(policy_tokens)
    if ref is None:  # the reference-free losses ignore it
        reference = torch.zeros_like(policy)
    else:
        reference = reduce(ref) if ref.dim() == 2 else ref.double()
    chosen_sum = torch.where(kept, policy_tokens.double(), 0.0).sum(-1)[:pairs]
    pair_weight = 1.0
    if log_sum_sq_probs is not None:
        aligned = torch.where(kept, policy_tokens.double() - log_sum_sq_probs.double(), 0.0)
        row_weight = torch.exp(aligned.sum(-1) / torch.clamp(counts, min=1)).detach()
        pair_weight = row_weight[:pairs] * row_weight[pairs:]
    weights = weights or [1.0] * len(losses)
    total = 0.0
    for loss, weight in zip(losses, weights, strict=True):
        total = total + weight * pair_weight * preference64(
            policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], loss, beta,
            eps_of(loss), counts[:pairs], counts[pairs:], f_divergence, alpha, chosen_sum, average,
            gamma)
    return total


# ---------------------------------------------------------- unpaired (KTO) losses, float64
# TRL KTOTrainer's loss_types, from the KTO paper (eq. 7) and APO (APO-zero, unpaired), in TRL's
# own 1 - sigmoid form: name -> (desirable, undesirable) loss of (r, z0, beta), r = logp - ref_logp.
# tests/ops/test_kto.py checks these keys are exactly the registry's unpaired names.
UNPAIRED_LOSS_FORMULAS = {
    "kto": (lambda r, z0, beta: 1 - torch.sigmoid(beta * (r - z0)),
            lambda r, z0, beta: 1 - torch.sigmoid(beta * (z0 - r))),
    "apo_zero_unpaired": (lambda r, z0, beta: 1 - torch.sigmoid(beta * r),
                          lambda r, z0, beta: torch.sigmoid(beta * r)),
}


def kl_reference64(*kl_parts):
    """KTO's z0 in float64, a constant: max(mean of all the estimates, 0), 0 for none."""
    kl = torch.cat([part.detach().double().reshape(-1) for part in kl_parts])
    return torch.clamp(kl.mean(), min=0) if kl.numel() else kl.new_zeros(())


def unpaired64(policy, ref, desirable, z0, loss, beta, wd=1.0, wu=1.0):
    """Per-example unpaired losses in float64 (z0: the reference point, ignored by apo)."""
    r = policy.double() - ref.double()
    desirable_loss, undesirable_loss = UNPAIRED_LOSS_FORMULAS[loss]
    return torch.where(desirable, wd * desirable_loss(r, z0, beta), wu * undesirable_loss(r, z0, beta))


# ------------------------------------------------------------------ gradients, by float64 autograd

def _finite64(tensor):
    """Float64 copy with -inf replaced by a floor whose exp underflows to exactly 0: -inf logits
    have probability 0 and zero gradient, but autograd through -inf itself gives NaN (0 * inf)."""
    floor = torch.finfo(torch.float64).min / 4
    return torch.where(torch.isneginf(tensor), torch.full_like(tensor, floor), tensor)


def token_logprobs_and_grad64(logits, labels, grad_logprobs, grad_entropy=None,
                              ignore_index=IGNORE, temperature=1.0):
    """(logprobs, entropy, grad_logits) in float64 for logits [..., V] of any dtype.

    grad_logits = d/dlogits of sum(logprobs * grad_logprobs) + sum(entropy * grad_entropy), by
    torch autograd through the formulas above. A label whose logit is -inf gets logprob -inf.
    """
    logits64 = _finite64(logits.detach().double()).requires_grad_(True)
    logprobs = token_logprobs64(logits64, labels, ignore_index, temperature)
    entropy = entropy64(logits64, labels, ignore_index, temperature)
    objective = (logprobs * grad_logprobs.double()).sum()
    if grad_entropy is not None:
        objective = objective + (entropy * grad_entropy.double()).sum()
    (grad_logits,) = torch.autograd.grad(objective, logits64)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).unsqueeze(-1)
    label_masked = torch.isneginf(logits.detach().gather(-1, safe_labels).squeeze(-1)) & valid
    logprobs = torch.where(label_masked, torch.full_like(logprobs, -math.inf), logprobs)
    return logprobs.detach(), entropy.detach(), grad_logits


def linear_logits64(hidden, weight, bias=None):
    """hidden @ weight.T (+ bias) in float64 (differentiable when the inputs are float64 leaves)."""
    logits = hidden.double() @ weight.double().t()
    return logits if bias is None else logits + bias.double()


def head_logits64(hidden, weight, bias=None, softcap=None, logit_scale=1.0, temperature=1.0):
    """TRL's head in float64, in its order: z = softcap * tanh(logit_scale * logits / softcap)
    (no tanh without a softcap), divided by the temperature (docs/algorithms.md)."""
    scaled = linear_logits64(hidden, weight, bias) * logit_scale
    if softcap is not None:
        scaled = softcap * torch.tanh(scaled / softcap)
    return scaled / temperature


def head_outputs64(head_logits, labels, ignore_index=IGNORE):
    """float64 per-token outputs of head logits z [N, V] (temperature already applied), as TRL's
    FusedCausalLMOutput defines them: log_probs, entropy, log_sum_sq_probs = log sum_v p_v^2,
    mean_logits = mean_v z_v, is_top1 = the label is the first argmax. 0 / False where ignored."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    log_p = head_logits - torch.logsumexp(head_logits, -1, keepdim=True)
    probs = log_p.exp()
    outputs = {
        "log_probs": log_p.gather(-1, safe[:, None]).squeeze(-1),
        "entropy": -torch.where(probs > 0, probs * log_p, torch.zeros_like(probs)).sum(-1),
        "log_sum_sq_probs": torch.log((probs * probs).sum(-1)),
        "mean_logits": head_logits.mean(-1),
    }
    outputs = {name: torch.where(valid, value, torch.zeros_like(value))
               for name, value in outputs.items()}
    label_logit = head_logits.gather(-1, safe[:, None])
    columns = torch.arange(head_logits.shape[-1], device=head_logits.device)
    earlier_max = torch.where(columns[None, :] < safe[:, None], head_logits,
                              torch.full_like(head_logits, -math.inf)).amax(-1)
    outputs["is_top1"] = (valid & (label_logit.squeeze(-1) >= head_logits.amax(-1))
                          & (label_logit.squeeze(-1) > earlier_max))
    return outputs


def sequence_logprobs64(token_logprobs, mask, average=False):
    """Masked sum (or masked mean) over the last dimension, in float64."""
    mask = mask.double()
    summed = (token_logprobs.double() * mask).sum(-1)
    return summed / mask.sum(-1).clamp(min=1) if average else summed


def grad_of(leaf):
    """leaf.grad, or zeros for a leaf the loss does not depend on (sft and the rejected log-probs:
    autograd leaves its grad None)."""
    return torch.zeros_like(leaf) if leaf.grad is None else leaf.grad


def grads64(function, inputs, upstream=None):
    """Values of ``function`` on float64 copies of ``inputs`` and d(sum(values * upstream))/d each
    input, by autograd: ``(values, [grad, ...])``."""
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    values = function(*leaves)
    weights = torch.ones_like(values) if upstream is None else upstream.double()
    grads = torch.autograd.grad((values * weights).sum(), leaves, allow_unused=True)
    return values.detach(), [torch.zeros_like(x) if g is None else g
                             for x, g in zip(leaves, grads, strict=True)]


# ------------------------------------------------------------- error bounds of an fp32 head

FP32_UNIT = 2.0 ** -24  # u: fp32's unit roundoff


def _gamma(count):
    """The classical bound on the relative error of a recursive fp32 sum (or dot) of ``count``
    terms: gamma_k = k u / (1 - k u), times the sum of the terms' magnitudes."""
    return count * FP32_UNIT / (1 - count * FP32_UNIT)


def head_gradient_bounds64(hidden, weight, bias, labels, grad_logprobs, grad_entropy=None, *,
                           softcap=None, logit_scale=1.0, temperature=1.0, ignore_index=IGNORE,
                           coefficient_errors=None):
    """Bounds, per element and in float64, on |computed - exact| of the head's gradients
    (hidden [..., H], weight [V, H], bias [V]) when fp32 arithmetic computes them from these
    inputs (bf16 / fp16 ones upcast exactly: an fp32 head) with per-token upstream gradients,
    whatever the order of the sums. From the standard bounds (docs/algorithms.md, "The fp32
    head"; Higham, Accuracy and Stability of Numerical Algorithms, 3.1):

    - each raw logit is a dot of H terms and the bias: error <= gamma_{H+1} * (|h| |w|^T + |b|);
      through the head (softcap * tanh(scale * raw / softcap) / T, slope <= scale / T) that is
      an error in z of (scale / T) * that + 4u |z| of the transform itself;
    - log p_v = z_v - max - log sum exp(z - max) then errs by eps_n <= 2 max_v |dz| + (V + 4) u
      + 4u max_v |z - max| (the row's sum of V exponentials), which is also the relative error of
      p_v, and the entropy's of (log p + H) up to a factor (2 + H);
    - d objective / d raw = slope * (g (1[v=y] - p_v) - g_ent p_v (log p_v + H)): each of its
      elementary terms (A = slope * (|g| (1[v=y] + p_v) + |g_ent| p_v (|log p_v| + H + 2)))
      errs by (2 eps_n + 8u) of its magnitude, plus the slope's own error with a softcap
      (4u + 2 |tanh| (1 - tanh^2) (scale / softcap) |d raw|, times scale / T);
    - the gradients are sums of such terms times |h| (weight: N tokens), times |w| (hidden: V
      columns, over every rank of a vocab shard) or alone (bias): error <= sum of the terms'
      errors + gamma_{K+1} * sum of |terms|.

    ``coefficient_errors``: (for g, for g_ent or None), per token, where the upstream gradients
    are themselves known only to within those (a loss's coefficients, computed in fp32 from
    fp32 log-probs): they add slope * (dg (1[v=y] + p_v) + dg_ent p_v (|log p_v| + H)) per term.
    Ignored tokens (``ignore_index``) contribute nothing (their hidden rows may hold NaN)."""
    u = FP32_UNIT
    flat_labels = labels.reshape(-1)
    valid = flat_labels != ignore_index
    h = torch.where(valid[:, None], hidden.detach().reshape(-1, hidden.shape[-1]).double(), 0.0)
    w = weight.detach().double()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    tokens, vocab, size = int(valid.sum()), w.shape[0], h.shape[1]
    raw = h @ w.t() + b
    d_raw = _gamma(size + 1) * (h.abs() @ w.abs().t() + b.abs())
    steepest = logit_scale / temperature
    if softcap is None:
        z = raw * steepest
        slope = torch.full_like(z, steepest)
        d_slope = torch.zeros_like(z)
    else:
        tanh = torch.tanh(raw * (logit_scale / softcap))
        z = softcap * tanh / temperature
        slope = steepest * (1 - tanh * tanh)
        d_slope = steepest * (4 * u + 2 * tanh.abs() * (1 - tanh * tanh)
                              * (logit_scale / softcap) * d_raw)
    d_z = steepest * d_raw + 4 * u * z.abs()
    log_p = torch.log_softmax(z, -1)
    probs = log_p.exp()
    entropy = -(probs * log_p).sum(-1, keepdim=True)
    eps = (2 * d_z.amax(-1, keepdim=True) + (vocab + 4) * u
           + 4 * u * (z - z.amax(-1, keepdim=True)).abs().amax(-1, keepdim=True))
    def per_token(values):
        if values is None:
            return torch.zeros(valid.shape[0], 1, dtype=torch.float64, device=valid.device)
        return torch.where(valid, values.reshape(-1).double(), 0.0).abs()[:, None]

    onehot = torch.nn.functional.one_hot(torch.where(valid, flat_labels, 0), vocab) * valid[:, None]

    def term_magnitudes(g, g_ent):
        return g * (onehot + probs) + g_ent * probs * (log_p.abs() + entropy + 2)

    parts = term_magnitudes(per_token(grad_logprobs), per_token(grad_entropy))
    terms = slope * parts
    errors = (2 * eps + 8 * u) * terms + d_slope * parts
    if coefficient_errors is not None:
        errors = errors + slope * term_magnitudes(*(per_token(e) for e in coefficient_errors))
    over_tokens = errors + _gamma(tokens + 1) * terms
    bound_hidden = (errors + _gamma(vocab + 1) * terms) @ w.abs()
    return bound_hidden.view(hidden.shape), over_tokens.t() @ h.abs(), over_tokens.sum(0)


def assert_within_bound(actual, exact, bound, name=""):
    """|actual - exact| <= ``bound`` (an fp32 computation's, as head_gradient_bounds64 gives)
    plus the one rounding of that fp32 result into actual's dtype (bf16 / fp16 gradients; and
    float16's subnormal spacing)."""
    exact, bound = exact.double(), bound.double()
    half_ulp = WEIGHT_ROUNDING[actual.dtype] if actual.dtype != torch.float32 else 0.0
    subnormal = 2.0 ** -25 if actual.dtype == torch.float16 else 0.0
    limit = bound * (1 + half_ulp) + half_ulp * exact.abs() + subnormal
    error = (actual.double() - exact).abs()
    worst = float((error / limit.clamp(min=1e-300)).max())
    assert torch.all(error <= limit), f"{name}: an error {worst:.3g} times its bound"


# -------------------------------------------------------------------------- weight updates

# The exact result rounded once into the target: half an ulp of the target dtype, relative.
WEIGHT_ROUNDING = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8,
                   torch.float16: 2.0 ** -11}


def assert_rounded_from(actual, exact, operands, name=""):
    """``actual`` equals ``exact`` (float64) up to one rounding into actual's dtype, after fp32
    arithmetic (fp64 for fp64) whose error scales with the operands (|t| + |s|: lerp cancels near
    t = s), and float16's subnormal spacing."""
    scale = sum(operand.double().abs() for operand in operands)
    subnormal = 2.0 ** -25 if actual.dtype == torch.float16 else 0.0
    arithmetic = 4 * min(WEIGHT_ROUNDING[actual.dtype], 2.0 ** -24)
    bound = WEIGHT_ROUNDING[actual.dtype] * exact.abs() + arithmetic * scale + subnormal
    error = (actual.double() - exact).abs()
    assert torch.all(error <= bound), f"{name}: max error {float(error.max()):.3g} ({actual.dtype})"


def ema64(target, source, decay):
    return decay * target.double() + (1 - decay) * source.double()


def lerp64(target, source, weight):
    return target.double() + weight * (source.double() - target.double())


def bema_ema64(ema, param, beta):
    """BEMA's EMA step (docs/algorithms.md "BEMA"): (1 - beta_t) EMA + beta_t theta_t."""
    return (1 - beta) * ema.double() + beta * param.double()


def bema_weights64(ema, param, init, alpha):
    """BEMA's weights from the (stored) EMA: EMA_t + alpha_t (theta_t - theta_0)."""
    return ema.double() + alpha * (param.double() - init.double())


def bema_trajectory64(policy_at: dict, initial: dict, schedule: dict) -> dict:
    """step -> BEMA's weights in float64 after that step (None until its first update), from the
    policy's weights at each step (dicts name -> tensor) and TRL's schedule settings
    (docs/algorithms.md "BEMA"): at update_after init and EMA <- theta; every update_freq steps
    after, beta_t, alpha_t of t = the step."""
    init = ema = initial
    weights, trajectory = None, {}
    for step in sorted(policy_at):
        theta = policy_at[step]
        after = schedule["update_after"]
        if step == after:
            init = ema = theta
        elif step > after and (step - after) % schedule["update_freq"] == 0:
            age = schedule["lag"] + schedule["multiplier"] * step
            beta = max(age ** -schedule["ema_power"], schedule["min_ema_multiplier"])
            alpha = age ** -schedule["bias_power"]
            ema = {n: bema_ema64(ema[n], theta[n], beta) for n in ema}
            weights = {n: bema_weights64(ema[n], theta[n], init[n], alpha) for n in ema}
        trajectory[step] = weights
    return trajectory


# -------------------------------------------------------------------------- policy-gradient losses
# The GRPO-family and RLOO losses of TRL 1.16 (docs/algorithms.md, "Policy-gradient losses"),
# written out per loss type in float64 (differentiable: take gradients by autograd). Masked
# positions are selected away (torch.where), so NaN there never reaches the loss.

def _policy_ratio64(log_ratio, mask, level):
    if level == "token":
        return torch.exp(log_ratio)
    total = torch.where(mask, log_ratio, torch.zeros_like(log_ratio)).sum(-1, keepdim=True)
    if level == "sequence":
        total = total / mask.sum(-1, keepdim=True).clamp(min=1)
    return torch.exp(total).expand_as(log_ratio)


def rollout_weight64(old_logprobs, rollout_logprobs, mask, mode, clip_min=None, clip_max=3.0):
    """The rollout correction's importance weight ρ [B, T] in float64 (a sequence's broadcast
    over its row) and its metrics (TRL's sampling/... names; verl's masked fraction)."""
    zero = torch.zeros((), dtype=torch.float64)
    d = old_logprobs.double() - rollout_logprobs.double()
    d = torch.where(mask & ~torch.isnan(d), d, zero)
    granularity, constraint = mode.split("_")
    if granularity == "token":
        r = torch.exp(d)
    else:
        s = d.sum(-1, keepdim=True)
        if granularity == "geometric":
            s = s / mask.sum(-1, keepdim=True).clamp(min=1)
        r = torch.exp(s)
    if granularity == "geometric" and clip_min is None and clip_max is not None:
        clip_min = 1 / clip_max
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    outside = (r < low) | (r > high)
    if constraint == "truncate":
        rho, outside = r.clamp(min=clip_min, max=clip_max), torch.zeros_like(outside)
    elif constraint == "mask":
        rho = torch.where(outside, zero, r)
    else:  # reject
        rho = torch.where(outside, zero, torch.ones_like(r))
    units = rho[mask] if granularity == "token" else rho[:, 0]
    masked = outside[mask] if granularity == "token" else outside[:, 0]
    diff = (old_logprobs.double() - rollout_logprobs.double()).abs()
    diff = diff[mask & ~torch.isnan(diff)]

    def stat(values, reduce):
        return reduce(values) if values.numel() else zero
    metrics = dict(importance_sampling_ratio_mean=stat(units, torch.mean),
                   importance_sampling_ratio_min=stat(units, torch.min),
                   importance_sampling_ratio_max=stat(units, torch.max),
                   importance_sampling_masked_fraction=stat(masked.double(), torch.mean),
                   sampling_logp_difference_mean=stat(diff, torch.mean),
                   sampling_logp_difference_max=stat(diff, torch.max))
    return rho.expand_as(mask).double(), metrics


ROLLOUT_METRICS = ("importance_sampling_ratio_mean", "importance_sampling_ratio_min",
                   "importance_sampling_ratio_max", "importance_sampling_masked_fraction",
                   "sampling_logp_difference_mean", "sampling_logp_difference_max")


def policy64(logprobs, old_logprobs, advantages, mask, loss_type, *, ref_logprobs=None, beta=0.0,
             kl_estimator="k3", bias_correction=True, epsilon=0.2, epsilon_high=None, delta=None,
             level="token", tau_pos=1.0, tau_neg=1.05, vespo=(2.0, 3.0, 3.0, 2.0), entropy=None,
             entropy_coef=0.0, top_entropy_quantile=1.0, max_completion_length=None,
             num_items=None, rollout_logprobs=None, is_correction=True, is_mode="sequence_mask",
             is_clip_min=None, is_clip_max=3.0, off_policy_threshold=None):
    """(loss, metrics dict) in float64. ``level`` is ignored for rloo (always the sequence sum).
    The rollout correction: ρ of rollout_weight64 times the policy term (vespo: Σ_t m·clamp(log ρ,
    log 1e-8, 20) into its sequence weight), and the off-policy mask keep_b = A ≥ 0 or
    mean_t(sampler_logp − logp) ≤ off_policy_threshold."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    zero = torch.zeros((), dtype=torch.float64)
    lp = torch.where(mask, logprobs.double(), zero)
    old = torch.where(mask, old_logprobs.double(), zero)
    adv = advantages.double()
    adv = adv[:, None].expand_as(lp) if adv.dim() == 1 else adv
    rows, n_rows = mask.sum(-1).double(), mask.shape[0]
    n_tokens = rows.sum()
    log_ratio = lp - old
    w = _policy_ratio64(log_ratio, mask, "sequence_sum" if loss_type == "rloo" else level)
    rho, rollout_metrics = None, dict.fromkeys(ROLLOUT_METRICS, torch.tensor(math.nan,
                                                                            dtype=torch.float64))
    if rollout_logprobs is not None and is_correction:
        rho, rollout_metrics = rollout_weight64(old_logprobs, rollout_logprobs, mask, is_mode,
                                                is_clip_min, is_clip_max)
    if loss_type == "cispo":
        term = -torch.clamp(w, max=eps_high).detach() * adv * lp
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, tau_pos, tau_neg)
        term = -torch.sigmoid(tau * (w - 1)) * 4 / tau * adv
    elif loss_type == "vespo":
        k_pos, lam_pos, k_neg, lam_neg = vespo
        s = torch.where(mask, log_ratio.clamp(-20, 20), zero).sum(-1, keepdim=True)
        if rho is not None:
            s = s + torch.where(mask, rho.log().clamp(math.log(1e-8), 20), zero).sum(-1, keepdim=True)
        log_w = s.clamp(math.log(1e-8), 20.0)
        k = torch.where(adv >= 0, k_pos, k_neg)
        lam = torch.where(adv >= 0, lam_pos, lam_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(0.0, 0.0, 0.0)
        term = -phi.detach() * adv * lp
    else:
        unclipped = w if delta is None else torch.clamp(w, max=delta)
        clipped = torch.clamp(w, 1 - epsilon, 1 + eps_high)
        term = -torch.minimum(unclipped * adv, clipped * adv)
    if rho is not None and loss_type != "vespo":
        term = term * rho
    if off_policy_threshold is not None:
        sampler = old_logprobs if rollout_logprobs is None else rollout_logprobs
        gap = sampler.double() - logprobs.detach().double()
        gap = torch.where(mask & ~torch.isnan(gap), gap, zero)
        mean_gap = gap.sum(-1, keepdim=True) / rows[:, None].clamp(min=1)
        term = term * ((adv >= 0) | (mean_gap <= off_policy_threshold)).double()
    kept = mask
    if top_entropy_quantile < 1.0:
        values = entropy.double()[mask]
        threshold = torch.quantile(values, 1 - top_entropy_quantile) if values.numel() else math.inf
        kept = mask & (entropy.double() >= threshold)
    term = torch.where(kept, term, zero)
    kl = None
    if ref_logprobs is not None:
        d = torch.where(mask, ref_logprobs.double(), zero) - lp
        kl = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[kl_estimator]
        if bias_correction:
            kl = kl * w
        kl = torch.where(mask, kl, zero)
        term = term + beta * kl
    term = torch.where(mask, term, zero)
    if loss_type in ("grpo", "sapo", "rloo"):
        loss = (term.sum(-1) / rows.clamp(min=1)).sum() / n_rows
    elif loss_type == "bnpo":
        loss = term.sum() / n_tokens.clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = term.sum() / (n_rows * max_completion_length)
    elif loss_type in ("dapo", "cispo", "vespo"):
        loss = term.sum() / max(n_tokens if num_items is None else num_items, 1)
    else:  # luspo
        loss = term.sum(-1).sum() / n_rows
    policy_loss = loss
    if entropy_coef != 0:
        ent = torch.where(kept, entropy.double(), zero)
        loss = loss - entropy_coef * ent.sum() / kept.sum().clamp(min=1)

    def masked_mean(x):
        return torch.where(mask, x, zero).sum() / n_tokens.clamp(min=1)

    per_row = loss_type == "rloo" or level == "sequence"
    per_row = per_row and advantages.dim() == 1
    c1 = w if delta is None else torch.clamp(w, max=delta)
    if loss_type == "cispo":
        low, high = torch.zeros_like(w, dtype=torch.bool), (w > eps_high) & (adv > 0)
    elif loss_type in ("sapo", "vespo"):
        low = high = torch.zeros_like(w, dtype=torch.bool)
    else:
        low, high = (c1 < 1 - epsilon) & (adv < 0), (c1 > 1 + eps_high) & (adv > 0)
    if per_row:
        def mean_of(x):
            return x[:, 0].double().sum() / n_rows
    else:
        def mean_of(x):
            return masked_mean(x.double())
    nan = torch.tensor(math.nan, dtype=torch.float64)
    w = w.detach()
    metrics = dict(policy_loss=policy_loss.detach(), clip_ratio_low=mean_of(low),
                   clip_ratio_high=mean_of(high), clip_ratio_region=mean_of(low | high),
                   mean_kl=masked_mean(kl).detach() if kl is not None else nan,
                   mean_entropy=(masked_mean(entropy.detach().double()) if entropy is not None
                                 else nan),
                   mean_ratio=mean_of(w).detach(), **rollout_metrics)
    return loss, metrics
# ------------------------------------------------------------------------------ memory

def peak_allocated_bytes(function):
    """Peak of bytes held during ``function()`` beyond what was held before. On CUDA, the caching
    allocator's peak counter; on CPU, from the allocator's own records: the profiler's memory
    events (one per allocation and per free, with its size), summed in time."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        function()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    events = prof.profiler.kineto_results.events()
    records = sorted((event.start_ns(), event.nbytes()) for event in events
                     if event.name() == "[memory]")
    held = peak = 0
    for _, nbytes in records:
        held += nbytes
        peak = max(peak, held)
    return peak
