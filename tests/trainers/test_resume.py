"""A run interrupted at step k and resumed with ``--resume`` logs exactly the numbers of an
uninterrupted run (every metric except wall-clock timings, compared bit for bit), for a
trust-region preference algorithm and for RLOO with Elastic Reset and an adaptive KL."""
import os

import pytest
from trainer_helpers import read_records, run_cli, strip_timing, write_config

CASES = {
    # TR updates at steps 2 and 4 straddle the interruption at 3; 2 micro-batches per step; the
    # 24-example dataset wraps into a second epoch.
    "tr-dpo": dict(batch_size=8, micro_batch_size=4, num_examples=24, tr_tau=2, tr_alpha=0.5,
                   lr=0.01, eval_batch_size=8, final_eval_batch_size=8),
    # resets at steps 2 and 4; the adaptive KL coefficient is part of the checkpointed state.
    "elastic-reset": dict(batch_size=4, micro_batch_size=2, samples_per_prompt=3, er_reset_every=2,
                          er_ema_decay=0.5, kl_target=0.2, kl_horizon=50, kl_estimator="k3",
                          lr=0.01, eval_batch_size=4, final_eval_batch_size=4),
}


@pytest.mark.parametrize("algo", sorted(CASES))
def test_resume_matches_uninterrupted_run(tmp_path, task_cache_dir, algo):
    config = write_config(tmp_path / "run.toml", task_cache_dir, algo=algo, **CASES[algo])
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    assert run_cli("--config", config, "--steps", 5, "--out", straight) == 0
    assert run_cli("--config", config, "--steps", 3, "--out", pieces) == 0
    assert os.path.exists(pieces / "checkpoints" / "step-000003.pt")
    assert run_cli("--config", config, "--steps", 5, "--out", pieces, "--resume") == 0

    expected = [strip_timing(r) for r in read_records(straight)]
    resumed = [strip_timing(r) for r in read_records(pieces)]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 5]  # the step-3 "final" record is gone
    assert resumed == expected
    # the run did something that a careless resume would lose
    losses = [r["loss"] for r in expected if not r.get("final")]
    assert len(set(losses)) == len(losses)
    if algo == "tr-dpo":
        assert [r["reference_updated"] for r in expected[:5]] == [False, True, False, True, False]
    else:
        assert [r["reset"] for r in expected[:5]] == [False, True, False, True, False]
        assert len({r["kl_coef"] for r in expected[:5]}) == 5
