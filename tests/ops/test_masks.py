"""Masked positions are inert, for every op with a mask: a NaN, +inf or -inf at a masked-out
position (in any input, and in the upstream gradient there) leaves the outputs equal to the
float64 oracle computed on the unmasked values alone, and gives exactly zero, finite gradient at
the masked positions, on every backend of the test device. Masking is selection, never a
multiplication by 0 (0 * NaN = NaN, 0 * inf = NaN). Rows with every position masked give 0, for
the sum and for the length-averaged mean (the count clamps to 1: 0 / 1, not 0 / 0).

A mask of any dtype holding only 0 and 1 (``attention_mask.float()``) is the bool mask: every
masked op gives bitwise the same outputs and gradients with it, on every backend, also under
torch.compile (tests/ops/test_validation.py: any other value is refused before a kernel runs)."""
import pytest
import torch

import pyalign
from pyalign import backends
from pyalign.losses import (
    ELEMENTWISE_NAMES,  # the primitives take pair-math names
    LABEL_SMOOTHING_NAMES,
    REGISTRY,
)
from support import (
    DEVICE,
    IGNORE,
    backends_for,
    grads64,
    kl64,
    linear_logits64,
    preference64,
    sequence_logprobs64,
    token_logprobs64,
)

POISONS = [float("nan"), float("inf"), float("-inf")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-3),
            torch.float16: dict(rtol=1e-2, atol=1e-3)}


def poison_masked(tensor, mask):
    """A copy of ``tensor`` with NaN, +inf and -inf cycling over the masked-out positions."""
    out = tensor.clone()
    flat = out.view(-1)
    hidden_positions = (~mask.reshape(-1).bool()).nonzero().flatten()
    for index, position in enumerate(hidden_positions.tolist()):
        flat[position] = POISONS[index % 3]
    return out


def random_mask(shape, all_masked_row=True):
    mask = torch.rand(shape) > 0.4
    if all_masked_row and len(shape) == 2:
        mask[1] = False  # a row with nothing unmasked
        mask[0, 0] = True
    return mask


# --------------------------------------------------------------------------- kl_penalty

@pytest.mark.parametrize("backend", backends_for("kl"))
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_penalty_masked_poison_is_inert(backend, estimator, dtype):
    shape = (4, 37)
    clean_lp = (-torch.rand(shape) * 4).to(dtype)
    clean_ref = (clean_lp.float() + torch.randn(shape) * 0.7).to(dtype)
    mask = random_mask(shape)
    logprobs, ref_logprobs = poison_masked(clean_lp, mask), poison_masked(clean_ref, mask)
    # the poison cycle starts at another place in ref, so NaN meets inf, inf meets -inf, ...
    ref_logprobs = poison_masked(ref_logprobs.flip(-1), mask.flip(-1)).flip(-1)
    upstream = poison_masked(torch.randn(shape), mask)
    leaves = [logprobs.requires_grad_(True), ref_logprobs.requires_grad_(True)]
    kl = pyalign.kl_penalty(*leaves, estimator=estimator, mask=mask, backend=backend)
    kl.backward(upstream)
    expected, (exp_grad_lp, exp_grad_ref) = grads64(
        lambda lp, ref: kl64(lp, ref, estimator, mask), [clean_lp, clean_ref],
        torch.where(mask, upstream, 0.0))
    torch.testing.assert_close(kl.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(kl[~mask] == 0)
    for grad, exp in ((leaves[0].grad, exp_grad_lp), (leaves[1].grad, exp_grad_ref)):
        assert torch.isfinite(grad).all() and torch.all(grad[~mask] == 0)
        torch.testing.assert_close(grad.double(), exp, **GRAD_TOL[dtype])


# --------------------------------------------------------------------------- sequence_logprobs

@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.uint8], ids=str)
def test_sequence_logprobs_masked_poison_is_inert(average, dtype, mask_dtype):
    shape = (5, 23)
    clean = (-torch.rand(shape) * 5).to(dtype)
    mask = random_mask(shape)
    token_logprobs = poison_masked(clean, mask).requires_grad_(True)
    out = pyalign.sequence_logprobs(token_logprobs, mask.to(mask_dtype), average=average)
    upstream = torch.randn(shape[0])
    out.backward(upstream)
    expected, (exp_grad,) = grads64(lambda lp: sequence_logprobs64(lp, mask, average), [clean],
                                    upstream)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.detach().double(), expected, **tol)
    assert out[1] == 0  # the all-masked row: 0, for the sum and the mean
    grad = token_logprobs.grad
    assert torch.isfinite(grad).all() and torch.all(grad[~mask] == 0)
    torch.testing.assert_close(grad.double(), exp_grad, **GRAD_TOL[dtype])


def test_sequence_logprobs_validates_its_arguments():
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\), expected \(2, 3\)"):
        pyalign.sequence_logprobs(torch.randn(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        pyalign.sequence_logprobs(torch.randn(2, 3), [[1, 1, 1]] * 2)
    with pytest.raises(TypeError, match="token_logprobs must be a floating tensor"):
        pyalign.sequence_logprobs(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be bool or hold only 0 and 1, got 0.5 at "
                                         r"position \(0, 0\)"):  # kept, or a weight?
        pyalign.sequence_logprobs(torch.randn(2, 3), torch.full((2, 3), 0.5))


# ------------------------------------------------------ the fused sequence reduce + pair loss

def sequence_primitive_case(pairs, tokens, dtype, all_masked_row=True):
    shape = (2 * pairs, tokens)
    mask = random_mask(shape, all_masked_row)
    clean = (-torch.rand(shape) * 3).to(dtype)
    clean_ref = (clean.float() - torch.randn(shape) * 0.5).to(dtype)
    return mask, clean, clean_ref


@pytest.mark.parametrize("backend", backends_for("preference"))
@pytest.mark.parametrize("loss", ELEMENTWISE_NAMES)
@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("ref_per_token", [False, True], ids=["ref_seq", "ref_tokens"])
def test_sequence_preference_primitives_masked_poison_is_inert(backend, loss, average,
                                                               ref_per_token):
    """The backend primitives directly: the public op reaches them with per-token log-probs that
    are 0 at ignored positions, but the contract is a mask, and the mask must hold alone."""
    pairs, beta = 3, 0.1
    eps = 0.1 if loss in LABEL_SMOOTHING_NAMES else 0.0
    # ORPO's probabilities: a row without tokens is a log-prob of 0, where its oracle is 0/0
    entry = REGISTRY[loss]
    mask, clean, clean_ref = sequence_primitive_case(pairs, 41, torch.float32,
                                                     all_masked_row=not entry.probabilities)
    if entry.probabilities:  # log-ratios that are log-probabilities, <= 0
        clean_ref = clean_ref.clamp(min=0)
    token_logprobs = poison_masked(clean, mask)
    ref = poison_masked(clean_ref, mask) if ref_per_token else -torch.rand(2 * pairs) * 20
    if entry.probabilities and not ref_per_token:
        ref = torch.rand(2 * pairs)
    # the backend table's choice for the loss (a loss without a Triton branch runs on eager)
    impl = backends.implementation("preference", backend, token_logprobs, loss=loss)
    losses, policy_seq, ref_seq = impl.sequence_preference_forward(
        token_logprobs, mask, ref, loss, beta, eps, average)
    upstream = torch.randn(pairs)
    grad_tokens, grad_ref = impl.sequence_preference_backward(
        upstream, token_logprobs, mask, ref, policy_seq, ref_seq, loss, beta, eps, average)

    def losses_of(lp, rf):
        policy = sequence_logprobs64(lp, mask, average)
        reference = sequence_logprobs64(rf, mask, average) if ref_per_token else rf
        if entry.reference_free:  # the primitive's contract is the ratio, whatever the loss
            policy, reference = policy - reference, torch.zeros_like(reference)
        return preference64(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:],
                            loss, beta, eps)

    clean_inputs = [clean, clean_ref if ref_per_token else ref]
    expected, (exp_grad_tokens, exp_grad_ref) = grads64(losses_of, clean_inputs, upstream)
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(policy_seq.double(), sequence_logprobs64(clean, mask, average),
                               rtol=1e-5, atol=1e-5)
    assert policy_seq[1] == 0 or entry.probabilities  # the all-masked row
    assert torch.isfinite(grad_tokens).all() and torch.all(grad_tokens[~mask] == 0)
    torch.testing.assert_close(grad_tokens.double(), exp_grad_tokens, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(grad_ref).all()
    if ref_per_token:
        assert torch.all(grad_ref[~mask] == 0)
    torch.testing.assert_close(grad_ref.double(), exp_grad_ref, rtol=1e-5, atol=1e-6)


def linear_masked_case(pairs=2, tokens=7, hidden_size=8, vocab=29):
    hidden = torch.randn(2 * pairs, tokens, hidden_size)
    weight = torch.randn(vocab, hidden_size) / hidden_size ** 0.5
    labels = torch.randint(0, vocab, (2 * pairs, tokens))
    labels[:, :2] = IGNORE  # prompt
    labels[0, -2:] = IGNORE  # padding
    labels[1] = IGNORE  # a row with no completion tokens
    return hidden, weight, labels


@pytest.mark.parametrize("backend", backends_for("linear_logprobs"))
@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_preference_loss_poison_at_ignored_positions_is_inert(backend, average, dtype):
    """NaN/inf hidden states at prompt and padding positions (policy and reference)."""
    hidden, weight, labels = linear_masked_case()
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    mask = labels != IGNORE
    ref_hidden = (hidden.float() + 0.3 * torch.randn(hidden.shape)).to(dtype)
    poisoned = hidden.clone()
    poisoned_ref = ref_hidden.clone()
    for index, (row, col) in enumerate((~mask).nonzero().tolist()):
        poisoned[row, col, index % hidden.shape[-1]] = POISONS[index % 3]
        poisoned_ref[row, col, (index + 1) % hidden.shape[-1]] = POISONS[(index + 1) % 3]
    hidden_leaf = poisoned.requires_grad_(True)
    weight_leaf = weight.clone().requires_grad_(True)
    out = pyalign.linear_preference_loss(hidden_leaf, weight_leaf, labels, ref_hidden=poisoned_ref,
                                         ref_weight=weight, loss="sigmoid", beta=0.1,
                                         average_log_prob=average, reduction="none", backend=backend)
    upstream = torch.randn(2)
    out.loss.backward(upstream)
    with torch.no_grad():
        ref_logps64 = sequence_logprobs64(
            token_logprobs64(linear_logits64(ref_hidden, weight), labels), mask, average)

    def losses_of(h, w):
        policy = sequence_logprobs64(token_logprobs64(linear_logits64(h, w), labels), mask,
                                     average)
        return preference64(policy[:2], policy[2:], ref_logps64[:2], ref_logps64[2:], "sigmoid", 0.1)

    expected, (exp_grad, exp_grad_weight) = grads64(losses_of, [hidden, weight], upstream)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.loss.detach().double(), expected, **tol)
    grad = hidden_leaf.grad
    assert torch.isfinite(grad).all() and torch.all(grad[~mask] == 0)
    torch.testing.assert_close(grad.double(), exp_grad, **tol)
    # the lm_head gradient sums over positions: a poisoned hidden state at an ignored one must
    # not reach it (0 * NaN in the matmul)
    assert torch.isfinite(weight_leaf.grad).all()
    torch.testing.assert_close(weight_leaf.grad.double(), exp_grad_weight, **tol)
    assert torch.isfinite(out.chosen_rewards).all() and torch.isfinite(out.rejected_rewards).all()


# ------------------------------------------------ masks of any dtype holding 0 and 1 only

MASK_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
               torch.uint8]


def _kl_penalty_case(backend, mask):
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    leaves = [(-3 * torch.rand(4, 9, generator=generator)).to(DEVICE).requires_grad_(True)
              for _ in range(2)]
    out = pyalign.kl_penalty(*leaves, estimator="k3", mask=mask, backend=backend)
    out.backward(torch.linspace(-1, 1, 36, device=DEVICE).view(4, 9))
    return [out.detach(), *(leaf.grad for leaf in leaves)]


def _sequence_logprobs_case(backend, mask):
    leaf = (-3 * torch.rand(4, 9, generator=torch.Generator(device=DEVICE).manual_seed(2))).to(DEVICE)
    leaf.requires_grad_(True)
    out = [pyalign.sequence_logprobs(leaf, mask, average=average) for average in (False, True)]
    (out[0] * 2 + out[1]).sum().backward()
    return [o.detach() for o in out] + [leaf.grad]


def _token_preference_case(loss):
    def run(backend, mask):
        generator = torch.Generator(device=DEVICE).manual_seed(3)
        leaf = (-3 * torch.rand(4, 9, generator=generator)).to(DEVICE).requires_grad_(True)
        ref = (-3 * torch.rand(4, 9, generator=generator)).to(DEVICE)
        reference_free = all(REGISTRY[name].reference_free for name in loss)
        out = pyalign.token_preference_loss(leaf, None if reference_free else ref, mask, loss=loss,
                                            reduction="none", backend=backend)
        out.loss.backward(torch.tensor([0.7, -1.3], device=DEVICE))
        return [out.loss.detach(), out.chosen_rewards, out.rejected_rewards, leaf.grad]
    return run


def _policy_loss_case(backend, mask):
    generator = torch.Generator(device=DEVICE).manual_seed(4)
    leaf = (-3 * torch.rand(4, 9, generator=generator)).to(DEVICE).requires_grad_(True)
    old = leaf.detach() + 0.3 * torch.randn(4, 9, generator=generator).to(DEVICE)
    advantages = torch.randn(4, generator=generator).to(DEVICE)
    out = pyalign.policy_loss(leaf, old, advantages, mask, loss_type="grpo", backend=backend)
    out.loss.backward()
    return [value.detach() for value in out] + [leaf.grad]


def _kto_case(backend, mask):
    """``mask``'s first row as KTO's desirable flags."""
    generator = torch.Generator(device=DEVICE).manual_seed(5)
    leaf = (-30 * torch.rand(9, generator=generator)).to(DEVICE).requires_grad_(True)
    ref = (-30 * torch.rand(9, generator=generator)).to(DEVICE)
    out = pyalign.kto_loss(leaf, ref, mask[0], torch.tensor(0.2, device=DEVICE), reduction="none")
    out.loss.backward(torch.linspace(-1, 1, 9, device=DEVICE))
    return [out.loss.detach(), out.rewards, leaf.grad]


def _linear_kto_case(backend, mask):
    """``mask``'s first row (its first 4 flags) as linear_kto_loss's desirable flags."""
    generator = torch.Generator(device=DEVICE).manual_seed(6)
    hidden = torch.randn(4, 5, 8, generator=generator).to(DEVICE).requires_grad_(True)
    weight = torch.randn(13, 8, generator=generator).to(DEVICE).requires_grad_(True)
    labels = torch.randint(0, 13, (4, 5), generator=generator).to(DEVICE)
    labels[:, 0] = IGNORE
    out = pyalign.linear_kto_loss(hidden, weight, labels, mask[0, :4],
                                  ref_logps=-10 * torch.rand(4, generator=generator).to(DEVICE),
                                  kl=torch.tensor(0.1, device=DEVICE), chunk_size=3,
                                  backend=backend)
    out.loss.backward()
    return [out.loss.detach(), hidden.grad, weight.grad]


MASKED_OPS = [
    ("kl_penalty", "kl", _kl_penalty_case),
    ("sequence_logprobs", None, _sequence_logprobs_case),
    ("token_preference_loss-sigmoid", "preference", _token_preference_case(["sigmoid"])),
    ("token_preference_loss-simpo-sft", "preference", _token_preference_case(["simpo", "sft"])),
    ("token_preference_loss-orpo", "preference", _token_preference_case(["orpo"])),
    ("policy_loss", "policy", _policy_loss_case),
    ("kto_loss", None, _kto_case),
    ("linear_kto_loss", "linear_logprobs", _linear_kto_case),
]


def masked_op_cases():
    cases = []
    for name, family, run in MASKED_OPS:
        for backend in backends_for(family) if family else ["auto"]:
            cases.append(pytest.param(run, backend, id=f"{name}-{backend}"))
    return cases


@pytest.mark.parametrize("run,backend", masked_op_cases())
def test_a_mask_of_any_dtype_holding_0_and_1_is_the_bool_mask(run, backend):
    mask = random_mask((4, 9))
    mask[0, :4] = torch.tensor([True, False, True, True])  # KTO's flags: both kinds
    expected = run(backend, mask)
    for dtype in MASK_DTYPES:
        got = run(backend, mask.to(dtype))
        for value, exp in zip(got, expected, strict=True):  # bitwise (NaN: a metric not asked for)
            torch.testing.assert_close(value, exp, rtol=0, atol=0, equal_nan=True, msg=str(dtype))


def test_a_float_mask_under_torch_compile():
    """The check on the mask's values is an op of its own: a compiled graph keeps it (fullgraph)
    and refuses a bad value when it runs."""
    logprobs, ref = -torch.rand(3, 5), -torch.rand(3, 5)
    mask = random_mask((3, 5))

    def objective(m):
        return pyalign.kl_penalty(logprobs, ref, estimator="k3", mask=m).sum()

    torch._dynamo.reset()
    try:
        compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(mask.float()), objective(mask))
        half = mask.float()
        half[2, 3] = 0.5
        with pytest.raises(ValueError, match=r"mask must be bool or hold only 0 and 1, got 0.5 "
                                             r"at position \(2, 3\)"):
            compiled(half)
    finally:
        torch._dynamo.reset()
