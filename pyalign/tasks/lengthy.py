"""The variable-length variant of the embedded task (``TaskConfig(variable_length=True)``):
documents end, responses stop at EOS, and the labellers who rank response pairs like length.

Documents. Sentences of the base language end (a noun followed by a full stop) with the fixed
share ``STOP_SHARE`` of a noun's next-category mass, whatever the task seed drew for the other
transitions (``Language(seed, stop_share=...)``); after each full stop past the prompt the
document ends with probability ``END_PROB``: EOS follows the stop. Response lengths (words
before EOS) are then right-skewed as real responses are: the SFT model's, on task seed 0 with
the cap of 32, have 10/25/50/75/90th percentiles 2, 4, 8, 16 and 25 words, mean 10.8, and one
in twenty reaches the cap.

Responses. A response holds at most ``response_len`` tokens (the cap) and ends at its first
EOS; the positions after it hold ``PAD = -100``, pyalign.data's padding id, which the trainers
mask (pyalign.trainers.scoring: response_mask, padding_inputs). A response that reaches the cap
without EOS is unfinished, as ``max_new_tokens`` leaves a response. Sampling draws all the
cap's tokens and then pads after the first EOS: the tokens before it are the same draws a
sampler that stops there would make.

Gold reward, per word: ``(#grammatical positive adjectives - #grammatical negative adjectives
- UNGRAMMATICAL_PENALTY * #ungrammatical positions) / #words`` over the positions up to and
including EOS, where EOS is grammatical only after a full stop and #words counts the tokens
before EOS (at least 1). Two responses of the same density score the same at any length: the
gold reward neither rewards nor punishes length (an unfinished response is not penalised).

Labellers. The noisy labellers who order preference pairs and mark KTO's examples desirable
judge ``gold + length_bias * words`` (``TaskConfig.length_bias``, gold units per word): the
verbosity bias of human and LLM raters, which leaves the chosen response of real preference
data longer than the rejected one more often than not (Singhal et al. 2023, arXiv 2310.03716;
Saito et al. 2023, arXiv 2310.10076; Park et al. 2024, arXiv 2403.19159). The proxy reward
model is fitted on their labels exactly as in the fixed-length task (proxy.py: counts of the
tokens and bigrams up to EOS), so it learns the bias from its data, as real reward models do,
not from its formula: with count features, a preference for length is a positive weight on
every common token. On task seed 0 (base size, cap 32, the default length_bias 0.0025: a mild
bias) the chosen response is the longer one in 56% of the pairs of unequal length, and on SFT
samples the proxy gains 0.0022 per word where the gold reward moves by -0.0004; fitted on labels
with length_bias 0 the proxy moves by -0.0007 per word (the chosen is the longer in 50%). DPO,
IPO and SLiC train on the same labels.
"""
from __future__ import annotations

import torch

from . import language
from .language import CATEGORIES, EOS_ID, PAD_ID, VOCAB_SIZE, Language

PAD = -100          # after a response's end (pyalign.data.tokenize.PAD)
STOP_SHARE = 0.35   # P(full stop | noun): how often a sentence ends
END_PROB = 0.7      # P(the document ends | a full stop past the prompt)
# The lengthy preset's [task] table. DPO lengthened its responses by 1-2 tokens per nat of KL
# (at length_bias 0.005): at a cap of 24 they reached it at 3-5 nats, and the length claim saw
# the cap, not the policy; 32 leaves the SFT model's mean length (about 11 words) room to grow
# 3-fold.
LENGTHY = {"variable_length": True, "response_len": 32}


def make_language(seed: int) -> Language:
    return Language(seed, stop_share=STOP_SHARE)


def end_at_eos(responses: torch.Tensor) -> torch.Tensor:
    """``responses`` with PAD after each row's first EOS (the EOS kept)."""
    is_eos = (responses == EOS_ID).to(torch.int32)
    after = (torch.cumsum(is_eos, dim=-1) - is_eos) > 0
    return responses.masked_fill(after, PAD)


def documents(lang: Language, n: int, prompt_len: int, cap: int, generator: torch.Generator):
    """(prompts [n, prompt_len], responses [n, cap]): document openings without an end, and
    their continuations, ended after a full stop with probability END_PROB (EOS, then PAD)."""
    prompts, state = lang.sample(n, prompt_len, generator, return_state=True)
    text = lang.continue_from(state, cap, generator) if n else torch.empty(0, cap, dtype=torch.long)
    stops = torch.isin(text, torch.tensor(language.category_token_ids()["stop"]))
    ends = stops & (torch.rand(text.shape, generator=generator) < END_PROB)
    eos_at = torch.zeros_like(ends)
    eos_at[:, 1:] = ends[:, :-1]          # EOS right after the stop (none past the cap)
    return prompts, end_at_eos(torch.where(eos_at, EOS_ID, text))


def sft_batch(lang: Language, n: int, prompt_len: int, cap: int, generator: torch.Generator):
    """(input_ids, labels) of ``n`` whole documents for the SFT model: the padding is PAD_ID in
    the inputs (after the end: causal attention never reads it) and -100 in the labels."""
    prompts, responses = documents(lang, n, prompt_len, cap, generator)
    labels = torch.cat([prompts, responses], dim=1)
    return labels.masked_fill(labels < 0, PAD_ID), labels


def check_responses(responses: torch.Tensor, name: str = "responses") -> None:
    """Token ids or PAD, the PAD a suffix of each row."""
    if not isinstance(responses, torch.Tensor) or responses.dim() != 2 or responses.dtype != torch.long:
        raise ValueError(f"{name} must be a 2-D int64 LongTensor [n, length], got "
                         f"{getattr(responses, 'dtype', type(responses))} "
                         f"{tuple(getattr(responses, 'shape', ()))}")
    outside = ((responses < 0) & (responses != PAD)) | (responses >= VOCAB_SIZE)
    if bool(outside.any()):
        raise ValueError(f"{name} holds ids outside [0, {VOCAB_SIZE}) that are not the padding {PAD}")
    padding = responses < 0
    if bool((padding[:, :-1] & ~padding[:, 1:]).any()):
        raise ValueError(f"{name}: the padding {PAD} must only follow a response's last token")


def word_counts(responses: torch.Tensor) -> torch.Tensor:
    """LongTensor[n]: the tokens of each response before its first EOS."""
    ended = end_at_eos(responses)
    return ((ended >= 0) & (ended != EOS_ID)).sum(1)


def gold_reward(prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """FloatTensor[n]: the per-word gold reward of variable-length responses (module docstring)."""
    language._check_tokens(prompts, "prompts")
    check_responses(responses)
    if prompts.shape[0] != responses.shape[0]:
        raise ValueError(f"prompts and responses differ in batch size: {prompts.shape[0]} vs "
                         f"{responses.shape[0]}")
    if prompts.shape[1] < 1 or responses.shape[1] < 1:
        raise ValueError("prompts and responses need at least one token each")
    prompts, ended = prompts.cpu(), end_at_eos(responses.cpu())
    counted = ended >= 0
    tokens = ended.clamp_min(0)
    category = language.token_categories()
    prev = torch.cat([prompts[:, -1:], tokens[:, :-1]], dim=1)
    is_eos = tokens == EOS_ID
    eos_after_stop = is_eos & (category[prev] == CATEGORIES.index("stop"))
    grammatical = language.grammatical_positions(prompts, tokens) | eos_after_stop
    cats = category[tokens]
    positive = (counted & grammatical & (cats == CATEGORIES.index("pos"))).sum(1).float()
    negative = (counted & grammatical & (cats == CATEGORIES.index("neg"))).sum(1).float()
    ungrammatical = (counted & ~grammatical).sum(1).float()
    words = (counted & ~is_eos).sum(1).clamp_min(1).float()
    return (positive - negative - language.UNGRAMMATICAL_PENALTY * ungrammatical) / words


def judged_reward(prompts: torch.Tensor, responses: torch.Tensor, length_bias: float) -> torch.Tensor:
    """FloatTensor[n]: what the labellers see: the gold reward plus ``length_bias`` per word."""
    return gold_reward(prompts, responses) + length_bias * word_counts(responses.cpu()).float()


def heldout_documents(lang: Language, n: int, prompt_len: int, cap: int, generator) -> torch.Tensor:
    """LongTensor[n, prompt_len + cap]: whole documents, PAD after their end (perplexity text)."""
    prompts, responses = documents(lang, n, prompt_len, cap, generator)
    return torch.cat([prompts, responses], dim=1)


def length_stats(pairs: dict, proxy, length_bias: float) -> dict:
    """How length sits in the SFT samples ``pairs`` (with their gold rewards) that the proxy
    ``proxy`` was fitted on: their length distribution, the gold and proxy rewards'
    least-squares slopes on it (gold units per word), and how often the labellers chose the
    longer response of a pair of unequal lengths."""
    prompts = torch.cat([pairs["prompt"], pairs["prompt"]])
    responses = torch.cat([pairs["chosen"], pairs["rejected"]])
    words = word_counts(responses).double()
    gold = torch.cat([pairs["chosen_gold"], pairs["rejected_gold"]]).double()
    with torch.no_grad():
        proxy_score = proxy(prompts, responses).double()
    judged = judged_reward(prompts, responses, length_bias).double()

    def slope(y):
        centred = words - words.mean()
        return float((centred * (y - y.mean())).sum() / centred.square().sum())
    longer = word_counts(pairs["chosen"]) - word_counts(pairs["rejected"])
    quantiles = torch.quantile(words, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64))
    return {"sft_words_mean": float(words.mean()), "sft_words_quantiles": quantiles.tolist(),
            "sft_unfinished": float((responses != EOS_ID).all(1).double().mean()),
            "sft_judged_mean": float(judged.mean()), "gold_words_slope": slope(gold),
            "proxy_words_slope": slope(proxy_score),
            "chosen_longer": float((longer > 0).double().sum() / (longer != 0).double().sum())}


__all__ = ["PAD", "STOP_SHARE", "END_PROB", "LENGTHY", "make_language", "end_at_eos", "documents",
           "sft_batch", "check_responses", "word_counts", "gold_reward", "judged_reward",
           "heldout_documents", "length_stats"]
