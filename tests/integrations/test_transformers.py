"""pyalign.integrations.transformers on tiny Hugging Face models: causal_lm_logprobs against the
model's own logits (a copy of the model, log_softmax in float64, gathered), forward and the
parameter gradients of per-token upstream gradients, on every architecture of hf_models; packed
sequences (position_ids restarting at 0) against each sequence scored alone in float64, with sdpa
and eager, and the trainers' padding-free scorer against padded rows; PEFT; the refusals;
add_fused_lm_head against TRL's own add_fused_lm_head."""
import copy

import peft
import pytest
import torch
from torch import nn

from hf_models import ARCHITECTURES, build_tiny_model, train_tokenizer
from pyalign.integrations import packing
from pyalign.integrations.transformers import (
    UnsupportedHeadError,
    add_fused_lm_head,
    causal_lm_logprobs,
    remove_fused_lm_head,
)
from support import DEVICE, assert_within_bound, backends_for, grads64

BACKENDS = backends_for("linear_logprobs")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def _batch(vocab, batch=3, length=9):
    """input_ids with right padding on row 1 and left padding on row 2 (and its mask)."""
    input_ids = torch.randint(3, vocab, (batch, length), device=DEVICE)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[2, :2] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def _reference(model, input_ids, attention_mask, labels, temperature, ignore_index=-100):
    """log-probs and entropy [B, T-1] from the model's own full logits, in float64 from there
    (transformers' float64 Gemma 2 gives NaN on a left-padded row, so the model stays fp32)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double()
    logp = (logits / temperature).log_softmax(-1)
    target = labels[:, 1:]
    mask = target != ignore_index
    # where, not a product: a left-padded row's fully masked positions can hold NaN logits.
    logprobs = torch.where(mask, logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0)
    entropy = torch.where(mask, -(logp.exp() * logp).sum(-1), 0)
    return logprobs, entropy, mask


def _grads(model):
    return {name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got_model, want_model, atol):
    got, want = _grads(got_model), _grads(want_model)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_equals_the_models_own_logits_forward_and_gradients(arch, backend, tokenizer):
    model = build_tiny_model(arch, tokenizer).to(DEVICE)
    reference = copy.deepcopy(model)
    input_ids, attention_mask = _batch(len(tokenizer))
    temperature = 0.7
    out = causal_lm_logprobs(model, input_ids, attention_mask=attention_mask, entropy=True,
                             temperature=temperature, backend=backend)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    want_logprobs, want_entropy, want_mask = _reference(reference, input_ids, attention_mask,
                                                        labels, temperature)
    assert torch.equal(out.mask, want_mask)
    assert out.logprobs.shape == out.entropy.shape == (3, 8)
    torch.testing.assert_close(out.logprobs.double(), want_logprobs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), want_entropy, atol=2e-5, rtol=1e-5)

    grad_logprobs = torch.randn(3, 8, device=DEVICE, dtype=torch.float64)
    grad_entropy = torch.randn(3, 8, device=DEVICE, dtype=torch.float64)
    ((out.logprobs * grad_logprobs.float()).sum() + (out.entropy * grad_entropy.float()).sum()
     ).backward()
    ((want_logprobs * grad_logprobs).sum() + (want_entropy * grad_entropy).sum()).backward()
    _assert_grads_close(model, reference, atol=5e-5)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_trainers_response_scorer_fuses_every_head(arch, tokenizer):
    """The trainers' ResponseScorer takes the fused head with the model's own soft-cap and scale
    (Granite's logits_scaling was once left out of it) and equals the model's float64 logits:
    log-probs, entropy, log sum p^2, and the gradients of per-token upstream gradients."""
    from pyalign.trainers.scoring import ResponseScorer
    model = build_tiny_model(arch, tokenizer).to(DEVICE)
    reference = copy.deepcopy(model).double()
    scorer = ResponseScorer(model, backend="auto", temperature=0.7)
    assert scorer.fused_linear, arch
    vocab = len(tokenizer)
    prompts = torch.randint(3, vocab, (2, 4), device=DEVICE)
    responses = torch.randint(3, vocab, (2, 5), device=DEVICE)
    prompts[1, 0] = -100  # left padding of a prompt, right padding of a response
    responses[1, 4] = -100
    mask = responses >= 0
    logprobs, entropy, log_sum_sq = scorer(prompts, responses, mask, entropy=True,
                                           log_sum_sq=True)
    want_logprobs = torch.zeros(2, 5, dtype=torch.float64, device=DEVICE)
    want_entropy, want_sum_sq = torch.zeros_like(want_logprobs), torch.zeros_like(want_logprobs)
    for row in range(2):
        prompt, response = prompts[row][prompts[row] >= 0], responses[row][mask[row]]
        ids = torch.cat([prompt, response])[None]
        logits = reference(input_ids=ids).logits[0, len(prompt) - 1:-1] / 0.7
        logp = logits.log_softmax(-1)
        n = len(response)
        want_logprobs[row, :n] = logp.gather(-1, response[:, None])[:, 0]
        want_entropy[row, :n] = -(logp.exp() * logp).sum(-1)
        want_sum_sq[row, :n] = torch.logsumexp(2 * logp, -1).detach()
    torch.testing.assert_close(logprobs.double(), want_logprobs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), want_entropy, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(log_sum_sq.double(), want_sum_sq, atol=2e-5, rtol=1e-5)
    grad_logprobs = torch.randn(2, 5, device=DEVICE, dtype=torch.float64)
    grad_entropy = torch.randn(2, 5, device=DEVICE, dtype=torch.float64)
    ((logprobs * grad_logprobs.float()).sum() + (entropy * grad_entropy.float()).sum()).backward()
    ((want_logprobs * grad_logprobs).sum() + (want_entropy * grad_entropy).sum()).backward()
    _assert_grads_close(model, reference, atol=5e-5)


def test_given_labels_and_ignore_index_and_no_entropy(tokenizer):
    model = build_tiny_model("llama", tokenizer).to(DEVICE)
    reference = copy.deepcopy(model)
    input_ids, attention_mask = _batch(len(tokenizer))
    labels = input_ids.clone()
    labels[0, :4] = -1  # a prompt, masked with a custom ignore_index
    out = causal_lm_logprobs(model, input_ids, labels=labels, ignore_index=-1)
    assert out.entropy is None
    want, _, mask = _reference(reference, input_ids, None, labels, 1.0, ignore_index=-1)
    assert torch.equal(out.mask, mask) and not mask[0, :3].any() and mask[1, 6:].all()
    torch.testing.assert_close(out.logprobs.double(), want, atol=2e-5, rtol=1e-5)


def test_peft_lora_model_with_the_head_adapted(tokenizer):
    model = build_tiny_model("qwen2", tokenizer).to(DEVICE)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["q_proj", "v_proj", "lm_head"])
    model = peft.get_peft_model(model, config)
    reference = copy.deepcopy(model)
    input_ids, attention_mask = _batch(len(tokenizer))
    out = causal_lm_logprobs(model, input_ids, attention_mask=attention_mask)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    want, _, _ = _reference(reference, input_ids, attention_mask, labels, 1.0)
    torch.testing.assert_close(out.logprobs.double(), want, atol=2e-5, rtol=1e-5)
    upstream = torch.randn(3, 8, device=DEVICE, dtype=torch.float64)
    (out.logprobs * upstream.float()).sum().backward()
    (want * upstream).sum().backward()
    assert any("lm_head.lora_B" in name for name in _grads(model))
    _assert_grads_close(model, reference, atol=5e-5)


def test_lora_head_with_dropout_in_training_is_refused(tokenizer):
    model = build_tiny_model("llama", tokenizer).to(DEVICE)
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_dropout=0.1,
                                                       target_modules=["lm_head"]))
    model.train()
    input_ids, _ = _batch(len(tokenizer))
    with pytest.raises(UnsupportedHeadError, match="lora_dropout=0.1"):
        causal_lm_logprobs(model, input_ids)


class _ScaledHead(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_unsupported_heads_are_refused_before_the_model_runs(tokenizer):
    model = build_tiny_model("llama", tokenizer).to(DEVICE)
    input_ids, _ = _batch(len(tokenizer))
    head = model.get_output_embeddings()
    custom = _ScaledHead(head.in_features, head.out_features, bias=False, device=DEVICE)
    model.set_output_embeddings(custom)
    with pytest.raises(UnsupportedHeadError, match="_ScaledHead, not torch.nn.Linear"):
        causal_lm_logprobs(model, input_ids)
    model.set_output_embeddings(head)
    model.config.dim_model_base = 8
    with pytest.raises(UnsupportedHeadError, match="dim_model_base=8"):
        causal_lm_logprobs(model, input_ids)
    with pytest.raises(UnsupportedHeadError, match="dim_model_base"):
        add_fused_lm_head(model)


def test_bad_arguments_are_named(tokenizer):
    model = build_tiny_model("llama", tokenizer).to(DEVICE)
    input_ids, _ = _batch(len(tokenizer))
    with pytest.raises(ValueError, match="input_ids must be"):
        causal_lm_logprobs(model, input_ids[:, :1])
    with pytest.raises(ValueError, match="temperature"):
        causal_lm_logprobs(model, input_ids, temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        causal_lm_logprobs(model, input_ids, labels=input_ids[:, 1:])
    with pytest.raises(ValueError, match="backend"):
        causal_lm_logprobs(model, input_ids, backend="fastest")
    with pytest.raises(ValueError, match="backend"):
        add_fused_lm_head(model, backend="fastest")
    with pytest.raises(ValueError, match="outputs must name"):
        add_fused_lm_head(model, outputs=("log_probs", "logits"))
    with pytest.raises(TypeError, match="head_dtype must be None .* or torch.float32"):
        causal_lm_logprobs(model, input_ids, head_dtype="float32")


ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
FIELDS = ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1",
          "label_mask")


@pytest.mark.parametrize("arch", ["gemma2", "granite", "gpt2"])
def test_add_fused_lm_head_matches_trls_own(arch, tokenizer):
    trl_utils = pytest.importorskip("trl.trainer.utils", reason="trl is not installed ([test] extra)")
    ours_model = build_tiny_model(arch, tokenizer).to(DEVICE)
    trl_model = copy.deepcopy(ours_model)
    add_fused_lm_head(ours_model, temperature=0.8, outputs=ALL_OUTPUTS)
    trl_utils.add_fused_lm_head(trl_model, temperature=0.8, outputs=ALL_OUTPUTS)
    input_ids, attention_mask = _batch(len(tokenizer))
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :3] = -100
    # Pre-shifted labels, as context parallelism passes them: [B, T], scored without a shift.
    shift_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    for kwargs in ({"labels": labels}, {"shift_labels": shift_labels},
                   {"labels": labels, "num_items_in_batch": 7}):
        ours = ours_model(input_ids=input_ids, attention_mask=attention_mask, fused_lm_head=True,
                          **kwargs)
        theirs = trl_model(input_ids=input_ids, attention_mask=attention_mask, fused_lm_head=True,
                           **kwargs)
        for field in FIELDS:
            got, want = getattr(ours, field), getattr(theirs, field)
            assert got.shape == want.shape and got.dtype == want.dtype, field
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=field)
        assert ours.aux_loss is None and theirs.aux_loss is None
    upstream = torch.randn_like(ours.log_probs)
    (ours.loss + (ours.log_probs * upstream).sum() + ours.entropy.sum()).backward()
    (theirs.loss + (theirs.log_probs * upstream).sum() + theirs.entropy.sum()).backward()
    _assert_grads_close(ours_model, trl_model, atol=5e-5)

    # Without fused_lm_head the forward is the model's own; remove_fused_lm_head restores it.
    plain = ours_model(input_ids=input_ids, labels=labels)
    assert plain.logits.shape == (3, 9, len(tokenizer))
    remove_fused_lm_head(ours_model)
    assert "forward" not in ours_model.__dict__
    torch.testing.assert_close(ours_model(input_ids=input_ids, labels=labels).loss, plain.loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head", ["head_dtype", "lm_head-in-fp32"])
def test_fp32_head_of_a_bf16_model(backend, head, tokenizer, monkeypatch):
    """A bf16 model scored through the fp32 head: ``causal_lm_logprobs(head_dtype=float32)`` on
    its bf16 head, or its lm_head cast to float32 (as TRL's trainers cast it) without the flag.
    The log-probs and entropies equal float64 on the model's own bf16 hidden states to fp32
    accuracy (a bf16 head's logits are rounded to bf16), the head's gradient is float64's rounded
    once into its dtype, and the kernel gets the hidden state in bf16 (no fp32 copy of it)."""
    import pyalign.integrations.transformers as hf

    model = build_tiny_model("llama", tokenizer).to(DEVICE, torch.bfloat16)
    if head == "lm_head-in-fp32":
        model.lm_head.float()
    kwargs = dict(head_dtype=torch.float32) if head == "head_dtype" else {}
    seen, inner = [], hf.linear_token_logprobs

    def spy(hidden, weight, labels, **options):
        seen.append((hidden.dtype, weight.dtype, options.get("head_dtype")))
        return inner(hidden, weight, labels, **options)

    monkeypatch.setattr(hf, "linear_token_logprobs", spy)
    input_ids, attention_mask = _batch(len(tokenizer))
    out = causal_lm_logprobs(model, input_ids, attention_mask=attention_mask, entropy=True,
                             temperature=0.7, backend=backend, **kwargs)
    weight = model.lm_head.weight
    assert seen == [(torch.bfloat16, weight.dtype, kwargs.get("head_dtype"))]
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask
                             ).last_hidden_state[:, :-1]
    labels = input_ids[:, 1:]

    def objective(w):
        logp = ((hidden.double() @ w.t()) / 0.7).log_softmax(-1)
        logprobs = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return torch.stack([torch.where(out.mask, logprobs, 0), torch.where(out.mask, entropy, 0)])

    upstream = torch.randn(2, *labels.shape, device=DEVICE)
    expected, (exact_grad,) = grads64(objective, [weight], upstream)
    torch.testing.assert_close(out.logprobs.double(), expected[0], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out.entropy.double(), expected[1], rtol=1e-5, atol=2e-5)
    torch.autograd.backward([out.logprobs, out.entropy], list(upstream))
    assert weight.grad.dtype == weight.dtype
    bound = 1e-4 * exact_grad.abs() + 1e-5 * float(exact_grad.abs().max())
    assert_within_bound(weight.grad, exact_grad, bound, "lm_head")
    assert all(torch.isfinite(p.grad).all() for p in model.model.parameters() if p.grad is not None)


def test_add_fused_lm_head_cast_to_fp32_matches_trls_own(tokenizer):
    """``cast_lm_head_to_fp32=True`` on a bf16 model whose head stays bf16: TRL's own
    add_fused_lm_head runs the head in fp32 (hidden.float(), the weight upcast slice by slice),
    ours through the fp32 head (head_dtype): the same outputs to fp32 accuracy and the same
    bf16 gradients up to one rounding."""
    trl_utils = pytest.importorskip("trl.trainer.utils", reason="trl is not installed ([test] extra)")
    ours_model = build_tiny_model("llama", tokenizer).to(DEVICE, torch.bfloat16)
    trl_model = copy.deepcopy(ours_model)
    add_fused_lm_head(ours_model, temperature=0.8, cast_lm_head_to_fp32=True, outputs=ALL_OUTPUTS)
    trl_utils.add_fused_lm_head(trl_model, temperature=0.8, cast_lm_head_to_fp32=True,
                                outputs=ALL_OUTPUTS)
    input_ids, attention_mask = _batch(len(tokenizer))
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    outs = [model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                  fused_lm_head=True) for model in (ours_model, trl_model)]
    for field in FIELDS:
        got, want = (getattr(out, field) for out in outs)
        assert got.dtype == want.dtype, field
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=field)
    upstream = torch.randn_like(outs[0].log_probs)
    for out in outs:
        (out.loss + (out.log_probs * upstream).sum() + out.entropy.sum()).backward()
    got, want = _grads(ours_model), _grads(trl_model)
    assert got.keys() == want.keys() and "lm_head.weight" in got
    for name in want:  # bf16 gradients of fp32 sums that differ in order: one rounding apart
        torch.testing.assert_close(got[name], want[name], rtol=2 ** -7,
                                   atol=1e-5 * float(want[name].abs().max()), msg=name)


@pytest.mark.slow
def test_fsdp2_fully_shard_two_processes(tmp_path):
    """causal_lm_logprobs through FSDP2's hooks on a sharded model (DTensor head), in 2 gloo
    processes: tests/integrations/fsdp_worker.py checks forward and gradients."""
    import os

    from torchrun_helpers import run_torchrun
    run_torchrun(os.path.join(os.path.dirname(__file__), "fsdp_worker.py"), cwd=tmp_path,
                 env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_add_fused_lm_head_under_peft_with_the_head_adapted(tokenizer):
    """Patched before wrapping (as TRL's trainers do), the LoRA delta on lm_head is used: TRL
    1.16's own fused head reads lm_head.weight, the base weight, and misses it."""
    model = build_tiny_model("llama", tokenizer).to(DEVICE)
    add_fused_lm_head(model)
    config = peft.LoraConfig(r=4, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["q_proj", "lm_head"])
    model = peft.get_peft_model(model, config)
    input_ids, attention_mask = _batch(len(tokenizer))
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    fused = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                  fused_lm_head=True)
    want, _, mask = _reference(model, input_ids, attention_mask, labels, 1.0)
    assert torch.equal(fused.label_mask, mask)
    torch.testing.assert_close(fused.log_probs.double(), want, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ packed sequences

# Row 0 packs three sequences; row 1 two and right padding (3 tokens).
PACKED_LENGTHS = ((5, 7, 3), (6, 4))
PACKED_WIDTH = 15
# (arch, attention implementation): gemma2's soft-capped attention has no sdpa
PACKED_CASES = [(arch, impl) for arch in ("llama", "gpt2", "mistral", "qwen3", "gemma2")
                for impl in ("sdpa", "eager") if (arch, impl) != ("gemma2", "sdpa")]


def _packed_batch(vocab):
    """(input_ids, attention_mask, position_ids [2, 15], the sequences as (row, start, ids))."""
    input_ids = torch.zeros(2, PACKED_WIDTH, dtype=torch.long, device=DEVICE)
    position_ids, attention_mask = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    sequences = []
    for row, lengths in enumerate(PACKED_LENGTHS):
        start = 0
        for length in lengths:
            ids = torch.randint(3, vocab, (length,), device=DEVICE)
            input_ids[row, start:start + length] = ids
            position_ids[row, start:start + length] = torch.arange(length)
            attention_mask[row, start:start + length] = 1
            sequences.append((row, start, ids))
            start += length
    return input_ids, attention_mask, position_ids, sequences


def _scored_alone64(model64, sequences):
    """Each sequence's log-probs and entropies [len - 1] from float64 logits of it alone."""
    scored = []
    for _, _, ids in sequences:
        logp = model64(input_ids=ids[None]).logits[0, :-1].log_softmax(-1)
        scored.append((logp.gather(-1, ids[1:, None])[:, 0], -(logp.exp() * logp).sum(-1)))
    return scored


def _packed_error(model, tokenizer, upstream_seed=0):
    """Score a packed batch and every sequence alone (float64 copy of the model); return the
    largest log-prob / entropy difference, after checking which positions are labels, and
    backpropagate the same per-token upstream gradients through both."""
    model64 = copy.deepcopy(model).double()
    input_ids, attention_mask, position_ids, sequences = _packed_batch(len(tokenizer))
    out = causal_lm_logprobs(model, input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, entropy=True)
    want_mask = torch.zeros(2, PACKED_WIDTH - 1, dtype=torch.bool, device=DEVICE)
    error, packed_sum, alone_sum = 0.0, 0.0, 0.0
    generator = torch.Generator(device=DEVICE).manual_seed(upstream_seed)
    for (row, start, ids), (logprobs, entropy) in zip(sequences, _scored_alone64(model64, sequences)):
        labels = slice(start, start + len(ids) - 1)  # label j scores token j + 1
        want_mask[row, labels] = True
        for got, want in ((out.logprobs[row, labels], logprobs), (out.entropy[row, labels], entropy)):
            error = max(error, float((got.detach().double() - want.detach()).abs().max()))
            upstream = torch.randn(want.shape, generator=generator, device=DEVICE, dtype=torch.float64)
            packed_sum = packed_sum + (got * upstream.float()).sum()
            alone_sum = alone_sum + (want * upstream).sum()
    assert torch.equal(out.mask, want_mask)  # no label at a boundary or in the padding
    assert bool((out.logprobs[~want_mask] == 0).all() and (out.entropy[~want_mask] == 0).all())
    packed_sum.backward()
    alone_sum.backward()
    return error, model64


@pytest.mark.parametrize("arch,impl", PACKED_CASES)
def test_packed_sequences_score_as_if_alone(arch, impl, tokenizer):
    model = build_tiny_model(arch, tokenizer).to(DEVICE)
    model.config._attn_implementation = impl
    error, model64 = _packed_error(model, tokenizer)
    assert error < 2e-5, error
    _assert_grads_close(model, model64, atol=5e-5)


def test_packing_left_to_the_model_mixes_the_sequences(tokenizer, monkeypatch):
    """The check above catches attention that crosses sequences: transformers 5.25's sdpa given
    the packed position_ids with an attention mask (its packed detection is off then) is far
    from each sequence alone."""
    monkeypatch.setattr(packing, "decoder_inputs", lambda config, input_ids, attention_mask,
                        position_ids: packing.DecoderInputs(
                            {"input_ids": input_ids, "attention_mask": attention_mask,
                             "position_ids": position_ids}, lambda output: output))
    model = build_tiny_model("llama", tokenizer).to(DEVICE)
    model.config._attn_implementation = "sdpa"
    error, _ = _packed_error(model, tokenizer)
    assert error > 1e-2, error


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_flash_attention_route_flattens_the_rows(arch, tokenizer, monkeypatch):
    """The flash-attention route (one row of every row's real tokens, hidden states scattered
    back), run here through transformers 5.25's own sdpa / eager packed masking of one row with
    no attention mask and no cache (flash-attn is not installed): each sequence as alone."""
    monkeypatch.setattr(packing, "attention_route", lambda implementation: "flatten")
    model = build_tiny_model(arch, tokenizer).to(DEVICE)
    model.config._attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    error, model64 = _packed_error(model, tokenizer)
    assert error < 2e-5, error
    _assert_grads_close(model, model64, atol=5e-5)


@pytest.mark.parametrize("fused_linear", [True, False])
@pytest.mark.parametrize("arch,impl", [("llama", "sdpa"), ("gemma2", "eager")])
def test_padding_free_scorer_equals_padded_rows(arch, impl, fused_linear, tokenizer):
    from pyalign.trainers.scoring import ResponseScorer
    model = build_tiny_model(arch, tokenizer).to(DEVICE)
    model.config._attn_implementation = impl
    vocab = len(tokenizer)
    prompts = torch.randint(3, vocab, (3, 5), device=DEVICE)
    responses = torch.randint(3, vocab, (3, 6), device=DEVICE)
    prompts[1, :2], prompts[2, :4] = -100, -100  # left-padded prompts, right-padded responses
    responses[0, 4:], responses[2, 1:] = -100, -100
    mask = responses >= 0
    padded = ResponseScorer(model, fused_linear=fused_linear, temperature=0.7)
    free = ResponseScorer(model, fused_linear=fused_linear, temperature=0.7, padding_free=True)
    want_logprobs, want_entropy = padded(prompts, responses, mask, entropy=True)
    logprobs, entropy = free(prompts, responses, mask, entropy=True)
    torch.testing.assert_close(logprobs, want_logprobs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, atol=2e-5, rtol=1e-5)
    assert bool((logprobs[~mask] == 0).all())
    prompts[1] = -100
    with pytest.raises(ValueError, match="needs a prompt token in every row"):
        free(prompts, responses, mask)


def test_packed_refusals_are_named_before_the_model_runs(tokenizer, monkeypatch):
    model = build_tiny_model("mistral", tokenizer).to(DEVICE)
    input_ids, attention_mask, position_ids, _ = _packed_batch(len(tokenizer))

    def score(**overrides):
        return causal_lm_logprobs(model, input_ids, **{"attention_mask": attention_mask,
                                                        "position_ids": position_ids, **overrides})

    monkeypatch.setattr(type(model.model), "forward", lambda *a, **k: pytest.fail("the model ran"))
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="need attn_implementation sdpa, eager or a flash"):
        score()
    model.config._attn_implementation = "sdpa"
    monkeypatch.setattr(model.config, "sliding_window", 6)
    with pytest.raises(ValueError, match="a sequence of 7 tokens is longer than the model's "
                                         r"sliding_window \(6\)"):
        score()
    monkeypatch.setattr(model.config, "sliding_window", None)
    monkeypatch.setattr(model.config, "layer_types", ["full_attention", "linear_attention"],
                        raising=False)
    with pytest.raises(ValueError, match=r"\['linear_attention'\] layers"):
        score()
    monkeypatch.setattr(packing, "attention_route", lambda implementation: "flatten")
    monkeypatch.setattr(model.config, "layer_types", None)
    shifted = position_ids.clone()
    shifted[1, :6] += 2  # row 1 starts mid-sequence: it cannot be flattened after row 0
    with pytest.raises(ValueError, match="each row must start a sequence"):
        score(position_ids=shifted)
    with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
        score(position_ids=position_ids.float())
    with pytest.raises(ValueError, match=r"position_ids must be \[B, T\] or \[1, T\]"):
        score(position_ids=position_ids[:, :4])
    with pytest.raises(ValueError, match="position_ids must be >= 0"):
        score(position_ids=position_ids - 1)
