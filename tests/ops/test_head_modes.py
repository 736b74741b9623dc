"""linear_token_logprobs's deterministic and batch-invariant modes, bitwise, on every backend of
the test device: repeated runs under several threads give the same bits for the values and every
gradient; a row scored alone gives the same bits for its log-prob and entropy as inside batches
of 1 to 129 other rows, at any position, with ignored padding rows (NaN hidden states among
them). On CPU the triton backend runs in the interpreter: its batch-invariant forward is the
fused kernel's, its deterministic backward the chunked strategy's."""
import pytest
import torch

import pyalign
from support import DEVICE, IGNORE, backends_for, torch_threads

BACKENDS = backends_for("linear_logprobs")
# (backend, arguments): the modes each backend is asked for, and the triton strategies under them
DETERMINISTIC = ([(b, {}) for b in BACKENDS if b != "triton"]
                 + [("triton", {"deterministic": True}),
                    ("triton", {"deterministic": True, "batch_invariant": True})] * ("triton" in BACKENDS))
INVARIANT = ([(b, {}) for b in BACKENDS]
             + [("triton", {"strategy": "chunked"})] * ("triton" in BACKENDS))
# the head options and metrics: none, or all of them (softcap, scale, temperature, metrics)
HEADS = {"plain": dict(outputs=("entropy",)),
         "options": dict(outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"),
                         softcap=2.5, logit_scale=0.7, temperature=0.8)}


def _inputs(tokens, hidden_size=32, vocab=300, dtype=torch.float32, seed=0):
    """hidden, weight, bias and labels of ``tokens`` tokens (the second one ignored)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=generator, device="cpu")
    weight = torch.randn(vocab, hidden_size, generator=generator, device="cpu") / 3
    bias = torch.randn(vocab, generator=generator, device="cpu")
    labels = torch.randint(0, vocab, (tokens,), generator=generator, device="cpu")
    labels[1:2] = IGNORE
    return [t.to(DEVICE, dtype if t.is_floating_point() else t.dtype)
            for t in (hidden, weight, bias, labels)]


@pytest.mark.parametrize("backend,mode", DETERMINISTIC,
                         ids=lambda v: v if isinstance(v, str) else "-".join(v) or "default")
@pytest.mark.parametrize("head", list(HEADS))
def test_repeated_runs_give_the_same_bits(backend, mode, head):
    """Runs of forward + backward with per-token upstream gradients under 2 threads: the values
    and the gradients of hidden, weight and bias bitwise equal (40 tokens, chunk_size 7: six
    vocabulary slices on the chunked heads, several tiles on the fused kernel)."""
    hidden, weight, bias, labels = _inputs(40)
    grad_logprobs, grad_entropy = torch.randn(40), torch.randn(40)

    def once():
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        out = pyalign.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2],
                                            chunk_size=7, backend=backend, **HEADS[head], **mode)
        torch.autograd.backward([out.log_probs, out.entropy], [grad_logprobs, grad_entropy])
        return [value for value in out if value is not None] + [leaf.grad for leaf in leaves]

    with torch_threads(2):
        first = once()
        for _ in range(2 if backend == "triton" else 3):  # the interpreter is slow
            for a, b in zip(first, once(), strict=True):
                assert torch.equal(a, b)


def _scored(hidden, weight, bias, labels, backend, mode, head):
    out = pyalign.linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend,
                                        batch_invariant=True, **HEADS[head], **mode)
    return [value for value in out if value is not None]


@pytest.mark.parametrize("backend,mode", INVARIANT,
                         ids=lambda v: v if isinstance(v, str) else "-".join(v.values()) or "auto")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head", list(HEADS))
def test_a_row_scores_the_same_alone_and_in_any_batch(backend, mode, dtype, head):
    """One row (H = 32, V = 300) scored alone, then inside batches of 2 to 130 rows at the first,
    a middle and the last position, the other rows random or ignored padding (zeros, or NaN):
    its outputs bitwise equal each time, under 2 threads."""
    row_hidden, weight, bias, row_label = _inputs(1, dtype=dtype, seed=1)
    row_label[0] = 17
    names = ("log_probs",) + HEADS[head]["outputs"]
    with torch_threads(2):
        alone = _scored(row_hidden, weight, bias, row_label, backend, mode, head)
        for size in (2, 5, 33, 64, 65, 130):  # 130: two blocks of the chunked heads
            hidden, _, _, labels = _inputs(size, dtype=dtype, seed=size)
            hidden[1] = float("nan")  # an ignored padded row (label 1 is ignored)
            if size > 5:
                hidden[-3:-1], labels[-3:-1] = 0.0, IGNORE
            for position in sorted({0, size // 2, size - 1} - {1}):
                batch_hidden, batch_labels = hidden.clone(), labels.clone()
                batch_hidden[position], batch_labels[position] = row_hidden[0], row_label[0]
                batch = _scored(batch_hidden, weight, bias, batch_labels, backend, mode, head)
                for name, one, many in zip(names, alone, batch, strict=True):
                    assert torch.equal(one[0], many[position]), (size, position, name)
