"""What one evaluation of a study point measures on one's own model and data (``pyalign study
--model DIR --data FILE``), the counterpart of evaluation.py's on the embedded task.

The run's ``eval_data`` is the held-out data (--eval-data, or the split of --data that
userdata.py writes). On its first ``prompts`` prompts, one sample each from the policy
(``DatasetTask.generate``: the model's tokenizer, stopped at its EOS, padding after it):

- ``kl_to_init``, ``kl_to_ref`` (and ``kl_to_init_se``, ``sqrt_kl``): as on the embedded task
  (evaluation.py: k1 summed over the response's tokens, the trainer's response mask);
- ``response_length``: tokens up to and including the first EOS;
- with ``--gold-reward``: ``gold_reward``, ``gold_reward_se``, ``gold_gain`` and
  ``gold_win_rate`` against the initial model's samples on the same prompts (drawn once);
  a gold reward that is not a finite number is an error naming it;
- with ``--reward`` (RL): ``proxy_reward``, its mean.

On the first ``heldout`` held-out preference pairs (where the held-out data hold pairs), the
implicit reward margin against the initial model, ``m = [log π(yw|x) − log π0(yw|x)] −
[log π(yl|x) − log π0(yl|x)]`` (sums over each completion's tokens, its EOS included):

- ``preference_accuracy``: the fraction with m > 0, ties counting ½ (½ at the initial model),
  and ``preference_accuracy_se``, its standard error over the pairs;
- ``preference_margin``: the mean of m, in nats;
- ``perplexity``: exp of the policy's mean NLL per token of the chosen completions;

and ``train_preference_accuracy``, the same accuracy on as many training pairs (the proxy
of a study without a gold reward: what the preference losses push up).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from pyalign.study.evaluation import CHUNK, drift, gold_metrics, policy_samples, sample
from pyalign.trainers.scoring import response_mask


def _pairs(path: str, count: int, run: dict, task, max_positions: Optional[int]):
    """The first ``count`` preference pairs of ``path``, tokenized as the run's data are; None
    where the file holds no pairs."""
    from pyalign.data import load_rows, tokenize_rows
    from pyalign.data.loading import Rows, detect_format
    rows = load_rows(path)
    if detect_format(rows) != "preference":
        return None
    first = Rows(rows.path, rows.records[:count], rows.unit, rows.numbers[:count])
    return tokenize_rows(first, task.tokenizer, kind="preference", max_length=run["max_length"],
                         max_prompt_length=run["max_prompt_length"], max_positions=max_positions)


class DataEvaluator:
    """Evaluations of one point on one's own model and data (see the module docstring)."""

    def __init__(self, trainer, run: dict, *, prompts: int, heldout: int, gold: Optional[str] = None):
        from pyalign.data.rewards import load_reward
        self.trainer = trainer
        task = trainer.task
        self.prompts = task.eval.prompts[:prompts]
        self.raw_prompts = task.eval.raw_prompts[:prompts]
        config = getattr(trainer.policy, "config", None)
        max_positions = getattr(config, "max_position_embeddings", None)
        self.heldout_pairs = _pairs(run["eval_data"], heldout, run, task, max_positions)
        self.train_pairs = _pairs(run["data"], heldout, run, task, max_positions)
        self.gold_spec = gold
        self.gold = load_reward(gold, conversational=task.conversational, flag="--gold-reward") \
            if gold else None
        if self.gold is not None:
            responses = sample(trainer, trainer.init_model, self.prompts, ("study", "sft-responses"))
            self.sft_gold = self._gold(responses)

    def _gold(self, responses: torch.Tensor) -> torch.Tensor:
        """The gold reward of each response (float64); a value that is not finite is an error."""
        from pyalign.data.rewards import RewardError
        _, texts = self.trainer.task.decode(self.prompts, responses)
        values = torch.tensor(self.gold(list(self.raw_prompts), texts), dtype=torch.float64)
        bad = (~torch.isfinite(values)).nonzero()
        if bad.numel():
            index = int(bad[0])
            raise RewardError(f"--gold-reward {self.gold_spec} returned {float(values[index])} for "
                              f"held-out prompt {index + 1} (of {values.shape[0]}); a gold reward must "
                              f"be a finite number for every completion")
        return values

    def _pair_scores(self, pairs) -> tuple[torch.Tensor, float, float]:
        """(the margin m of each pair, the policy's NLL summed over the chosen tokens, their count)."""
        trainer = self.trainer
        device = trainer.dist.device
        margins, nll, tokens = [], 0.0, 0.0
        for start in range(0, len(pairs), CHUNK):
            prompts = pairs.prompts[start:start + CHUNK].to(device)
            ratios = []
            for column in ("chosen", "rejected"):
                completions = pairs.completions[column][start:start + CHUNK].to(device)
                mask = trainer.response_mask(completions)
                policy = torch.where(mask, trainer._scorer_module()(prompts, completions, mask), 0.0)
                initial = torch.where(mask, trainer.init_scorer(prompts, completions, mask), 0.0)
                ratios.append((policy.double().sum(-1) - initial.double().sum(-1)).cpu())
                if column == "chosen":
                    nll -= float(policy.double().sum())
                    tokens += float(mask.sum())
            margins.append(ratios[0] - ratios[1])
        return torch.cat(margins), nll, tokens

    @staticmethod
    def _accuracy(margins: torch.Tensor) -> tuple[float, float]:
        wins = (margins > 0).double() + 0.5 * (margins == 0).double()
        n = wins.shape[0]
        return float(wins.mean()), float(wins.std()) / math.sqrt(n) if n > 1 else 0.0

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        trainer, task = self.trainer, self.trainer.task
        with policy_samples(trainer, self.prompts, step) as (responses, kl_init, kl_ref):
            heldout = self._pair_scores(self.heldout_pairs) if self.heldout_pairs is not None else None
            train = self._pair_scores(self.train_pairs) if self.train_pairs is not None else None
        row = {**drift(kl_init, kl_ref), "prompts": self.prompts.shape[0], "response_cap": task.response_len,
               "response_length": float(response_mask(responses, task.eos_id).sum(-1).double().mean())}
        if self.gold is not None:
            row.update(gold_metrics(self._gold(responses), self.sft_gold))
        if hasattr(task, "proxy_reward"):  # --reward
            row["proxy_reward"] = float(task.proxy_reward(self.prompts, responses).double().mean())
        if heldout is not None:
            margins, nll, tokens = heldout
            accuracy, error = self._accuracy(margins)
            row.update({"preference_accuracy": accuracy, "preference_accuracy_se": error,
                        "preference_margin": float(margins.mean()), "pairs": margins.shape[0],
                        "perplexity": math.exp(nll / tokens)})
        if train is not None:
            row["train_preference_accuracy"] = self._accuracy(train[0])[0]
        return row


__all__ = ["DataEvaluator"]
