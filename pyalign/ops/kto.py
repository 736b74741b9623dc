"""KTO and its unpaired relatives (TRL KTOTrainer's ``loss_type``: ``kto``, ``apo_zero_unpaired``)
on unpaired desirable / undesirable examples: from sequence log-probs (``kto_loss``) or straight
from the policy's last hidden state (``linear_kto_loss``, which never holds [N, V] logits).

The losses are the unpaired entries of the loss registry (pyalign/losses.py), run under autograd
on [B] tensors. KTO's reference point z0 = max(mean(kl), 0), detached, is the mean of the
per-example KL estimates over every rank (``kto_reference_point``). docs/algorithms.md, "KTO".
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from pyalign import backends, losses
from pyalign._utils import accumulation_dtype
from pyalign.ops import _checks, _fused_head, _vocab_parallel
from pyalign.ops._loss_options import REDUCTIONS, reduced
from pyalign.ops.linear_logprobs import linear_token_logprobs
from pyalign.ops.preference import sequence_logprobs


class KTOLossOutput(NamedTuple):
    loss: torch.Tensor
    rewards: torch.Tensor  # beta * (policy_logps - ref_logps) [B], detached
    kl: torch.Tensor  # the z0 used (0-d): detached, clamped at 0; 0 for a loss without one
    logps: torch.Tensor  # the policy's sequence log-probs [B], detached (TRL's logps/chosen, ...)


def kto_reference_point(kl: torch.Tensor, process_group=None) -> torch.Tensor:
    """KTO's z0 = max(mean(kl), 0), detached, as a 0-d fp32 tensor (fp64 for fp64 ``kl``).

    ``kl``: per-example estimates [M] of log π(y'|x) − log ref(y'|x) on mismatched
    prompt/completion pairs, or one estimate (0-d, e.g. a rank's mean). When torch.distributed is
    initialised the mean is over the estimates of every rank of ``process_group`` (default: the
    world): an all_reduce of their sum and count, so ranks with different M (even 0) still give
    the global mean; every rank of the group must call it. No estimates anywhere: z0 = 0.
    NaN in ``kl`` gives a NaN z0.
    """
    _checks.check_tensor("kl", kl, floating=True)
    if kl.dim() > 1:
        raise ValueError(f"kl must be per-example estimates [M] or a 0-d tensor, got shape "
                         f"{tuple(kl.shape)}")
    distributed = dist.is_available() and dist.is_initialized()
    if process_group is not None:
        if not distributed:
            raise ValueError("process_group is given but torch.distributed is not initialised")
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, got "
                            f"{type(process_group).__name__}")
    estimates = kl.detach().reshape(-1).to(torch.float64)
    totals = torch.stack([estimates.sum(), estimates.new_tensor(float(estimates.numel()))])
    if distributed:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=process_group)
    # no estimates anywhere: 0 (a tensor select, not a Python branch: torch.compile keeps one graph)
    mean = torch.where(totals[1] > 0, totals[0] / totals[1].clamp(min=1), 0.0)
    out_dtype = accumulation_dtype(kl)
    return mean.clamp(min=0).to(out_dtype)


def _check_config(loss, beta, desirable_weight, undesirable_weight, reduction):
    if isinstance(loss, str) and loss in losses.PAIRWISE_NAMES:
        raise ValueError(f"loss {loss!r} is a pairwise loss (preference_loss); the unpaired losses "
                         f"are {losses.UNPAIRED_NAMES}")
    entry = losses.get(_checks.check_choice("loss", loss, losses.UNPAIRED_NAMES), pairwise=False)
    beta = _checks.check_positive("beta", beta)
    desirable_weight, undesirable_weight = (
        _checks.check_finite_range(name, weight, low=0.0, what=">= 0 and finite")
        for name, weight in (("desirable_weight", desirable_weight),
                             ("undesirable_weight", undesirable_weight)))
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    return entry, beta, desirable_weight, undesirable_weight


def _check_desirable(desirable, batch: int) -> torch.Tensor:
    """The flags as a bool [B]: a bool tensor, or 0/1 in any dtype (_checks.check_mask)."""
    desirable = _checks.check_mask("desirable", desirable)
    _checks.check_shape("desirable", desirable, (batch,), "[B], one flag per example")
    return desirable


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl: Optional[torch.Tensor] = None, *, loss: str = "kto", beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             reduction: str = "mean", process_group=None) -> KTOLossOutput:
    """An unpaired loss of TRL's KTOTrainer from sequence log-probs [B], r = policy − ref:

    - ``kto``: desirable ``λ_D·(1 − σ(β·(r − z0)))``, undesirable ``λ_U·(1 − σ(β·(z0 − r)))``,
      z0 = ``kto_reference_point(kl, process_group)``: the mean of the KL estimates ``kl`` ([M]
      or 0-d) over every rank when torch.distributed is initialised, clamped at 0, detached.
    - ``apo_zero_unpaired``: desirable ``λ_D·(1 − σ(β·r))``, undesirable ``λ_U·σ(β·r)``; no
      reference point (``kl`` is not used and may be None; the reported kl is 0).

    ``reduction``: ``mean`` over all B examples (as TRL: the weights scale the terms, they do not
    renormalise the mean), ``sum`` or ``none``. Returns the loss, the detached rewards β·r, the z0
    used and the detached policy log-probs. ``desirable`` [B]: bool, or 0/1 in any dtype (other
    values are refused, named); ``beta`` finite > 0; the weights finite >= 0.
    """
    entry, beta, desirable_weight, undesirable_weight = _check_config(
        loss, beta, desirable_weight, undesirable_weight, reduction)
    _checks.check_tensor("policy_logps", policy_logps, floating=True)
    _checks.check_tensor("ref_logps", ref_logps, floating=True)
    if policy_logps.dim() != 1:
        raise ValueError(f"policy_logps must be 1-D [B], got shape {tuple(policy_logps.shape)}")
    _checks.check_shape("ref_logps", ref_logps, policy_logps.shape, "policy_logps.shape")
    desirable = _check_desirable(desirable, policy_logps.shape[0])
    if kl is None and entry.uses_kl_reference:
        raise ValueError(f"loss {loss!r} needs kl: the KL estimates on mismatched prompt/completion "
                         f"pairs ([M], or one 0-d estimate)")
    if kl is not None:  # checked even where the loss does not use it
        _checks.check_tensor("kl", kl, floating=True)
    _checks.check_same_device(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable, kl=kl)
    acc = accumulation_dtype(policy_logps, ref_logps)
    if entry.uses_kl_reference:
        reference_point = kto_reference_point(kl, process_group).to(acc)
    else:
        reference_point = torch.zeros((), dtype=acc, device=policy_logps.device)
    out = _unpaired_losses(entry, policy_logps, ref_logps, reference_point, desirable, beta,
                           desirable_weight, undesirable_weight)
    return out._replace(loss=reduced(out.loss, reduction))


def _unpaired_losses(entry, policy_logps, ref_logps, reference_point, desirable, beta,
                     desirable_weight, undesirable_weight) -> KTOLossOutput:
    """The entry's per-example losses [B] on r = policy − ref (inputs validated, z0 reduced)."""
    acc = accumulation_dtype(policy_logps, ref_logps)
    log_ratio = policy_logps.to(acc) - ref_logps.to(acc)
    per_example = entry.forward(log_ratio, reference_point, desirable, beta, desirable_weight,
                                undesirable_weight)
    return KTOLossOutput(per_example, (beta * log_ratio).detach(), reference_point,
                         policy_logps.detach().to(acc))


# --------------------------------------------------------------------------- linear_kto_loss

def _check_head_inputs(hidden_name: str, hidden, labels_name: str, labels, weight, rows: str,
                       head_dtype=None) -> None:
    """Hidden states [rows, T, H] for the policy's head and their labels [rows, T], named as the
    caller named them (the inner linear_token_logprobs would say "hidden" and "labels")."""
    _checks.check_tensor(hidden_name, hidden, floating=True)
    _checks.check_tensor(labels_name, labels, integer=True)
    if hidden.dim() != 3 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{hidden_name} must be [{rows}, T, H] with H = weight.shape[1] = "
                         f"{weight.shape[1]}, got shape {tuple(hidden.shape)}")
    _checks.check_shape(labels_name, labels, hidden.shape[:-1], f"{hidden_name}.shape[:-1]")
    _checks.check_head_dtypes(hidden, weight, None, head_dtype, hidden_name=hidden_name)


def _check_reference_head(ref_weight, ref_bias, weight, ref_hiddens: dict, head_dtype) -> None:
    """The reference's lm_head: required as soon as any reference hidden state is given (never
    taken from the policy silently), refused without one."""
    given = [name for name, tensor in ref_hiddens.items() if tensor is not None]
    if given and ref_weight is None:
        raise ValueError(f"{' and '.join(given)} given without ref_weight: the reference model's "
                         f"lm_head [V, H] is required (pass weight itself if the reference shares the "
                         f"policy's head; it is never taken from the policy silently)")
    if not given and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight / ref_bias are given without ref_hidden or ref_kl_hidden "
                         "(the precomputed reference log-probs need no head)")
    if ref_weight is None:
        return
    _checks.check_tensor("ref_weight", ref_weight, floating=True)
    if tuple(ref_weight.shape) != tuple(weight.shape):
        raise ValueError(f"ref_weight must be [V, H] = {tuple(weight.shape)} like weight, got "
                         f"{tuple(ref_weight.shape)}")
    if ref_bias is not None:
        _checks.check_tensor("ref_bias", ref_bias, floating=True)
        _checks.check_shape("ref_bias", ref_bias, (ref_weight.shape[0],), "[V]")
    for name in given:
        _checks.check_head_dtypes(ref_hiddens[name], ref_weight, ref_bias, head_dtype,
                                  hidden_name=name, weight_name="ref_weight", bias_name="ref_bias")


def _check_precomputed(name: str, tensor, rows: int, what: str) -> None:
    _checks.check_tensor(name, tensor, floating=True)
    _checks.check_shape(name, tensor, (rows,), what)


def linear_kto_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    desirable: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                    kl: Optional[torch.Tensor] = None, kl_hidden: Optional[torch.Tensor] = None,
                    kl_labels: Optional[torch.Tensor] = None,
                    ref_logps: Optional[torch.Tensor] = None,
                    ref_hidden: Optional[torch.Tensor] = None,
                    ref_kl_logps: Optional[torch.Tensor] = None,
                    ref_kl_hidden: Optional[torch.Tensor] = None,
                    ref_weight: Optional[torch.Tensor] = None,
                    ref_bias: Optional[torch.Tensor] = None,
                    loss: str = "kto", beta: float = 0.1, desirable_weight: float = 1.0,
                    undesirable_weight: float = 1.0, ignore_index: int = -100,
                    temperature: float = 1.0, average_log_prob: bool = False,
                    head_dtype: Optional[torch.dtype] = None,
                    reduction: str = "mean", chunk_size: Optional[int] = None,
                    backend: str = "auto", process_group=None,
                    vocab_process_group=None) -> KTOLossOutput:
    """``kto_loss`` straight from the policy's last hidden state: no [B*T, V] logits are held.

    hidden [B, T, H], weight (the lm_head) [V, H], bias [V] or None, labels [B, T] aligned with
    hidden (``ignore_index`` on prompt and padding positions), desirable [B] (bool, or 0/1). The
    sequence log-probs are the masked sums of ``pyalign.linear_token_logprobs`` (means with
    ``average_log_prob=True``).

    Reference of the completions: ``ref_logps`` [B] precomputed, or ``ref_hidden`` [B, T, H]
    scored with ``ref_weight`` (+ ``ref_bias``), without gradient. ``ref_weight`` is required with
    any reference hidden state (pass ``weight`` if the reference shares the policy's head).

    KL estimates (``kto`` only; ignored by ``apo_zero_unpaired``): ``kl`` precomputed ([M] or
    0-d, as in kto_loss), or the mismatched pairs ``kl_hidden`` [M, T', H] + ``kl_labels``
    [M, T'], scored by the policy's head without gradient, with their reference ``ref_kl_logps``
    [M] or ``ref_kl_hidden`` [M, T', H] (scored with ``ref_weight``). z0 is their mean over every
    rank of ``process_group`` (the data-parallel group, as in ``kto_loss``), clamped at 0.

    ``head_dtype``: the fp32 head of ``linear_token_logprobs`` (a float32 ``weight`` with bf16 /
    fp16 hidden states, or ``head_dtype=torch.float32``), for the reference's head too.

    ``vocab_process_group``: the vocab-parallel head, as ``process_group`` of
    ``linear_token_logprobs`` (named apart: here ``process_group`` is the data-parallel group of
    z0). ``weight``, ``bias``, ``ref_weight`` and ``ref_bias`` are this rank's vocabulary rows;
    hidden states, labels and the rest are the same on every rank of it, and so is the result.
    """
    with _vocab_parallel.ShardChecks(vocab_process_group, "vocab_process_group") as shard_checks:
        entry, beta, desirable_weight, undesirable_weight = _check_config(
            loss, beta, desirable_weight, undesirable_weight, reduction)
        head_dtype = _checks.check_head_dtype(head_dtype)
        desirable = _check_policy_head(hidden, weight, bias, labels, desirable, ref_logps,
                                       ref_hidden, head_dtype)
        estimates = _check_kl_inputs(entry, loss, weight, _KLInputs(
            kl, kl_hidden, kl_labels, ref_kl_logps, ref_kl_hidden), head_dtype)
        _check_reference_head(ref_weight, ref_bias, weight,
                              {"ref_hidden": ref_hidden, "ref_kl_hidden": ref_kl_hidden}, head_dtype)
        _checks.check_same_device(hidden=hidden, weight=weight, labels=labels, desirable=desirable,
                                  bias=bias, ref_logps=ref_logps, ref_hidden=ref_hidden,
                                  ref_weight=ref_weight, ref_bias=ref_bias, **estimates._asdict())
        head = _SequenceHead(_checks.check_int("ignore_index", ignore_index),
                             _checks.check_temperature(temperature),
                             _checks.check_optional_positive_int("chunk_size", chunk_size),
                             _checks.check_bool("average_log_prob", average_log_prob),
                             backends.check_name(backend), vocab_process_group, head_dtype)
    fused = _fused_head.applies(reduction, hidden, weight, bias)
    scored_kl = entry.uses_kl_reference and estimates.kl is None
    # everything that decides the collectives a rank runs, or what they exchange
    shard = shard_checks.shard(weight, hidden, labels, head.ignore_index, agreed=dict(
        op="linear_kto_loss", fused=fused, reference="hidden" if ref_logps is None else "logps",
        kl=("hidden, reference " + ("hidden" if estimates.ref_kl_logps is None else "logps")
            if scored_kl else "precomputed or none"),
        temperature=head.temperature, ignore_index=head.ignore_index, chunk_size=head.chunk_size,
        hidden_dtype=hidden.dtype, head_dtype=_checks.logits_dtype(hidden, weight, head_dtype)))
    hidden = _checks.head_hidden(hidden, weight, head_dtype)
    if ref_hidden is not None:
        ref_hidden = _checks.head_hidden(ref_hidden, ref_weight, head_dtype)
    if ref_logps is not None:
        ref_logps = ref_logps.detach()
    kl = head.kl_estimates(estimates, weight, bias, ref_weight, ref_bias) if scored_kl else estimates.kl
    config = dict(beta=beta, desirable_weight=desirable_weight,
                  undesirable_weight=undesirable_weight)
    if fused:
        return _fused_linear_kto(hidden, weight, bias, labels, desirable, kl, ref_logps, ref_hidden,
                                 ref_weight, ref_bias, entry, config, process_group, head,
                                 reduction, shard)
    policy_logps = head.sequence_logps(hidden, weight, bias, labels)
    if ref_logps is None:
        with torch.no_grad():
            ref_logps = head.sequence_logps(ref_hidden, ref_weight, ref_bias, labels)
    return kto_loss(policy_logps, ref_logps, desirable, kl, loss=loss, reduction=reduction,
                    process_group=process_group, **config)


def _check_policy_head(hidden, weight, bias, labels, desirable, ref_logps, ref_hidden,
                       head_dtype) -> torch.Tensor:
    """The policy's head inputs and the completions' reference (precomputed or hidden states);
    returns the desirable flags as bool."""
    _checks.check_tensor("weight", weight, floating=True)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    _check_head_inputs("hidden", hidden, "labels", labels, weight, "B", head_dtype)
    if bias is not None:
        _checks.check_tensor("bias", bias, floating=True)
        _checks.check_head_dtypes(hidden, weight, bias, head_dtype)
    desirable = _check_desirable(desirable, hidden.shape[0])
    if (ref_logps is None) == (ref_hidden is None):
        raise ValueError("give exactly one of ref_logps (precomputed [B]) or ref_hidden")
    if ref_logps is not None:
        _check_precomputed("ref_logps", ref_logps, hidden.shape[0], "[B]")
    else:
        _checks.check_tensor("ref_hidden", ref_hidden, floating=True)
        _checks.check_shape("ref_hidden", ref_hidden, hidden.shape, "hidden.shape")
    return desirable


class _KLInputs(NamedTuple):
    """KTO's KL estimates: precomputed ``kl``, or the mismatched pairs and their reference."""
    kl: Optional[torch.Tensor]
    kl_hidden: Optional[torch.Tensor]
    kl_labels: Optional[torch.Tensor]
    ref_kl_logps: Optional[torch.Tensor]
    ref_kl_hidden: Optional[torch.Tensor]


def _check_kl_inputs(entry, loss, weight, given: _KLInputs, head_dtype) -> _KLInputs:
    """The KL inputs checked; all None for a loss without a reference point (checked anyway)."""
    if not entry.uses_kl_reference:  # apo_zero_unpaired: no reference point, nothing to score
        for name, tensor in given._asdict().items():
            if tensor is not None:  # checked, then unused
                _checks.check_tensor(name, tensor)
        return _KLInputs(None, None, None, None, None)
    if given.kl is not None:
        extra = [name for name, tensor in given._asdict().items() if name != "kl" and tensor is not None]
        if extra:
            raise ValueError(f"give either kl (precomputed estimates) or kl_hidden + kl_labels, not "
                             f"kl and {', '.join(extra)}")
        _checks.check_tensor("kl", given.kl, floating=True)
        return given
    if given.kl_hidden is None or given.kl_labels is None:
        raise ValueError(f"loss {loss!r} needs KL estimates: give kl (precomputed [M]) or "
                         f"kl_hidden [M, T', H] with kl_labels [M, T'] (mismatched pairs)")
    _check_head_inputs("kl_hidden", given.kl_hidden, "kl_labels", given.kl_labels, weight, "M",
                       head_dtype)
    if (given.ref_kl_logps is None) == (given.ref_kl_hidden is None):
        raise ValueError("give exactly one of ref_kl_logps (precomputed [M]) or ref_kl_hidden for "
                         "the reference of the KL pairs")
    if given.ref_kl_logps is not None:
        _check_precomputed("ref_kl_logps", given.ref_kl_logps, given.kl_hidden.shape[0],
                           "[M] = kl_hidden.shape[0]")
    else:
        _checks.check_tensor("ref_kl_hidden", given.ref_kl_hidden, floating=True)
        _checks.check_shape("ref_kl_hidden", given.ref_kl_hidden, given.kl_hidden.shape,
                            "kl_hidden.shape")
    return given


class _SequenceHead(NamedTuple):
    """linear_kto_loss's head options: sequence log-probs of hidden states through a head."""
    ignore_index: int
    temperature: float
    chunk_size: Optional[int]
    average: bool
    backend: str
    process_group: object  # the vocab-parallel group, or None
    head_dtype: Optional[torch.dtype]

    def sequence_logps(self, hidden_states, head, head_bias, token_labels):
        token_logps = linear_token_logprobs(hidden_states, head, token_labels, bias=head_bias,
                                            ignore_index=self.ignore_index,
                                            temperature=self.temperature,
                                            head_dtype=self.head_dtype,
                                            chunk_size=self.chunk_size, backend=self.backend,
                                            process_group=self.process_group)
        return sequence_logprobs(token_logps, token_labels != self.ignore_index,
                                 average=self.average)

    def kl_estimates(self, given: _KLInputs, weight, bias, ref_weight, ref_bias):
        """The mismatched pairs' log-ratios [M] (policy minus reference), no gradient."""
        with torch.no_grad():
            kl_ref = (given.ref_kl_logps if given.ref_kl_logps is not None else
                      self.sequence_logps(given.ref_kl_hidden, ref_weight, ref_bias, given.kl_labels))
            return self.sequence_logps(given.kl_hidden, weight, bias, given.kl_labels) - kl_ref


def _fused_linear_kto(hidden, weight, bias, labels, desirable, kl, ref_logps, ref_hidden,
                      ref_weight, ref_bias, entry, config, process_group, head: _SequenceHead,
                      reduction, shard) -> KTOLossOutput:
    """linear_kto_loss in 3 matmuls (pyalign/ops/_fused_head.py): chunks of whole sequences, each
    chunk's per-example losses by kto_loss's own ``_unpaired_losses``; z0 is reduced once, before
    the loop (its all_reduce must not run per chunk: ranks may have different chunk counts)."""
    acc = accumulation_dtype(hidden, ref_logps if ref_hidden is None else ref_hidden)
    if entry.uses_kl_reference:
        reference_point = kto_reference_point(kl, process_group).to(acc)
    else:
        reference_point = torch.zeros((), dtype=acc, device=hidden.device)

    def chunk_loss(rows, token_logps, mask, ref_tokens, _log_sum_sq):
        policy = sequence_logprobs(token_logps, mask, average=head.average)
        ref = (ref_logps[rows] if ref_tokens is None
               else sequence_logprobs(ref_tokens, mask, average=head.average))
        out = _unpaired_losses(entry, policy, ref, reference_point, desirable[rows], **config)
        return out.loss, (out.rewards, out.logps)

    reference = None if ref_hidden is None else _fused_head.ReferenceHead(ref_hidden, ref_weight,
                                                                          ref_bias)
    unit_rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    plan = _fused_head.FusedHeadPlan(labels, unit_rows, chunk_loss, reduction, head.ignore_index,
                                     head.temperature, head.chunk_size, head.backend, reference,
                                     vocab_shard=shard)
    loss, rewards, logps = _fused_head.fused_head_loss(hidden, weight, bias, plan)
    return KTOLossOutput(loss, rewards, reference_point, logps)
