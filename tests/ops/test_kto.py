"""pyalign.kto_loss and linear_kto_loss (every unpaired loss of the registry: kto,
apo_zero_unpaired) against the float64 oracle of tests/support.py, forward and gradients; KTO's
reference point (detached, clamped at 0, the mean of the KL estimates, gathered over 2 gloo
ranks with uneven batches); the fused head path against the naive logits path on every
linear_logprobs backend, its peak memory and torch.compile; TRL 1.16 KTOTrainer's own loss code
run on the same tensors; bad input."""
import ast
import importlib.metadata
import importlib.util
import math
import os
import subprocess
import sys
import types
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import pyalign
from pyalign import losses
from pyalign.ops.kto import kto_reference_point
from support import (
    IGNORE,
    ON_CPU,
    UNPAIRED_LOSS_FORMULAS,
    backends_for,
    grads64,
    kl_reference64,
    linear_logits64,
    peak_allocated_bytes,
    sequence_logprobs64,
    token_logprobs64,
    unpaired64,
)

LINEAR_BACKENDS = backends_for("linear_logprobs")
HERE = Path(__file__).resolve().parent


def test_the_oracle_covers_exactly_the_unpaired_losses():
    assert losses.UNPAIRED_NAMES == ("kto", "apo_zero_unpaired")
    assert set(UNPAIRED_LOSS_FORMULAS) == set(losses.UNPAIRED_NAMES)
    assert [losses.REGISTRY[name].uses_kl_reference for name in losses.UNPAIRED_NAMES] == [True, False]
    assert not set(losses.UNPAIRED_NAMES) & set(losses.PAIRWISE_NAMES)


def reference_point64(loss, kl):
    """The z0 a loss runs with: KTO's, or 0 for a loss without one."""
    if losses.REGISTRY[loss].uses_kl_reference:
        return kl_reference64(kl)
    return torch.zeros((), dtype=torch.float64)


def unpaired_case(batch, desirable="mixed", kl_size=7, kl_mean=0.8, dtype=torch.float32):
    """Sequence log-probs of realistic size, log-ratios of a few nats, KL estimates [kl_size]
    around ``kl_mean`` (negative: clamped)."""
    ref = -20 - 60 * torch.rand(batch)
    policy = ref + 3 * torch.randn(batch)
    if desirable == "mixed":
        flags = torch.rand(batch) < 0.5
        flags[0] = True
        if batch > 1:
            flags[-1] = False
    else:
        flags = torch.full((batch,), desirable == "all")
    kl = kl_mean + 0.5 * torch.randn(kl_size)
    return policy.to(dtype), ref.to(dtype), flags, kl.to(dtype)


CASES = [(1, "mixed"), (1, "none"), (9, "mixed"), (8, "all"), (8, "none"), (37, "mixed")]


@pytest.mark.parametrize("loss", losses.UNPAIRED_NAMES)
@pytest.mark.parametrize("batch,desirable", CASES, ids=[f"B{b}-{d}" for b, d in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.7, 0.4)], ids=str)
def test_kto_loss_matches_float64(loss, batch, desirable, dtype, weights):
    policy, ref, flags, kl = unpaired_case(batch, desirable, dtype=dtype)
    beta = 0.3
    assert kl_reference64(kl) > 0.1  # the reference point matters in this case
    z0 = reference_point64(loss, kl)
    upstream = torch.randn(batch)
    leaves = [policy.clone().requires_grad_(True), ref.clone().requires_grad_(True)]
    out = pyalign.kto_loss(*leaves, flags, kl, loss=loss, beta=beta, desirable_weight=weights[0],
                           undesirable_weight=weights[1], reduction="none")
    out.loss.backward(upstream)
    expected, exp_grads = grads64(lambda p, r: unpaired64(p, r, flags, z0, loss, beta, *weights),
                                  [policy, ref], upstream)
    assert out.loss.dtype == torch.float32 and out.loss.shape == (batch,)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    grad_tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    for leaf, exp_grad in zip(leaves, exp_grads, strict=True):
        assert leaf.grad.dtype == dtype
        torch.testing.assert_close(leaf.grad.double(), exp_grad, **grad_tol)
    mean = pyalign.kto_loss(policy, ref, flags, kl, loss=loss, beta=beta, desirable_weight=weights[0],
                            undesirable_weight=weights[1])
    torch.testing.assert_close(mean.loss.double(), expected.mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.kl.double(), z0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.rewards.double(), beta * (policy.double() - ref.double()),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logps.double(), policy.double())
    assert not (out.rewards.requires_grad or out.kl.requires_grad or out.logps.requires_grad)


def test_gradcheck_float64():
    policy, ref, flags, kl = unpaired_case(6, dtype=torch.float64)
    for loss in losses.UNPAIRED_NAMES:
        assert torch.autograd.gradcheck(
            lambda p, r, loss=loss: pyalign.kto_loss(p, r, flags, kl, loss=loss, beta=0.4,
                                                     desirable_weight=1.3, reduction="none").loss,
            [policy.clone().requires_grad_(True), ref.clone().requires_grad_(True)])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_the_empty_batch(reduction):
    policy, ref, flags, kl = unpaired_case(5)
    out = pyalign.kto_loss(policy, ref, flags, kl, beta=0.2, reduction=reduction)
    per_example = unpaired64(policy, ref, flags, kl_reference64(kl), "kto", 0.2)
    expected = {"mean": per_example.mean(), "sum": per_example.sum(), "none": per_example}[reduction]
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)
    empty = torch.empty(0, requires_grad=True)
    out = pyalign.kto_loss(empty, torch.empty(0), torch.empty(0, dtype=torch.bool), kl,
                           reduction=reduction)
    assert out.loss.numel() == 0 if reduction == "none" else out.loss == 0
    out.loss.sum().backward()
    assert empty.grad.shape == (0,)


# ------------------------------------------------------------------------ the reference point

def test_no_gradient_flows_into_kl():
    policy, ref, flags, kl = unpaired_case(6)
    kl_leaf = kl.clone().requires_grad_(True)
    out = pyalign.kto_loss(policy.requires_grad_(True), ref, flags, kl_leaf)
    assert not out.kl.requires_grad
    out.loss.backward()
    assert kl_leaf.grad is None
    assert policy.grad is not None and policy.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", losses.UNPAIRED_NAMES)
def test_a_negative_kl_mean_is_clamped_to_zero(loss):
    policy, ref, flags, kl = unpaired_case(7, kl_mean=-2.0)
    assert kl.mean() < 0
    out = pyalign.kto_loss(policy, ref, flags, kl, loss=loss, beta=0.5, reduction="none")
    assert out.kl == 0
    zero = torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(out.loss.double(), unpaired64(policy, ref, flags, zero, loss, 0.5),
                               rtol=1e-5, atol=1e-7)
    # unclamped, the kto loss would differ: the test sees the clamp
    unclamped = unpaired64(policy, ref, flags, kl.double().mean(), "kto", 0.5)
    assert loss != "kto" or not torch.allclose(out.loss.double(), unclamped, rtol=1e-3)


def test_the_reference_point_is_the_mean_of_the_estimates():
    """[M] estimates, M != B: their mean; a 0-d estimate: itself; none: 0; a NaN: NaN."""
    policy, ref, flags, kl = unpaired_case(4, kl_size=11)
    out = pyalign.kto_loss(policy, ref, flags, kl)
    torch.testing.assert_close(out.kl.double(), kl.double().mean(), rtol=1e-6, atol=1e-7)
    one = pyalign.kto_loss(policy, ref, flags, torch.tensor(0.37))
    torch.testing.assert_close(one.kl, torch.tensor(0.37))
    torch.testing.assert_close(one.loss.double(), unpaired64(
        policy, ref, flags, torch.tensor(0.37, dtype=torch.float64), "kto", 0.1).mean(), rtol=1e-5, atol=1e-7)
    assert pyalign.kto_loss(policy, ref, flags, torch.empty(0)).kl == 0
    assert kto_reference_point(torch.tensor([0.5, 1.5], dtype=torch.float64)).dtype == torch.float64
    nan_kl = kl.clone()
    nan_kl[3] = float("nan")
    assert torch.isnan(pyalign.kto_loss(policy, ref, flags, nan_kl).loss)


def test_apo_zero_unpaired_needs_no_kl():
    policy, ref, flags, kl = unpaired_case(6)
    without = pyalign.kto_loss(policy, ref, flags, loss="apo_zero_unpaired", beta=0.2)
    ignored = pyalign.kto_loss(policy, ref, flags, kl, loss="apo_zero_unpaired", beta=0.2)
    assert without.kl == 0 and ignored.kl == 0
    torch.testing.assert_close(without.loss, ignored.loss)
    zero = torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(without.loss.double(), unpaired64(
        policy, ref, flags, zero, "apo_zero_unpaired", 0.2).mean(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", losses.UNPAIRED_NAMES)
def test_large_scaled_log_ratios_stay_finite_and_exact(loss):
    """|beta * r| from 1e-3 to 1e4: each term is a sigmoid of +-beta*r, so a loss of 1e-13 (or
    0 in fp32) keeps its digits, and the gradients stay finite. The expected values are the
    exact 1 / (1 + exp(-u)) in float64 (1 - sigmoid(u) there loses them beyond |u| ~ 20)."""
    policy = torch.tensor([1e-3, 1.0, 20.0, 30.0, -20.0, -30.0, 1e4, -1e4, 1e4, -1e4], dtype=torch.float64)
    flags = torch.tensor([True, False] * 4 + [False, True])
    leaf = policy.float().requires_grad_(True)
    out = pyalign.kto_loss(leaf, torch.zeros(10), flags, torch.tensor(0.0), loss=loss, beta=1.0,
                           reduction="none")
    out.loss.sum().backward()
    # kto with z0 = 0 and apo_zero_unpaired: desirable sigmoid(-r), undesirable sigmoid(r) (kto's
    # 1 - sigmoid(z0 - r))
    u = torch.where(flags, -policy, policy)
    expected = 1 / (1 + torch.exp(-u))
    assert torch.isfinite(out.loss).all() and torch.isfinite(leaf.grad).all()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=0)


# ------------------------------------------------------------------- 2 ranks, uneven batches

def test_two_gloo_ranks_with_uneven_batches_gather_the_global_mean(tmp_path):
    """Rank 0 holds 3 examples and 5 KL estimates, rank 1 6 examples and 2 estimates (then 0):
    the reference point is the mean of all 7 (not the mean of the two ranks' means), and each
    rank's loss and gradient are the oracle's with that z0. kto_reference_point of one 0-d
    estimate per rank (a rank's mean, as TRL gathers it) gives the mean of the means."""
    with torch.device("cpu"):  # the ranks run on CPU (gloo), whatever the test device
        check_two_ranks(tmp_path)


def check_two_ranks(tmp_path):
    init_file = tmp_path / "rendezvous"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parents[1]), os.environ.get("PYTHONPATH")])))
    workers = [subprocess.Popen([sys.executable, str(HERE / "kto_dist_worker.py"), str(init_file), str(rank),
                                 str(tmp_path / f"rank{rank}.pt")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    for worker in workers:
        output, _ = worker.communicate(timeout=240)
        assert worker.returncode == 0, output[-4000:]
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    data = results[0]["data"]  # the same global data on both ranks (one seed)
    z0 = kl_reference64(data["kl"])
    mean_of_means = (data["kl"][:5].double().mean() + data["kl"][5:].double().mean()) / 2
    assert not math.isclose(float(z0), float(mean_of_means), rel_tol=1e-3)
    for rank, result in enumerate(results):
        rows = slice(*data["rows"][rank])
        torch.testing.assert_close(result["z0"].double(), z0, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(result["z0_group"].double(), z0, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(result["z0_one_rank_empty"].double(), kl_reference64(data["kl"][:5]),
                                   rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(result["z0_of_means"].double(), mean_of_means.clamp(min=0), rtol=1e-6,
                                   atol=1e-7)
        ref, desirable = data["ref"][rows], data["desirable"][rows]
        expected, (exp_grad,) = grads64(
            lambda p, ref=ref, desirable=desirable: unpaired64(p, ref, desirable, z0, "kto", 0.4).sum(),
            [data["policy"][rows]])
        torch.testing.assert_close(result["loss"].double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["grad"].double(), exp_grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ linear_kto_loss

def linear_kto_case(batch=5, tokens=6, kl_rows=4, kl_tokens=5, hidden_size=8, vocab=37):
    """Completions [B, T] and mismatched KL pairs [M, T'] with prompt and padding positions
    (ignore_index) and a fully ignored row each, a policy head with a bias, a reference head and
    reference hidden states."""
    def rows(count, length):
        hidden = torch.randn(count, length, hidden_size)
        labels = torch.randint(0, vocab, (count, length))
        labels[:, :2] = IGNORE
        labels[0, -1] = IGNORE
        labels[2] = IGNORE  # a row without a completion token: its sequence log-prob is 0
        return hidden, labels

    hidden, labels = rows(batch, tokens)
    kl_hidden, kl_labels = rows(kl_rows, kl_tokens)
    weight = torch.randn(vocab, hidden_size) / hidden_size ** 0.5
    bias = 0.5 * torch.randn(vocab)
    desirable = torch.tensor([True, False, True, False, False][:batch])
    return dict(hidden=hidden, labels=labels, kl_hidden=kl_hidden, kl_labels=kl_labels, weight=weight,
                bias=bias, desirable=desirable, ref_hidden=hidden + 0.3 * torch.randn(hidden.shape),
                ref_kl_hidden=kl_hidden + 0.3 * torch.randn(kl_hidden.shape),
                ref_weight=weight + 0.05 * torch.randn(weight.shape),
                ref_bias=bias + 0.1 * torch.randn(vocab))


def sequence64(hidden, weight, bias, labels, average):
    token_logps = token_logprobs64(linear_logits64(hidden, weight, bias), labels)
    return sequence_logprobs64(token_logps, labels != IGNORE, average)


REFERENCES = ["ref_logps", "ref_hidden"]
KL_INPUTS = ["kl", "kl_hidden+ref_kl_logps", "kl_hidden+ref_kl_hidden"]


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("loss", losses.UNPAIRED_NAMES)
@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("kl_input", KL_INPUTS)
@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
def test_linear_kto_loss_matches_float64(backend, loss, reference, kl_input, average):
    case = linear_kto_case()
    c = case
    with torch.no_grad():
        ref_logps64 = sequence64(c["ref_hidden"], c["ref_weight"], c["ref_bias"], c["labels"], average)
        ref_kl64 = sequence64(c["ref_kl_hidden"], c["ref_weight"], c["ref_bias"], c["kl_labels"], average)
        kl64 = sequence64(c["kl_hidden"], c["weight"], c["bias"], c["kl_labels"], average) - ref_kl64
    z0 = reference_point64(loss, kl64)
    kwargs = dict(ref_logps=ref_logps64.float()) if reference == "ref_logps" else dict(
        ref_hidden=c["ref_hidden"], ref_weight=c["ref_weight"], ref_bias=c["ref_bias"])
    if kl_input == "kl":
        kwargs["kl"] = kl64.float()
    else:
        kwargs.update(kl_hidden=c["kl_hidden"], kl_labels=c["kl_labels"])
        if kl_input.endswith("ref_kl_logps"):
            kwargs["ref_kl_logps"] = ref_kl64.float()
        else:
            kwargs.update(ref_kl_hidden=c["ref_kl_hidden"], ref_weight=c["ref_weight"],
                          ref_bias=c["ref_bias"])
    leaves = [c[name].clone().requires_grad_(True) for name in ("hidden", "weight", "bias")]
    out = pyalign.linear_kto_loss(leaves[0], leaves[1], c["labels"], c["desirable"], bias=leaves[2],
                                  loss=loss, beta=0.2, desirable_weight=1.3, undesirable_weight=0.8,
                                  average_log_prob=average, chunk_size=7, backend=backend, **kwargs)
    out.loss.backward()

    def loss_of(hidden, weight, bias):
        policy = sequence64(hidden, weight, bias, c["labels"], average)
        return unpaired64(policy, ref_logps64, c["desirable"], z0, loss, 0.2, 1.3, 0.8).mean()

    expected, exp_grads = grads64(loss_of, [c["hidden"], c["weight"], c["bias"]])
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kl.double(), z0, rtol=1e-5, atol=1e-6)
    for name, leaf, exp_grad in zip(("hidden", "weight", "bias"), leaves, exp_grads, strict=True):
        torch.testing.assert_close(leaf.grad.double(), exp_grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.all(leaves[0].grad[c["labels"] == IGNORE] == 0)
    policy64 = sequence64(c["hidden"], c["weight"], c["bias"], c["labels"], average)
    torch.testing.assert_close(out.logps.double(), policy64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rewards.double(), 0.2 * (policy64 - ref_logps64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("loss", losses.UNPAIRED_NAMES)
def test_linear_kto_loss_bf16_matches_float64(backend, loss):
    """bf16 hidden states and heads (policy, reference, KL pairs): fp32 accumulation, so the loss
    is the float64 value of the bf16 inputs to fp32 accuracy; the gradients come back in bf16."""
    c = {name: (tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor)
         for name, tensor in linear_kto_case().items()}
    leaves = [c[name].clone().requires_grad_(True) for name in ("hidden", "weight")]
    out = pyalign.linear_kto_loss(leaves[0], leaves[1], c["labels"], c["desirable"], kl_hidden=c["kl_hidden"],
                                  kl_labels=c["kl_labels"], ref_hidden=c["ref_hidden"],
                                  ref_kl_hidden=c["ref_kl_hidden"], ref_weight=c["ref_weight"], loss=loss,
                                  beta=0.2, chunk_size=7, backend=backend)
    out.loss.backward()
    with torch.no_grad():
        ref64 = sequence64(c["ref_hidden"], c["ref_weight"], None, c["labels"], False)
        kl64 = (sequence64(c["kl_hidden"], c["weight"], None, c["kl_labels"], False)
                - sequence64(c["ref_kl_hidden"], c["ref_weight"], None, c["kl_labels"], False))
    z0 = reference_point64(loss, kl64)
    expected, exp_grads = grads64(
        lambda h, w: unpaired64(sequence64(h, w, None, c["labels"], False), ref64, c["desirable"], z0,
                                loss, 0.2).mean(), [c["hidden"], c["weight"]])
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-4, atol=1e-5)
    for leaf, exp_grad in zip(leaves, exp_grads, strict=True):
        assert leaf.grad.dtype == torch.bfloat16
        torch.testing.assert_close(leaf.grad.double(), exp_grad, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_linear_kto_loss_equals_kto_loss_on_the_naive_logits_path(backend):
    """The same numbers as kto_loss on sequence log-probs from full fp32 logits (log_softmax),
    gradients wrt hidden, weight and bias included."""
    c = linear_kto_case(batch=4, tokens=5)
    leaves = [c[name].clone().requires_grad_(True) for name in ("hidden", "weight", "bias")]
    out = pyalign.linear_kto_loss(leaves[0], leaves[1], c["labels"], c["desirable"][:4], bias=leaves[2],
                                  kl_hidden=c["kl_hidden"], kl_labels=c["kl_labels"],
                                  ref_hidden=c["ref_hidden"], ref_kl_hidden=c["ref_kl_hidden"],
                                  ref_weight=c["ref_weight"], ref_bias=c["ref_bias"], beta=0.3,
                                  backend=backend)
    out.loss.backward()

    def naive_sequence(hidden, weight, bias, labels):
        logits = hidden @ weight.t() + bias
        token_logps = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return torch.where(labels != IGNORE, token_logps, 0.0).sum(-1)

    naive = [c[name].clone().requires_grad_(True) for name in ("hidden", "weight", "bias")]
    with torch.no_grad():
        kl = (naive_sequence(c["kl_hidden"], c["weight"], c["bias"], c["kl_labels"])
              - naive_sequence(c["ref_kl_hidden"], c["ref_weight"], c["ref_bias"], c["kl_labels"]))
        ref_logps = naive_sequence(c["ref_hidden"], c["ref_weight"], c["ref_bias"], c["labels"])
    expected = pyalign.kto_loss(naive_sequence(*naive, c["labels"]), ref_logps, c["desirable"][:4], kl,
                                beta=0.3)
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kl, expected.kl, rtol=1e-5, atol=1e-6)
    for leaf, naive_leaf in zip(leaves, naive, strict=True):
        torch.testing.assert_close(leaf.grad, naive_leaf.grad, rtol=1e-4, atol=1e-6)


def test_the_kl_pairs_give_no_gradient():
    """The KL pairs are scored by the policy's own head, without gradient: the weight gradient is
    the oracle's with z0 a constant, and measurably not the one with z0 differentiated."""
    c = linear_kto_case()
    with torch.no_grad():  # log-ratios of about a nat: the sigmoids are not saturated
        ref_logps = (sequence64(c["hidden"], c["weight"], None, c["labels"], False) + torch.randn(5)).float()
        ref_kl_logps = (sequence64(c["kl_hidden"], c["weight"], None, c["kl_labels"], False) - 1.0).float()
    weight = c["weight"].clone().requires_grad_(True)
    kl_hidden = c["kl_hidden"].clone().requires_grad_(True)
    out = pyalign.linear_kto_loss(c["hidden"], weight, c["labels"], c["desirable"], kl_hidden=kl_hidden,
                                  kl_labels=c["kl_labels"], ref_logps=ref_logps, ref_kl_logps=ref_kl_logps,
                                  beta=0.5)
    out.loss.backward()
    assert kl_hidden.grad is None and out.kl > 0.5

    def loss_of(weight, detach):
        kl = sequence64(c["kl_hidden"], weight, None, c["kl_labels"], False) - ref_kl_logps.double()
        z0 = kl.mean().clamp(min=0)
        policy = sequence64(c["hidden"], weight, None, c["labels"], False)
        return unpaired64(policy, ref_logps, c["desirable"], z0.detach() if detach else z0, "kto", 0.5).mean()

    _, (detached,) = grads64(lambda w: loss_of(w, True), [c["weight"]])
    _, (through_z0,) = grads64(lambda w: loss_of(w, False), [c["weight"]])
    torch.testing.assert_close(weight.grad.double(), detached, rtol=1e-4, atol=1e-6)
    assert (through_z0 - detached).abs().max() > 0.1 * detached.abs().max()


def test_linear_kto_loss_never_holds_the_full_logits():
    """1024 completion + 1024 KL tokens, V = 16000: naive logits of the completions alone are 65 MB;
    the chunked path (128 tokens a chunk: 8 MB) stays under a few chunks. Not triton in the CPU
    interpreter (minutes at this size)."""
    rows, tokens, vocab, hidden_size, chunk_size = 8, 128, 16000, 16, 128
    hidden = torch.randn(rows, tokens, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / 4).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows, tokens))
    kl_hidden = torch.randn(rows, tokens, hidden_size)
    desirable = torch.arange(rows) % 2 == 0
    ref_logps = torch.full((rows,), -1000.0)

    def naive():
        logps = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, labels[..., None])[..., 0].sum(-1)
        pyalign.kto_loss(logps, ref_logps, desirable, torch.tensor(0.1)).loss.backward()

    full_logits_bytes = rows * tokens * vocab * 4
    chunk_bytes = chunk_size * vocab * 4
    assert peak_allocated_bytes(naive) >= full_logits_bytes, "the measurement does not see the logits"
    for backend in LINEAR_BACKENDS:
        if backend == "triton" and ON_CPU:
            continue

        def fused(backend=backend):
            pyalign.linear_kto_loss(hidden, weight, labels, desirable, kl_hidden=kl_hidden, kl_labels=labels,
                                    ref_logps=ref_logps, ref_kl_logps=ref_logps, chunk_size=chunk_size,
                                    backend=backend).loss.backward()

        hidden.grad = weight.grad = None
        peak = peak_allocated_bytes(fused)
        assert peak < 8 * chunk_bytes, (
            f"{backend}: peak {peak / 1e6:.0f} MB, a chunk of logits {chunk_bytes / 1e6:.0f} MB")


# ------------------------------------------------------------------------- TRL 1.16 parity

def trl_kto_methods():
    """KTOTrainer._compute_loss and _compute_kl_logps of the installed TRL, compiled from its own
    source file (a KTOTrainer needs a model, a dataset and an accelerator; these two methods use
    only torch, so they run on a stand-in ``self``). The names they reference
    outside the precomputed-reference path (peft adapters, gradient checkpointing) raise."""
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed: the TRL 1.16 parity tests need it (the [test] extra installs it)")
    assert importlib.metadata.version("trl") == "1.16.0", "the parity numbers are TRL 1.16's"
    path = Path(spec.submodule_search_locations[0]) / "trainer" / "kto_trainer.py"
    tree = ast.parse(path.read_text())
    trainer = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "KTOTrainer")
    wanted = ("_compute_loss", "_compute_kl_logps")
    methods = [node for node in trainer.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    assert sorted(node.name for node in methods) == sorted(wanted)

    def unavailable(*args, **kwargs):
        raise AssertionError("outside the precomputed-reference path")

    namespace = {"torch": torch, "F": torch.nn.functional, "warnings": warnings,
                 "is_peft_model": lambda model: False, "use_adapter": unavailable,
                 "disable_gradient_checkpointing": unavailable}
    exec(compile(ast.Module(body=methods, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["_compute_loss"], namespace["_compute_kl_logps"]


class TableModel:
    """A stand-in causal LM: per-token log-probs [B, L-1] read from a table by the row id in
    input_ids[:, 0], 0 where the label is -100 (as TRL's fused lm head returns them)."""

    def __init__(self, table):
        self.table = table

    def __call__(self, input_ids, labels, **kwargs):
        log_probs = torch.where(labels[:, 1:] == -100, 0.0, self.table[input_ids[:, 0]])
        zeros = torch.zeros_like(log_probs.detach())
        return types.SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)


def trl_batch(batch, length, desirable, generator):
    """A collated KTO batch: completions with prompts and padding and mismatched KL completions,
    rows identified by input_ids[:, 0] (the reference log-probs come from the test)."""
    def sequences(first_id):
        ids = torch.randint(10, 100, (batch, length), generator=generator)
        ids[:, 0] = torch.arange(batch) + first_id
        mask = torch.zeros(batch, length, dtype=torch.long)
        for row in range(batch):
            start, end = 2 + row % 3, length - row % 2
            mask[row, start:end] = 1
        return ids, mask

    input_ids, completion_mask = sequences(0)
    kl_ids, kl_mask = sequences(batch)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "completion_mask": completion_mask, "KL_input_ids": kl_ids,
            "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": kl_mask,
            "label": desirable}


TRL_CASES = [("kto", 0.1, (1.0, 1.0), "mixed", 0.0), ("kto", 2.0, (1.5, 0.7), "mixed", 0.0),
             ("kto", 0.5, (1.0, 1.33), "mixed", -3.0), ("kto", 0.5, (1.0, 1.0), "all", 0.0),
             ("apo_zero_unpaired", 0.1, (1.0, 1.0), "mixed", 0.0),
             ("apo_zero_unpaired", 1.0, (0.8, 1.2), "none", 0.0)]


@pytest.mark.parametrize("loss,beta,weights,kind,kl_shift", TRL_CASES,
                         ids=[f"{c[0]}-beta{c[1]}-{c[2]}-{c[3]}-kl{c[4]}" for c in TRL_CASES])
def test_trl_kto_trainer_loss_on_the_same_tensors(loss, beta, weights, kind, kl_shift):
    """TRL 1.16's own KTOTrainer._compute_loss (precomputed reference, one process: its gather is
    the identity) against kto_loss on the same per-token log-probs: the loss, its gradient wrt
    the log-probs, and the logged kl, rewards/chosen|rejected and logps/chosen|rejected."""
    with torch.device("cpu"):  # TRL's code on CPU tensors, whatever the test device
        check_against_trl(loss, beta, weights, kind, kl_shift)


def check_against_trl(loss, beta, weights, kind, kl_shift):
    compute_loss, compute_kl_logps = trl_kto_methods()
    batch, length = 7, 9
    generator = torch.Generator().manual_seed(5)
    desirable = {"mixed": torch.tensor([True, False, True, True, False, False, True]),
                 "all": torch.ones(batch, dtype=torch.bool),
                 "none": torch.zeros(batch, dtype=torch.bool)}[kind]
    inputs = trl_batch(batch, length, desirable, generator)
    table = -0.5 - 3 * torch.rand(2 * batch, length - 1, generator=generator)
    mask, kl_mask = inputs["completion_mask"][:, 1:] == 1, inputs["KL_completion_mask"][:, 1:] == 1
    # log-ratios of a few nats; KL estimates around 1 (or, shifted, a negative mean: clamped)
    inputs["ref_logps"] = (table[:batch] * mask).sum(-1) + 2 * torch.randn(batch, generator=generator)
    inputs["ref_KL_logps"] = ((table[batch:] * kl_mask).sum(-1) - 0.5 - torch.rand(batch, generator=generator)
                              - kl_shift)
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        precompute_ref_logps=True, calculate_KL=loss == "kto", loss_type=loss, beta=beta,
        desirable_weight=weights[0], undesirable_weight=weights[1], aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)}, _tp_size=1, _total_train_tokens=0)
    trainer._compute_kl_logps = types.MethodType(compute_kl_logps, trainer)
    trl_table = table.clone().requires_grad_(True)
    trl_loss = types.MethodType(compute_loss, trainer)(TableModel(trl_table), inputs, return_outputs=False)
    trl_loss.backward()
    metrics = trainer._metrics["train"]

    ours_table = table.clone().requires_grad_(True)
    policy = pyalign.sequence_logprobs(ours_table[:batch], mask)
    with torch.no_grad():
        kl = pyalign.sequence_logprobs(ours_table[batch:], kl_mask) - inputs["ref_KL_logps"]
    out = pyalign.kto_loss(policy, inputs["ref_logps"], desirable, kl if loss == "kto" else None,
                           loss=loss, beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
    out.loss.backward()
    torch.testing.assert_close(out.loss, trl_loss.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_table.grad, trl_table.grad, rtol=1e-5, atol=1e-8)
    assert trl_table.grad[:batch].abs().sum() > 0 and torch.all(trl_table.grad[batch:] == 0)
    assert metrics["kl"] == [pytest.approx(float(out.kl), rel=1e-6, abs=1e-7)]
    assert (float(out.kl) == 0) == (loss != "kto" or kl_shift < 0)
    for flag, suffix in ((True, "chosen"), (False, "rejected")):
        rows = desirable == flag
        if rows.any():
            assert metrics[f"rewards/{suffix}"] == [pytest.approx(float(out.rewards[rows].mean()), rel=1e-6)]
            assert metrics[f"logps/{suffix}"] == [pytest.approx(float(out.logps[rows].mean()), rel=1e-6)]
        else:
            assert f"rewards/{suffix}" not in metrics


def test_fullgraph_compile_matches_eager():
    """torch.compile(fullgraph=True) traces kto_loss and linear_kto_loss whole (the reference point
    is a tensor select, the head goes through the custom ops); same loss and gradients."""
    c = linear_kto_case(batch=4)
    kwargs = dict(kl_hidden=c["kl_hidden"], kl_labels=c["kl_labels"], ref_hidden=c["ref_hidden"],
                  ref_kl_hidden=c["ref_kl_hidden"], ref_weight=c["ref_weight"], beta=0.3, backend="eager")

    def objective(hidden, weight):
        return pyalign.linear_kto_loss(hidden, weight, c["labels"], c["desirable"][:4], **kwargs).loss

    results = []
    for function in (objective, torch.compile(objective, fullgraph=True, backend="aot_eager")):
        leaves = [c["hidden"].clone().requires_grad_(True), c["weight"].clone().requires_grad_(True)]
        value = function(*leaves)
        value.backward()
        results.append([value.detach(), *(leaf.grad for leaf in leaves)])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ bad input

def _kto(**overrides):
    args = dict(policy_logps=torch.randn(4), ref_logps=torch.randn(4),
                desirable=torch.tensor([True, False, True, False]), kl=torch.rand(3))
    args.update(overrides)
    return pyalign.kto_loss(args.pop("policy_logps"), args.pop("ref_logps"), args.pop("desirable"),
                            args.pop("kl"), **args)


def _linear(**overrides):
    c = linear_kto_case(batch=4)
    args = dict(hidden=c["hidden"], weight=c["weight"], labels=c["labels"], desirable=c["desirable"][:4],
                ref_logps=torch.randn(4), kl=torch.rand(3))
    args.update(overrides)
    args = {key: value for key, value in args.items() if value is not None}
    return pyalign.linear_kto_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"),
                                   args.pop("desirable"), **args)


_C = linear_kto_case(batch=4)

BAD_INPUT = [
    ("unknown loss", lambda: _kto(loss="kto_pair"), ValueError, "loss must be one of"),
    ("a pairwise name", lambda: _kto(loss="sigmoid"), ValueError, "pairwise loss"),
    ("loss not a str", lambda: _kto(loss=["kto"]), TypeError, "loss must be a str"),
    ("kto without kl", lambda: _kto(kl=None), ValueError, "needs kl"),
    ("kl 2-D", lambda: _kto(kl=torch.rand(2, 2)), ValueError, "kl must be per-example"),
    ("kl integer", lambda: _kto(kl=torch.tensor([1, 2])), TypeError, "kl must be a floating"),
    ("kl a list, unused by apo", lambda: _kto(kl=[0.1], loss="apo_zero_unpaired"), TypeError,
     "kl must be a torch.Tensor"),
    ("desirable of 0.5", lambda: _kto(desirable=torch.tensor([1.0, 0.5, 1.0, 0.0])), ValueError,
     r"desirable must be bool or hold only 0 and 1, got 0.5 at position \(1,\)"),
    ("desirable of 2", lambda: _kto(desirable=torch.tensor([1, 0, 2, 0])), ValueError,
     r"desirable must be bool or hold only 0 and 1, got 2 at position \(2,\)"),
    ("list desirable", lambda: _kto(desirable=[True, False, True, False]), TypeError,
     "desirable must be a torch.Tensor"),
    ("short desirable", lambda: _kto(desirable=torch.tensor([True, False])), ValueError,
     "desirable has shape"),
    ("2-D policy", lambda: _kto(policy_logps=torch.randn(4, 1)), ValueError, "policy_logps must be 1-D"),
    ("ref shape", lambda: _kto(ref_logps=torch.randn(5)), ValueError, "ref_logps has shape"),
    ("beta 0", lambda: _kto(beta=0.0), ValueError, "beta must be"),
    ("negative weight", lambda: _kto(undesirable_weight=-0.5), ValueError, "undesirable_weight must be"),
    ("bad reduction", lambda: _kto(reduction="avg"), ValueError, "reduction must be one of"),
    ("group without dist", lambda: _kto(process_group=object()), ValueError, "not initialised"),
    ("linear: ref_hidden without ref_weight", lambda: _linear(ref_logps=None, ref_hidden=_C["ref_hidden"]),
     ValueError, "ref_hidden given without ref_weight"),
    ("linear: ref_kl_hidden without ref_weight",
     lambda: _linear(kl=None, kl_hidden=_C["kl_hidden"], kl_labels=_C["kl_labels"],
                     ref_kl_hidden=_C["ref_kl_hidden"]), ValueError,
     "ref_kl_hidden given without ref_weight"),
    ("linear: ref_weight without a reference hidden state", lambda: _linear(ref_weight=_C["weight"]),
     ValueError, "without ref_hidden"),
    ("linear: both ref_logps and ref_hidden", lambda: _linear(ref_hidden=_C["ref_hidden"]), ValueError,
     "exactly one of ref_logps"),
    ("linear: ref_weight of another shape",
     lambda: _linear(ref_logps=None, ref_hidden=_C["ref_hidden"], ref_weight=_C["weight"][:5]), ValueError,
     "ref_weight must be"),
    ("linear: kto without KL inputs", lambda: _linear(kl=None), ValueError, "needs KL estimates"),
    ("linear: kl and kl_hidden", lambda: _linear(kl_hidden=_C["kl_hidden"], kl_labels=_C["kl_labels"]),
     ValueError, "either kl"),
    ("linear: kl_hidden without kl_labels", lambda: _linear(kl=None, kl_hidden=_C["kl_hidden"]), ValueError,
     "needs KL estimates"),
    ("linear: kl_labels of another shape",
     lambda: _linear(kl=None, kl_hidden=_C["kl_hidden"], kl_labels=_C["labels"], ref_kl_logps=torch.randn(4)),
     ValueError, "kl_labels has shape"),
    ("linear: no reference for the KL pairs",
     lambda: _linear(kl=None, kl_hidden=_C["kl_hidden"], kl_labels=_C["kl_labels"]), ValueError,
     "exactly one of ref_kl_logps"),
    ("linear: ref_kl_logps of another length",
     lambda: _linear(kl=None, kl_hidden=_C["kl_hidden"], kl_labels=_C["kl_labels"],
                     ref_kl_logps=torch.randn(3)),
     ValueError, "ref_kl_logps has shape"),
    ("linear: hidden 2-D", lambda: _linear(hidden=_C["hidden"][0], labels=_C["labels"][0]), ValueError,
     "hidden must be"),
    ("linear: desirable of NaN", lambda: _linear(desirable=torch.tensor([1.0, 0.0, float("nan"), 1.0])),
     ValueError, r"desirable must be bool or hold only 0 and 1, got nan at position \(2,\)"),
    ("linear: unknown loss", lambda: _linear(loss="bco"), ValueError, "loss must be one of"),
    ("linear: float labels", lambda: _linear(labels=_C["labels"].float()), TypeError,
     "labels must be an integer"),
]


@pytest.mark.parametrize("call,error,message", [case[1:] for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
