"""Bad input gets a clear Python error before any kernel runs (matched on the message), on every
backend of the test device (support.backends_for); NaN and inf in the data are not errors: they
propagate and nothing crashes."""
import pytest
import torch

import pyalign
from support import backends_for

LOGPROB_BACKENDS = backends_for("logprobs")
LINEAR_BACKENDS = backends_for("linear_logprobs")
KL_BACKENDS = backends_for("kl")
PREFERENCE_BACKENDS = backends_for("preference")


def pairs(batch=4):
    return [torch.randn(batch) - 30 for _ in range(4)]


# ----------------------------------------------------------------------------- token_logprobs

@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
@pytest.mark.parametrize("bad_label,message", [
    (50, r"1 label\(s\) outside \[0, 50\) that are not ignore_index=-100; first is 50"),
    (-1, r"outside \[0, 50\) .* first is -1"),
    (10 ** 12, "first is 1000000000000"),
])
def test_label_out_of_range(backend, bad_label, message):
    logits = torch.randn(2, 3, 50)
    labels = torch.randint(0, 50, (2, 3))
    labels[1, 2] = bad_label
    with pytest.raises(ValueError, match=message):
        pyalign.token_logprobs(logits, labels, backend=backend)


@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
def test_ignore_index_is_the_only_exception(backend):
    logits = torch.randn(3, 10)
    pyalign.token_logprobs(logits, torch.tensor([-7, 0, 9]), ignore_index=-7, backend=backend)
    with pytest.raises(ValueError, match="first is -100 at flat position 1"):
        pyalign.token_logprobs(logits, torch.tensor([-7, -100, 9]), ignore_index=-7,
                               backend=backend)


@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
def test_token_logprobs_bad_arguments(backend):
    logits = torch.randn(4, 10)
    labels = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"labels has shape \(3,\), expected \(4,\)"):
        pyalign.token_logprobs(logits, labels[:3], backend=backend)
    with pytest.raises(ValueError, match=r"labels has shape \(4, 1\), expected \(4,\)"):
        pyalign.token_logprobs(logits, labels[:, None], backend=backend)
    with pytest.raises(ValueError, match="all tensors must be on one device.*labels on meta"):
        pyalign.token_logprobs(logits, labels.to("meta"), backend=backend)
    with pytest.raises(TypeError, match="logits must be a floating tensor .* got torch.int64"):
        pyalign.token_logprobs(labels[:, None].expand(4, 10).contiguous(), labels, backend=backend)
    with pytest.raises(TypeError, match="labels must be an integer tensor .* got torch.float32"):
        pyalign.token_logprobs(logits, labels.float(), backend=backend)
    with pytest.raises(TypeError, match="labels must be an integer tensor .* got torch.bool"):
        pyalign.token_logprobs(logits, labels > 3, backend=backend)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor, got list"):
        pyalign.token_logprobs([[0.0, 1.0]], labels, backend=backend)
    with pytest.raises(ValueError, match="non-empty last .* dimension"):
        pyalign.token_logprobs(torch.randn(4, 0), labels, backend=backend)
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            pyalign.token_logprobs(logits, labels, temperature=temperature, backend=backend)


# ---------------------------------------------------------------------- linear_token_logprobs

@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_linear_bad_arguments(backend):
    hidden, weight = torch.randn(5, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (5,))
    call = pyalign.linear_token_logprobs
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H = .* 8, got \(30, 7\)"):
        call(hidden, weight[:, :7], labels, backend=backend)
    with pytest.raises(TypeError, match="hidden and weight must share a dtype"):
        call(hidden, weight.bfloat16(), labels, backend=backend)
    with pytest.raises(ValueError, match=r"bias has shape \(29,\), expected \(30,\)"):
        call(hidden, weight, labels, bias=torch.randn(29), backend=backend)
    with pytest.raises(TypeError, match="bias must have hidden's dtype"):
        call(hidden, weight, labels, bias=torch.randn(30, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match=r"labels has shape \(4,\), expected \(5,\)"):
        call(hidden, weight, labels[:4], backend=backend)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        call(hidden, weight, labels, chunk_size=0, backend=backend)
    with pytest.raises(ValueError, match="one device.*weight on meta"):
        call(hidden, weight.to("meta"), labels, backend=backend)
    with pytest.raises(TypeError, match="hidden must be a floating tensor"):
        call(hidden.long(), weight, labels, backend=backend)
    with pytest.raises(ValueError, match="empty vocabulary"):
        call(hidden, weight[:0], labels, backend=backend)
    bad_labels = labels.clone()
    bad_labels[3] = 30
    with pytest.raises(ValueError, match=r"outside \[0, 30\)"):
        call(hidden, weight, bad_labels, backend=backend)


# ------------------------------------------------------------------------------------- kl

@pytest.mark.parametrize("backend", KL_BACKENDS)
def test_kl_bad_arguments(backend):
    logprobs, ref = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError,
                       match=r"estimator must be one of \('k1', 'k2', 'k3'\), got 'k4'"):
        pyalign.kl_penalty(logprobs, ref, estimator="k4", backend=backend)
    with pytest.raises(ValueError, match=r"ref_logprobs has shape \(3, 3\), expected \(3, 4\)"):
        pyalign.kl_penalty(logprobs, ref[:, :3], backend=backend)
    with pytest.raises(ValueError, match=r"mask has shape \(3,\), expected \(3, 4\)"):
        pyalign.kl_penalty(logprobs, ref, mask=torch.ones(3, dtype=torch.bool), backend=backend)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        pyalign.kl_penalty(logprobs, ref, mask=[[True] * 4] * 3, backend=backend)
    with pytest.raises(ValueError, match="one device"):
        pyalign.kl_penalty(logprobs, ref.to("meta"), backend=backend)
    with pytest.raises(TypeError, match="logprobs must be a floating tensor"):
        pyalign.kl_penalty(logprobs.long(), ref, backend=backend)


# ----------------------------------------------------------------------------- preference

@pytest.mark.parametrize("backend", PREFERENCE_BACKENDS)
def test_preference_bad_arguments(backend):
    inputs = pairs()
    with pytest.raises(ValueError, match="unknown preference loss 'dpo'; expected one of"):
        pyalign.preference_loss(*inputs, loss="dpo", backend=backend)
    for beta in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            pyalign.preference_loss(*inputs, beta=beta, backend=backend)
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
            pyalign.preference_loss(*inputs, label_smoothing=eps, backend=backend)
    with pytest.raises(ValueError, match="reduction must be one of"):
        pyalign.preference_loss(*inputs, reduction="avg", backend=backend)
    with pytest.raises(ValueError, match=r"ref_rejected has shape \(3,\), expected \(4,\)"):
        pyalign.preference_loss(*inputs[:3], inputs[3][:3], backend=backend)
    with pytest.raises(ValueError, match="policy_chosen must be 1-D"):
        pyalign.preference_loss(*(t[:, None] for t in inputs), backend=backend)
    with pytest.raises(ValueError, match="one device"):
        pyalign.preference_loss(*inputs[:3], inputs[3].to("meta"), backend=backend)
    with pytest.raises(TypeError, match="ref_chosen must be a floating tensor"):
        pyalign.preference_loss(inputs[0], inputs[1], inputs[2].long(), inputs[3], backend=backend)


def test_kto_bad_arguments():
    policy, ref = torch.randn(4), torch.randn(4)
    desirable = torch.tensor([True, False, True, False])
    with pytest.raises(ValueError, match="beta must be"):
        pyalign.kto_loss(policy, ref, desirable, torch.tensor(0.1), beta=0)
    with pytest.raises(ValueError, match="desirable_weight must be >= 0"):
        pyalign.kto_loss(policy, ref, desirable, torch.tensor(0.1), desirable_weight=-1)
    with pytest.raises(TypeError, match="desirable must be a bool tensor"):
        pyalign.kto_loss(policy, ref, [True] * 4, torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"desirable has shape \(3,\)"):
        pyalign.kto_loss(policy, ref, desirable[:3], torch.tensor(0.1))


def test_linear_preference_bad_arguments():
    hidden, weight = torch.randn(4, 5, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (4, 5))
    with pytest.raises(ValueError, match=r"hidden must be \[2B, T, H\]"):
        pyalign.linear_preference_loss(hidden[:3], weight, labels[:3], ref_logps=torch.randn(3))
    with pytest.raises(ValueError, match="give exactly one of ref_logps"):
        pyalign.linear_preference_loss(hidden, weight, labels)
    with pytest.raises(ValueError, match="give exactly one of ref_logps"):
        pyalign.linear_preference_loss(hidden, weight, labels, ref_logps=torch.randn(4),
                                       ref_hidden=hidden)
    with pytest.raises(ValueError, match=r"ref_logps has shape \(3,\), expected \(4,\)"):
        pyalign.linear_preference_loss(hidden, weight, labels, ref_logps=torch.randn(3))
    with pytest.raises(ValueError, match="unknown preference loss"):
        pyalign.linear_preference_loss(hidden, weight, labels, ref_logps=torch.randn(4), loss="x")


def test_bad_backend_names(monkeypatch):
    logits, labels = torch.randn(2, 5), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="backend must be one of"):
        pyalign.token_logprobs(logits, labels, backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        pyalign.kl_penalty(logits, logits, backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        pyalign.preference_loss(*pairs(), backend="gpu")
    monkeypatch.setenv("PYALIGN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PYALIGN_BACKEND must be one of .*'bogus'"):
        pyalign.token_logprobs(logits, labels)
    with pytest.raises(ValueError, match="PYALIGN_BACKEND must be one of .*'bogus'"):
        pyalign.linear_token_logprobs(torch.randn(2, 3), torch.randn(5, 3), labels)


# --------------------------------------------------------------------- NaN and inf propagate

@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_logprobs_bad_data_propagates(backend, value):
    logits = torch.randn(3, 12, requires_grad=True)
    with torch.no_grad():
        logits[1, 4] = value
    labels = torch.tensor([2, 7, 11])
    logprobs, entropy = pyalign.token_logprobs(logits, labels, entropy=True, backend=backend)
    # NaN stays NaN; a +inf logit elsewhere in the row makes the label's log-prob -inf (the limit)
    # or NaN: either way not a finite number
    assert torch.isnan(logprobs[1]) if value != value else not torch.isfinite(logprobs[1])
    assert torch.isfinite(logprobs[[0, 2]]).all() and torch.isfinite(entropy[[0, 2]]).all()
    (logprobs.sum() + entropy.sum()).backward()
    assert torch.isfinite(logits.grad[[0, 2]]).all()


@pytest.mark.parametrize("backend", LOGPROB_BACKENDS)
def test_all_minus_inf_row_propagates(backend):
    """A row with every logit -inf has no distribution: NaN (or -inf) there, nothing else hurt."""
    logits = torch.randn(3, 12)
    logits[0] = float("-inf")
    logprobs = pyalign.token_logprobs(logits, torch.tensor([2, 7, 11]), backend=backend)
    assert not torch.isfinite(logprobs[0])
    assert torch.isfinite(logprobs[1:]).all()


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_linear_bad_data_propagates(backend):
    hidden = torch.randn(4, 6)
    hidden[2, 3] = float("nan")
    weight = torch.randn(20, 6)
    logprobs = pyalign.linear_token_logprobs(hidden, weight, torch.tensor([0, 5, 9, 19]),
                                             backend=backend)
    assert torch.isnan(logprobs[2]) and torch.isfinite(logprobs[[0, 1, 3]]).all()


@pytest.mark.parametrize("backend", PREFERENCE_BACKENDS)
def test_preference_bad_data_propagates(backend):
    inputs = pairs()
    inputs[1][0] = float("inf")
    out = pyalign.preference_loss(*inputs, loss="ipo", reduction="none", backend=backend)
    assert not torch.isfinite(out.loss[0]) and torch.isfinite(out.loss[1:]).all()
    inputs[1][0] = float("nan")
    assert torch.isnan(pyalign.preference_loss(*inputs, backend=backend).loss)
