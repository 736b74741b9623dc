"""The grids ``pyalign study --preset NAME`` runs.

- ``default``: DPO, IPO and SLiC over 4 values of beta and TR-DPO over 4 update periods tau
  (alpha 0.6, beta 0.1), 3 seeds, evaluated at 1/8, 1/4, 1/2, 1 and 2 epochs of 1024 pairs:
  48 runs, 430 s measured with 2 workers on 2 cores that other jobs kept at load average 3.4-5.9
  (a first version with 2 seeds took 236 s at load 2.7-3.7; the third seed is there because one
  of those two seeds collapsed mid-epoch in 5 of its 16 runs and the other in none: two seeds
  cannot say how often that happens).

Why batches of 16 pairs (``pyalign train``'s default is 32): how far a policy moves is set by
the number of Adam updates more than by the examples seen, and the papers that report
over-optimisation within one epoch make hundreds to thousands of updates per epoch. At 32 pairs
one epoch of 1024 pairs is 32 updates, and a first run of this grid (2 epochs, 64 updates) ended
with DPO's gold still rising at every beta; 16 pairs doubles the updates per epoch for the same
data and about the same compute. TR-DPO's tau then spans 1/16 to 1/2 of the 128-update run, the
range of the TR-DPO paper's hard-update periods relative to its run length.
- ``elastic-reset``: RLOO over KL coefficients (0 included: RLOO without a KL penalty) against
  Elastic Reset (at RLOO's default coefficient 0.05) over reset periods, 2 seeds (389 s with 2
  workers at load average 3.8-8.7), the same
  evaluation steps (8, 16, 32, 64, 128 updates of 16 prompts). The periods are not powers of
  two on purpose: a first run with periods 16, 32 and 64 divided every evaluation step, so every
  evaluation of Elastic Reset saw the policy just reset to its EMA and none the policy between
  resets. With 12, 24 and 48 the evaluations fall at varying phases of the reset cycle.
- ``full``: every preference algorithm and both RL ones, wider sweeps, 3 seeds, 4 epochs: for a
  machine with tens of cores.
"""
from __future__ import annotations

EPOCHS = [0.125, 0.25, 0.5, 1.0, 2.0]
PREFERENCE = {"batch_size": 16, "micro_batch_size": 16}  # 64 updates per epoch of 1024 pairs

PRESETS: dict[str, dict] = {
    "default": {
        "seeds": [0, 1, 2],
        "epochs": EPOCHS,
        "preference": PREFERENCE,
        "algos": {
            "dpo": {"beta": [0.025, 0.05, 0.1, 0.2]},
            "ipo": {"beta": [0.25, 0.5, 1.0, 2.0]},
            "slic": {"beta": [0.025, 0.05, 0.1, 0.2]},
            "tr-dpo": {"tr_tau": [8, 16, 32, 64], "beta": 0.1, "tr_alpha": 0.6},
        },
    },
    "elastic-reset": {
        "seeds": [0, 1],
        "epochs": EPOCHS,
        "algos": {
            "rloo": {"kl_coef": [0.0, 0.02, 0.05, 0.1, 0.2]},
            "elastic-reset": {"er_reset_every": [12, 24, 48], "kl_coef": 0.05},
        },
    },
    "full": {
        "seeds": [0, 1, 2],
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
