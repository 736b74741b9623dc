"""``DatasetTask``: the user's tokenized dataset in the place of the embedded task
(``pyalign.tasks.Task``), with the methods the trainers call: ``preference_pairs`` /
``unpaired`` (the dataset), ``prompts`` / ``eval_prompts`` (prompts drawn with the trainer's
generator, so a batch is a function of (seed, step) and a resumed run draws the same ones),
``generate`` (sampling from the policy with the trainer's generator) and, with ``--reward``,
``proxy_reward`` (the reward it gives, the only reward there is: no ``gold_reward``), named by
``reward_name`` in errors and ``reward_labels`` in plots.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch

from pyalign._kv_cache import sampling_cache
from pyalign.tasks.task import sample_next_token

from .tokenize import PAD, TokenizedData


def _trim_prompts(prompts: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns that are padding in every row."""
    real = (prompts >= 0).any(0).nonzero()
    return prompts[:, int(real[0]):] if real.numel() else prompts


class DatasetTask:
    """A dataset-backed task (see the module docstring). ``reward`` scores (prompts,
    completions) lists of strings (pyalign.data.rewards)."""

    def __init__(self, tokenizer, train: TokenizedData, *, eval_data: Optional[TokenizedData] = None,
                 max_completion_length: int = 64, reward: Optional[Callable] = None,
                 reward_spec: Optional[str] = None):
        self.tokenizer = tokenizer
        self.train = train
        self.eval = eval_data
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        first = int(train.prompts[0][train.prompts[0] >= 0][0])
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else first
        self.response_len = max_completion_length
        self.conversational = train.conversational
        # the prompt as the file holds it, by its token ids (what a reward function is given)
        self._raw_prompts = {}
        for data in filter(None, (train, eval_data)):
            for ids, raw in zip(data.prompts, data.raw_prompts, strict=True):
                self._raw_prompts[tuple(ids[ids >= 0].tolist())] = raw
        if reward is not None:
            self._reward = reward
            self.proxy_reward = self._score
            spec = reward_spec or "the reward function"
            self.reward_name = f"--reward {spec}" if reward_spec else spec
            what = "reward model score" if reward_spec and os.path.isdir(reward_spec) else "reward"
            self.reward_labels = {"proxy_reward": f"{what} ({self.reward_name})"}

    def __repr__(self) -> str:
        return f"DatasetTask({self.train.path!r}, {len(self.train)} rows, {self.train.kind})"

    # data ---------------------------------------------------------------------------------
    def _rows(self, n: int, what: str) -> slice:
        if n > len(self.train):
            raise ValueError(f"{self.train.path}: {n} {what} asked for, the file has {len(self.train)}")
        return slice(0, n)

    def preference_pairs(self, n: int, generator: Optional[torch.Generator] = None) -> dict:
        """The first ``n`` pairs of the dataset (the trainer shuffles them per epoch)."""
        rows = self._rows(n, "preference pairs")
        return {"prompt": _trim_prompts(self.train.prompts[rows]),
                "chosen": self.train.completions["chosen"][rows],
                "rejected": self.train.completions["rejected"][rows]}

    def unpaired(self, n: int, generator: Optional[torch.Generator] = None) -> dict:
        rows = self._rows(n, "unpaired examples")
        return {"prompt": _trim_prompts(self.train.prompts[rows]),
                "completion": self.train.completions["completion"][rows],
                "desirable": self.train.labels[rows]}

    def prompts(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` training prompts drawn with replacement on ``generator``, left-padded."""
        return self._draw(self.train, n, generator)

    def eval_prompts(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` prompts of --eval-data (else of the training data) for the evaluations."""
        return self._draw(self.eval or self.train, n, generator)

    @staticmethod
    def _draw(data: TokenizedData, n: int, generator) -> torch.Tensor:
        rows = torch.randint(len(data), (n,), generator=generator)
        return _trim_prompts(data.prompts[rows])

    # generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, model, prompts: torch.Tensor, *, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """LongTensor[n, response_len]: samples of ``model`` after the left-padded ``prompts``,
        drawn on ``generator`` (temperature 0: greedy); PAD after each row's first eos."""
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        generator = generator if generator is not None else torch.default_generator
        device = next(model.parameters()).device
        attention = (prompts >= 0).to(device)
        positions = (attention.long().cumsum(-1) - 1).clamp_min(0)
        ids = prompts.clamp_min(0).to(device)
        responses = torch.full((prompts.shape[0], self.response_len), PAD, dtype=torch.long)
        done = torch.zeros(prompts.shape[0], dtype=torch.bool)
        cache = sampling_cache(model)
        out = model(input_ids=ids, attention_mask=attention.long(), position_ids=positions,
                    use_cache=True, **cache)
        for i in range(self.response_len):
            tokens = sample_next_token(out.logits[:, -1], temperature, generator)
            responses[:, i] = torch.where(done, PAD, tokens)
            if self.eos_id is not None:
                done |= tokens == self.eos_id
            if bool(done.all()) or i + 1 == self.response_len:
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=tokens[:, None].to(device), attention_mask=attention.long(),
                        position_ids=positions, use_cache=True, **cache)
        return responses.to(prompts.device)

    # rewards ----------------------------------------------------------------------------------
    def decode(self, prompts: torch.Tensor, responses: torch.Tensor) -> tuple[list, list]:
        """(the prompts as the file holds them, the completions as text; for conversational
        data [{"role": "assistant", "content": text}]): a reward function's arguments."""
        raw, texts = [], []
        for prompt, response in zip(prompts.cpu(), responses.cpu(), strict=True):
            key = tuple(prompt[prompt >= 0].tolist())
            raw.append(self._raw_prompts.get(key, self.tokenizer.decode(list(key), skip_special_tokens=True)))
            texts.append(self.tokenizer.decode(response[response >= 0].tolist(), skip_special_tokens=True))
        if self.conversational:
            texts = [[{"role": "assistant", "content": text}] for text in texts]
        return raw, texts

    def check_reward(self) -> None:
        """Score two training prompts with one-token completions: a --reward that raises or
        returns something else than one float per completion fails before any training."""
        from .rewards import RewardError
        prompts = _trim_prompts(self.train.prompts[:2])
        token = self.eos_id if self.eos_id is not None else self.bos_id
        try:
            self._score(prompts, torch.full((prompts.shape[0], 1), token, dtype=torch.long))
        except RewardError:
            raise
        except Exception as exc:
            raise RewardError(f"--reward failed on the first prompts of {self.train.path}: "
                              f"{type(exc).__name__}: {exc}") from exc

    def _score(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """FloatTensor[n]: the --reward score of each completion."""
        raw, texts = self.decode(prompts, responses)
        return torch.tensor(self._reward(raw, texts), dtype=torch.float32)


__all__ = ["DatasetTask"]
