"""The evaluation of a training run: sample completions from the policy on fixed prompts and
report the mean gold and proxy rewards (where the task has them), the KL to the initial model
(k3 estimator, nats per response), the sample entropy and the response length.
"""
from __future__ import annotations

import torch

import pyalign
from pyalign.trainers.distributed import split_evenly, unsharded
from pyalign.trainers.scoring import masked_sum
from pyalign.trainers.seeding import make_generator


@torch.no_grad()
def sample_and_score(trainer, prompts: torch.Tensor, key) -> dict:
    """Sample from the policy on ``prompts`` (this rank's share), score them; global means.

    Sampling is chunked by micro_batch_size with one generator per global chunk, so the
    numbers do not depend on the number of ranks.
    """
    cfg, task = trainer.config, trainer.task
    local = split_evenly(prompts.shape[0], trainer.dist.world_size, "the evaluation batch")
    offset = trainer.dist.rank * local
    sums = dict(gold=0.0, proxy=0.0, kl=0.0, entropy=0.0, tokens=0.0, n=0.0)
    chunk_size = min(cfg.micro_batch_size, local)
    trainer.policy.eval()
    try:
        for start in range(0, local, chunk_size):
            chunk = prompts[offset + start: offset + min(start + chunk_size, local)].to(trainer.dist.device)
            generator = make_generator(cfg.seed, "eval", key, (offset + start) // chunk_size)
            with unsharded(trainer.scorer):
                responses = task.generate(trainer.policy, chunk, temperature=cfg.temperature,
                                          generator=generator).to(trainer.dist.device)
            mask = trainer.response_mask(responses)
            logprobs, entropy = trainer._scorer_module()(chunk, responses, mask, entropy=True)
            init_logprobs = trainer.init_scorer(chunk, responses, mask)
            kl = pyalign.kl_penalty(logprobs, init_logprobs, estimator="k3", mask=mask,
                                    backend=cfg.backend)
            if hasattr(task, "gold_reward"):
                sums["gold"] += float(task.gold_reward(chunk.cpu(), responses.cpu()).double().sum())
            if hasattr(task, "proxy_reward"):  # user data without --reward has none
                sums["proxy"] += float(task.proxy_reward(chunk.cpu(), responses.cpu()).double().sum())
            sums["kl"] += float(kl.double().sum())
            sums["entropy"] += masked_sum(entropy, mask)
            sums["tokens"] += float(mask.sum())
            sums["n"] += chunk.shape[0]
    finally:
        trainer.policy.train()
    counts = dict(kl="n", entropy="tokens", tokens="n")
    if hasattr(task, "proxy_reward"):
        counts["proxy"] = "n"
    if hasattr(task, "gold_reward"):
        counts["gold"] = "n"
    means = trainer._reduce_means(sums, counts)
    renamed = dict(gold="gold_reward", proxy="proxy_reward", kl="kl_to_init",
                   entropy="sample_entropy", tokens="response_length")
    return {renamed[k]: v for k, v in means.items()}


__all__ = ["sample_and_score"]
