"""TRL 1.16's own CPOTrainer (loss_type "sigmoid" = CPO, "simpo" = SimPO / CPO-SimPO, with
cpo_alpha, simpo_gamma, label_smoothing) and ORPOTrainer loss code against pyalign's
reference-free losses on the same logits: the loss (TRL's ``get_batch_loss_metrics``: its
concatenated forward, get_batch_logps, NLL and cpo_loss / odds_ratio_loss), its gradient, and the
rewards TRL logs. pyalign is ``loss=["cpo" | "simpo" | "orpo", "sft"]`` with the NLL's weight,
through token_preference_loss on every backend and linear_preference_loss's 3-matmul path.

The trainers are built without ``__init__`` (which needs a model, a dataset and an accelerator):
their loss methods read the config attributes set here, and a stand-in model returns the given
logits. TRL's numbers, not a re-derivation.

ORPO's NLL in TRL runs over the prompt tokens too (the official code's; the paper's L_SFT is the
response's), pyalign's over the response: with one prompt token, which nothing predicts, the two
are the same tokens; tests/ops/test_preference_reference_free.py checks the rest."""
import types
import warnings

import pytest
import torch

import pyalign
from support import DEVICE, ON_CPU, backends_for

trl = pytest.importorskip("trl", reason="trl is not installed ([test] extra)")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL's experimental-API warning
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

BACKENDS = backends_for("preference")
LINEAR_BACKENDS = backends_for("linear_logprobs")
IGNORE = -100


def trl_trainer(cls, **config):
    trainer = cls.__new__(cls)
    accelerator = types.SimpleNamespace(device=DEVICE, gather_for_metrics=lambda x: x)
    attributes = dict(accelerator=accelerator, aux_loss_enabled=False, is_encoder_decoder=False,
                      pad_token_id=0, padding_value=0, alpha=0.0, **config)
    for name, value in attributes.items():
        object.__setattr__(trainer, name, value)
    return trainer


def token_batch(pairs, prompt=1, tokens=9, vocab=17, seed=0):
    """TRL's tokenized pairs: input ids [B, L] per side (prompt + completion + padding), their
    attention masks and labels (-100 on the prompt and the padding)."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(1, vocab, (pairs, tokens), generator=generator)
        ends = torch.randint(prompt + 2, tokens + 1, (pairs, 1), generator=generator)
        attention = (torch.arange(tokens) < ends).long()
        labels = torch.where(attention.bool(), ids, IGNORE)
        labels[:, :prompt] = IGNORE
        batch.update({f"{side}_input_ids": torch.where(attention.bool(), ids, 0),
                      f"{side}_attention_mask": attention, f"{side}_labels": labels})
    return batch


def trl_run(cls, logits, batch, **config):
    """(loss, metrics) of TRL's get_batch_loss_metrics; ``logits`` [2B, L, V], chosen rows first."""
    trainer = trl_trainer(cls, **config)
    model = lambda *args, **kwargs: types.SimpleNamespace(logits=logits)  # noqa: E731
    return trainer.get_batch_loss_metrics(model, batch)


def shifted(batch):
    """pyalign's inputs of the same batch: labels[:, 1:] (the token each position predicts)."""
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    return labels[:, 1:]


def ours_from_logits(logits, labels, backend, **loss_kwargs):
    vocab = logits.shape[-1]
    token_logps = pyalign.token_logprobs(logits[:, :-1].reshape(-1, vocab), labels.reshape(-1),
                                         ignore_index=IGNORE).view(labels.shape)
    return pyalign.token_preference_loss(token_logps, None, labels != IGNORE, backend=backend,
                                         **loss_kwargs)


CPO_CASES = [  # TRL config -> pyalign's loss
    (dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0, label_smoothing=0.0, simpo_gamma=0.5),
     dict(loss=["cpo", "sft"], loss_weights=[1.0, 1.0], beta=0.1)),
    (dict(loss_type="sigmoid", beta=0.5, cpo_alpha=0.3, label_smoothing=0.1, simpo_gamma=0.5),
     dict(loss=["cpo", "sft"], loss_weights=[1.0, 0.3], beta=0.5, label_smoothing=0.1)),
    (dict(loss_type="sigmoid", beta=0.2, cpo_alpha=0.0, label_smoothing=0.0, simpo_gamma=0.5),
     dict(loss="cpo", beta=0.2)),
    (dict(loss_type="simpo", beta=2.0, cpo_alpha=0.0, label_smoothing=0.0, simpo_gamma=0.5),
     dict(loss="simpo", beta=2.0, simpo_gamma=0.5, average_log_prob=True)),
    (dict(loss_type="simpo", beta=2.5, cpo_alpha=0.0, label_smoothing=0.2, simpo_gamma=1.4),
     dict(loss="simpo", beta=2.5, simpo_gamma=1.4, label_smoothing=0.2)),  # sums: the same loss
    (dict(loss_type="simpo", beta=1.0, cpo_alpha=0.5, label_smoothing=0.0, simpo_gamma=0.5),
     dict(loss=["simpo", "sft"], loss_weights=[1.0, 0.5], beta=1.0, simpo_gamma=0.5,
          average_log_prob=True)),
]
CPO_IDS = ["cpo", "cpo-alpha-smoothing", "cpo-no-nll", "simpo", "simpo-gamma-smoothing",
           "cpo-simpo"]
ORPO_CASES = [(dict(beta=0.1), dict(loss=["orpo", "sft"], beta=0.1, average_log_prob=True)),
              (dict(beta=1.5), dict(loss=["orpo", "sft"], beta=1.5))]  # sums: the same loss


def case_params(backends, linear=False):
    """Every case on every backend; the Triton interpreter (slow) on the linear path: CPO and
    ORPO, its two pair-math branches."""
    params = []
    for backend in backends:
        slow = linear and backend == "triton" and ON_CPU
        cases = ([(CPOTrainer, *case, name) for case, name in zip(CPO_CASES, CPO_IDS)]
                 + [(ORPOTrainer, *case, f"orpo-{case[0]['beta']}") for case in ORPO_CASES])
        for cls, trl_config, ours, name in cases:
            if not slow or name in ("cpo", "orpo-0.1"):
                params.append(pytest.param(backend, cls, trl_config, ours, id=f"{backend}-{name}"))
    return params


@pytest.mark.parametrize("backend,cls,trl_config,ours", case_params(BACKENDS))
@pytest.mark.parametrize("pairs", [1, 4])
def test_token_preference_loss_is_trls(backend, cls, trl_config, ours, pairs):
    batch = token_batch(pairs)
    logits = torch.randn(2 * pairs, 9, 17, generator=torch.Generator(device=DEVICE).manual_seed(pairs)) * 2
    trl_leaf = logits.clone().requires_grad_(True)
    expected, metrics = trl_run(cls, trl_leaf, batch, **trl_config)
    expected.backward()
    leaf = logits.clone().requires_grad_(True)
    out = ours_from_logits(leaf, shifted(batch), backend, **ours)
    out.loss.backward()
    assert torch.isfinite(expected) and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, expected.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad, trl_leaf.grad, rtol=2e-5, atol=1e-7)
    # TRL's rewards are beta times the log-probs it scores: per-token means for simpo and orpo
    trl_averages = cls is ORPOTrainer or trl_config["loss_type"] == "simpo"
    if trl_averages == ours.get("average_log_prob", False):
        for name, value in (("chosen", out.chosen_rewards), ("rejected", out.rejected_rewards)):
            torch.testing.assert_close(value.mean().item(), float(metrics[f"rewards/{name}"]),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,cls,trl_config,ours", case_params(LINEAR_BACKENDS, linear=True))
def test_linear_preference_loss_is_trls(backend, cls, trl_config, ours):
    """From hidden states: the 3-matmul path (no reference, sft's chunk shares) on logits
    hidden @ W^T, TRL on the same logits."""
    pairs, generator = 3, torch.Generator(device=DEVICE).manual_seed(5)
    batch = token_batch(pairs, tokens=7, vocab=13, seed=1)
    hidden = torch.randn(2 * pairs, 7, 6, generator=generator)
    weight = torch.randn(13, 6, generator=generator)
    trl_leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    expected, _ = trl_run(cls, trl_leaves[0] @ trl_leaves[1].t(), batch, **trl_config)
    expected.backward()
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    out = pyalign.linear_preference_loss(leaves[0][:, :-1], leaves[1], shifted(batch),
                                         chunk_size=4, backend=backend, **ours)
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected.detach(), rtol=2e-5, atol=1e-6)
    for leaf, trl_leaf in zip(leaves, trl_leaves, strict=True):
        torch.testing.assert_close(leaf.grad, trl_leaf.grad, rtol=1e-4, atol=1e-6)


def test_trls_orpo_nll_counts_the_prompt_tokens():
    """With a prompt of 3 tokens TRL's ORPO NLL also runs over the 2 prompt tokens that the
    model predicts; pyalign's is the response's, as CPO's (and SimPO's paper): the difference
    is exactly TRL's cross-entropy over prompt + response minus ours over the response."""
    batch = token_batch(2, prompt=3)
    logits = torch.randn(4, 9, 17, generator=torch.Generator(device=DEVICE).manual_seed(3))
    trl_loss, metrics = trl_run(ORPOTrainer, logits, batch, beta=0.1)
    labels = shifted(batch)
    out = ours_from_logits(logits, labels, "auto", loss=["orpo", "sft"], beta=0.1)
    full_labels = torch.where(batch["chosen_attention_mask"].bool(), batch["chosen_input_ids"],
                              IGNORE)[:, 1:]
    full_nll = torch.nn.functional.cross_entropy(logits[:2, :-1].reshape(-1, 17),
                                                 full_labels.reshape(-1), ignore_index=IGNORE)
    assert float(metrics["nll_loss"]) == pytest.approx(float(full_nll), rel=1e-6)
    response_nll = torch.nn.functional.cross_entropy(logits[:2, :-1].reshape(-1, 17),
                                                     labels[:2].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(out.loss - response_nll, trl_loss - full_nll, rtol=1e-5, atol=1e-6)
