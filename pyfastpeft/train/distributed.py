"""Multi-process training: ``torchrun --nproc-per-node N -m pyfastpeft finetune ...``.

Every rank draws the same global batch from the same data generator and trains on its own slice of
rows; the loss is the global token mean (each rank's token sum over the global count, times the world
size because DistributedDataParallel averages), so N processes compute the single-process gradient up
to float32 rounding. DDP reduces only parameters that require gradients: frozen base weights are never
communicated. Rank 0 alone writes files.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (WORLD_SIZE > 1); a single process needs nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device, fsdp: bool = False) -> torch.nn.Module:
    """DDP around ``model``, or with ``fsdp`` FSDP2 in place: each decoder block one sharded unit (its
    frozen and trainable tensors side by side), then the root. Build the optimizer after this: FSDP2
    replaces the parameters by sharded ones."""
    if not info.enabled:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from .methods import decoder_blocks

        mesh = init_device_mesh(device.type, (info.world_size,))
        for block in decoder_blocks(model)[1]:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def gather_full(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors from FSDP2's sharded ones (a collective: every rank calls it); others pass through."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach() for k, v in state.items()}


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_rank(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """True on every rank when any rank says True (a Ctrl-C seen by one process stops them all)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)  # nccl reduces device tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        # An FSDP2 model is a web of reference cycles (its hooks hold its state): collect it now, while the
        # group exists, rather than at interpreter exit after the group is gone. A gloo rank that tore down
        # a sharded model's leftovers after destroy_process_group aborted once in a full test run
        # ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()
