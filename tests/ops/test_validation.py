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
    with pytest.raises(TypeError, match="bias must have weight's dtype"):
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
    with pytest.raises(TypeError, match="desirable must be a torch.Tensor"):
        pyalign.kto_loss(policy, ref, [True] * 4, torch.tensor(0.1))
    with pytest.raises(ValueError, match=r"desirable has shape \(3,\)"):
        pyalign.kto_loss(policy, ref, desirable[:3], torch.tensor(0.1))


def test_linear_preference_bad_arguments():
    hidden, weight = torch.randn(4, 5, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (4, 5))
    with pytest.raises(ValueError, match=r"hidden must be \[2B, T, H\]"):
        pyalign.linear_preference_loss(hidden[:3], weight, labels[:3], ref_logps=torch.randn(3))
    with pytest.raises(ValueError, match="needs the reference log-probs: give ref_logps"):
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


# ------------------------------------------------- scalars, flags, dtypes and shapes of every op
# Each bad value is refused by every public op that takes the argument, with TypeError for a
# wrong type and ValueError for a wrong value, naming the argument, before any kernel runs:
# backends.implementation (the only way to a kernel) raises KernelRan if it is reached.

class KernelRan(Exception):
    pass


@pytest.fixture
def no_kernels(monkeypatch):
    def refuse(*args, **kwargs):
        raise KernelRan("a backend was asked for an implementation before validation finished")
    monkeypatch.setattr(pyalign.backends, "implementation", refuse)


def _token_logprobs(**kw):
    return pyalign.token_logprobs(torch.randn(3, 10), torch.randint(0, 10, (3,)), **kw)


def _linear_token_logprobs(**kw):
    return pyalign.linear_token_logprobs(torch.randn(3, 8), torch.randn(10, 8),
                                         torch.randint(0, 10, (3,)), **kw)


def _kl_penalty(**kw):
    return pyalign.kl_penalty(torch.randn(3, 4), torch.randn(3, 4), **kw)


def _preference_loss(**kw):
    return pyalign.preference_loss(*pairs(), **kw)


def _kto_loss(**kw):
    return pyalign.kto_loss(torch.randn(4), torch.randn(4), torch.tensor([True, False, True, False]),
                            torch.tensor(0.1), **kw)


def _linear_preference_loss(**kw):
    kw.setdefault("ref_logps", torch.randn(4))
    return pyalign.linear_preference_loss(torch.randn(4, 5, 8), torch.randn(30, 8),
                                          torch.randint(0, 30, (4, 5)), **kw)


def _sequence_logprobs(**kw):
    return pyalign.sequence_logprobs(torch.randn(4, 8), torch.rand(4, 8) > 0.5, **kw)


OPS = {"token_logprobs": _token_logprobs, "linear_token_logprobs": _linear_token_logprobs,
       "kl_penalty": _kl_penalty, "preference_loss": _preference_loss, "kto_loss": _kto_loss,
       "linear_preference_loss": _linear_preference_loss, "sequence_logprobs": _sequence_logprobs}

NOT_A_NUMBER = [("a string", "0.5", TypeError), ("True", True, TypeError), ("None", None, TypeError),
                ("a 2-element tensor", torch.tensor([0.5, 0.5]), TypeError)]
NOT_FINITE = [("nan", float("nan"), ValueError), ("inf", float("inf"), ValueError)]
NOT_A_FLAG = [("the string 'no'", "no", TypeError), ("the int 1", 1, TypeError),
              ("the int 0", 0, TypeError), ("None", None, TypeError)]

# (argument, [(case id, bad value, exception)], the ops that take it)
BAD_SCALARS = [
    ("ignore_index", [("float 1.7", 1.7, TypeError), ("None", None, TypeError),
                      ("a string", "x", TypeError), ("True", True, TypeError),
                      ("False", False, TypeError), ("2**70", 2 ** 70, ValueError),
                      ("-2**70", -2 ** 70, ValueError), ("a float tensor", torch.tensor(1.0), TypeError),
                      ("a 1-element 1-D tensor", torch.tensor([3]), TypeError)],
     ["token_logprobs", "linear_token_logprobs", "linear_preference_loss"]),
    ("temperature", [("0", 0.0, ValueError), ("negative", -1.0, ValueError),
                     ("below the 1e-4 floor", 1e-5, ValueError), *NOT_FINITE, *NOT_A_NUMBER],
     ["token_logprobs", "linear_token_logprobs", "linear_preference_loss"]),
    ("beta", [("0", 0.0, ValueError), ("negative", -0.1, ValueError), *NOT_FINITE, *NOT_A_NUMBER],
     ["preference_loss", "kto_loss", "linear_preference_loss"]),
    ("label_smoothing", [("negative", -0.1, ValueError), ("0.5", 0.5, ValueError), *NOT_FINITE,
                         *NOT_A_NUMBER],
     ["preference_loss", "linear_preference_loss"]),
    ("desirable_weight", [("negative", -1.0, ValueError), *NOT_FINITE, *NOT_A_NUMBER], ["kto_loss"]),
    ("undesirable_weight", [("negative", -1.0, ValueError), *NOT_FINITE, *NOT_A_NUMBER], ["kto_loss"]),
    ("estimator", [("unknown", "k4", ValueError), ("upper case", "K1", ValueError),
                   ("None", None, TypeError), ("a list", ["k1"], TypeError)], ["kl_penalty"]),
    ("reduction", [("unknown", "avg", ValueError), ("None", None, TypeError),
                   ("a tuple", ("mean",), TypeError)],
     ["preference_loss", "kto_loss", "linear_preference_loss"]),
    ("loss", [("unknown", "dpo", ValueError), ("None", None, TypeError)],
     ["preference_loss", "linear_preference_loss"]),
    ("chunk_size", [("0", 0, ValueError), ("negative", -4, ValueError), ("2**70", 2 ** 70, ValueError),
                    ("float 2.5", 2.5, TypeError), ("float 8.0", 8.0, TypeError), ("True", True, TypeError),
                    ("a string", "8", TypeError)],
     ["linear_token_logprobs", "linear_preference_loss"]),
    ("entropy", NOT_A_FLAG, ["token_logprobs", "linear_token_logprobs"]),
    ("inplace_backward", NOT_A_FLAG, ["token_logprobs"]),
    ("average", NOT_A_FLAG, ["sequence_logprobs"]),
    ("average_log_prob", NOT_A_FLAG, ["linear_preference_loss"]),
]


def _bad_scalar_params():
    for argument, cases, ops in BAD_SCALARS:
        for op in ops:
            for case_id, value, exception in cases:
                yield pytest.param(op, argument, value, exception, id=f"{op}-{argument}-{case_id}")


@pytest.mark.parametrize("op,argument,value,exception", list(_bad_scalar_params()))
def test_bad_scalar_and_flag_arguments(no_kernels, op, argument, value, exception):
    with pytest.raises(exception, match=rf"\b{argument}\b") as raised:
        OPS[op](**{argument: value})
    assert argument in str(raised.value)


@pytest.mark.parametrize("op,kwargs", [
    ("token_logprobs", dict(ignore_index=torch.tensor(-7), temperature=torch.tensor(0.5))),
    ("token_logprobs", dict(ignore_index=2 ** 63 - 1, temperature=1e-4, entropy=True)),
    ("linear_token_logprobs", dict(ignore_index=-(2 ** 63), chunk_size=2, temperature=3)),
    ("linear_token_logprobs", dict(chunk_size=None, entropy=torch.tensor(False))),
    ("preference_loss", dict(beta=1, label_smoothing=0, reduction="none")),
    ("kto_loss", dict(beta=torch.tensor(0.2), desirable_weight=0, undesirable_weight=2)),
    ("kl_penalty", dict(estimator="k3")),
    ("sequence_logprobs", dict(average=True)),
    ("linear_preference_loss", dict(ignore_index=-1, chunk_size=3, average_log_prob=True)),
])
def test_good_scalar_arguments_are_accepted(op, kwargs):
    """The neighbours of the refused values: ints for reals, 0-d tensors, the int64 ends."""
    OPS[op](**kwargs)


def test_temperature_floor_is_the_documented_constant():
    from pyalign.ops import _checks
    assert _checks.MIN_TEMPERATURE == 1e-4
    assert "1e-04" in pyalign.token_logprobs.__doc__ or "1e-4" in pyalign.token_logprobs.__doc__
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, at least 0.0001"):
        _token_logprobs(temperature=9.99e-5)


# Float-only tensor inputs given integer (or bool) tensors: (op, the argument, the call)
_INT = torch.randint(0, 5, (4,))
BAD_DTYPES = [
    ("token_logprobs", "logits",
     lambda: pyalign.token_logprobs(torch.randint(0, 9, (3, 10)), torch.randint(0, 10, (3,)))),
    ("linear_token_logprobs", "hidden",
     lambda: pyalign.linear_token_logprobs(torch.randint(0, 9, (3, 8)), torch.randn(10, 8),
                                           torch.randint(0, 10, (3,)))),
    ("linear_token_logprobs", "weight",
     lambda: pyalign.linear_token_logprobs(torch.randn(3, 8), torch.randint(0, 9, (10, 8)),
                                           torch.randint(0, 10, (3,)))),
    ("linear_token_logprobs", "bias",
     lambda: _linear_token_logprobs(bias=torch.randint(0, 9, (10,)))),
    ("kl_penalty", "logprobs", lambda: pyalign.kl_penalty(torch.randint(0, 9, (3, 4)), torch.randn(3, 4))),
    ("kl_penalty", "ref_logprobs", lambda: pyalign.kl_penalty(torch.randn(3, 4), torch.ones(3, 4).bool())),
    ("preference_loss", "policy_chosen", lambda: pyalign.preference_loss(_INT, *pairs()[1:])),
    ("preference_loss", "policy_rejected",
     lambda: pyalign.preference_loss(pairs()[0], _INT, *pairs()[2:])),
    ("preference_loss", "ref_rejected", lambda: pyalign.preference_loss(*pairs()[:3], _INT)),
    ("kto_loss", "policy_logps",
     lambda: pyalign.kto_loss(_INT, torch.randn(4), torch.ones(4, dtype=torch.bool), torch.tensor(0.1))),
    ("kto_loss", "ref_logps",
     lambda: pyalign.kto_loss(torch.randn(4), _INT, torch.ones(4, dtype=torch.bool), torch.tensor(0.1))),
    ("kto_loss", "kl",
     lambda: pyalign.kto_loss(torch.randn(4), torch.randn(4), torch.ones(4, dtype=torch.bool),
                              torch.tensor(1))),
    ("linear_preference_loss", "hidden",
     lambda: pyalign.linear_preference_loss(torch.randint(0, 9, (4, 5, 8)), torch.randn(30, 8),
                                            torch.randint(0, 30, (4, 5)), ref_logps=torch.randn(4))),
    ("linear_preference_loss", "weight",
     lambda: pyalign.linear_preference_loss(torch.randn(4, 5, 8), torch.randint(0, 9, (30, 8)),
                                            torch.randint(0, 30, (4, 5)), ref_logps=torch.randn(4))),
    ("linear_preference_loss", "labels",
     lambda: pyalign.linear_preference_loss(torch.randn(4, 5, 8), torch.randn(30, 8),
                                            torch.rand(4, 5), ref_logps=torch.randn(4))),
    ("linear_preference_loss", "ref_logps", lambda: _linear_preference_loss(ref_logps=_INT)),
    ("linear_preference_loss", "ref_hidden",
     lambda: _linear_preference_loss(ref_logps=None, ref_hidden=torch.randint(0, 9, (4, 5, 8)))),
    ("linear_preference_loss", "ref_weight",
     lambda: _linear_preference_loss(ref_logps=None, ref_hidden=torch.randn(4, 5, 8),
                                     ref_weight=torch.randint(0, 9, (30, 8)))),
    ("linear_preference_loss", "ref_bias",
     lambda: _linear_preference_loss(ref_logps=None, ref_hidden=torch.randn(4, 5, 8),
                                     ref_weight=torch.randn(30, 8), ref_bias=torch.randint(0, 9, (30,)))),
    ("sequence_logprobs", "token_logprobs",
     lambda: pyalign.sequence_logprobs(torch.randint(0, 9, (4, 8)), torch.ones(4, 8, dtype=torch.bool))),
]


@pytest.mark.parametrize("op,argument,call", [pytest.param(*case, id=f"{case[0]}-{case[1]}-{i}")
                                              for i, case in enumerate(BAD_DTYPES)])
def test_bad_tensor_dtypes(no_kernels, op, argument, call):
    with pytest.raises(TypeError, match=rf"\b{argument}\b"):
        call()


# Shapes that broadcast (or are otherwise accepted) into a different answer.
BAD_SHAPES = [
    ("sequence_logprobs", "token_logprobs",  # [4, 1] against [4, 8] summed one token 8 times
     lambda: pyalign.sequence_logprobs(torch.randn(4, 1), torch.ones(4, 8, dtype=torch.bool))),
    ("sequence_logprobs", "mask",
     lambda: pyalign.sequence_logprobs(torch.randn(4, 8), torch.ones(8, dtype=torch.bool))),
    ("sequence_logprobs", "mask",
     lambda: pyalign.sequence_logprobs(torch.randn(4, 8), torch.ones(1, 8, dtype=torch.bool))),
    ("sequence_logprobs", "token_logprobs",
     lambda: pyalign.sequence_logprobs(torch.tensor(1.0), torch.tensor(True))),
    ("kl_penalty", "ref_logprobs", lambda: pyalign.kl_penalty(torch.randn(3, 4), torch.randn(1, 4))),
    ("kl_penalty", "ref_logprobs", lambda: pyalign.kl_penalty(torch.randn(3, 4), torch.randn(4))),
    ("kl_penalty", "mask",
     lambda: pyalign.kl_penalty(torch.randn(3, 4), torch.randn(3, 4), mask=torch.ones(1, 4).bool())),
    ("preference_loss", "policy_rejected",
     lambda: pyalign.preference_loss(torch.randn(4), torch.randn(4, 1), torch.randn(4), torch.randn(4))),
    ("preference_loss", "policy_chosen",
     lambda: pyalign.preference_loss(torch.randn(4, 1), *(torch.randn(4) for _ in range(3)))),
    ("kto_loss", "ref_logps",
     lambda: pyalign.kto_loss(torch.randn(4), torch.randn(4, 1), torch.ones(4, dtype=torch.bool),
                              torch.tensor(0.1))),
    ("kto_loss", "desirable",
     lambda: pyalign.kto_loss(torch.randn(4), torch.randn(4), torch.ones(4, 1, dtype=torch.bool),
                              torch.tensor(0.1))),
    ("linear_token_logprobs", "hidden",  # H = 0: every logit is the bias, nothing of hidden used
     lambda: pyalign.linear_token_logprobs(torch.randn(3, 0), torch.randn(10, 0), torch.zeros(3).long())),
    ("linear_token_logprobs", "weight",
     lambda: pyalign.linear_token_logprobs(torch.randn(3, 8), torch.randn(10, 7), torch.zeros(3).long())),
    ("linear_token_logprobs", "weight",
     lambda: pyalign.linear_token_logprobs(torch.randn(3, 8), torch.randn(2, 10, 8), torch.zeros(3).long())),
    ("linear_token_logprobs", "bias", lambda: _linear_token_logprobs(bias=torch.randn(1))),
    ("linear_token_logprobs", "bias", lambda: _linear_token_logprobs(bias=torch.randn(1, 10))),
    ("linear_token_logprobs", "labels",
     lambda: pyalign.linear_token_logprobs(torch.randn(3, 8), torch.randn(10, 8), torch.zeros(1).long())),
    ("token_logprobs", "labels",
     lambda: pyalign.token_logprobs(torch.randn(3, 10), torch.zeros(1).long())),
    ("linear_preference_loss", "hidden",
     lambda: pyalign.linear_preference_loss(torch.randn(4, 5, 0), torch.randn(30, 0),
                                            torch.zeros(4, 5).long(), ref_logps=torch.randn(4))),
    ("linear_preference_loss", "labels",
     lambda: pyalign.linear_preference_loss(torch.randn(4, 5, 8), torch.randn(30, 8),
                                            torch.zeros(4, 1).long(), ref_logps=torch.randn(4))),
    ("linear_preference_loss", "ref_logps", lambda: _linear_preference_loss(ref_logps=torch.randn(4, 1))),
    ("linear_preference_loss", "ref_logps", lambda: _linear_preference_loss(ref_logps=torch.randn(3))),
    ("linear_preference_loss", "ref_hidden",
     lambda: _linear_preference_loss(ref_logps=None, ref_hidden=torch.randn(4, 1, 8))),
    ("linear_preference_loss", "ref_weight",
     lambda: _linear_preference_loss(ref_logps=None, ref_hidden=torch.randn(4, 5, 8),
                                     ref_weight=torch.randn(30, 7))),
    ("linear_preference_loss", "ref_bias",
     lambda: _linear_preference_loss(ref_logps=None, ref_hidden=torch.randn(4, 5, 8),
                                     ref_weight=torch.randn(30, 8), ref_bias=torch.randn(29))),
    ("linear_preference_loss", "bias", lambda: _linear_preference_loss(bias=torch.randn(29))),
]


@pytest.mark.parametrize("op,argument,call", [pytest.param(*case, id=f"{case[0]}-{case[1]}-{i}")
                                              for i, case in enumerate(BAD_SHAPES)])
def test_bad_shapes(no_kernels, op, argument, call):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        call()


def test_linear_preference_reference_head_is_required(no_kernels):
    """ref_hidden without ref_weight used to be scored by the policy's head silently; a head given
    with precomputed reference log-probs would be ignored."""
    for extra in ({}, {"ref_bias": torch.randn(30)}):
        with pytest.raises(ValueError, match="ref_hidden given without ref_weight"):
            _linear_preference_loss(ref_logps=None, ref_hidden=torch.randn(4, 5, 8), **extra)
    for extra in ({"ref_weight": torch.randn(30, 8)}, {"ref_bias": torch.randn(30)}):
        with pytest.raises(ValueError, match="given with ref_logps"):
            _linear_preference_loss(**extra)


# A mask is bool or holds 0 and 1 only, in any dtype (tests/ops/test_masks.py: such a mask is the
# bool mask); any other value is refused before a kernel runs, named with its argument, value and
# position. (op, argument, call(mask [4, 6]) -> the op's call with that mask)
_TOKENS = torch.randn(4, 6) - 2
MASKED_CALLS = [
    ("kl_penalty", "mask", lambda m: pyalign.kl_penalty(_TOKENS, _TOKENS.clone(), mask=m)),
    ("sequence_logprobs", "mask", lambda m: pyalign.sequence_logprobs(_TOKENS, m)),
    ("token_preference_loss", "mask",
     lambda m: pyalign.token_preference_loss(_TOKENS, _TOKENS.clone(), m)),
    ("token_preference_loss", "mask",
     lambda m: pyalign.token_preference_loss(_TOKENS, None, m, loss=["orpo", "sft"])),
    ("policy_loss", "mask", lambda m: pyalign.policy_loss(_TOKENS, None, torch.randn(4), m)),
    ("kto_loss", "desirable",
     lambda m: pyalign.kto_loss(torch.randn(6), torch.randn(6), m[2], torch.tensor(0.1))),
    ("linear_kto_loss", "desirable",
     lambda m: pyalign.linear_kto_loss(torch.randn(4, 6, 8), torch.randn(10, 8),
                                       torch.randint(0, 10, (4, 6)), m[2, 2:], ref_logps=torch.randn(4),
                                       kl=torch.tensor(0.1))),
]
BAD_MASK_VALUES = [(torch.float32, 0.5, "0.5"), (torch.float32, 2.0, "2.0"),
                   (torch.float64, float("nan"), "nan"), (torch.bfloat16, -1.0, "-1.0"),
                   (torch.int64, 2, "2"), (torch.uint8, 3, "3")]


@pytest.mark.parametrize("dtype,value,shown", BAD_MASK_VALUES, ids=lambda v: str(v))
@pytest.mark.parametrize("op,argument,call", [pytest.param(*case, id=f"{case[0]}-{i}")
                                              for i, case in enumerate(MASKED_CALLS)])
def test_mask_values_other_than_0_and_1_are_refused(no_kernels, op, argument, call, dtype, value,
                                                    shown):
    mask = (torch.arange(24).view(4, 6) % 3 != 0).to(dtype)
    mask[2, 4] = value
    position = r"\(2, 4\)" if argument == "mask" else (r"\(4,\)" if op == "kto_loss" else r"\(2,\)")
    with pytest.raises(ValueError, match=rf"{argument} must be bool or hold only 0 and 1, got "
                                         rf"{shown} at position {position}"):
        call(mask)
