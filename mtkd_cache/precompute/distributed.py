"""torch.distributed glue for sharded precompute: rank discovery, control group, shared decisions.

Under `torchrun` every rank runs the same `run_teacher` call with its own copy of the teacher.
Ranks never exchange tensors, only small control messages: rank 0 claims the teacher and
broadcasts the list of uncommitted chunks, each rank takes every W-th entry of it (so a resume
with another world size, or after some chunks were committed, spreads the remaining work evenly),
and at the end the ranks gather the ids of samples with non-finite logits and wait for rank 0 to
finish. These messages go over gloo (TCP) even on GPUs, with a long timeout: a rank that finished
its share waits for the slowest rank and for rank 0's `finish`, which can take longer than NCCL's
10-minute watchdog. Each GPU rank is pinned to `cuda:LOCAL_RANK` before anything touches CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_gather", "barrier", "broadcast", "dist_info", "share_of", "shutdown"]

T = TypeVar("T")

CONTROL_TIMEOUT = timedelta(hours=float(os.environ.get("MTKD_CONTROL_TIMEOUT_HOURS", "24")))
"""How long a rank waits for the others at a control message (override: MTKD_CONTROL_TIMEOUT_HOURS)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    initialized_here: bool
    group: Any = None
    """The gloo process group for control messages (None: the default group, or one process)."""


def dist_info(device: torch.device) -> DistInfo:
    """Join the torchrun job, if any: pin the GPU, then set up a gloo control group.

    Args:
        device: This rank's (first) device; a CUDA device is made current (`torch.cuda.set_device`)
            before anything touches CUDA, so no rank works on cuda:0 by default.

    Returns:
        Rank facts; `world_size == 1` (no torchrun) creates no process group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return DistInfo(0, 1, 0, False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, True)
    # The caller already runs a (possibly NCCL) group: control messages get their own gloo group.
    group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, False, group)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier(group=info.group)


def broadcast(info: DistInfo, value: T) -> T:
    """Rank 0's `value` on every rank (any picklable object; `value` is ignored elsewhere)."""
    if info.world_size <= 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=info.group)
    return box[0]  # type: ignore[no-any-return]


def all_gather(info: DistInfo, value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    if info.world_size <= 1:
        return [value]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, value, group=info.group)
    return out


def share_of(todo: Sequence[int], info: DistInfo) -> list[int]:
    """This rank's part of `todo`: every W-th entry starting at its rank (interleaved, so
    neighbouring chunks, which tend to cost the same, land on different ranks)."""
    return list(todo[info.rank :: info.world_size])


def shutdown(info: DistInfo) -> None:
    if info.group is not None:
        dist.destroy_process_group(info.group)
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
