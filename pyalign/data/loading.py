"""Reading a dataset file (JSONL, JSON, Parquet, or a ``datasets.save_to_disk`` directory) into
rows, and checking them against TRL's dataset formats before any tokenization.

Formats (TRL's names), told apart by their columns:

- preference: ``prompt``, ``chosen``, ``rejected``; or the implicit-prompt form ``chosen``,
  ``rejected`` (the shared beginning is the prompt);
- unpaired preference (KTO): ``prompt``, ``completion``, ``label`` (bool: desirable); KTO takes
  preference rows too, each pair giving a desirable and an undesirable row (``unpair``);
- prompt-only (RL): ``prompt``.

Each text field is a string (standard) or a list of ``{"role", "content"}`` messages
(conversational), the same kind in every row. Every check names the file and the line (JSONL,
and JSON's syntax and encoding errors) or row: bytes that are not UTF-8, lone surrogates, a
missing column or a wrong type in any row.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

# The columns each kind of data needs (TRL's dataset formats).
FORMATS = {
    "preference": ("chosen", "rejected"),  # and optionally "prompt"
    "unpaired": ("prompt", "completion", "label"),
    "prompt": ("prompt",),
}
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion")


class DataError(ValueError):
    """Bad data; the message names the file and the row."""


@dataclass
class Rows:
    """The rows of a dataset file, and how to name one in a message."""
    path: str
    records: list
    unit: str = "row"  # "line" for JSONL (numbered as in an editor)
    numbers: list = None  # the line or row number of each record, 1-based

    def where(self, index: int) -> str:
        return f"{self.path} {self.unit} {self.numbers[index]}"

    def __len__(self) -> int:
        return len(self.records)


def _datasets(path: str, what: str):
    try:
        import datasets
    except ImportError as exc:
        from pyalign._utils import pip_extra
        raise DataError(f"{path}: {what} needs the datasets package ({pip_extra('data')} or "
                        f"pip install datasets)") from exc
    return datasets


def load_rows(path: str) -> Rows:
    """The records of ``path``; DataError for a missing, empty or unreadable file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        datasets = _datasets(path, "a datasets directory")
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as exc:
            raise DataError(f"{path}: not a datasets directory (datasets.load_from_disk: {exc})") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{path}: a DatasetDict without a 'train' split "
                                f"(splits: {', '.join(loaded)})")
            loaded = loaded["train"]
        records = loaded.to_list()
        rows = Rows(path, records, "row", list(range(1, len(records) + 1)))
    elif not os.path.isfile(path):
        raise DataError(f"{path}: no such file (JSONL, JSON, Parquet, or a datasets directory)")
    elif path.endswith(".parquet"):
        datasets = _datasets(path, "Parquet")
        try:
            records = datasets.Dataset.from_parquet(path).to_list()
        except Exception as exc:
            raise DataError(f"{path}: unreadable Parquet: {exc}") from exc
        rows = Rows(path, records, "row", list(range(1, len(records) + 1)))
    elif path.endswith(".jsonl"):
        rows = _jsonl_rows(path)
    elif path.endswith(".json"):
        rows = _json_rows(path)
    else:
        raise DataError(f"{path}: unknown data format; use .jsonl, .json, .parquet or a "
                        f"datasets directory")
    if not rows.records:
        raise DataError(f"{path}: empty (no rows)")
    return rows


def _text(raw: bytes, path: str, where: str) -> str:
    """``raw`` decoded as UTF-8, or a DataError naming the place of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} {where}: not UTF-8 text ({exc.reason}: byte "
                        f"{raw[exc.start:exc.start + 1].hex()} at byte {exc.start + 1} of it); save "
                        f"the file as UTF-8") from None


def _jsonl_rows(path: str) -> Rows:
    records, numbers = [], []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            line = _text(raw, path, f"line {number}")
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: invalid JSON: {exc}") from exc
            numbers.append(number)
    return Rows(path, records, "line", numbers)


def _json_rows(path: str) -> Rows:
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        start, end = raw.rfind(b"\n", 0, exc.start) + 1, raw.find(b"\n", exc.start)
        _text(raw[start:end if end >= 0 else None], path, f"line {line}")  # raises, naming it
        raise
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: invalid JSON: {exc}") from exc
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and data:
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DataError(f"{path}: its columns have different lengths {sorted(lengths)}")
        data = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects (or an object of columns)")
    return Rows(path, data, "row", list(range(1, len(data) + 1)))


def detect_format(rows: Rows) -> str:
    """'preference', 'unpaired' or 'prompt', from the first row's columns."""
    first = rows.records[0]
    if not isinstance(first, dict):
        raise DataError(f"{rows.where(0)}: expected an object of columns, got {type(first).__name__}")
    columns = set(first)
    for kind in ("preference", "unpaired", "prompt"):
        if set(FORMATS[kind]) <= columns:
            return kind
    raise DataError(f"{rows.where(0)}: columns {sorted(columns)} fit none of the accepted formats: "
                    f"prompt/chosen/rejected or chosen/rejected (preference), "
                    f"prompt/completion/label (unpaired, KTO), prompt (prompt-only, RL)")


def _is_messages(value) -> bool:
    return isinstance(value, list)


def _check_string(rows: Rows, index: int, what: str, value: str) -> None:
    """A string that is text: no lone surrogate (JSON's "\\ud800"), which no tokenizer takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{rows.where(index)}: {what} holds a lone surrogate "
                        f"(U+{ord(value[exc.start]):04X} at character {exc.start + 1}), which is not "
                        f"text; write the character itself or its surrogate pair") from None


def _check_text(rows: Rows, index: int, column: str, value) -> None:
    if isinstance(value, str):
        _check_string(rows, index, f"column {column!r}", value)
        return
    if isinstance(value, list) and value:
        for i, message in enumerate(value):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise DataError(f"{rows.where(index)}: column {column!r} message {i} must be "
                                f"{{'role': str, 'content': str}}, got {message!r}")
            for key in ("role", "content"):
                _check_string(rows, index, f"column {column!r} message {i} {key}", message[key])
        return
    raise DataError(f"{rows.where(index)}: column {column!r} must be a string or a non-empty "
                    f"list of {{'role', 'content'}} messages, got {value!r}")


def check_rows(rows: Rows, kind: str) -> bool:
    """Every row has the columns ``kind`` needs and every text column it holds is text (a
    string or messages, of one kind in the whole file), whatever the first row holds; True
    when conversational."""
    needed = FORMATS[kind]
    has_prompt = "prompt" in rows.records[0]
    conversational = None
    for index, record in enumerate(rows.records):
        if not isinstance(record, dict):
            raise DataError(f"{rows.where(index)}: expected an object of columns, "
                            f"got {type(record).__name__}")
        columns = needed + (("prompt",) if has_prompt and kind == "preference" else ())
        missing = [c for c in columns if record.get(c) is None]
        if missing:
            raise DataError(f"{rows.where(index)}: missing column(s) {', '.join(map(repr, missing))} "
                            f"(a {kind} dataset needs {', '.join(columns)})")
        for column in TEXT_COLUMNS:
            if record.get(column) is None or (column not in needed and column != "prompt"):
                continue
            _check_text(rows, index, column, record[column])
            if conversational is None:
                conversational = _is_messages(record[column])
            elif conversational != _is_messages(record[column]):
                raise DataError(f"{rows.where(index)}: column {column!r} mixes conversational "
                                f"(message lists) and standard (string) data")
        if kind == "unpaired" and not isinstance(record["label"], bool):
            raise DataError(f"{rows.where(index)}: column 'label' must be true or false, "
                            f"got {record['label']!r}")
    return bool(conversational)


def split_implicit_prompt(record: dict) -> tuple:
    """(prompt, chosen, rejected) of a preference row; without a prompt column, TRL's implicit
    prompt: the longest shared beginning of chosen and rejected (messages, or characters; a space
    just before the split goes to the completions)."""
    if record.get("prompt") is not None:
        return record["prompt"], record["chosen"], record["rejected"]
    chosen, rejected = record["chosen"], record["rejected"]
    length = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        length += 1
    if isinstance(chosen, str) and length and chosen[length - 1] == " ":
        length -= 1
    return chosen[:length], chosen[length:], rejected[length:]


def unpair(rows: Rows) -> Rows:
    """Preference rows as KTO's unpaired rows, as TRL's ``unpair_preference_dataset`` makes
    them: each pair's chosen completion a desirable row, its rejected one an undesirable row
    (every chosen row, then every rejected row), each named by its pair's line or row."""
    records = []
    for label in (True, False):
        for record in rows.records:
            prompt, chosen, rejected = split_implicit_prompt(record)
            records.append({"prompt": prompt, "completion": chosen if label else rejected,
                            "label": label})
    return Rows(rows.path, records, rows.unit, rows.numbers * 2)


def example_count(rows: Rows, kind: str) -> int:
    """The examples ``rows`` give a ``kind`` run: one per row, two per pair for KTO (unpaired)."""
    return 2 * len(rows) if kind == "unpaired" and detect_format(rows) == "preference" else len(rows)


__all__ = ["DataError", "Rows", "FORMATS", "load_rows", "detect_format", "check_rows", "unpair",
           "split_implicit_prompt", "example_count"]
