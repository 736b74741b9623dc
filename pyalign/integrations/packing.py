"""Packed sequences in a Hugging Face causal LM: several sequences in one row, ``position_ids``
restarting at 0 at each one (TRL's ``padding_free``, Unsloth's packing), scored as if each were
alone in its own row. Used by ``causal_lm_logprobs(position_ids=...)`` and the trainers'
``ResponseScorer(padding_free=True)``.

- Labels: a token at position 0 starts a sequence; nothing before it in its sequence predicts
  it, so it is never a label (``boundary_labels``).
- Attention: each token attends only to the tokens before it in its own sequence. What does that
  depends on the model's attention implementation (``config._attn_implementation``; read in
  transformers 5.25, ``masking_utils`` and ``modeling_flash_attention_utils``):

  - ``sdpa``, ``eager``: a 4-D mask built here from ``position_ids`` (block-diagonal, causal in
    each sequence, padding keys excluded; bool for sdpa, additive fp32 for eager), which
    transformers' mask functions pass through as they are. transformers' own detection of packed
    ``position_ids`` (``find_packed_sequence_indices``, transformers 5.x) is not relied on: it
    runs only with no 2-D attention mask and no cache (``model(packed, position_ids=...)`` with
    the default ``use_cache=True`` builds a cache and attends across the sequences), it splits
    wherever positions do not grow by exactly 1, and only models that build their masks through
    ``masking_utils`` have it.
  - flash attention (any implementation whose name contains "flash", as transformers'
    ``is_flash_attention_requested`` reads it: ``flash_attention_2``, ``flash_attention_3``,
    hub flash kernels): takes no 4-D mask; its ``_flash_attention_forward`` (transformers >= 4.44)
    runs the varlen kernel with sequence starts from the positions when the batch is one row and
    no attention mask is given. So the real tokens of every row are flattened into that one row
    (each row must then start a sequence: position 0 at its first real token) and the hidden
    states are scattered back.
  - any other implementation (``flex_attention``, paged attention, a registered custom one):
    ValueError.

- Layers a mask cannot confine: a config whose ``layer_types`` name anything but
  ``full_attention`` / ``sliding_attention`` (recurrent, linear-attention, chunked layers carry
  state or attend across sequences) is refused; on sdpa / eager a sliding window shorter than a
  packed sequence is refused (the mask built here has no window; flash attention applies the
  window inside each sequence).

The mask is [B, T, T] per call (bool for sdpa, fp32 for eager): with long packed rows flash
attention is the implementation to use.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

_MASKED_LAYERS = ("full_attention", "sliding_attention")
_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


class DecoderInputs(NamedTuple):
    """What the decoder is called with (``input_ids``, ``attention_mask``, ``position_ids``) and
    ``restore``, which takes its output [B', T', ...] back to the rows and columns of the
    original ``input_ids`` [B, T, ...] (zeros where the flattened form has no token)."""

    kwargs: dict
    restore: Callable[[torch.Tensor], torch.Tensor]


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def check_position_ids(position_ids, input_ids: torch.Tensor) -> torch.Tensor:
    """``position_ids`` as [B, T] integer positions >= 0 (a [1, T] one broadcast over the rows)."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point \
            or position_ids.dtype == torch.bool or position_ids.is_complex():
        raise TypeError(f"position_ids must be an integer tensor, got "
                        f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}")
    if position_ids.dim() != 2 or position_ids.shape[1] != input_ids.shape[1] \
            or position_ids.shape[0] not in (1, input_ids.shape[0]):
        raise ValueError(f"position_ids must be [B, T] or [1, T] like input_ids "
                         f"{tuple(input_ids.shape)}, got {tuple(position_ids.shape)}")
    if bool((position_ids < 0).any()):
        raise ValueError("position_ids must be >= 0 (a sequence starts at position 0)")
    return position_ids.to(input_ids.device).expand_as(input_ids)


def boundary_labels(labels: torch.Tensor, position_ids: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``labels`` [B, T] with every token at position 0 (a sequence's first) set to ignore_index."""
    return labels.masked_fill(position_ids.to(labels.device) == 0, ignore_index)


def is_packed(position_ids: torch.Tensor, real: torch.Tensor) -> bool:
    """Whether some row holds a second sequence: a real token at position 0 with a real token
    before it in the row (the first real token of a left-padded row starts no second one)."""
    real_before = (real.long().cumsum(-1) - real.long()) > 0
    return bool(((position_ids == 0) & real & real_before).any())


def block_causal_mask(position_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T]: query t may attend to key s <= t of its own sequence (a sequence runs
    from a position 0 to the next) when s is real; every token attends to itself, so a padding
    row is never empty (an empty row gives NaN in sdpa, which 0-weights do not remove)."""
    length = position_ids.shape[1]
    sequence = (position_ids == 0).long().cumsum(-1)
    same = sequence[:, :, None] == sequence[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    itself = torch.eye(length, dtype=torch.bool, device=position_ids.device)
    return ((same & causal & real[:, None, :]) | itself)[:, None]


def _check_layers(config, position_ids: torch.Tensor, real: torch.Tensor, windowless: bool) -> None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        other = sorted(set(layer_types) - set(_MASKED_LAYERS))
        if other:
            raise ValueError(f"packed sequences: the model has {other} layers, which no attention "
                             f"mask confines to one sequence; score the sequences in their own rows")
    window = getattr(config, "sliding_window", None)
    slides = window is not None and (layer_types is None or "sliding_attention" in layer_types)
    if windowless and slides:
        lengths = _sequence_lengths(position_ids, real)
        if lengths.numel() and int(lengths.max()) > window:
            raise ValueError(f"packed sequences: a sequence of {int(lengths.max())} tokens is longer "
                             f"than the model's sliding_window ({window}), which the mask built for "
                             f"sdpa / eager does not apply; use flash attention or shorter sequences")


def _sequence_lengths(position_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The number of real tokens of every packed sequence."""
    # a row's sequence numbers run from 0 to T: offset each row by T + 1
    sequence = (position_ids == 0).long().cumsum(-1) + (position_ids.shape[1] + 1) * torch.arange(
        position_ids.shape[0], device=position_ids.device)[:, None]
    return torch.bincount(sequence[real])


def scatter_rows(real: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The inverse of ``tensor[real][None]``: [1, N, ...] -> [B, T, ...], each of the N values
    back at its real position (row-major), zeros elsewhere; differentiable."""
    def restore(output: torch.Tensor) -> torch.Tensor:
        where = real.view(*real.shape, *[1] * (output.dim() - 2))
        return output.new_zeros((*real.shape, *output.shape[2:])).masked_scatter(where, output[0])
    return restore


def _flattened(input_ids: torch.Tensor, position_ids: torch.Tensor, real: torch.Tensor) -> DecoderInputs:
    """The real tokens of every row in one row, for flash attention's varlen path."""
    first_real = real.long().argmax(-1)
    starts = position_ids.gather(1, first_real[:, None])[:, 0]
    if bool(((starts != 0) & real.any(-1)).any()):
        raise ValueError("packed sequences on flash attention: the rows are flattened into one, so "
                         "each row must start a sequence (position_ids 0 at its first real token)")
    return DecoderInputs({"input_ids": input_ids[real][None], "attention_mask": None,
                          "position_ids": position_ids[real][None]}, scatter_rows(real))


def attention_route(implementation: str) -> str:
    """How packed sequences stay apart under an attention implementation: "mask" (a 4-D mask
    built here) or "flatten" (one row, flash attention's varlen path); ValueError otherwise."""
    if "flash" in implementation:
        return "flatten"
    if implementation in _MASK_IMPLEMENTATIONS:
        return "mask"
    raise ValueError(f"packed sequences need attn_implementation sdpa, eager or a flash attention "
                     f"one (which keep each sequence to itself); the model uses {implementation!r}")


def decoder_inputs(config, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                   position_ids: Optional[torch.Tensor]) -> DecoderInputs:
    """The decoder's inputs for ``input_ids`` [B, T] whose ``position_ids`` may pack several
    sequences per row (see the module docstring); unchanged when they do not."""
    unchanged = DecoderInputs({"input_ids": input_ids, "attention_mask": attention_mask,
                               "position_ids": position_ids}, _unchanged)
    if position_ids is None:
        return unchanged
    real = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
            else attention_mask.to(position_ids.device) != 0)
    if not is_packed(position_ids, real):
        return unchanged
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    implementation = getattr(text_config, "_attn_implementation", None) or "eager"
    route = attention_route(implementation)
    _check_layers(text_config, position_ids, real, windowless=route == "mask")
    if route == "flatten":
        return _flattened(input_ids, position_ids, real)
    mask = block_causal_mask(position_ids, real)
    if implementation == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(
            ~mask, torch.finfo(torch.float32).min)
    return DecoderInputs({"input_ids": input_ids, "attention_mask": mask,
                          "position_ids": position_ids}, _unchanged)
