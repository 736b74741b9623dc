"""torch.compile(fullgraph=True) over the public ops: the custom ops keep the graph whole
(fullgraph=True raises on any graph break) and the compiled results match eager.

Inductor (the default compiler) runs once per op; the per-backend variants (every backend of the
test device, support.backends_for) use "aot_eager", which traces the same forward and backward
graphs without generating C++ (a few seconds, not tens).
"""
import pytest
import torch

import pyalign
from pyalign import backends
from support import backends_for

LOGPROB_BACKENDS = backends_for("logprobs")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def logprobs_objective(logits, labels, grad_logprobs, backend="auto"):
    logprobs, entropy = pyalign.token_logprobs(logits, labels, entropy=True, temperature=0.7,
                                               backend=backend)
    return (logprobs * grad_logprobs).sum() + 0.5 * entropy.sum()


def logprobs_case():
    logits = torch.randn(2, 3, 50) * 2
    labels = torch.randint(0, 50, (2, 3))
    labels[0, 1] = -100
    return logits, labels, torch.randn(2, 3)


def value_and_grad(function, logits, *args):
    leaf = logits.clone().requires_grad_(True)
    value = function(leaf, *args)
    value.backward()
    return value.detach(), leaf.grad


@pytest.mark.parametrize("compiler,backend", [("inductor", "auto")] +
                         [("aot_eager", b) for b in LOGPROB_BACKENDS])
def test_token_logprobs_fullgraph_matches_eager(compiler, backend):
    logits, labels, grad_logprobs = logprobs_case()
    expected = value_and_grad(logprobs_objective, logits, labels, grad_logprobs, backend)
    compiled = torch.compile(logprobs_objective, fullgraph=True, backend=compiler)
    actual = value_and_grad(compiled, logits, labels, grad_logprobs, backend)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-6, atol=1e-7)


def preference_objective(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    out = pyalign.preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                  loss="sigmoid", beta=0.1, label_smoothing=0.1)
    return out.loss, out.margins


@pytest.mark.parametrize("compiler", ["inductor"])
def test_preference_loss_fullgraph_matches_eager(compiler):
    inputs = [torch.randn(5) * 3 - 40 for _ in range(4)]
    results = []
    for function in (preference_objective,
                     torch.compile(preference_objective, fullgraph=True, backend=compiler)):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        loss, margins = function(*leaves)
        loss.backward()
        results.append((loss.detach(), margins, [leaf.grad for leaf in leaves]))
    (loss, margins, grads), (exp_loss, exp_margins, exp_grads) = results[1], results[0]
    torch.testing.assert_close(loss, exp_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(margins, exp_margins, rtol=1e-6, atol=1e-7)
    for grad, exp_grad in zip(grads, exp_grads, strict=False):
        torch.testing.assert_close(grad, exp_grad, rtol=1e-6, atol=1e-8)


def test_no_graph_breaks_in_any_op():
    """torch._dynamo.explain over every differentiable op: one graph, zero breaks. Each op runs
    eagerly first (backends loaded, as in a training loop's second step); the first-use case is
    test_compile_before_any_eager_call."""
    logits, labels, grad_logprobs = logprobs_case()
    hidden, weight = torch.randn(6, 8), torch.randn(40, 8)
    token_labels = torch.randint(0, 40, (6,))
    logprobs, ref_logprobs = -torch.rand(7), -torch.rand(7)
    mask = torch.rand(7) > 0.3
    pairs = [torch.randn(4) - 30 for _ in range(4)]
    calls = [
        (logprobs_objective, (logits, labels, grad_logprobs)),
        (lambda h, w, y: pyalign.linear_token_logprobs(h, w, y, entropy=True,
                                                       chunk_size=4)[0].sum(),
         (hidden, weight, token_labels)),
        (lambda a, b, m: pyalign.kl_penalty(a, b, estimator="k3", mask=m).sum(),
         (logprobs, ref_logprobs, mask)),
        (lambda *t: pyalign.preference_loss(*t, loss="ipo", beta=0.2).loss, pairs),
        (lambda *t: pyalign.preference_loss(  # MPO + aot + a divergence: batch steps in torch
            *t[:4], loss=["sigmoid", "sft", "aot"], loss_weights=[0.8, 1.0, 0.5],
            chosen_lengths=t[4], rejected_lengths=t[5]).loss, pairs + [torch.rand(4) * 9] * 2),
        (lambda a, b, m: pyalign.token_preference_loss(
            a, b, m, loss=["sigmoid_norm", "bco_pair"], ld_alpha=0.5).loss,
         (-torch.rand(4, 5), -torch.rand(4, 5), torch.rand(4, 5) > 0.3)),
    ]
    for function, args in calls:
        function(*args)
        explanation = torch._dynamo.explain(function)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


def test_labels_out_of_range_still_raise_when_compiled():
    logits, labels, grad_logprobs = logprobs_case()
    labels[1, 2] = 50
    compiled = torch.compile(logprobs_objective, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match=r"outside \[0, 50\)"):
        compiled(logits, labels, grad_logprobs)


def test_compile_before_any_eager_call():
    """A user's first call may be the compiled one: backends not loaded yet must not break the
    graph (resolving a backend runs at trace time)."""
    saved = dict(backends._loaded), dict(backends._failures)
    backends._loaded.clear()
    backends._failures.clear()
    try:
        logits, labels, grad_logprobs = logprobs_case()
        compiled = torch.compile(logprobs_objective, fullgraph=True, backend="aot_eager")
        actual = value_and_grad(compiled, logits, labels, grad_logprobs)
    finally:
        backends._loaded.update(saved[0])
        backends._failures.update(saved[1])
    expected = value_and_grad(logprobs_objective, logits, labels, grad_logprobs)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-6, atol=1e-7)
