"""The training algorithms by name (``pyalign train --algo``): which trainer each runs with which
fixed settings, its tuned defaults, and which config keys belong to which algorithm.

Preference family (``PreferenceTrainer`` / ``PreferenceConfig``), offline on preference data:

- ``dpo``: DPO, the sigmoid loss on the implicit reward margin, frozen reference.
- ``ipo``: IPO, the squared loss on the length-normalised margin; tuned default ``beta = 0.5``.
- ``slic``: SLiC, the hinge loss on the margin.
- ``kto``: KTO on unpaired desirable / undesirable examples (``loss = "apo_zero_unpaired"`` in
  a config file swaps in TRL's other unpaired loss).
- ``tr-dpo``, ``tr-ipo``, ``tr-kto``: the same losses with a trust-region reference, pulled
  towards the policy every ``tr_tau`` steps (``tr-ipo`` keeps IPO's ``beta = 0.5``).

RL family (``RLTrainer`` / ``RLConfig``), online from a reward:

- ``rloo``: REINFORCE with a leave-one-out baseline and a KL penalty to the initial model.
- ``elastic-reset``: RLOO with Elastic Reset (an EMA of the policy, and periodic resets of the
  policy to it and of the EMA to the initial model).

Config keys:

- ``ALGO_KEYS`` are set by the algorithm (its ``ALGOS`` preset) and cannot come from a config
  file, except ``loss`` for the algorithms of ``LOSS_CONFIGURABLE``, which may swap in any other
  loss of the same kind: pairwise (``pyalign.preference_loss``, or a list of them, e.g. MPO:
  ``loss = ["sigmoid", "bco_pair", "sft"]``, ``loss_weights = [0.8, 0.2, 1.0]``) or unpaired
  (``pyalign.kto_loss``).
- ``ONLY_FOR`` names the keys that apply to some algorithms only: ``tr_alpha`` / ``tr_tau`` to
  the trust-region ones, ``desirable_weight`` / ``undesirable_weight`` to the KTO ones,
  ``precompute_ref`` to the frozen-reference preference ones, ``er_*`` to Elastic Reset, and
  the pairwise loss options (``loss_weights``, ``f_divergence``, ``f_alpha_divergence_coef``,
  ``ld_alpha``, ``use_weighting``) to ``PAIRWISE_LOSS_CONFIGURABLE``.
- Every other field of the family's config class applies to every algorithm of the family.

``DEFAULT_STEPS`` and ``TUNED_DEFAULTS`` are tuned on the embedded task so that a default run
takes about a minute on 2 CPU cores.
"""
from __future__ import annotations

# algo -> (family: "preference" | "rl", the config values the algorithm fixes)
ALGOS: dict[str, tuple[str, dict]] = {
    "dpo": ("preference", {"loss": "sigmoid"}),
    "ipo": ("preference", {"loss": "ipo", "length_normalize": True}),
    "slic": ("preference", {"loss": "hinge"}),
    "kto": ("preference", {"loss": "kto"}),
    "tr-dpo": ("preference", {"loss": "sigmoid", "reference": "trust_region"}),
    "tr-ipo": ("preference", {"loss": "ipo", "length_normalize": True, "reference": "trust_region"}),
    "tr-kto": ("preference", {"loss": "kto", "reference": "trust_region"}),
    "rloo": ("rl", {}),
    "elastic-reset": ("rl", {"elastic_reset": True}),
}
# Defaults tuned on the embedded task so a default run takes about a minute on 2 CPU cores.
DEFAULT_STEPS = {"preference": 100, "rl": 60}
TUNED_DEFAULTS = {
    "ipo": {"beta": 0.5},
    "tr-ipo": {"beta": 0.5},
}
# Keys the algorithm sets (not settable from a config file).
ALGO_KEYS = {"loss", "reference", "elastic_reset", "length_normalize"}
# A pairwise algorithm may swap in any other pairwise loss of pyalign.preference_loss, or a
# weighted list of them (loss_weights), with the loss options below; a KTO one any unpaired loss.
PAIRWISE_LOSS_CONFIGURABLE = ("dpo", "tr-dpo", "slic", "ipo", "tr-ipo")
LOSS_CONFIGURABLE = PAIRWISE_LOSS_CONFIGURABLE + ("kto", "tr-kto")
# Keys that belong to some algorithms only.
ONLY_FOR = {
    "tr_alpha": ("tr-dpo", "tr-ipo", "tr-kto"),
    "tr_tau": ("tr-dpo", "tr-ipo", "tr-kto"),
    "desirable_weight": ("kto", "tr-kto"),
    "undesirable_weight": ("kto", "tr-kto"),
    "precompute_ref": ("dpo", "ipo", "slic", "kto"),
    "er_ema_decay": ("elastic-reset",),
    "er_reset_every": ("elastic-reset",),
    "er_ema_every": ("elastic-reset",),
    "er_reset_optimizer": ("elastic-reset",),
    **{key: PAIRWISE_LOSS_CONFIGURABLE
       for key in ("loss_weights", "f_divergence", "f_alpha_divergence_coef", "ld_alpha",
                   "use_weighting")},
}
