"""``pyalign train`` under torchrun: 2 CPU processes (gloo; DDP, and FSDP2 via fully_shard) with
the global batch split over ranks log the same loss curve (to fp32 tolerance) as 1 process with
the same global batch, and after trust-region updates the two ranks' reference models are
identical (DDP) or gather to the single-process reference (FSDP2)."""
import os

import pytest
import torch
from torchrun_helpers import run_torchrun
from trainer_helpers import read_records, strip_timing, write_config

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

CONFIGS = {
    # 8 pairs per step = 4 per rank = 2 micro-batches of 2; TR updates at steps 2 and 4
    "tr-dpo": dict(algo="tr-dpo", steps=4, batch_size=8, micro_batch_size=2, num_examples=32,
                   tr_tau=2, tr_alpha=0.5, lr=0.01, eval_every=2, eval_batch_size=8,
                   final_eval_batch_size=8),
    # KTO: z0 is averaged over the whole global batch, so it is split-invariant too
    "tr-kto": dict(algo="tr-kto", steps=3, batch_size=8, micro_batch_size=2, num_examples=32,
                   tr_tau=2, lr=0.01, eval_every=0, final_eval_batch_size=4),
    # 4 prompts x 3 samples per step = 2 prompts per rank, one rollout chunk of 2 prompts each
    "rloo": dict(algo="rloo", steps=3, batch_size=4, micro_batch_size=2, samples_per_prompt=3,
                 kl_target=0.2, kl_horizon=50, lr=0.01, final_eval_batch_size=4),
}
# FSDP2: the same tr-dpo run with every model sharded; compared with the 1-process tr-dpo run.
CONFIGS["tr-dpo-fsdp"] = dict(CONFIGS["tr-dpo"], fsdp=True)
# FSDP2 Elastic Reset, straight and interrupted at step 2 then resumed: the gathered EMA and
# the sharded optimizer state go through the checkpoint.
CONFIGS["er-fsdp"] = dict(algo="elastic-reset", steps=4, batch_size=4, micro_batch_size=2,
                          samples_per_prompt=2, er_reset_every=3, er_ema_decay=0.5, lr=0.01,
                          final_eval_batch_size=4, fsdp=True)
CONFIGS["er-fsdp-resume"] = CONFIGS["er-fsdp"]
# FSDP2 with a LoRA adapter on the frozen model (only the adapter trains, sharded with the rest):
# the same loss curve as the 1-process LoRA run.
CONFIGS["tr-dpo-fsdp-lora"] = dict(CONFIGS["tr-dpo"], fsdp=True, lora="r=4,alpha=8")
ONE_PROCESS_ONLY = {"tr-dpo-lora": dict(CONFIGS["tr-dpo"], lora="r=4,alpha=8")}
TRAIN_KEYS = {"tr-dpo": ("loss", "chosen_reward", "rejected_reward", "margin", "grad_norm"),
              "tr-dpo-lora": ("loss", "chosen_reward", "rejected_reward", "margin", "grad_norm"),
              "tr-kto": ("loss", "kto_kl", "grad_norm"),
              "rloo": ("loss", "reward", "proxy_reward", "kl_penalty", "kl_coef", "grad_norm")}


def _torchrun(out_dir, configs):
    run_torchrun(os.path.join(HERE, "dist_worker.py"), out_dir, *configs)


def test_two_ranks_match_one(tmp_path, task_cache_dir, tiny_task):
    configs = [write_config(tmp_path / f"{name}.toml", task_cache_dir, **values)
               for name, values in CONFIGS.items()]
    _torchrun(tmp_path / "two", configs)
    from trainer_helpers import run_cli
    for name, values in ONE_PROCESS_ONLY.items():
        config = write_config(tmp_path / f"{name}.toml", task_cache_dir, **values)
        assert run_cli("--config", config, "--out", tmp_path / "one" / name) == 0
    for name, config in zip(CONFIGS, configs):
        if name.startswith("er-fsdp"):
            continue
        if name in ("tr-dpo-fsdp", "tr-dpo-fsdp-lora"):  # against the 1-process run without FSDP
            two = read_records(tmp_path / "two" / name)
            name = name.replace("-fsdp", "")
            one = read_records(tmp_path / "one" / name)
        else:
            assert run_cli("--config", config, "--out", tmp_path / "one" / name) == 0
            one = read_records(tmp_path / "one" / name)
            two = read_records(tmp_path / "two" / name)
        assert [r["step"] for r in one] == [r["step"] for r in two]
        for a, b in zip(one, two):
            for key in TRAIN_KEYS[name]:
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=2e-5, abs=2e-6), (name, a["step"], key)
        # the step's own numbers were all logged by both runs (nothing silently missing)
        assert all(key in one[0] and key in two[0] for key in TRAIN_KEYS[name])

    ranks = [torch.load(tmp_path / "two" / "tr-dpo" / f"weights-rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    moved = 0
    initial = tiny_task.sft_state_dict()
    for key, tensor in ranks[0]["reference"].items():
        assert torch.equal(tensor, ranks[1]["reference"][key]), key  # bit for bit, no communication
        assert torch.equal(ranks[0]["policy"][key], ranks[1]["policy"][key]), key
        moved += not torch.equal(tensor, initial[key])
    assert moved > 0  # the trust-region updates did move the reference
    sharded = [torch.load(tmp_path / "two" / "tr-dpo-fsdp" / f"weights-rank{r}.pt") for r in (0, 1)]
    assert sharded[0]["fsdp"]
    for key, tensor in ranks[0]["reference"].items():
        for rank in (0, 1):  # the gathered FSDP2 reference is the DDP one, to fp32 tolerance
            torch.testing.assert_close(sharded[rank]["reference"][key], tensor, rtol=1e-4, atol=1e-5)
    straight = [strip_timing(r) for r in read_records(tmp_path / "two" / "er-fsdp")]
    resumed = [strip_timing(r) for r in read_records(tmp_path / "two" / "er-fsdp-resume")]
    assert resumed == straight and [r["reset"] for r in straight[:4]] == [False, False, True, False]
    records = read_records(tmp_path / "two" / "tr-dpo")
    assert [r["reference_updated"] for r in records if not r.get("final")] == [False, True, False, True]
