"""The loss registry: every loss of pyalign declared once, with its paper, equation, forward and
gradient, and the flags from which every API derives its inputs, choices and error messages.

- pyalign/losses/preference.py: the DPO family (``REGISTRY``'s pairwise entries, the
  reference-free ones included) and the unpaired KTO losses;
- pyalign/losses/pair_batch.py: what a pairwise loss runs on (``PairBatch``, the f-divergences,
  the batch steps, ``pair_ratios``);
- pyalign/losses/policy.py: the policy-gradient losses (``POLICY_REGISTRY``), the KL estimators
  and the policy backends' row stats;
- pyalign/losses/rollout.py: the policy losses' rollout corrections (``ROLLOUT_CORRECTIONS``: the
  importance weight between the trainer's old policy and the sampler) and the off-policy mask.

``from pyalign import losses`` and ``losses.<name>`` for any of them: this package hands on their
public names.
"""
# ruff: noqa: F401, F403  (the submodules' public names, handed on)
from pyalign.losses.pair_batch import *
from pyalign.losses.policy import *
from pyalign.losses.preference import *
from pyalign.losses.rollout import *
