"""Bridges into the user's own stack: Hugging Face ``transformers`` models (``transformers``),
TRL's trainers (``trl``), and LoRA adapters through peft (``lora``). Nothing here is imported by
``import pyalign``: each submodule imports its peer library when it is used, and the peers stay
optional (transformers is a dependency; trl and peft are not)."""
