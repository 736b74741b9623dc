"""The user's own data for ``pyalign train --data``: TRL's dataset formats, loaded, checked,
tokenized and served to the trainers.

    rows = load_rows("prefs.jsonl")                 # JSONL / JSON / Parquet / a datasets directory
    examples = tokenize_rows(rows, tokenizer, kind="preference", max_length=512)
    task = DatasetTask(tokenizer, examples, max_positions=2048)   # what the trainers consume

``loading`` reads the file and checks each row's columns and types (``DataError`` names the
file and row); ``tokenize`` renders conversational rows with the tokenizer's chat template,
splits implicit prompts, truncates (prompt from the left, completion from the right) and pads;
``task`` is ``DatasetTask``, the dataset-backed stand-in for the embedded task
(``pyalign.tasks``); ``rewards`` loads ``--reward`` (``path/to/file.py:function``,
``module:function`` or a reward-model directory).

Padding: token tensors pad with ``PAD = -100`` (prompts on the left, completions on the
right); the trainers' scorer treats negative ids as padding (attention mask, no loss).
"""
from .loading import DataError, example_count, load_rows
from .task import DatasetTask
from .tokenize import PAD, TokenizedData, tokenize_rows

__all__ = ["DataError", "load_rows", "example_count", "tokenize_rows", "TokenizedData", "DatasetTask", "PAD"]
