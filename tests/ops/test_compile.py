"""torch.compile(fullgraph=True) over the public ops: the custom ops keep the graph whole
(fullgraph=True raises on any graph break) and the compiled results match eager.

Inductor (the default compiler) runs once per op; the per-backend variants (every backend of the
test device, support.backends_for) use "aot_eager", which traces the same forward and backward
graphs without generating C++ (a few seconds, not tens). Every unpaired and policy loss of the
registry (pyalign/losses/) and one pairwise loss of each kind (support.pairwise_loss_kinds: the
others trace the same graph, the loss name a constant of the opaque pair op) is traced whole and
matches eager, value and gradients.
"""
import pytest
import torch

import pyalign
from pyalign import backends, losses
from support import backends_for, pairwise_loss_kinds

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


# ------------------------------------------------- every loss of the registry, fullgraph=True
# Each loss runs through every path that can reach a different autograd.Function argument list:
# sequence log-probs with the token counts (length normalisation, the batch steps), per-token
# log-probs (the counts from the mask; the fused sequence primitive for the plain losses), and
# the head (hidden states; under torch.compile its recompute path, eagerly its 3-matmul path)
# with an f-divergence where the loss takes one (the prepared ratios against a zero reference).

def _value_and_grads(function, tensors):
    """(value, *grads) of ``function`` on fresh leaf copies of the floating ``tensors``."""
    leaves = [t.clone().requires_grad_(True) if t.is_floating_point() else t for t in tensors]
    value = function(*leaves)
    value.backward()
    return (value.detach(), *[leaf.grad for leaf in leaves if leaf.is_floating_point()])


def _assert_compiled_matches_eager(objective, tensors):
    expected = _value_and_grads(objective, tensors)
    compiled = _value_and_grads(torch.compile(objective, fullgraph=True, backend="aot_eager"),
                                tensors)
    assert sum(grad is not None for grad in expected[1:]) >= 1
    for actual, wanted in zip(compiled, expected, strict=True):
        if wanted is None:  # an input the loss does not read (sft: the rejected log-probs)
            assert actual is None
            continue
        assert torch.isfinite(wanted).all()
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-6)


def _head_case(rows, seq_len=5, hidden_size=8, vocab=37):
    hidden = torch.randn(rows, seq_len, hidden_size)
    weight = torch.randn(vocab, hidden_size) * 0.5
    labels = torch.randint(0, vocab, (rows, seq_len))
    labels[:, 0] = -100  # a prompt position
    labels[1, -2:] = -100  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("name", pairwise_loss_kinds())
def test_every_kind_of_pairwise_loss_fullgraph_matches_eager(name):
    entry = losses.REGISTRY[name]
    pairs = 3
    sequence = [torch.randn(pairs) * 3 - 40 for _ in range(4)]
    lengths = [torch.randint(1, 9, (pairs,)).float() for _ in range(2)]
    token_logps, ref_token_logps = -torch.rand(2 * pairs, 5) * 4, -torch.rand(2 * pairs, 5) * 4
    token_mask = torch.rand(2 * pairs, 5) > 0.3
    hidden, weight, labels = _head_case(2 * pairs)
    ref_hidden = torch.randn_like(hidden)
    options = dict(loss=name, beta=0.3,
                   label_smoothing=0.1 if entry.uses_label_smoothing else 0.0)
    divergence = "js_divergence" if entry.f_divergence else "reverse_kl"

    def objective(policy_chosen, policy_rejected, ref_chosen, ref_rejected, token_logps, hidden,
                  weight):
        from_sequences = pyalign.preference_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths=lengths[0],
            rejected_lengths=lengths[1], **options).loss
        from_tokens = pyalign.token_preference_loss(token_logps, ref_token_logps, token_mask,
                                                    **options).loss
        from_head = pyalign.linear_preference_loss(
            hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=weight.detach(),
            f_divergence=divergence, **options).loss
        return from_sequences + from_tokens + from_head

    _assert_compiled_matches_eager(objective, [*sequence, token_logps, hidden, weight])


def test_reference_given_twice_fullgraph_matches_eager():
    """A reference-free call passes one zero tensor as both references: still one graph."""
    policy_chosen, policy_rejected = torch.randn(4) - 30, torch.randn(4) - 30
    zeros = torch.zeros(4)

    def objective(policy_chosen, policy_rejected):
        return pyalign.preference_loss(policy_chosen, policy_rejected, zeros, zeros,
                                       loss="sigmoid").loss

    _assert_compiled_matches_eager(objective, [policy_chosen, policy_rejected])


@pytest.mark.parametrize("name", losses.UNPAIRED_NAMES)
def test_every_unpaired_loss_fullgraph_matches_eager(name):
    rows = 4
    policy_logps, ref_logps = torch.randn(rows) - 20, torch.randn(rows) - 20
    desirable = torch.tensor([True, False, True, False])
    kl = torch.rand(rows)
    hidden, weight, labels = _head_case(rows)
    ref_hidden = torch.randn_like(hidden)

    def objective(policy_logps, hidden, weight):
        from_sequences = pyalign.kto_loss(policy_logps, ref_logps, desirable, kl, loss=name,
                                          beta=0.3).loss
        from_head = pyalign.linear_kto_loss(hidden, weight, labels, desirable, kl=kl,
                                            ref_hidden=ref_hidden, ref_weight=weight.detach(),
                                            loss=name, beta=0.3).loss
        return from_sequences + from_head

    _assert_compiled_matches_eager(objective, [policy_logps, hidden, weight])


@pytest.mark.parametrize("name", losses.POLICY_NAMES)
def test_every_policy_loss_fullgraph_matches_eager(name):
    shape = (3, 6)
    logprobs = -torch.rand(shape) * 3
    old_logprobs = logprobs + torch.randn(shape) * 0.2
    ref_logprobs = logprobs + torch.randn(shape) * 0.2
    advantages = torch.randn(shape[0])
    mask = torch.rand(shape) > 0.3
    entropy = torch.rand(shape) * 2
    options = dict(loss_type=name, ref_logprobs=ref_logprobs, beta=0.04, entropy_coef=0.01)
    if losses.POLICY_REGISTRY[name].normalisation == "max_length":
        options["max_completion_length"] = shape[1]

    def objective(logprobs, entropy):
        return pyalign.policy_loss(logprobs, old_logprobs, advantages, mask, entropy=entropy,
                                   **options).loss

    _assert_compiled_matches_eager(objective, [logprobs, entropy])
