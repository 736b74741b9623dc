"""Preference (DPO family, KTO, TR-*) and RL (RLOO, Elastic Reset) trainers on pyalign's ops.

    task = pyalign.tasks.make_task(0)
    trainer = PreferenceTrainer(task, PreferenceConfig(loss="sigmoid", reference="trust_region"),
                                algo="tr-dpo", out_dir="runs/tr-dpo")
    summary = trainer.train(steps=100)            # or trainer.train(100, resume=True)

The command line is ``pyalign train``; torchrun runs both trainers with
DDP (or FSDP2, ``fsdp=True``), the global batch split over ranks.

Modules: ``trainer`` (TrainerConfig, the shared loop), ``preference`` and ``rl`` (the two
families), ``scoring`` (response log-probs), ``checkpoint`` (the checkpoint format and RNG
state), ``metrics`` (metrics.jsonl, the reward-vs-KL plot, the summary line) and
``distributed`` (process group, batch splitting, FSDP2 shard helpers).
"""
from pyalign.trainers.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyalign.trainers.metrics import read_metrics
from pyalign.trainers.preference import LOSSES, PAIRWISE_LOSSES, PreferenceConfig, PreferenceTrainer
from pyalign.trainers.rl import RLConfig, RLTrainer
from pyalign.trainers.trainer import Trainer, TrainerConfig

__all__ = ["Trainer", "TrainerConfig", "PreferenceTrainer", "PreferenceConfig", "RLTrainer",
           "RLConfig", "CheckpointError", "load_checkpoint", "save_checkpoint", "read_metrics",
           "LOSSES", "PAIRWISE_LOSSES"]
