"""The policy_loss row of `pyalign bench` (pyalign/bench/policy.py): it runs at the quick size,
every CPU backend of the family is a row, and pyalign's loss equals the eager TRL formula the
case times against (so the rows do the same work)."""
import json

import torch

import pyalign
from pyalign import backends, cli
from pyalign.bench.policy import naive_grpo_loss


def test_policy_case_runs_with_every_cpu_backend(tmp_path):
    json_path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--no-compile", "--no-progress",
                   "--reps", "1", "--threads", "1", "--cases", "policy", "--json", str(json_path)])
    assert rc == 0
    (case,) = json.loads(json_path.read_text())["cases"]
    rows = {row["name"]: row for row in case["rows"]}
    assert rows["eager GRPO formula (TRL's)"]["status"] == "ok"
    for name in backends.available("policy", "cpu"):
        if name != "triton":
            assert rows[f"pyalign policy_loss grpo [{name}]"]["status"] == "ok"


def test_the_timed_rows_compute_the_same_loss():
    logprobs = -torch.rand(6, 20) * 4
    old, ref = logprobs + 0.3 * torch.randn(6, 20), logprobs + 0.5 * torch.randn(6, 20)
    advantages = torch.randn(6)
    mask = torch.arange(20)[None, :] < torch.randint(5, 21, (6,))[:, None]
    want = naive_grpo_loss(logprobs, old, ref, advantages, mask.float(), 0.04)
    got = pyalign.policy_loss(logprobs, old, advantages, mask, loss_type="grpo", ref_logprobs=ref,
                              beta=0.04).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
