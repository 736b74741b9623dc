"""pyalign.integrations.transformers on tiny Hugging Face models: causal_lm_logprobs against the
model's own logits (a copy of the model, log_softmax in float64, gathered), forward and the
parameter gradients of per-token upstream gradients, on every architecture of hf_models; PEFT;
the refusals; add_fused_lm_head against TRL's own add_fused_lm_head."""
import copy

import peft
import pytest
import torch
from torch import nn

from hf_models import ARCHITECTURES, build_tiny_model, train_tokenizer
from pyalign.integrations.transformers import (
    UnsupportedHeadError,
    add_fused_lm_head,
    causal_lm_logprobs,
    remove_fused_lm_head,
)
from support import DEVICE, backends_for

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


@pytest.mark.slow
def test_fsdp2_fully_shard_two_processes(tmp_path):
    """causal_lm_logprobs through FSDP2's hooks on a sharded model (DTensor head), in 2 gloo
    processes: tests/integrations/fsdp_worker.py checks forward and gradients."""
    import os
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           worker]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


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
