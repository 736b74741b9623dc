"""Independent float64 references for the tests. Written from ALGORITHMS.md, sharing no code
with pyalign: every test compares pyalign against these (or against autograd through them)."""
import math

import torch

IGNORE = -100


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


def preference64(pc, pr, rc, rr, loss, beta, eps=0.0):
    """Per-pair losses in float64, straight from the ALGORITHMS.md table."""
    pc, pr, rc, rr = (t.double() for t in (pc, pr, rc, rr))
    rw, rl = pc - rc, pr - rr
    h = rw - rl
    x = beta * h
    sig = torch.sigmoid
    if loss == "sigmoid":
        return -(1 - eps) * _logsig(x) - eps * _logsig(-x)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return torch.clamp(1 - x, min=0)
    if loss == "robust":
        return (-(1 - eps) * _logsig(x) + eps * _logsig(-x)) / (1 - 2 * eps)
    if loss == "exo_pair":
        return sig(x) * (_logsig(x) - math.log(1 - eps)) + sig(-x) * (_logsig(-x) - math.log(eps))
    if loss == "nca_pair":
        return -_logsig(beta * rw) - 0.5 * _logsig(-beta * rw) - 0.5 * _logsig(-beta * rl)
    if loss == "bco_pair":
        return -_logsig(beta * rw) - _logsig(-beta * rl)
    if loss == "sppo_hard":
        return (rw - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2
    if loss == "apo_zero":
        return 1 - sig(beta * rw) + sig(beta * rl)
    if loss == "apo_down":
        return sig(beta * rw) + 1 - sig(x)
    if loss == "discopop":
        m = sig(x / 0.05)
        return (1 - m) * (-_logsig(x)) + m * torch.exp(-x)
    raise KeyError(loss)


def kto64(policy, ref, desirable, kl, beta, wd=1.0, wu=1.0):
    z0 = torch.clamp(kl.double().mean(), min=0)
    r = policy.double() - ref.double()
    loss = torch.where(desirable, wd * (1 - torch.sigmoid(beta * (r - z0))),
                       wu * (1 - torch.sigmoid(beta * (z0 - r))))
    return loss.mean()


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


def sequence_logprobs64(token_logprobs, mask, average=False):
    """Masked sum (or masked mean) over the last dimension, in float64."""
    mask = mask.double()
    summed = (token_logprobs.double() * mask).sum(-1)
    return summed / mask.sum(-1).clamp(min=1) if average else summed


def grads64(function, inputs, upstream=None):
    """Values of ``function`` on float64 copies of ``inputs`` and d(sum(values * upstream))/d each
    input, by autograd: ``(values, [grad, ...])``."""
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    values = function(*leaves)
    weights = torch.ones_like(values) if upstream is None else upstream.double()
    grads = torch.autograd.grad((values * weights).sum(), leaves, allow_unused=True)
    return values.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


# -------------------------------------------------------------------------- weight updates

def ema64(target, source, decay):
    return decay * target.double() + (1 - decay) * source.double()


def lerp64(target, source, weight):
    return target.double() + weight * (source.double() - target.double())
