"""What one evaluation of a study point measures, on policy samples for a fixed prompt set.

- ``kl_to_init`` / ``kl_to_ref``: KL(policy || initial model) and KL(policy || the trainer's
  current reference: the trust-region reference of TR-*, else the initial model), in nats per
  response, estimated from one policy sample per prompt as the mean of the sequence log-ratio
  ``log pi(y|x) - log pi_ref(y|x)`` (k1 summed over the response: unbiased); ``kl_to_init_se``
  is the standard error of that mean over the prompts. Not k3 summed over tokens, although it is
  unbiased too and never negative per token: at the KLs a study reaches (several nats) its
  ``exp`` term gives it a heavy tail. Measured on a DPO policy at KL ~ 7.6 nats (1024 samples):
  k3's standard error is 2.9 nats on 128 samples (k1's 0.45) and one sample reached 376 nats.
- ``gold_reward``, ``proxy_reward``: means over the samples (``gold_reward_se``: the standard
  error of the gold mean over the prompts); ``gold_gain``: gold minus the SFT model's mean gold
  on its own responses to the same prompts.
- ``gold_win_rate``: the fraction of prompts where the policy's response has a higher gold reward
  than the SFT model's response to the same prompt (ties count one half).
- ``response_length``: tokens up to and including the first EOS (all of them when there is none).
- ``perplexity``: exp of the mean next-token NLL of held-out base-language documents (up to
  their EOS in the variable-length task, whose held-out documents are padded with -100 after it).

The prompts, the held-out text and the SFT responses are drawn from fixed generators, the same
for every point and seed (a shared test set, so points compare pairwise); the policy's samples
from a generator keyed by the point's seed and the step. On one's own model and data:
data_evaluation.py, with the same KLs and sampling (``policy_samples``).
"""
from __future__ import annotations

import contextlib
import math

import torch

import pyalign
from pyalign.trainers.scoring import response_mask
from pyalign.trainers.trainer import make_generator

CHUNK = 64  # prompts per generation / scoring chunk


class Evaluator:
    def __init__(self, trainer, *, prompts: int, heldout: int):
        self.trainer = trainer
        task = trainer.task
        self.prompts = task.prompts(prompts, make_generator("study", "eval-prompts"))
        self.heldout = task.heldout_text(heldout, make_generator("study", "heldout-text"))
        self.sft_responses = sample(trainer, trainer.init_model, self.prompts, ("study", "sft-responses"))
        self.sft_gold = task.gold_reward(self.prompts, self.sft_responses)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        trainer, task = self.trainer, self.trainer.task
        policy = trainer.policy
        with policy_samples(trainer, self.prompts, step) as (responses, kl_init, kl_ref):
            heldout = self.heldout.to(trainer.dist.device)  # padding (-100) only after a document's end
            nll = float(policy(input_ids=heldout.clamp_min(0), labels=heldout).loss)
        gold = task.gold_reward(self.prompts, responses).double()
        proxy = task.proxy_reward(self.prompts, responses).double()
        return {**drift(kl_init, kl_ref), **gold_metrics(gold, self.sft_gold.double()),
                "proxy_reward": float(proxy.mean()),
                "response_length": float(response_mask(responses, task.eos_id).sum(-1).double().mean()),
                "perplexity": math.exp(nll)}


@contextlib.contextmanager
def policy_samples(trainer, prompts: torch.Tensor, step: int):
    """With the policy in eval mode: its samples on ``prompts`` at ``step`` (drawn on the
    point's evaluation generator) and their per-response KLs (``sequence_kls``)."""
    policy = trainer.policy
    policy.eval()
    try:
        responses = sample(trainer, policy, prompts, ("study", "eval", trainer.config.seed, step))
        yield (responses, *sequence_kls(trainer, prompts, responses))
    finally:
        policy.train()


def sample(trainer, model, prompts: torch.Tensor, key) -> torch.Tensor:
    """One response of ``model`` per prompt (the task's sampling at the run's temperature), in
    chunks of CHUNK prompts, each drawn on a generator keyed by ``key`` and the chunk."""
    task, temperature = trainer.task, trainer.config.temperature
    chunks = []
    for index, start in enumerate(range(0, prompts.shape[0], CHUNK)):
        chunk = prompts[start:start + CHUNK].to(trainer.dist.device)
        chunks.append(task.generate(model, chunk, temperature=temperature,
                                    generator=make_generator(*key, index)).cpu())
    return torch.cat(chunks)


def sequence_kls(trainer, prompts: torch.Tensor, responses: torch.Tensor) -> tuple:
    """Per response: log pi(y|x) - log pi_0(y|x) and log pi(y|x) - log pi_ref(y|x), summed over
    the response's tokens (trainer.response_mask), float64 on the CPU."""
    kl_init, kl_ref = [], []
    device = trainer.dist.device
    for start in range(0, responses.shape[0], CHUNK):
        chunk_prompts = prompts[start:start + CHUNK].to(device)
        chunk = responses[start:start + CHUNK].to(device)
        mask = trainer.response_mask(chunk)
        logprobs = trainer._scorer_module()(chunk_prompts, chunk, mask)
        for scorer, out in ((trainer.init_scorer, kl_init), (trainer.ref_scorer, kl_ref)):
            other = scorer(chunk_prompts, chunk, mask)
            kl = pyalign.kl_penalty(logprobs, other, estimator="k1", mask=mask,
                                    backend=trainer.config.backend)
            out.append(torch.where(mask, kl, 0.0).double().sum(-1).cpu())
    return torch.cat(kl_init), torch.cat(kl_ref)


def drift(kl_init: torch.Tensor, kl_ref: torch.Tensor) -> dict:
    """The KL metrics of an evaluation from the per-response KLs (a negative mean, possible for
    an unbiased estimate near 0, is reported as 0)."""
    n = kl_init.shape[0]
    kl_mean = max(float(kl_init.mean()), 0.0)
    return {"kl_to_init": kl_mean,
            "kl_to_init_se": float(kl_init.std()) / math.sqrt(n) if n > 1 else 0.0,
            "kl_to_ref": max(float(kl_ref.mean()), 0.0),
            "sqrt_kl": math.sqrt(kl_mean)}


def gold_metrics(gold: torch.Tensor, sft_gold: torch.Tensor) -> dict:
    """The gold metrics of an evaluation from the policy's and the SFT model's gold rewards on
    the same prompts (float64)."""
    n = gold.shape[0]
    wins = (gold > sft_gold).double() + 0.5 * (gold == sft_gold).double()
    return {"gold_reward": float(gold.mean()),
            "gold_reward_se": float(gold.std()) / math.sqrt(n) if n > 1 else 0.0,
            "gold_gain": float(gold.mean() - sft_gold.mean()),
            "gold_win_rate": float(wins.mean())}


__all__ = ["Evaluator", "policy_samples", "sample", "sequence_kls", "drift", "gold_metrics"]
