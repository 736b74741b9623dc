"""Run under torchrun by test_distributed.py: train each given config in turn in one process
group (``pyalign train``'s own code path), then save this rank's policy and reference weights.

    torchrun --nproc-per-node 2 dist_worker.py OUT_DIR CONFIG [CONFIG ...]

A config whose file name contains "resume" is trained to half its steps, checkpointed, and
continued by a new trainer from that checkpoint.
"""
import argparse
import os
import sys

import torch


def _full(state):
    """Plain tensors; FSDP2 shards (DTensors) are gathered (a collective: every rank calls it)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in state.items()}


def main() -> int:
    from pyalign.cli.train import add_train_arguments, resolve_settings
    from pyalign.trainers.build import build_trainer
    from pyalign.trainers.distributed import init_distributed

    out_root, configs = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    dist_ctx = init_distributed()
    try:
        for config in configs:
            parser = argparse.ArgumentParser()
            add_train_arguments(parser)
            name = os.path.splitext(os.path.basename(config))[0]
            args = parser.parse_args(["--config", config, "--out", os.path.join(out_root, name),
                                      "--no-progress"])
            algo, run, trainer_config = resolve_settings(args)
            resume = None
            if "resume" in name:  # interrupted half way, then resumed by a fresh trainer
                first = build_trainer(algo, run, trainer_config, dist_ctx=dist_ctx, progress=False)
                first.train(run["steps"] // 2)
                resume = True
            trainer = build_trainer(algo, run, trainer_config, dist_ctx=dist_ctx, progress=False)
            trainer.train(run["steps"], resume=resume)
            state = {"world_size": dist_ctx.world_size, "fsdp": trainer_config.fsdp,
                     "policy": _full(trainer.policy.state_dict()),
                     "reference": _full(trainer.ref_model.state_dict())}
            torch.save(state, os.path.join(out_root, name, f"weights-rank{dist_ctx.rank}.pt"))
    finally:
        dist_ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
