"""linear_logprobs on the CPU backend: torch matmuls per token chunk with the csrc/cpu logprobs
kernels as the epilogue (forward reduction, in-place backward), against float64 autograd."""
import math

import pytest
import torch

import pyalign
from oracle import IGNORE, entropy64, linear_logits64, token_logprobs64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_linear_forward_backward_vs_oracle(cpu_ops, dtype, with_bias, chunk_size):
    tokens, hidden_size, vocab = 13, 24, 1037
    hidden = (torch.randn(tokens, hidden_size) / math.sqrt(hidden_size)).to(dtype)
    weight = torch.randn(vocab, hidden_size).to(dtype)
    bias = torch.randn(vocab).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, (tokens,))
    labels[[2, 7]] = IGNORE
    labels[0], labels[-1] = 0, vocab - 1
    grad_logprobs, grad_entropy = torch.randn(tokens), torch.randn(tokens)
    temperature = 0.8

    leaves64 = [t.detach().double().requires_grad_(True) for t in (hidden, weight)]
    bias64 = bias.detach().double().requires_grad_(True) if with_bias else None
    logits64 = linear_logits64(leaves64[0], leaves64[1], bias64)
    logprobs64 = token_logprobs64(logits64, labels, IGNORE, temperature)
    entropy_64 = entropy64(logits64, labels, IGNORE, temperature)
    objective = (logprobs64 * grad_logprobs.double() + entropy_64 * grad_entropy.double()).sum()
    grads64 = torch.autograd.grad(objective, leaves64 + ([bias64] if with_bias else []))

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    bias_leaf = bias.clone().requires_grad_(True) if with_bias else None
    logprobs, entropy = pyalign.linear_token_logprobs(
        leaves[0], leaves[1], labels, bias=bias_leaf, temperature=temperature, entropy=True,
        chunk_size=chunk_size, backend="cpu")
    # bf16 operands: the matmul itself rounds (bf16 products, fp32 accumulation)
    fwd_tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(logprobs.double(), logprobs64.detach(), **fwd_tol)
    torch.testing.assert_close(entropy.double(), entropy_64.detach(), **fwd_tol)
    (logprobs * grad_logprobs + entropy * grad_entropy).sum().backward()
    got = [leaves[0].grad, leaves[1].grad] + ([bias_leaf.grad] if with_bias else [])
    bwd_tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for name, actual, expected in zip(("hidden", "weight", "bias"), got, grads64):
        assert actual.dtype == dtype
        torch.testing.assert_close(actual.double(), expected, **bwd_tol,
                                   msg=lambda m: f"grad {name}: {m}")
