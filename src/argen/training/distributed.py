"""Process-group setup and model wrapping for training under `torchrun`.

- `init_distributed(device)` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK); with one
  process it returns a single-rank `DistInfo` and creates no process group. CUDA uses NCCL with one
  GPU per local rank; the CPU uses gloo.
- `wrap_model(model, info, strategy)`: "none", "ddp" (DistributedDataParallel) or "fsdp" (FSDP2
  `fully_shard` on every transformer block and then the root, so parameters, gradients and the
  optimizer state are sharded). "auto" picks FSDP for models above `FSDP_AUTO_PARAMS`, else DDP.
- `no_grad_sync(model)`: context for gradient-accumulation micro-steps that must not all-reduce.
- `all_reduce_mean`, `all_gather_objects`, `barrier`, `cleanup` are no-ops with one process.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from argen.utils.dist_env import process_ranks
from argen.utils.errors import ArgenError

FSDP_AUTO_PARAMS = 1_000_000_000
STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group if there is one; pick this rank's device."""
    rank, world, local_rank = process_ranks()
    if device.type == "cuda":
        if world > 1:
            if local_rank >= torch.cuda.device_count():
                raise ArgenError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                                 f"use --nproc_per_node <= the number of GPUs")
            device = torch.device("cuda", local_rank)
        elif device.index is None:  # "cuda" / "auto": torch.cuda.set_device refuses a device without an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def resolve_strategy(strategy: str, model: nn.Module, info: DistInfo) -> str:
    if strategy not in STRATEGIES:
        raise ArgenError(f"unknown distributed strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if not info.distributed:
        return "none" if strategy in ("auto", "ddp") else strategy
    if strategy == "auto":
        return "fsdp" if sum(p.numel() for p in model.parameters()) > FSDP_AUTO_PARAMS else "ddp"
    return strategy


def wrap_model(model: nn.Module, info: DistInfo, strategy: str) -> nn.Module:
    """Return the module to train: the model itself, a DDP wrapper, or the model sharded in place."""
    if strategy == "none":
        return model
    if strategy == "ddp":
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ArgenError(f"unknown distributed strategy {strategy!r}")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, active: bool):
    """Skip the gradient all-reduce inside the block when `active` (accumulation micro-steps)."""
    if not active:
        yield
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
