"""Tiny Hugging Face causal LMs and a locally trained tokenizer, for the integration tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained with the ``tokenizers`` library
on text made here, wrapped in ``PreTrainedTokenizerFast`` (bos/eos/pad and a small chat
template), and each model is built from its config with random weights and saved beside it, so
``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` work
as they would on a user's own model directory.

    path = save_tiny_model(tmp_path / "llama", "llama")
    model, tokenizer = load_tiny_model(path)

``ARCHITECTURES`` lists what ``tiny_config`` builds; each stresses one head feature (tied
embeddings, final-logit soft-capping, logit scaling).
"""
from __future__ import annotations

import os
import random

import torch

# A Jinja chat template in the common role/content form (TRL's conversational datasets).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>",
                  "<|end|>"]
_WORDS = ("the a cat dog sat ran on under mat log big small red blue quickly slowly and then "
          "it was is good bad yes no one two three four five happy sad tree river sun moon").split()

# What each architecture stresses in the head.
ARCHITECTURES = {
    "llama": "untied head",
    "qwen2": "untied head, attention bias",
    "gemma2": "final_logit_softcapping",
    "gpt2": "tied embeddings (lm_head is wte)",
    "cohere": "logit_scale multiplier",
    "granite": "logits_scaling divisor",
    "mistral": "untied head, sliding-window attention",
    "qwen3": "untied head, q/k norms",
    "phi3": "untied head, fused qkv projection",
    "gemma3_text": "final_logit_softcapping with tied embeddings",
}


def sample_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def train_tokenizer(vocab_size: int = 320, seed: int = 0):
    """A byte-level BPE tokenizer trained on generated sentences (PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [sample_text(rng, rng.randint(3, 12)) for _ in range(2000)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 4,
                max_positions: int = 128):
    """The config of a tiny ``arch`` model (random weights once built)."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {arch!r}")
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_embd=hidden, n_layer=layers,
                                    n_head=heads, n_positions=max_positions, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                  max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, tie_word_embeddings=False)
    if arch == "gemma2":
        common.update(head_dim=hidden // heads, final_logit_softcapping=5.0,
                      attn_logit_softcapping=50.0, query_pre_attn_scalar=hidden // heads,
                      sliding_window=max_positions)
    elif arch == "gemma3_text":
        common.update(head_dim=hidden // heads, final_logit_softcapping=5.0,
                      query_pre_attn_scalar=hidden // heads, sliding_window=max_positions,
                      tie_word_embeddings=True)
    elif arch == "mistral":
        common.update(sliding_window=max_positions)
    elif arch == "qwen3":
        common.update(head_dim=hidden // heads)
    elif arch == "cohere":
        common.update(logit_scale=0.5)
    elif arch == "granite":
        common.update(logits_scaling=4.0)
    return AutoConfig.for_model(arch, **common)


def build_tiny_model(arch: str, tokenizer, seed: int = 0, **sizes):
    """A tiny ``arch`` causal LM with random weights, in float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), **sizes))
    return model.float().eval()


def save_tiny_model(path, arch: str = "llama", seed: int = 0, **sizes) -> str:
    """Build, then save a tiny model and its tokenizer to ``path`` (a user's model directory)."""
    path = os.fspath(path)
    tokenizer = train_tokenizer(seed=seed)
    model = build_tiny_model(arch, tokenizer, seed=seed, **sizes)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_tiny_model(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(os.fspath(path), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    return model.float(), tokenizer
