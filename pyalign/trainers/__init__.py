"""Preference (DPO family, KTO, TR-*) and RL (RLOO, Elastic Reset) trainers on pyalign's ops.

    task = pyalign.tasks.make_task(0)
    trainer = PreferenceTrainer(task, PreferenceConfig(loss="sigmoid", reference="trust_region"),
                                algo="tr-dpo", out_dir="runs/tr-dpo")
    summary = trainer.train(steps=100)            # or trainer.train(100, resume=True)

The command line is ``pyalign train``; torchrun runs both trainers with
DDP (or FSDP2, ``fsdp=True``), the global batch split over ranks.

Modules: ``trainer`` (TrainerConfig, the shared loop), ``preference`` and ``rl`` (the two
families, each with its config class and its ``--algo`` presets), ``presets`` (the algorithms
by name), ``fields`` (how a setting is declared and checked), ``settings`` (the run's own
settings, the config file and the resolution of a run's settings, for ``pyalign train`` and
``pyalign study``), ``build`` (a trainer from resolved settings: models, the user's data, LoRA),
``scoring`` (response log-probs), ``evaluation`` (policy samples scored), ``seeding``,
``checkpoint`` (the checkpoint format and RNG state), ``metrics`` (metrics.jsonl, the
reward-vs-KL plot, the summary line), ``tracking`` (TensorBoard, W&B), ``stop`` (a clean stop
on SIGINT/SIGTERM) and ``distributed`` (process group, batch splitting, FSDP2 helpers).
"""
from pyalign.trainers.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyalign.trainers.metrics import read_metrics
from pyalign.trainers.preference import PreferenceConfig, PreferenceTrainer
from pyalign.trainers.rl import RLConfig, RLTrainer
from pyalign.trainers.trainer import Trainer, TrainerConfig

__all__ = ["Trainer", "TrainerConfig", "PreferenceTrainer", "PreferenceConfig", "RLTrainer",
           "RLConfig", "CheckpointError", "load_checkpoint", "save_checkpoint", "read_metrics"]
