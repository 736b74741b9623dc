"""The policy_loss row of `pyalign bench` (pyalign/bench/policy.py): it runs at the quick size,
every CPU backend of the family is a row (with and without the rollout correction), and
pyalign's loss equals the eager TRL formula the case times against (so the rows do the same
work)."""
import importlib.util
import json

import torch

import pyalign
from pyalign import backends, cli
from pyalign.bench.policy import naive_grpo_is_loss, naive_grpo_loss


def test_policy_case_runs_with_every_cpu_backend(tmp_path):
    json_path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--no-compile", "--no-progress",
                   "--reps", "1", "--threads", "1", "--cases", "policy", "--json", str(json_path)])
    assert rc == 0
    (case,) = json.loads(json_path.read_text())["cases"]
    rows = {row["name"]: row for row in case["rows"]}
    assert rows["eager GRPO formula (TRL's)"]["status"] == "ok"
    assert rows["eager GRPO + sequence_mask IS (TRL's)"]["status"] == "ok"
    for name in backends.available("policy", "cpu"):
        if name != "triton":
            assert rows[f"pyalign policy_loss grpo [{name}]"]["status"] == "ok"
            assert rows[f"pyalign policy_loss grpo + rollout IS [{name}]"]["status"] == "ok"


def test_the_timed_rows_compute_the_same_loss():
    logprobs = -torch.rand(6, 20) * 4
    old, ref = logprobs + 0.3 * torch.randn(6, 20), logprobs + 0.5 * torch.randn(6, 20)
    advantages = torch.randn(6)
    mask = torch.arange(20)[None, :] < torch.randint(5, 21, (6,))[:, None]
    want = naive_grpo_loss(logprobs, old, ref, advantages, mask.float(), 0.04)
    got = pyalign.policy_loss(logprobs, old, advantages, mask, loss_type="grpo", ref_logprobs=ref,
                              beta=0.04).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    rollout = old + 0.4 * torch.randn(6, 20)  # some rows above the clip: masked
    want = naive_grpo_is_loss(logprobs, old, ref, rollout, advantages, mask.float(), 0.04)
    got = pyalign.policy_loss(logprobs, old, advantages, mask, loss_type="grpo", ref_logprobs=ref,
                              rollout_logprobs=rollout, beta=0.04).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_linear_policy_rows_compute_the_same_loss():
    """linear_policy's rows (eager full logits, Liger's LigerFusedLinearGRPOLoss, pyalign's
    3-matmul path) do the same work: GRPO with TRL's bias-corrected k3 KL, one value."""
    from pyalign.bench.policy import naive_linear_grpo_loss
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 7, 16, generator=generator)
    weight = torch.randn(50, 16, generator=generator) / 4
    mask = torch.arange(7)[None, :] < torch.tensor([7, 4, 2])[:, None]
    safe_labels = torch.randint(0, 50, (3, 7), generator=generator)
    labels = safe_labels.masked_fill(~mask, -100)
    old = -torch.rand(3, 7, generator=generator) * 4
    ref = -torch.rand(3, 7, generator=generator) * 4
    advantages = torch.randn(3, generator=generator)
    want = naive_linear_grpo_loss(hidden, weight, safe_labels, old, ref, advantages, mask.float())
    ours = pyalign.linear_policy_loss(hidden.requires_grad_(True), weight, labels, advantages, old,
                                      ref, beta=0.04).loss
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    if importlib.util.find_spec("liger_kernel") is None:
        return  # a benchmark peer, not a dependency: CI's [test] venv has no Liger (no Liger row)
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    liger = LigerFusedLinearGRPOLoss(beta=0.04, loss_type="grpo", compiled=False,
                                     use_bias_correction_kl=True)(
        hidden, weight, safe_labels, mask.long(), advantages, ref_per_token_logps=ref,
        old_per_token_logps=old)
    torch.testing.assert_close(liger[0] if isinstance(liger, tuple) else liger, want, rtol=1e-5,
                               atol=1e-6)
