"""TRL 1.16's own DPO loss code against pyalign.token_preference_loss on the same per-token
log-probs: the loss and its gradient for every loss_type, loss combinations with weights, every
f_divergence_type, ld_alpha and WPO weighting, on every backend.

Building a DPOTrainer needs a model, a dataset and an accelerator, so the test compiles the body
of ``DPOTrainer._compute_loss`` from TRL's installed source file, unchanged,
and calls it with a stand-in ``self`` (the config attributes, an accelerator that gathers
nothing) and a stand-in model whose forward returns the given per-token log-probs (0 at
non-completion positions, as TRL's fused LM head gives). TRL's numbers, not a re-derivation.
"""
import ast
import collections
import contextlib
import math
import pathlib
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import pyalign
from support import backends_for

trl = pytest.importorskip("trl", reason="trl is not installed ([test] extra)")

BACKENDS = backends_for("preference")


def _load_trl_compute_loss():
    source = pathlib.Path(trl.__file__).parent / "trainer" / "dpo_trainer.py"
    tree = ast.parse(source.read_text())
    trainer = next(node for node in tree.body
                   if isinstance(node, ast.ClassDef) and node.name == "DPOTrainer")
    method = next(node for node in trainer.body
                  if isinstance(node, ast.FunctionDef) and node.name == "_compute_loss")
    namespace = dict(torch=torch, F=F, math=math, warnings=warnings, contextlib=contextlib,
                     is_peft_model=lambda model: False,
                     disable_gradient_checkpointing=lambda *args, **kwargs: contextlib.nullcontext())
    exec(compile(ast.Module(body=[method], type_ignores=[]), str(source), "exec"), namespace)
    return namespace["_compute_loss"]


TRL_COMPUTE_LOSS = _load_trl_compute_loss()


def trl_loss(policy_tokens, ref_tokens, mask, *, loss_types, loss_weights=None, beta=0.1,
             label_smoothing=0.0, f_divergence="reverse_kl", alpha=0.5, ld_alpha=None,
             log_sum_sq_probs=None):
    """TRL's _compute_loss on per-token log-probs [2B, T] and the completion mask [2B, T] (TRL's
    shifted completion mask; its unshifted one gets a prompt token in front)."""
    rows, tokens = mask.shape

    def outputs(log_probs):
        return types.SimpleNamespace(
            log_probs=log_probs, entropy=torch.zeros(rows, tokens),
            mean_logits=torch.zeros(rows, tokens), is_top1=torch.zeros(rows, tokens, dtype=torch.bool),
            log_sum_sq_probs=log_sum_sq_probs)

    completion_mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), mask.long()], dim=1)
    inputs = dict(input_ids=torch.ones(rows, tokens + 1, dtype=torch.long),
                  attention_mask=torch.ones(rows, tokens + 1, dtype=torch.long),
                  completion_mask=completion_mask)
    this = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                          gather=lambda x: x),
        aux_loss_enabled=False, precompute_ref_logps=False,
        ref_model=lambda **kwargs: outputs(ref_tokens),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
        loss_types=list(loss_types), loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence,
        f_alpha_divergence_coef=alpha, ld_alpha=ld_alpha, use_weighting=log_sum_sq_probs is not None,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    return TRL_COMPUTE_LOSS(this, lambda **kwargs: outputs(policy_tokens), inputs, False)


def token_case(pairs, tokens=9):
    """Per-token log-probs (0 off the completion, as TRL's head gives), a prompt, padding, a
    rejected row without completion tokens (when there are 2+ pairs) and different lengths."""
    mask = torch.ones(2 * pairs, tokens, dtype=torch.bool)
    mask[:, :2] = False
    lengths = torch.randint(1, tokens - 2, (2 * pairs,))
    mask &= torch.arange(tokens) < (2 + lengths)[:, None]
    if pairs > 1:
        mask[pairs + 1] = False
    policy = torch.where(mask, -3 * torch.rand(2 * pairs, tokens), 0.0)
    ref = torch.where(mask, policy + 0.4 * torch.randn(2 * pairs, tokens), 0.0)
    log_sum_sq_probs = torch.where(mask, -0.5 - torch.rand(2 * pairs, tokens), 0.0)
    return policy, ref, mask, log_sum_sq_probs


def check_against_trl(backend, pairs, loss_types, *, loss_weights=None, label_smoothing=0.0,
                      f_divergence="reverse_kl", alpha=0.5, ld_alpha=None, weighting=False,
                      beta=0.1):
    policy, ref, mask, log_sum_sq_probs = token_case(pairs)
    lss = log_sum_sq_probs if weighting else None
    trl_leaf = policy.clone().requires_grad_(True)
    expected = trl_loss(trl_leaf, ref, mask, loss_types=loss_types, loss_weights=loss_weights,
                        beta=beta, label_smoothing=label_smoothing, f_divergence=f_divergence,
                        alpha=alpha, ld_alpha=ld_alpha, log_sum_sq_probs=lss)
    expected.backward()
    leaf = policy.clone().requires_grad_(True)
    out = pyalign.token_preference_loss(
        leaf, ref, mask, loss=list(loss_types), loss_weights=loss_weights, beta=beta,
        label_smoothing=label_smoothing, f_divergence=f_divergence, f_alpha_divergence_coef=alpha,
        ld_alpha=ld_alpha, use_weighting=weighting, log_sum_sq_probs=lss, backend=backend)
    out.loss.backward()
    assert torch.isfinite(expected) and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, expected.detach(), rtol=2e-5, atol=1e-6)
    # off the completion TRL's stand-in log-probs are leaves it sums unmasked; its real head
    # gives them no gradient, ours selects them away
    torch.testing.assert_close(leaf.grad[mask], trl_leaf.grad[mask], rtol=2e-5, atol=1e-6)
    assert torch.all(leaf.grad[~mask] == 0)


# TRL's sigmoid and sigmoid_norm ignore label_smoothing (ours apply cDPO): 0 there
SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.2}


# TRL's DPOTrainer loss types: every pairwise loss but those of its CPOTrainer and ORPOTrainer
# (tests/ops/test_preference_trl_cpo.py)
DPO_LOSS_TYPES = [name for name in pyalign.losses.PAIRWISE_NAMES if name not in ("simpo", "cpo", "orpo")]


@pytest.mark.parametrize("pairs", [1, 3, 5])
@pytest.mark.parametrize("loss", DPO_LOSS_TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_loss_type_is_trls(backend, loss, pairs):
    check_against_trl(backend, pairs, [loss], label_smoothing=SMOOTHING.get(loss, 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_types,weights", [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
    (["ipo", "aot", "apo_zero"], None),
    (["sigmoid_norm", "sft", "discopop", "nca_pair"], [0.5, 2.0, 0.0, 1.5]),
], ids=["mpo", "ipo-aot-apo", "four"])
def test_combinations_are_trls(backend, loss_types, weights):
    check_against_trl(backend, 4, loss_types, loss_weights=weights)


F_CASES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
           ("alpha_divergence", 1.0), ("alpha_divergence", 1.7), ("alpha_divergence", -0.5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("f_divergence,alpha", F_CASES, ids=[f"{f}-{a}" for f, a in F_CASES])
@pytest.mark.parametrize("loss_types", [["sigmoid"], ["ipo"], ["hinge"], ["sigmoid_norm"],
                                        ["robust", "exo_pair", "discopop", "sft"]], ids="-".join)
def test_f_divergences_are_trls(backend, loss_types, f_divergence, alpha):
    smoothing = 1e-3 if "exo_pair" in loss_types else 0.0
    check_against_trl(backend, 3, loss_types, f_divergence=f_divergence, alpha=alpha,
                      label_smoothing=smoothing, beta=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("loss_types", [["sigmoid"], ["aot", "sft"], ["sigmoid_norm", "ipo"]],
                         ids="-".join)
def test_ld_alpha_is_trls(backend, loss_types, ld_alpha):
    check_against_trl(backend, 4, loss_types, ld_alpha=ld_alpha)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_types", [["sigmoid"], ["ipo", "bco_pair"], ["sigmoid_norm"]],
                         ids="-".join)
@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_wpo_weighting_is_trls(backend, loss_types, ld_alpha):
    check_against_trl(backend, 3, loss_types, weighting=True, ld_alpha=ld_alpha)


def test_trl_sft_with_weighting_fails_where_ours_weights_the_pairs():
    """TRL 1.16 multiplies sft's expanded (stride-0) per-sequence loss in place: it raises. Ours
    weights each pair's copy of the batch NLL: the mean of w_pair times the NLL."""
    policy, ref, mask, log_sum_sq_probs = token_case(3)
    with pytest.raises(RuntimeError):
        trl_loss(policy.clone().requires_grad_(True), ref, mask, loss_types=["sft"],
                 log_sum_sq_probs=log_sum_sq_probs)
    out = pyalign.token_preference_loss(policy, ref, mask, loss="sft", use_weighting=True,
                                        log_sum_sq_probs=log_sum_sq_probs, reduction="none")
    nll = -policy[:3][mask[:3]].double().sum() / mask[:3].sum()
    kept = mask.double()
    weights = torch.exp(((policy.double() - log_sum_sq_probs.double()) * kept).sum(-1)
                        / kept.sum(-1).clamp(min=1))
    torch.testing.assert_close(out.loss.double(), nll * weights[:3] * weights[3:], rtol=1e-5,
                               atol=1e-7)
