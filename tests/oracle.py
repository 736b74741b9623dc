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
    value = {"k1": -d, "k2": d * d / 2, "k3": torch.exp(d) - d - 1}[estimator]
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
