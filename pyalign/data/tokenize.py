"""From checked rows to padded token tensors, with TRL's semantics: conversational rows are
rendered with the tokenizer's chat template (the prompt with the generation prompt, each
completion as the rest of prompt + completion), an implicit prompt is the beginning chosen and
rejected share, KTO's unpaired rows may come from pairs (one desirable, one undesirable each),
standard prompts start with bos and standard completions end with eos, and truncation cuts the
prompt from the left (``max_prompt_length``) and the completion from the right (to
``max_length`` tokens in all).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .loading import DataError, Rows, check_rows, detect_format, split_implicit_prompt, unpair

PAD = -100  # the padding id of every tensor here: negative, so never a token


# What each kind of run accepts (a KTO run takes pairs too), and what it needs.
ACCEPTED = {"preference": ("preference",), "unpaired": ("unpaired", "preference"),
            "prompt": ("prompt", "preference", "unpaired")}
FORMAT_NEEDS = {"preference": ("chosen", "rejected"), "unpaired": ("prompt", "completion", "label"),
                "prompt": ("prompt",)}
NEEDS = {"preference": "preference data (prompt/chosen/rejected or chosen/rejected)",
         "unpaired": "unpaired data (prompt/completion/label) or preference pairs",
         "prompt": "a 'prompt' column"}


@dataclass
class TokenizedData:
    """Token ids of a dataset, padded with PAD: prompts on the left, completions on the right.
    ``completions`` maps a column (chosen, rejected; or completion) to its [n, R] tensor."""
    path: str
    kind: str  # preference, unpaired or prompt
    conversational: bool
    prompts: torch.Tensor
    completions: dict = field(default_factory=dict)
    labels: Optional[torch.Tensor] = None  # unpaired: desirable
    raw_prompts: list = field(default_factory=list)  # the prompt of each row, as in the file

    def __len__(self) -> int:
        return self.prompts.shape[0]


def _render(tokenizer, prompt, completions: list, where: str) -> tuple[str, list]:
    """(prompt text, completion texts) of a conversational row (TRL's apply_chat_template)."""
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        texts = []
        for completion in completions:
            full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
            if not full.startswith(prompt_text):  # a template that rewrites earlier turns
                full_no_gen = tokenizer.apply_chat_template(prompt, tokenize=False)
                start = len(full_no_gen) if full.startswith(full_no_gen) else 0
                texts.append(full[start:])
            else:
                texts.append(full[len(prompt_text):])
    except Exception as exc:
        raise DataError(f"{where}: the tokenizer's chat template failed on this row: {exc}") from exc
    return prompt_text, texts


def _ids(tokenizer, text: str) -> list:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _left_pad(sequences: list) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), PAD, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            out[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
    return out


def _right_pad(sequences: list) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), PAD, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def tokenize_rows(rows: Rows, tokenizer, *, kind: str, max_length: Optional[int] = None,
                  max_prompt_length: Optional[int] = None, max_positions: Optional[int] = None,
                  generation_length: int = 0) -> TokenizedData:
    """Check, render, tokenize, truncate and pad ``rows`` as ``kind`` data (preference,
    unpaired or prompt). ``max_positions`` (the model's) bounds prompt + completion, and for
    prompt-only data prompt + ``generation_length``; a longer row is a DataError."""
    found = detect_format(rows)
    if found not in ACCEPTED[kind]:
        first = rows.records[0]
        missing = [c for c in FORMAT_NEEDS[kind] if first.get(c) is None]
        raise DataError(f"{rows.where(0)}: this algorithm needs {NEEDS[kind]}, but this row has "
                        f"columns {sorted(first)} (missing {', '.join(map(repr, missing))})")
    conversational = check_rows(rows, found if kind != "prompt" else "prompt")
    if kind == "unpaired" and found == "preference":  # KTO on pairs: TRL's unpairing
        rows = unpair(rows)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{rows.path}: conversational data (lists of messages) needs a tokenizer "
                        f"with a chat template; this model's tokenizer has none")
    columns = {"preference": ("chosen", "rejected"), "unpaired": ("completion",), "prompt": ()}[kind]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompts, raw_prompts = [], []
    completions = {column: [] for column in columns}
    for index, record in enumerate(rows.records):
        where = rows.where(index)
        if kind == "preference":
            prompt, *texts = split_implicit_prompt(record)
        else:
            prompt, texts = record["prompt"], [record[column] for column in columns]
        raw_prompts.append(prompt)
        if conversational:
            prompt_text, texts = _render(tokenizer, prompt, texts, where)
            prompt_ids = _ids(tokenizer, prompt_text)
            texts_ids = [_ids(tokenizer, text) for text in texts]
        else:
            prompt_ids = _ids(tokenizer, prompt)
            if bos is not None and prompt_ids[:1] != [bos]:
                prompt_ids = [bos] + prompt_ids
            texts_ids = [_ids(tokenizer, text) for text in texts]
            if eos is not None:
                texts_ids = [ids if ids[-1:] == [eos] else ids + [eos] for ids in texts_ids]
        if max_prompt_length is not None:
            prompt_ids = prompt_ids[-max_prompt_length:]
        if not prompt_ids:
            raise DataError(f"{where}: the prompt is empty after tokenization (and the tokenizer "
                            f"has no bos token to start it)")
        if max_length is not None:
            room = max_length - len(prompt_ids) - (generation_length if kind == "prompt" else 0)
            if room < (0 if kind == "prompt" else 1):
                raise DataError(f"{where}: the prompt has {len(prompt_ids)} tokens, which leaves no "
                                f"room for a completion under max_length {max_length} (set "
                                f"max_prompt_length)")
            texts_ids = [ids[:room] for ids in texts_ids]
        for column, ids in zip(columns, texts_ids, strict=True):
            if not ids:
                raise DataError(f"{where}: column {column!r} is empty after tokenization")
        longest = len(prompt_ids) + max([len(ids) for ids in texts_ids] or [generation_length])
        if max_positions is not None and longest > max_positions:
            what = "its prompt + completion" if columns else \
                f"its prompt + max_completion_length ({generation_length})"
            raise DataError(f"{where}: {what} is {longest} tokens, longer than the model's "
                            f"{max_positions} positions (set max_length to truncate)")
        prompts.append(prompt_ids)
        for column, ids in zip(columns, texts_ids, strict=True):
            completions[column].append(ids)
    padded = {column: _right_pad(values) for column, values in completions.items()}
    if kind == "preference":  # chosen and rejected share one width (they go through one forward)
        width = max(t.shape[1] for t in padded.values())
        padded = {c: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=PAD)
                  for c, t in padded.items()}
    labels = None
    if kind == "unpaired":  # (rows may be the unpaired rows of pairs)
        labels = torch.tensor([bool(r["label"]) for r in rows.records], dtype=torch.bool)
    return TokenizedData(rows.path, kind, conversational, _left_pad(prompts), padded, labels,
                         raw_prompts)


__all__ = ["PAD", "TokenizedData", "tokenize_rows"]
