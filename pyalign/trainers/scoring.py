"""Scoring responses with pyalign's fused log-prob ops: ``response_mask`` (which response
tokens count) and ``ResponseScorer``, the module the trainers wrap (DDP/FSDP2) to get per-token
log-probs and entropies of responses given prompts.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

import pyalign
from pyalign.eager.logprobs import log_sum_sq_probs
from pyalign.integrations import packing
from pyalign.integrations import transformers as hf_head

IGNORE_INDEX = -100


def response_mask(responses: torch.Tensor, eos_id: Optional[int]) -> torch.Tensor:
    """True up to and including the first EOS of each response (all True when there is none),
    and never at padding (negative ids: pyalign.data pads with -100)."""
    real = responses >= 0
    if eos_id is None:
        return real
    is_eos = (responses == eos_id).to(torch.int32)
    return ((torch.cumsum(is_eos, dim=-1) - is_eos) == 0) & real


def padding_inputs(input_ids: torch.Tensor) -> dict:
    """The model inputs of token ids padded with negative ids (left-padded prompts,
    right-padded responses): the ids with padding replaced by 0, an attention mask without it
    and positions counted over the real tokens; just the ids when there is no padding."""
    real = input_ids >= 0
    if bool(real.all()):
        return {"input_ids": input_ids}
    return {"input_ids": input_ids.clamp_min(0), "attention_mask": real.long(),
            "position_ids": (real.long().cumsum(-1) - 1).clamp_min(0)}


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Sum of ``values`` where ``mask`` holds, in float64: selection, not ``values * mask`` (a NaN
    or inf at a masked position must not reach a logged metric)."""
    return float(torch.where(mask.bool(), values.detach(), 0.0).double().sum())


def _drop_padding_columns(prompts: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor):
    """Without the prompt columns that are padding in every row and the response columns after
    the last real token of every row: a batch of short rows does not pay for the longest row of
    its dataset."""
    if not bool((prompts < 0).any() or (responses < 0).any()):
        return prompts, responses, mask
    real_prompt, real_response = (prompts >= 0).any(0), (responses >= 0).any(0)
    first = int(real_prompt.nonzero()[0]) if bool(real_prompt.any()) else prompts.shape[1] - 1
    last = int(real_response.nonzero()[-1]) + 1 if bool(real_response.any()) else 1
    return prompts[:, first:], responses[:, :last], mask[:, :last]


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM of ``model``, under a PEFT wrapper if any: peft injects its
    LoRA layers into that model in place, so its decoder (``.base_model``) gives the adapted
    hidden states, where the PeftModel's own ``base_model`` is peft's tuner, which returns logits."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _fusable_head(causal_lm: torch.nn.Module) -> bool:
    """Whether the fused head reproduces ``causal_lm``'s logits exactly (``check_head``); a
    module without a config or an output head is not a causal LM the head can fuse."""
    try:
        hf_head.check_head(causal_lm)
    except (hf_head.UnsupportedHeadError, AttributeError):
        return False
    return True


def _padding_free_inputs(config, input_ids: torch.Tensor) -> packing.DecoderInputs:
    """Every row's real tokens (ids >= 0) packed into one row, positions restarting at 0 with
    each row (pyalign/integrations/packing.py keeps them apart); ``restore`` puts the decoder's
    output back into the padded rows."""
    real = input_ids >= 0
    positions = real.long().cumsum(-1) - 1
    decoder = packing.decoder_inputs(config, input_ids[real][None], None, positions[real][None])
    back = packing.scatter_rows(real)
    return packing.DecoderInputs(decoder.kwargs, lambda output: back(decoder.restore(output)))


class ResponseScorer(torch.nn.Module):
    """Per-token log-probs (and entropies) of response tokens given prompts, via pyalign's ops.

    With ``fused_linear`` the logits are never materialised: the causal LM's last hidden state
    and lm_head go to ``pyalign.linear_token_logprobs`` with the head's own soft-cap and logit
    scale, read as pyalign.integrations.transformers reads them (Gemma 2/3, Cohere, Granite,
    Falcon-H1, ...); a head it cannot reproduce exactly is scored from the model's logits
    instead. Wrapping this module (not the bare model) in DDP/FSDP keeps the lm_head inside the
    wrapped forward.

    With ``padding_free`` the padding never reaches the model: the real tokens of all the rows
    (prompt and response) run as one packed row, each row's a sequence of its own
    (pyalign/integrations/packing.py: sdpa and eager get a block-diagonal mask, flash attention
    its varlen path), with the same log-probs as the padded rows. Every row needs a prompt token.
    """

    def __init__(self, model: torch.nn.Module, *, fused_linear: bool = True, backend: str = "auto",
                 temperature: float = 1.0, bf16: bool = False, padding_free: bool = False):
        super().__init__()
        self.model = model
        self.fused_linear = bool(fused_linear) and _fusable_head(_causal_lm(model))
        self.backend = backend
        self.temperature = float(temperature)
        self.bf16 = bool(bf16)
        self.padding_free = bool(padding_free)

    def _inputs(self, prompts: torch.Tensor, responses: torch.Tensor) -> packing.DecoderInputs:
        input_ids = torch.cat([prompts, responses], dim=1)
        if not self.padding_free:
            return packing.DecoderInputs(padding_inputs(input_ids), lambda output: output)
        if not bool((prompts >= 0).any(-1).all()):
            raise ValueError("padding_free scoring needs a prompt token in every row (a "
                             "response's first token is predicted from the prompt's last)")
        return _padding_free_inputs(_causal_lm(self.model).config, input_ids)

    def _autocast(self, device: torch.device):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def forward(self, prompts: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor,
                entropy: bool = False, log_sum_sq: bool = False):
        """Per-token log-probs (and entropies with ``entropy``; and, with ``log_sum_sq``, log Σ p²
        per token, no gradient: WPO's input) of the response tokens, a tensor or a tuple."""
        width = responses.shape[1]
        prompts, responses, mask = _drop_padding_columns(prompts, responses, mask)
        inputs = self._inputs(prompts, responses)
        start = prompts.shape[1] - 1
        labels = responses.masked_fill(~mask, IGNORE_INDEX)
        with self._autocast(prompts.device):
            if self.fused_linear:
                causal_lm = _causal_lm(self.model)
                hidden = hf_head.backbone(causal_lm)(**inputs.kwargs, use_cache=False).last_hidden_state
                hidden = inputs.restore(hidden)[:, start:start + responses.shape[1]]
                names = ("log_probs", *(("entropy",) if entropy else ()),
                         *(("log_sum_sq_probs",) if log_sum_sq else ()))
                scored = hf_head.score_hidden(causal_lm, hidden, labels, mask,
                                              temperature=self.temperature, outputs=names,
                                              backend=self.backend)
                out = (scored[0], scored[1]) if entropy else scored[0]
                sum_sq = scored[2]
            else:
                logits = inputs.restore(self.model(**inputs.kwargs, use_cache=False).logits)
                logits = logits[:, start:start + responses.shape[1]]
                out = pyalign.token_logprobs(logits, labels, temperature=self.temperature,
                                             entropy=entropy, backend=self.backend)
                if log_sum_sq:
                    sum_sq = log_sum_sq_probs(logits, self.temperature)
        outputs = (*(out if entropy else (out,)), *((sum_sq,) if log_sum_sq else ()))
        if responses.shape[1] < width:  # back to the caller's width (the dropped columns: 0)
            outputs = tuple(torch.nn.functional.pad(t, (0, width - responses.shape[1])) for t in outputs)
        return outputs if len(outputs) > 1 else outputs[0]


__all__ = ["IGNORE_INDEX", "response_mask", "padding_inputs", "ResponseScorer"]
