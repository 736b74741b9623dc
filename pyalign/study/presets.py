"""The grids ``pyalign study --preset NAME`` runs.

Every preset runs 5 seeds: a verdict rests on the 95% t-interval of a seed mean (stats.py), whose
half-width is 2.78 sd / sqrt(5) = 1.24 sd at 5 seeds against 2.48 sd at 3, for 5/3 of the
compute; and the presets fix their KL ``budgets``, so that two runs of one preset (on two
machines, or under two thread counts) are compared budget by budget. CPU seconds per point were
measured with one thread on the 2-core VM (EPYC) while other jobs loaded it (``pyalign train
--config`` of a point, interpreter start included): DPO on the fixed-length task 11.6, RLOO 19.3;
DPO on the variable-length task 12 / 18 / 33 at the small / base / large model size.

- ``quick``: a first look in about two minutes on 2 cores: DPO over 3 betas against TR-DPO over
  2 update periods, 3 seeds (the fewest a verdict takes), 2 epochs.
- ``default``: DPO, IPO and SLiC over 4 values of beta and TR-DPO over 4 update periods tau
  (alpha 0.6, beta 0.1), evaluated at 1/8, 1/4, 1/2, 1 and 2 epochs of 1024 pairs: 80 runs.
- ``elastic-reset``: RLOO over KL coefficients (0 included: RLOO without a KL penalty) against
  Elastic Reset (at RLOO's default coefficient 0.05) over reset periods, the same evaluation
  steps (8, 16, 32, 64, 128 updates of 16 prompts): 40 runs. The periods are not powers of two on
  purpose: a first run with periods 16, 32 and 64 divided every evaluation step, so every
  evaluation of Elastic Reset saw the policy just reset to its EMA and none the policy between
  resets. With 12, 24 and 48 the evaluations fall at varying phases of the reset cycle.
- ``lengthy``: the length and scale claims of the DAA over-optimisation paper (arXiv
  2406.02900) on the variable-length task (pyalign.tasks.lengthy: responses end at EOS, the
  labellers who rank the pairs like length): DPO, IPO and SLiC over 4 betas at the three model
  sizes (pyalign.tasks.MODEL_SIZES): 180 runs. The betas reach one step lower than the default
  study's: a first slice at DPO beta 0.05 and 0.1 drifted 7-14 nats in two epochs with gold still
  rising, and a hump needs budgets past it.
- ``full``: every preference algorithm and both RL ones, wider sweeps, 4 epochs: for a machine
  with tens of cores.

On one's own model (``--model``, ``--data``) a preset gives its algorithms, knob values, seeds and
epochs, not the settings tuned here (userdata.from_preset); ``quick`` then runs one epoch.

Why batches of 16 pairs (``pyalign train``'s default is 32): how far a policy moves is set by
the number of Adam updates more than by the examples seen, and the papers that report
over-optimisation within one epoch make hundreds to thousands of updates per epoch. At 32 pairs
one epoch of 1024 pairs is 32 updates, and a first run of this grid (2 epochs, 64 updates) ended
with DPO's gold still rising at every beta; 16 pairs doubles the updates per epoch for the same
data and about the same compute. TR-DPO's tau then spans 1/16 to 1/2 of the 128-update run, the
range of the TR-DPO paper's hard-update periods relative to its run length.
"""
from __future__ import annotations

from pyalign.tasks.lengthy import LENGTHY

EPOCHS = [0.125, 0.25, 0.5, 1.0, 2.0]
SEEDS = [0, 1, 2, 3, 4]
PREFERENCE = {"batch_size": 16, "micro_batch_size": 16}  # 64 updates per epoch of 1024 pairs
DAAS = {"dpo": {"beta": [0.025, 0.05, 0.1, 0.2]}, "ipo": {"beta": [0.25, 0.5, 1.0, 2.0]},
        "slic": {"beta": [0.025, 0.05, 0.1, 0.2]}}

PRESETS: dict[str, dict] = {
    "quick": {
        "seeds": [0, 1, 2],
        "epochs": [0.25, 0.5, 1.0, 2.0],
        "preference": PREFERENCE,
        "budgets": [2.0, 6.0, 20.0, 100.0],
        "algos": {
            "dpo": {"beta": [0.05, 0.1, 0.2]},
            "tr-dpo": {"tr_tau": [16, 32], "beta": 0.1, "tr_alpha": 0.6},
        },
    },
    "default": {
        "seeds": SEEDS,
        "epochs": EPOCHS,
        "preference": PREFERENCE,
        "budgets": [1.5, 4.5, 12.0, 40.0, 120.0],
        "algos": {**DAAS, "tr-dpo": {"tr_tau": [8, 16, 32, 64], "beta": 0.1, "tr_alpha": 0.6}},
    },
    "elastic-reset": {
        "seeds": SEEDS,
        "epochs": EPOCHS,
        "budgets": [0.5, 1.0, 2.0, 10.0, 100.0],
        "algos": {
            "rloo": {"kl_coef": [0.0, 0.02, 0.05, 0.1, 0.2]},
            "elastic-reset": {"er_reset_every": [12, 24, 48], "kl_coef": 0.05},
        },
    },
    "lengthy": {
        "seeds": SEEDS,
        "epochs": EPOCHS,
        "sizes": ["small", "base", "large"],
        "task": dict(LENGTHY),
        "preference": PREFERENCE,
        "algos": {"dpo": {"beta": [0.0125, 0.025, 0.05, 0.1]}, "ipo": {"beta": [0.125, 0.25, 0.5, 1.0]},
                  "slic": {"beta": [0.0125, 0.025, 0.05, 0.1]}},
    },
    "full": {
        "seeds": SEEDS,
        "epochs": [0.125, 0.25, 0.5, 1.0, 2.0, 4.0],
        "preference": PREFERENCE,
        "algos": {
            "dpo": {"beta": [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4]},
            "ipo": {"beta": [0.125, 0.25, 0.5, 1.0, 2.0, 4.0]},
            "slic": {"beta": [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4]},
            "kto": {"beta": [0.025, 0.05, 0.1, 0.2, 0.4]},
            "tr-dpo": {"tr_tau": [4, 8, 16, 32, 64, 128], "beta": 0.1},
            "tr-ipo": {"tr_tau": [4, 8, 16, 32, 64, 128], "beta": 0.5},
            "tr-kto": {"tr_tau": [4, 8, 16, 32, 64, 128], "beta": 0.1},
            "rloo": {"kl_coef": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4]},
            "elastic-reset": {"er_reset_every": [10, 20, 40, 80, 160], "kl_coef": 0.05},
        },
    },
}

__all__ = ["PRESETS"]
