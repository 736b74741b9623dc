"""The fp32 head (docs/algorithms.md, "The fp32 head"): a bf16 / fp16 hidden state with a float32
head (weight and bias), or ``head_dtype=torch.float32`` upcasting a bf16 / fp16 head for the call,
on every linear_logprobs backend of the test device (the Triton interpreter included), against the
float64 oracle of the same values (the upcast is exact): every output of linear_token_logprobs to
fp32 accuracy (a bf16 head's logits are ~1e-2 off), the gradients within the fp32 error bounds of
tests/support.py rounded once into each input's own dtype, with per-token upstream gradients,
ignore_index (NaN padding), softcap / logit_scale / temperature, the metrics and memory_budget's
kept rows; the fused losses (preference, KTO, policy; the 3-matmul and the recompute paths)
against their float64 oracles; no path holds an fp32 copy of a bf16 weight; which dtypes are
accepted, and the errors for the others, raised before any kernel runs."""
import pytest
import torch

import pyalign
from pyalign import backends
from support import (
    DEVICE,
    IGNORE,
    assert_within_bound,
    backend_cases,
    backends_for,
    entropy64,
    grads64,
    head_gradient_bounds64,
    head_logits64,
    head_outputs64,
    kl_reference64,
    linear_logits64,
    peak_allocated_bytes,
    policy64,
    sequence_logprobs64,
    token_logprobs64,
    token_preference64,
    unpaired64,
)

BACKENDS = backends_for("linear_logprobs")
CHUNKED = [b for b in BACKENDS if b != "triton"]
LOW = [torch.bfloat16, torch.float16]
# (leading shape, H, V): several Triton tiles of the fp32 table (32 x 64 forward, 32 x 32
# backward) with partial last ones; the interpreter gets the smaller shapes.
SHAPES = [((2, 7), 16, 7), ((37,), 24, 300)]
TRITON_SHAPES = [((2, 7), 16, 7), ((33,), 40, 100)]
OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# The head's options, each case with its memory_budget (every token's logits kept: the chunked
# backends' no-recompute path; Triton keeps none).
OPTIONS = [dict(temperature=0.8), dict(softcap=2.5, logit_scale=0.3, temperature=0.7, keep=True)]


def fp32_head_case(lead, hidden_size, vocab, dtype, form, seed=0):
    """bf16 / fp16 hidden states (the NaN-padded rows ignored), a head in float32 ("fp32-weight")
    or in ``dtype`` for head_dtype=float32 ("head_dtype"), labels with awkward ones in, per-token
    upstream gradients, and the op's keyword arguments for the form."""
    generator = torch.Generator().manual_seed(seed)
    hidden = (3 * torch.randn(*lead, hidden_size, generator=generator)).to(DEVICE, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * (2 / hidden_size ** 0.5))
    bias = torch.randn(vocab, generator=generator)
    head = torch.float32 if form == "fp32-weight" else dtype
    weight, bias = weight.to(DEVICE, head), bias.to(DEVICE, head)
    labels = torch.randint(0, vocab, lead, generator=generator).to(DEVICE)
    flat, rows = labels.view(-1), hidden.view(-1, hidden_size)
    flat[0] = vocab - 1
    flat[1] = IGNORE
    rows[1] = float("nan")  # a padded row: reaches nothing
    if flat.numel() > 4:
        flat[-1] = 0
        flat[3::5] = linear_logits64(rows[3::5], weight, bias).argmax(-1)  # is_top1 True there
    upstream = (torch.randn(lead, generator=generator).to(DEVICE),
                torch.randn(lead, generator=generator).to(DEVICE))
    kwargs = {} if form == "fp32-weight" else dict(head_dtype=torch.float32)
    return hidden, weight, bias, labels, upstream, kwargs


def _exact(hidden, weight, bias, labels, upstream, softcap, logit_scale, temperature):
    """float64 outputs and gradients of sum(lp * g + entropy * g_ent) (the ignored rows as 0)."""
    valid = labels.reshape(-1) != IGNORE
    rows = torch.where(valid[:, None], hidden.reshape(-1, hidden.shape[-1]).double(), 0.0)
    flat_labels = labels.reshape(-1)

    def objective(h, w, b):
        out = head_outputs64(head_logits64(h, w, b, softcap, logit_scale, temperature),
                             flat_labels)
        return ((out["log_probs"] * upstream[0].reshape(-1).double()).sum()
                + (out["entropy"] * upstream[1].reshape(-1).double()).sum())

    _, grads = grads64(objective, [rows, weight, bias])
    outputs = head_outputs64(head_logits64(rows, weight, bias, softcap, logit_scale, temperature),
                             flat_labels)
    return {k: v.view(labels.shape) for k, v in outputs.items()}, grads


@pytest.mark.parametrize("backend,lead,hidden_size,vocab",
                         backend_cases("linear_logprobs", SHAPES, TRITON_SHAPES))
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("form", ["fp32-weight", "head_dtype"])
@pytest.mark.parametrize("options", OPTIONS, ids=["T0.8", "softcap-scale-T0.7-kept"])
def test_linear_token_logprobs_matches_float64(backend, lead, hidden_size, vocab, dtype, form,
                                               options):
    hidden, weight, bias, labels, upstream, kwargs = fp32_head_case(lead, hidden_size, vocab,
                                                                    dtype, form)
    options = dict(options)
    if options.pop("keep", False):
        kwargs["memory_budget"] = labels.numel() * vocab * 4
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = pyalign.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2],
                                        outputs=OUTPUTS, backend=backend, **options, **kwargs)
    torch.autograd.backward([out.log_probs, out.entropy], list(upstream))
    head = dict(softcap=options.get("softcap"), logit_scale=options.get("logit_scale", 1.0),
                temperature=options["temperature"])
    expected, exact_grads = _exact(hidden, weight, bias, labels, upstream, **head)
    for name in ("log_probs",) + OUTPUTS:
        value = getattr(out, name)
        if name == "is_top1":
            assert torch.equal(value, expected[name].to(value.device))
            continue
        assert value.dtype == torch.float32, name
        # fp32 accuracy: a bf16 / fp16 head's logits would be rounded ~2^-9 relative (~1e-2 here)
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=2e-5,
                                   msg=name)
    assert expected["is_top1"].any()
    bounds = head_gradient_bounds64(hidden, weight, bias, labels, *upstream, **head)
    for name, leaf, exact, bound in zip(("hidden", "weight", "bias"), leaves, exact_grads, bounds,
                                        strict=True):
        assert leaf.grad.dtype == leaf.dtype, name  # each input's own dtype
        assert_within_bound(leaf.grad.view(exact.shape), exact, bound.view(exact.shape), name)
    assert torch.all(leaves[0].grad.view(-1, hidden_size)[1] == 0)  # the padded row


@pytest.mark.parametrize("backend", CHUNKED)
def test_the_fp32_head_is_what_a_bf16_head_is_not(backend):
    """The same bf16 hidden state and head: with head_dtype=float32 the log-probs are the
    float64 ones to 1e-5; without it (a bf16 matmul, logits rounded to bf16) they are not, so the
    tolerance of the test above tells the two apart. (The Triton kernel's bf16 dots accumulate
    the exact bf16 products in fp32 already; its fp32 head differs in keeping the backward's
    d/dz tile in fp32.)"""
    hidden, weight, bias, labels, _, _ = fp32_head_case((2, 7), 16, 7, torch.bfloat16, "head_dtype")
    expected, _ = _exact(hidden, weight, bias, labels, (torch.zeros(2, 7),) * 2, None, 1.0, 1.0)
    valid = labels != IGNORE
    errors = {}
    for head_dtype in (torch.float32, None):
        logprobs = pyalign.linear_token_logprobs(hidden, weight, labels, bias=bias,
                                                 head_dtype=head_dtype, backend=backend)
        errors[head_dtype] = float((logprobs.double() - expected["log_probs"])[valid].abs().max())
    assert errors[torch.float32] < 2e-5 < 1e-3 < errors[None], errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_backend_hands_the_fp32_head_to_eager(backend):
    """Each backend runs the fp32 head itself (no eager fallback), forward and backward, the
    vocab shard's backward too (wider than one tile)."""
    hidden = torch.randn(4, 8, device=DEVICE, dtype=torch.bfloat16)
    for weight in (torch.randn(300, 8, device=DEVICE), torch.randn(300, 8, device=DEVICE, dtype=BF16)):
        rows = hidden if weight.dtype == FP32 else hidden.float()  # head_dtype's upcast
        for primitive in ("forward", "backward"):
            assert backends.resolved_name("linear_logprobs", backend, rows, weight,
                                          primitive=primitive, hidden=rows, weight=weight,
                                          vocab_shard=primitive == "backward") == backend


# ----------------------------------------------------------------------- accepted and refused

FP32, BF16, FP16, FP64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
ACCEPTED = [  # (hidden, weight (and bias), head_dtype)
    (FP32, FP32, None), (BF16, BF16, None), (FP16, FP16, None), (FP64, FP64, None),
    (BF16, FP32, None), (FP16, FP32, None), (BF16, FP32, FP32), (BF16, BF16, FP32),
    (FP16, FP16, FP32), (FP32, BF16, FP32), (FP16, BF16, FP32), (FP32, FP32, FP32),
]
REFUSED = [  # (hidden, weight, bias, head_dtype, error, message)
    (FP32, BF16, BF16, None, TypeError, "hidden and weight must share a dtype, or make a float32 "
                                        "head of a bfloat16/float16 hidden"),
    (BF16, FP16, FP16, None, TypeError, "got hidden torch.bfloat16 and weight torch.float16"),
    (FP64, FP32, FP32, None, TypeError, "hidden and weight must share a dtype"),
    (FP32, FP64, FP64, None, TypeError, "hidden and weight must share a dtype"),
    (FP64, BF16, BF16, FP32, TypeError, "weight torch.bfloat16, head_dtype=torch.float32"),
    (FP64, FP64, FP64, FP32, TypeError, "head_dtype=torch.float32 upcasts a bfloat16/float16 "
                                        "head .*weight is torch.float64"),
    (BF16, FP32, BF16, None, TypeError, "bias must have weight's dtype torch.float32"),
    (BF16, BF16, FP32, FP32, TypeError, "bias must have weight's dtype torch.bfloat16"),
    (BF16, BF16, None, BF16, ValueError, "head_dtype must be None .* or torch.float32, got "
                                         "torch.bfloat16"),
    (BF16, BF16, None, "float32", TypeError, "head_dtype must be None"),
]


@pytest.fixture
def no_kernels(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a backend was asked for an implementation before the checks")
    monkeypatch.setattr(backends, "implementation", refuse)


@pytest.mark.parametrize("hidden_dtype,weight_dtype,head_dtype", ACCEPTED, ids=str)
def test_accepted_dtypes(hidden_dtype, weight_dtype, head_dtype):
    hidden, weight = torch.randn(4, 8).to(hidden_dtype), torch.randn(11, 8).to(weight_dtype)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logprobs = pyalign.linear_token_logprobs(hidden, weight, torch.tensor([0, 3, IGNORE, 10]),
                                             bias=torch.randn(11).to(weight_dtype),
                                             head_dtype=head_dtype)
    logprobs.sum().backward()
    assert torch.isfinite(logprobs).all()
    assert hidden.grad.dtype == hidden_dtype and weight.grad.dtype == weight_dtype


@pytest.mark.parametrize("hidden_dtype,weight_dtype,bias_dtype,head_dtype,error,message", REFUSED,
                         ids=str)
def test_refused_dtypes_are_named_before_any_kernel_runs(no_kernels, hidden_dtype, weight_dtype,
                                                         bias_dtype, head_dtype, error, message):
    hidden, weight = torch.randn(2, 3, 8).to(hidden_dtype), torch.randn(11, 8).to(weight_dtype)
    bias = None if bias_dtype is None else torch.randn(11).to(bias_dtype)
    labels = torch.randint(0, 11, (2, 3))
    with pytest.raises(error, match=message):
        pyalign.linear_token_logprobs(hidden, weight, labels, bias=bias, head_dtype=head_dtype)
    with pytest.raises(error, match=message):
        pyalign.linear_policy_loss(hidden, weight, labels, torch.randn(2), bias=bias,
                                   head_dtype=head_dtype)
    kto = dict(bias=bias, ref_logps=torch.randn(2), kl=torch.zeros(()), head_dtype=head_dtype)
    with pytest.raises(error, match=message):
        pyalign.linear_kto_loss(hidden, weight, labels, torch.tensor([True, False]), **kto)
    with pytest.raises(error, match=message):
        pyalign.linear_preference_loss(hidden, weight, labels, bias=bias, ref_logps=torch.randn(2),
                                       head_dtype=head_dtype)


def test_the_reference_heads_and_kl_pairs_are_checked_under_their_names(no_kernels):
    hidden, weight = torch.randn(2, 3, 8, dtype=BF16), torch.randn(11, 8)
    labels = torch.randint(0, 11, (2, 3))
    with pytest.raises(TypeError, match="ref_hidden and ref_weight must share a dtype.*got "
                                        "ref_hidden torch.float32 and ref_weight torch.bfloat16"):
        pyalign.linear_preference_loss(hidden, weight, labels, ref_hidden=hidden.float(),
                                       ref_weight=weight.bfloat16())
    with pytest.raises(TypeError, match="kl_hidden and weight must share a dtype.*got kl_hidden "
                                        "torch.float64"):
        pyalign.linear_kto_loss(hidden, weight, labels, torch.tensor([True, False]),
                                ref_logps=torch.randn(2), kl_hidden=hidden.double(),
                                kl_labels=labels, ref_kl_logps=torch.randn(2))
    with pytest.raises(TypeError, match="ref_bias must have ref_weight's dtype"):
        pyalign.linear_kto_loss(hidden, weight, labels, torch.tensor([True, False]),
                                ref_hidden=hidden, ref_weight=weight, ref_bias=torch.randn(11, dtype=BF16),
                                kl=torch.zeros(()))


# ------------------------------------------------------------------------------ fused losses

def loss_case(rows, dtype, form, seq_len=6, hidden_size=8, vocab=23, seed=0):
    """Policy and reference hidden states in ``dtype``, their heads (fp32, or ``dtype`` with
    head_dtype), bias, labels with a prompt, padding and an all-ignored row."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, seq_len, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) / 2
    bias = torch.randn(vocab, generator=generator)
    labels = torch.randint(0, vocab, (rows, seq_len), generator=generator)
    labels[:, :2] = IGNORE
    labels[1, seq_len - 2:] = IGNORE
    labels[rows - 1] = IGNORE
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=generator)
    ref_weight = weight + 0.1 * torch.randn(weight.shape, generator=generator)
    head = torch.float32 if form == "fp32-weight" else dtype
    kwargs = {} if form == "fp32-weight" else dict(head_dtype=torch.float32)
    return (hidden.to(DEVICE, dtype), weight.to(DEVICE, head), bias.to(DEVICE, head),
            labels.to(DEVICE), ref_hidden.to(DEVICE, dtype), ref_weight.to(DEVICE, head), kwargs)


def run_loss(op, reduction, hidden, weight, bias, *args, **kwargs):
    """(loss, grads of hidden, weight and bias); reduction "none" (the recompute path) is
    averaged here."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = op(leaves[0], leaves[1], *args, bias=leaves[2], reduction=reduction, **kwargs)
    loss = out.loss.mean() if reduction == "none" else out.loss
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def assert_fp32_accurate(loss, grads, expected, exact_grads):
    """The loss to fp32 accuracy; each gradient to fp32 accuracy (the fused losses' tolerance,
    rtol 1e-4 and 1e-5 of the largest) then rounded once into its input's dtype."""
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for grad, exact in zip(grads, exact_grads, strict=True):
        exact = exact.to(grad.device)
        bound = 1e-4 * exact.abs() + 1e-5 * float(exact.abs().max())
        assert_within_bound(grad, exact, bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["fp32-weight", "head_dtype"])
@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["3-matmul", "recompute"])
def test_preference_loss_with_an_fp32_head_matches_float64(backend, form, reduction):
    """DPO with WPO weights, the reference from hidden states through its own fp32 head."""
    hidden, weight, bias, labels, ref_hidden, ref_weight, kwargs = loss_case(4, torch.bfloat16,
                                                                             form)
    loss, grads = run_loss(pyalign.linear_preference_loss, reduction, hidden, weight, bias, labels,
                           ref_hidden=ref_hidden, ref_weight=ref_weight, beta=0.5,
                           temperature=0.9, use_weighting=True, chunk_size=5, backend=backend,
                           **kwargs)
    mask = (labels != IGNORE).cpu()
    cpu_labels = labels.cpu()
    with torch.no_grad():
        ref_tokens = token_logprobs64(linear_logits64(ref_hidden, ref_weight).cpu(), cpu_labels,
                                      temperature=0.9)

    def objective(h, w, b):
        logits = linear_logits64(h, w, b).cpu()
        tokens = token_logprobs64(logits, cpu_labels, temperature=0.9)
        log_sum_sq = torch.logsumexp(2 * torch.log_softmax(logits / 0.9, -1), -1).detach()
        return token_preference64(tokens, ref_tokens, mask, ["sigmoid"], 0.5,
                                  log_sum_sq_probs=log_sum_sq).mean()

    expected, exact_grads = grads64(objective, [hidden, weight, bias])
    assert_fp32_accurate(loss, grads, expected, exact_grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["fp32-weight", "head_dtype"])
@pytest.mark.parametrize("reduction", ["sum", "none"], ids=["3-matmul", "recompute"])
def test_kto_loss_with_an_fp32_head_matches_float64(backend, form, reduction):
    """KTO with the reference and the KL pairs from fp16 hidden states through fp32 heads."""
    hidden, weight, bias, labels, ref_hidden, ref_weight, kwargs = loss_case(4, torch.float16, form)
    kl_hidden, _, _, kl_labels, ref_kl_hidden, _, _ = loss_case(3, torch.float16, form, seed=1)
    desirable = torch.tensor([True, False, True, False], device=DEVICE)
    loss, grads = run_loss(pyalign.linear_kto_loss, reduction, hidden, weight, bias, labels,
                           desirable, ref_hidden=ref_hidden, ref_weight=ref_weight,
                           kl_hidden=kl_hidden, kl_labels=kl_labels, ref_kl_hidden=ref_kl_hidden,
                           beta=0.4, chunk_size=4, backend=backend, **kwargs)
    if reduction == "sum":
        loss, grads = loss / 4, [grad / 4 for grad in grads]  # the oracle's mean
    mask, kl_mask = (labels != IGNORE).cpu(), (kl_labels != IGNORE).cpu()

    def sequences(h, w, b, token_labels, token_mask):
        tokens = token_logprobs64(linear_logits64(h, w, b).cpu(), token_labels.cpu())
        return sequence_logprobs64(tokens, token_mask)

    with torch.no_grad():
        ref = sequences(ref_hidden, ref_weight, None, labels, mask)
        z0 = kl_reference64(sequences(kl_hidden, weight, bias, kl_labels, kl_mask)
                            - sequences(ref_kl_hidden, ref_weight, None, kl_labels, kl_mask))
    expected, exact_grads = grads64(
        lambda h, w, b: unpaired64(sequences(h, w, b, labels, mask), ref, desirable.cpu(), z0,
                                   "kto", 0.4).mean(), [hidden, weight, bias])
    assert_fp32_accurate(loss, grads, expected, exact_grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["fp32-weight", "head_dtype"])
@pytest.mark.parametrize("top_entropy_quantile", [1.0, 0.5], ids=["3-matmul", "recompute"])
def test_policy_loss_with_an_fp32_head_matches_float64(backend, form, top_entropy_quantile):
    """GRPO with the k3 KL and an entropy bonus (its gradient goes through the head too)."""
    hidden, weight, bias, labels, _, _, kwargs = loss_case(4, torch.bfloat16, form)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        policy = token_logprobs64(linear_logits64(hidden, weight, bias).cpu(), labels.cpu())
    old = (policy + 0.3 * torch.randn(policy.shape, generator=generator)).float().to(DEVICE)
    ref = (policy + 0.5 * torch.randn(policy.shape, generator=generator)).float().to(DEVICE)
    advantages = torch.randn(4, generator=generator).to(DEVICE)
    options = dict(loss_type="grpo", beta=0.04, entropy_coef=0.05, temperature=0.9,
                   top_entropy_quantile=top_entropy_quantile)
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = pyalign.linear_policy_loss(leaves[0], leaves[1], labels, advantages, old, ref,
                                     bias=leaves[2], chunk_size=5, backend=backend, **options,
                                     **kwargs)
    out.loss.backward()
    cpu_labels = labels.cpu()

    def objective(h, w, b):
        logits = linear_logits64(h, w, b).cpu()
        loss, _ = policy64(token_logprobs64(logits, cpu_labels, temperature=0.9), old.cpu(),
                           advantages.cpu(), cpu_labels != IGNORE, "grpo", ref_logprobs=ref.cpu(),
                           beta=0.04, level="token",
                           entropy=entropy64(logits, cpu_labels, temperature=0.9),
                           entropy_coef=0.05, top_entropy_quantile=top_entropy_quantile)
        return loss

    expected, exact_grads = grads64(objective, [hidden, weight, bias])
    assert_fp32_accurate(out.loss.detach(), [leaf.grad for leaf in leaves], expected, exact_grads)


# ------------------------------------------------------------------------------------ memory

@pytest.mark.skipif(not CHUNKED, reason="no chunked backend")
def test_no_path_holds_an_fp32_copy_of_a_bf16_head():
    """head_dtype=float32 on a bf16 head of V = 32000, H = 512 (32 MiB; 64 MiB in fp32): the
    chunked head's forward and the 3-matmul loss hold the fp32 weight gradient every path
    returns and a few chunk-sized blocks, never an fp32 copy of the weight besides."""
    vocab, hidden_size, tokens = 32000, 512, 12
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, tokens // 2, hidden_size, generator=generator).to(DEVICE, BF16)
    weight = (torch.randn(vocab, hidden_size, generator=generator) / 16).to(DEVICE, BF16)
    labels = torch.randint(0, vocab, (2, tokens // 2), generator=generator).to(DEVICE)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    fp32_weight, block = vocab * hidden_size * 4, 1 << 24  # _chunked_head.DEFAULT_CHUNK_BYTES
    for backend in CHUNKED:
        forward = peak_allocated_bytes(lambda backend=backend: pyalign.linear_token_logprobs(
            hidden, weight, labels, head_dtype=FP32, backend=backend))
        assert forward < 3 * block < fp32_weight, f"{backend}: forward peak {forward / 2**20:.0f} MiB"
        weight.grad = None
        fused = peak_allocated_bytes(lambda backend=backend: pyalign.linear_preference_loss(
            hidden, weight, labels, ref_logps=torch.zeros(2, device=DEVICE), head_dtype=FP32,
            backend=backend).loss.backward())
        # the fp32 gradient buffer with a weight block, then with its bf16 cast (handed over);
        # an fp32 copy of the weight beside the buffer would be 2 * fp32_weight
        assert fused < fp32_weight + fp32_weight // 2 + block // 2, (
            f"{backend}: 3-matmul peak {fused / 2**20:.0f} MiB, W in fp32 {fp32_weight / 2**20:.0f}")
