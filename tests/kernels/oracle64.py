"""Float64 references for the kernel tests, written from the formulas in ALGORITHMS.md with
torch autograd for the gradients (independent of the kernels' hand-derived backward)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _finite_logits(scaled: torch.Tensor) -> torch.Tensor:
    # -inf logits have probability 0 and zero gradient; autograd through -inf gives NaN
    # (0 * inf), so stand them in with a value whose exp underflows to exactly 0 in float64.
    floor = torch.finfo(torch.float64).min / 4
    return torch.where(torch.isneginf(scaled), torch.full_like(scaled, floor), scaled)


def token_logprobs(logits, labels, ignore_index, temperature, grad_logprobs, grad_entropy=None):
    """(logprobs, entropy, grad_logits) in float64 for logits [N, V] (any dtype)."""
    logits64 = logits.detach().to(torch.float64).requires_grad_(True)
    neg_inf = torch.isneginf(logits64.detach())
    scaled = _finite_logits(logits64) / temperature
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    log_probs = torch.log_softmax(scaled, dim=-1)
    logprobs = torch.where(valid, log_probs.gather(1, safe_labels[:, None])[:, 0], 0.0)
    probs = log_probs.exp()
    entropy = torch.where(valid, -(probs * torch.where(neg_inf, 0.0, log_probs)).sum(-1), 0.0)
    objective = (logprobs * grad_logprobs.to(torch.float64)).sum()
    if grad_entropy is not None:
        objective = objective + (entropy * grad_entropy.to(torch.float64)).sum()
    (grad_logits,) = torch.autograd.grad(objective, logits64)
    return logprobs.detach(), entropy.detach(), grad_logits


def kl(logprobs, ref_logprobs, mask, estimator, grad_kl):
    """(kl, grad_logprobs, grad_ref_logprobs) in float64."""
    logp = logprobs.detach().to(torch.float64).requires_grad_(True)
    ref = ref_logprobs.detach().to(torch.float64).requires_grad_(True)
    diff = ref - logp
    value = {"k1": lambda: -diff, "k2": lambda: diff ** 2 / 2,
             "k3": lambda: torch.exp(diff) - diff - 1}[estimator]()
    if mask is not None:
        value = torch.where(mask, value, torch.zeros_like(value))
    grads = torch.autograd.grad((value * grad_kl.to(torch.float64)).sum(), (logp, ref))
    return value.detach(), grads[0], grads[1]


def pair_loss(r_w, r_l, loss, beta, eps):
    """Per-pair loss of ALGORITHMS.md from the log-ratios r_w, r_l (float64 tensors)."""
    h = r_w - r_l
    x = beta * h
    ls = F.logsigmoid
    if loss == "sigmoid":
        return -(1 - eps) * ls(x) - eps * ls(-x)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return torch.clamp(1 - x, min=0)
    if loss == "robust":
        return (-(1 - eps) * ls(x) + eps * ls(-x)) / (1 - 2 * eps)
    if loss == "exo_pair":
        return torch.sigmoid(x) * (ls(x) - math.log(1 - eps)) + torch.sigmoid(-x) * (ls(-x) - math.log(eps))
    if loss == "nca_pair":
        return -ls(beta * r_w) - 0.5 * ls(-beta * r_w) - 0.5 * ls(-beta * r_l)
    if loss == "bco_pair":
        return -ls(beta * r_w) - ls(-beta * r_l)
    if loss == "sppo_hard":
        return (r_w - 1 / (2 * beta)) ** 2 + (r_l + 1 / (2 * beta)) ** 2
    if loss == "apo_zero":
        return 1 - torch.sigmoid(beta * r_w) + torch.sigmoid(beta * r_l)
    if loss == "apo_down":
        return torch.sigmoid(beta * r_w) + 1 - torch.sigmoid(beta * h)
    if loss == "discopop":
        m = torch.sigmoid(x / 0.05)
        return (1 - m) * (-ls(x)) + m * torch.exp(-x)
    raise ValueError(loss)


def preference(pc, pr, rc, rr, loss, beta, eps, grad_losses):
    """(losses, (grad_pc, grad_pr, grad_rc, grad_rr)) in float64."""
    inputs = [t.detach().to(torch.float64).requires_grad_(True) for t in (pc, pr, rc, rr)]
    losses = pair_loss(inputs[0] - inputs[2], inputs[1] - inputs[3], loss, beta, eps)
    grads = torch.autograd.grad((losses * grad_losses.to(torch.float64)).sum(), inputs)
    return losses.detach(), grads


def linear_token_logprobs(hidden, weight, bias, labels, ignore_index, temperature, grad_logprobs,
                          grad_entropy=None):
    """(logprobs, entropy, grad_hidden, grad_weight, grad_bias) in float64."""
    h = hidden.detach().to(torch.float64).requires_grad_(True)
    w = weight.detach().to(torch.float64).requires_grad_(True)
    b = None if bias is None else bias.detach().to(torch.float64).requires_grad_(True)
    logits = h @ w.t() + (0 if b is None else b)
    scaled = logits / temperature
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    log_probs = torch.log_softmax(scaled, dim=-1)
    logprobs = torch.where(valid, log_probs.gather(1, safe_labels[:, None])[:, 0], 0.0)
    entropy = torch.where(valid, -(log_probs.exp() * log_probs).sum(-1), 0.0)
    objective = (logprobs * grad_logprobs.to(torch.float64)).sum()
    if grad_entropy is not None:
        objective = objective + (entropy * grad_entropy.to(torch.float64)).sum()
    wrt = (h, w) if b is None else (h, w, b)
    grads = torch.autograd.grad(objective, wrt)
    return (logprobs.detach(), entropy.detach(), grads[0], grads[1],
            None if b is None else grads[2])
