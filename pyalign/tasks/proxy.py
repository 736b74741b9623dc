"""The proxy reward model: a linear Bradley-Terry model over bag-of-tokens and token-bigram counts.

Features of a (prompt, response): the count of each token in the response (V features) and the
count of each token bigram (prev, token) over the response positions, the first one's ``prev``
being the last prompt token (V*V features). The proxy reward is ``scale * (w . features) + bias``.
It is fitted by L2-regularised logistic regression on NOISY preference pairs (the Bradley-Terry
likelihood of the observed labels), so it tracks the gold reward where the training samples are
dense and is blind where they are sparse: rare bigrams (the ungrammatical ones) get weights near
zero, which a policy optimising the proxy can exploit (over-optimisation).
"""
from __future__ import annotations

import torch


def features(prompts: torch.Tensor, responses: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """FloatTensor[n, V + V*V]: unigram then bigram counts of each response; negative ids (the
    padding after a variable-length response's end) count nowhere."""
    n = responses.shape[0]
    feats = torch.zeros(n, vocab_size + vocab_size * vocab_size)
    counts = (responses >= 0).to(feats.dtype)
    responses = responses.clamp_min(0)
    feats.scatter_add_(1, responses, counts)
    prev = torch.cat([prompts[:, -1:], responses[:, :-1]], dim=1)
    feats.scatter_add_(1, vocab_size + prev * vocab_size + responses, counts)
    return feats


class ProxyRewardModel(torch.nn.Module):
    """scale * (weight . features) + bias; no grad needed at use time."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = torch.nn.Parameter(torch.zeros(vocab_size + vocab_size * vocab_size))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("bias", torch.tensor(0.0))

    def logits(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        return features(prompts, responses, self.vocab_size) @ self.weight

    @torch.no_grad()
    def forward(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        return self.scale * self.logits(prompts, responses) + self.bias


def fit_bradley_terry(model: ProxyRewardModel, prompts: torch.Tensor, chosen: torch.Tensor,
                      rejected: torch.Tensor, *, l2: float, max_iter: int = 200) -> float:
    """Fit ``model.weight`` by L-BFGS on -mean log sigmoid(f(chosen) - f(rejected)) + l2/2 |w|^2.

    Returns the final objective. Deterministic (full batch, no randomness)."""
    feature_diff = (features(prompts, chosen, model.vocab_size)
                    - features(prompts, rejected, model.vocab_size))
    weight = model.weight
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7,
                                  tolerance_change=1e-10, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        margin = feature_diff @ weight
        loss = -torch.nn.functional.logsigmoid(margin).mean() + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
        final = closure()
    weight.grad = None
    return float(final.detach())
