"""The C++ policy ops (torch.ops.pyalign_C.policy_*, csrc/cpu/policy.cpp) called directly: the
``_out`` variants write every element of NaN-poisoned buffers and equal the allocating ops, for
every policy-term branch and ratio level; and the ops' own input checks. Values and gradients
through the public API are tested in tests/ops/test_policy.py."""
import pytest
import torch

from pyalign import losses
from support import poison_

TERMS = sorted(set(losses.policy_kernel_ids().values()))
LEVELS = ["token", "sequence", "sequence_sum"]


def case(rows=5, length=13):
    logprobs = -torch.rand(rows, length) * 3
    old = logprobs + torch.randn(rows, length) * 0.4
    ref = logprobs + torch.randn(rows, length) * 0.4
    mask = torch.rand(rows, length) > 0.3
    mask[-1] = False
    entropy_mask = mask & (torch.rand(rows, length) > 0.4)
    advantages = torch.randn(rows, 1).expand(rows, length).contiguous()  # the ops take them per token
    return logprobs, old, advantages, mask, entropy_mask, ref, torch.rand(rows, length)


@pytest.mark.parametrize("term_id", TERMS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("rollout", [False, True], ids=["plain", "rollout-weights"])
def test_out_variants_write_every_element(cpu_ops, term_id, level, rollout):
    logprobs, old, adv, mask, emask, ref, entropy = case()
    params = losses.PolicyParams(epsilon_high=1.3 if term_id == 1 else 0.28, delta=1.6).as_list()
    # the rollout correction's per-token weights (some 0) and per-row sampler log-weights
    policy_weights = (torch.rand(5, 13) * (torch.rand(5, 13) > 0.2)) if rollout else None
    log_weights = torch.randn(5) if rollout else None
    args = (logprobs, old, adv, mask, emask, ref, entropy, policy_weights, log_weights, term_id,
            level, params, 3, True)
    stats = poison_(torch.empty(5, len(losses.POLICY_ROW_STATS)))
    cpu_ops.policy_forward_out(*args, stats)
    assert torch.isfinite(stats).all() and torch.equal(stats, cpu_ops.policy_forward(*args))
    weights, entropy_weights = torch.rand(5), torch.rand(5)
    back = (weights, entropy_weights, logprobs, old, adv, mask, emask, ref, policy_weights,
            log_weights, term_id, level, params, 0.04, 3, True)
    grad, grad_entropy = poison_(torch.empty(5, 13)), poison_(torch.empty(5, 13))
    cpu_ops.policy_backward_out(*back, grad, grad_entropy)
    assert torch.isfinite(grad).all() and torch.isfinite(grad_entropy).all()
    allocated = cpu_ops.policy_backward(*back)
    assert torch.equal(grad, allocated[0]) and torch.equal(grad_entropy, allocated[1])
    assert torch.all(grad[~mask] == 0) and torch.all(grad_entropy[~emask] == 0)


@pytest.mark.parametrize("change,match", [
    (dict(term_id=7), "term id"),
    (dict(level="row"), "level"),
    (dict(old=torch.zeros(5, 13, dtype=torch.float64)), "old_logprobs"),
    (dict(mask=torch.ones(5, 13)), "mask"),
    (dict(params=[0.2]), "9 floats"),
    (dict(policy_weights=torch.ones(5, 12)), "policy_weights"),
    (dict(log_weights=torch.ones(4)), "sampler_log_weights"),
])
def test_ops_check_their_inputs(cpu_ops, change, match):
    logprobs, old, adv, mask, emask, ref, entropy = case()
    args = dict(logprobs=logprobs, old=old, adv=adv, mask=mask, emask=None, ref=None, entropy=None,
                policy_weights=None, log_weights=None, term_id=0, level="token",
                params=losses.PolicyParams().as_list(), estimator=3, bias=True)
    with pytest.raises(RuntimeError, match=match):
        cpu_ops.policy_forward(*{**args, **change}.values())


def test_the_row_stat_count_is_checked_at_load(cpu_ops):
    """The extension's count of row stats (csrc/common/policy_stats.h) is the registry's; a
    mismatch makes the cpu policy backend unavailable, saying why."""
    from types import SimpleNamespace

    from pyalign import _cpp_backend

    assert cpu_ops.policy_num_stats() == len(losses.POLICY_ROW_STATS)
    stale = SimpleNamespace(policy_num_stats=lambda: len(losses.POLICY_ROW_STATS) - 1)
    with pytest.raises(RuntimeError, match="C\\+\\+ policy kernels write 11 row stats.*names 12"):
        _cpp_backend._make_policy(stale)
