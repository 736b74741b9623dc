"""The trainers' distributed set-up: the process group (``DistContext``, ``init_distributed``),
how a global batch splits over ranks and micro-batches, the FSDP2 wrapping unit, and the
DTensor helpers that turn a rank's shard into the full tensor and back (so checkpoints do not
depend on the number of ranks).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            # Every rank reaches this point before any tears down its gloo pairs: a rank that
            # destroys the group while a peer still talks to it aborts the peer (SIGABRT).
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed() -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and os.environ.get("PYALIGN_DEVICE", "") != "cpu"
    if world_size <= 1:
        return DistContext(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device,
                       owns_group=owns)


def split_evenly(total: int, world_size: int, what: str) -> int:
    if total % world_size:
        raise ValueError(f"{what} ({total}) must be divisible by the number of ranks ({world_size})")
    return total // world_size


def micro_slices(local_size: int, micro_size: int) -> list[slice]:
    micro_size = min(micro_size, local_size)
    if local_size % micro_size:
        raise ValueError(f"the per-rank batch ({local_size}) must be a multiple of "
                         f"micro_batch_size ({micro_size})")
    return [slice(i, i + micro_size) for i in range(0, local_size, micro_size)]


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (the FSDP2 wrapping unit)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    return list(layers) if layers is not None else []


def _is_tensor_dict(value) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(v, torch.Tensor) for v in value.values()))


def _gather_shard(param: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """The full tensor of which ``shard`` is this rank's part, laid out like ``param``."""
    from torch.distributed.tensor import DTensor
    if not isinstance(param, DTensor):
        return shard.detach().cpu()
    full = DTensor.from_local(shard, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride()).full_tensor()
    return full.detach().cpu()


def _local_shard(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full``, sharded like ``param`` (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(param, DTensor):
        return full
    full = full.to(device=param.device)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


def gather_strategy_state(state: dict, params: dict) -> dict:
    """A reference strategy's ``state_dict`` with every per-parameter tensor dict (a rank's
    shards, keyed by parameter name) gathered to full CPU tensors (a collective)."""
    return {key: ({name: _gather_shard(params[name], shard) for name, shard in value.items()}
                  if _is_tensor_dict(value) else value) for key, value in state.items()}


def shard_strategy_state(state: dict, params: dict) -> dict:
    """The inverse of ``gather_strategy_state``: this rank's shards of the full tensors."""
    return {key: ({name: _local_shard(params[name], full) for name, full in value.items()}
                  if _is_tensor_dict(value) else value) for key, value in state.items()}


def full_model_state(model: torch.nn.Module, sharded: bool) -> dict:
    """The model's full state dict on CPU (gathered from FSDP2 shards when ``sharded``: a
    collective, every rank calls it)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_full_model_state(model: torch.nn.Module, state: dict, sharded: bool) -> None:
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                   broadcast_from_rank0=False))
        return
    model.load_state_dict(state)


def full_optimizer_state(model: torch.nn.Module, optimizer, sharded: bool) -> dict:
    """The optimizer's full state dict (gathered when ``sharded``: a collective)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_optimizer_state(model: torch.nn.Module, optimizer, state: dict, sharded: bool) -> None:
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def wrap_scorer(scorer: torch.nn.Module, dist_ctx: DistContext, *, fsdp: bool, trainable: bool,
                bos_id: int) -> torch.nn.Module:
    """DDP for the trained scorer; under FSDP2 every model is sharded the same way (layers,
    then the scorer as root) so reference updates between them stay shard-local."""
    if not dist_ctx.distributed:
        return scorer
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in _decoder_layers(scorer.model):
            fully_shard(layer)
        # reshard the root after forward too (its default is to keep it gathered for the
        # backward): the reference/EMA updates must see every model as shards.
        fully_shard(scorer, reshard_after_forward=True)
        # One forward through the root before anything calls the bare model (generate):
        # FSDP2 initialises its root on the first forward and refuses a layer-first one.
        with torch.no_grad():
            token = torch.full((1, 1), bos_id, dtype=torch.long, device=dist_ctx.device)
            scorer(token, token, torch.ones_like(token, dtype=torch.bool))
        return scorer
    if not trainable:
        return scorer
    from torch.nn.parallel import DistributedDataParallel
    device_ids = [dist_ctx.device.index] if dist_ctx.device.type == "cuda" else None
    return DistributedDataParallel(scorer, device_ids=device_ids)


@contextlib.contextmanager
def unsharded(scorer: torch.nn.Module):
    """Plain (gathered) parameters for code that calls the bare model outside the scorer's
    forward (task.generate). A no-op without FSDP."""
    if not hasattr(scorer, "unshard"):
        yield
        return
    scorer.unshard()
    try:
        yield
    finally:
        scorer.reshard()


@contextlib.contextmanager
def accumulating(scorer: torch.nn.Module, last: bool):
    """Skip the gradient all-reduce (DDP's, FSDP2's) on all but the last micro-batch."""
    if not last and hasattr(scorer, "no_sync"):
        with scorer.no_sync():
            yield
    elif not last and hasattr(scorer, "set_requires_gradient_sync"):
        scorer.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            scorer.set_requires_gradient_sync(True)
    else:
        yield


__all__ = ["DistContext", "init_distributed", "split_evenly", "micro_slices", "gather_strategy_state",
           "shard_strategy_state", "full_model_state", "load_full_model_state", "full_optimizer_state",
           "load_full_optimizer_state", "wrap_scorer", "unsharded", "accumulating"]
