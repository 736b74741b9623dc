"""Preference (DPO family, KTO, TR-*) and RL (RLOO, Elastic Reset) trainers on pyalign's ops.

    task = pyalign.tasks.make_task(0)
    trainer = PreferenceTrainer(task, PreferenceConfig(loss="sigmoid", reference="trust_region"),
                                algo="tr-dpo", out_dir="runs/tr-dpo")
    summary = trainer.train(steps=100)            # or trainer.train(100, resume=True)

The command line is ``pyalign train`` (pyalign/train_cli.py); torchrun runs both trainers with
DDP (or FSDP2, ``fsdp=True``), the global batch split over ranks.
"""
from pyalign.trainers.base import (CheckpointError, Trainer, TrainerConfig, load_checkpoint,
                                   read_metrics, save_checkpoint)
from pyalign.trainers.preference import LOSSES, PAIRWISE_LOSSES, PreferenceConfig, PreferenceTrainer
from pyalign.trainers.rl import RLConfig, RLTrainer

__all__ = ["Trainer", "TrainerConfig", "PreferenceTrainer", "PreferenceConfig", "RLTrainer",
           "RLConfig", "CheckpointError", "load_checkpoint", "save_checkpoint", "read_metrics",
           "LOSSES", "PAIRWISE_LOSSES"]
