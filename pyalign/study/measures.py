"""What a study measures quality by, and the words its report uses for it.

On the embedded task, and on one's own model with ``--gold-reward``, quality is the **gold
reward** of the policy's samples (``GOLD``): the fits are on the gold gain over the SFT model
and the gold win rate against it, the method pairs compare the best gold and win rate within a
KL budget, and the proxy is the reward the RL algorithms train on (the embedded task's reward
model, or ``--reward``).

On one's own model without a gold reward, quality is the **held-out preference accuracy**
(``ACCURACY``): on held-out preference pairs (``--eval-data``, or a split of ``--data``), the
fraction whose implicit reward margin against the initial model,
``[log π(yw|x) − log π0(yw|x)] − [log π(yl|x) − log π0(yl|x)]``, is positive (ties count ½:
exactly ½ at the initial model); the fits are on that accuracy minus ½ and on the mean margin
(nats), and the proxy is the same accuracy on training pairs (what the preference losses
push up). The report then says "held-out accuracy" wherever the embedded task's says "gold":
it measures agreement with held-out labels, not gold quality (docs/algorithms.md).
"""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Measures:
    quality: str  # the row key a method maximises: budget tables, drops, peaks
    quality_se: str  # its standard error within one evaluation (the drop's noise floor)
    targets: dict  # row key -> its value at d = 0: what R(d) is fitted on
    target_names: dict  # row key -> its name in the fit table
    pair_metrics: tuple  # the metrics of the method-pair tables and verdicts
    proxy: Optional[str]  # row key of the reward the methods are trained on, where there is one
    noun: str  # the quality in a sentence ("gold reward")
    short: str  # ... in a table header or a short phrase ("gold")
    proxy_noun: str
    axis: str  # the progress plot's y axis
    phrase: str  # the quality in a title ("gold quality")
    progress_phrase: str  # the quality and the proxy over training ("gold and proxy reward")
    proxy_short: str  # the proxy in a sentence ("the proxy changes by ...")
    target_axes: dict  # target -> its axis label in the fits' figure
    labels: dict = dataclasses.field(default_factory=dict)  # row key -> words, where not the key's

    def label(self, metric: str) -> str:
        """A metric in words: ``gold_win_rate`` -> "gold win rate"."""
        return self.labels.get(metric, metric.replace("_", " "))

    def has_proxy(self, row: dict) -> bool:
        return self.proxy is not None and row.get(self.proxy) is not None

    def sentence(self, text: str) -> str:
        """``text`` with its first letter in upper case (``str.capitalize`` lowers the rest)."""
        return text[:1].upper() + text[1:]


GOLD = Measures(
    quality="gold_reward", quality_se="gold_reward_se",
    targets={"gold_gain": 0.0, "gold_win_rate": 0.5},
    target_names={"gold_gain": "gold gain", "gold_win_rate": "win rate − ½"},
    pair_metrics=("gold_reward", "gold_win_rate"), proxy="proxy_reward",
    noun="gold reward", short="gold", proxy_noun="proxy reward",
    axis="reward (gold units), mean over seeds", phrase="gold quality",
    progress_phrase="gold and proxy reward", proxy_short="proxy",
    target_axes={"gold_gain": "gold reward gain over the SFT model",
                 "gold_win_rate": "gold win rate against the SFT model"})

ACCURACY = Measures(
    quality="preference_accuracy", quality_se="preference_accuracy_se",
    targets={"preference_margin": 0.0, "preference_accuracy": 0.5},
    target_names={"preference_margin": "held-out margin", "preference_accuracy": "accuracy − ½"},
    pair_metrics=("preference_accuracy", "preference_margin"), proxy="train_preference_accuracy",
    noun="held-out preference accuracy", short="held-out accuracy",
    proxy_noun="training preference accuracy",
    axis="preference accuracy (implicit reward vs the initial model), mean over seeds",
    phrase="held-out preference accuracy",
    progress_phrase="held-out and training preference accuracy",
    proxy_short="training preference accuracy",
    target_axes={"preference_margin": "held-out preference margin over the initial model (nats)",
                 "preference_accuracy": "held-out preference accuracy against the initial model"},
    labels={"preference_accuracy": "held-out preference accuracy",
            "preference_margin": "held-out preference margin"})


def measures_of(spec: dict) -> Measures:
    """The measures of a study grid: the held-out preference accuracy for one's own data
    without ``gold_reward``, else the gold reward."""
    return ACCURACY if spec.get("data") and not spec.get("gold_reward") else GOLD


__all__ = ["Measures", "GOLD", "ACCURACY", "measures_of"]
