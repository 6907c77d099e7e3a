"""torch.distributed glue for sharded precompute: rank discovery, process group, barriers.

Under `torchrun` every rank runs the same `run_teacher` call; ranks take disjoint contiguous
chunk ranges and commit them independently, rank 0 creates the arrays first and finishes last.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["DistInfo", "barrier", "dist_info", "shutdown"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    initialized_here: bool


def dist_info(device_type: str) -> DistInfo:
    """Initialise the default process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return DistInfo(0, 1, 0, False)
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        created = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, created)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


