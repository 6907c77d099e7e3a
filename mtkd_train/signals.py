"""SIGTERM handling for the training loop: stop at a step boundary, on every rank at once.

`StopSignal` installs a SIGTERM handler that only sets a flag; the loop asks `should_stop()` once
per step, which all-reduces the flag (MAX) under DDP so every rank stops after the same step and
the final checkpoint is consistent. `restore()` puts the previous handler back.

torchrun stops a job by sending SIGTERM to each worker's whole process group, DataLoader workers
included, and SIGKILL after its grace period (`torchrun --shutdown-timeout`, default 30 s). A
DataLoader worker killed by that SIGTERM would make the training process fail before it saves, so
each worker leaves the trainer's process group (`own_process_group`, their `worker_init_fn`): a
group-wide SIGTERM reaches only the trainer, which then shuts its workers down. Workers still obey a
SIGTERM sent to them alone (the DataLoader's and multiprocessing's own shutdown) and exit when the
main process dies (the DataLoader's parent watchdog). Ignoring SIGTERM instead hangs every
interpreter exit that still holds a live worker: multiprocessing terminates daemon children with
SIGTERM, then joins them. The final checkpoint then costs at most the rest of the current step plus one save.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["StopSignal", "own_process_group"]


class StopSignal:
    """A SIGTERM flag the loop polls.

    Args:
        world: Number of ranks (1 = no collective).
        device: Device of the all-reduce tensor (the DDP backend's device).
    """

    def __init__(self, world: int, device: torch.device):
        self.world, self.device = world, device
        self.stopped = False
        self._previous: Any = None

    def install(self) -> StopSignal:
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopped = True

    def should_stop(self) -> bool:
        """True once any rank received SIGTERM (one all-reduce per call under DDP)."""
        if self.world > 1:
            flag = torch.tensor([1.0 if self.stopped else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.stopped = bool(flag.item() > 0)
        return self.stopped

    def restore(self) -> None:
        """Put back the handler that was installed before (idempotent)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def own_process_group(worker_id: int = 0) -> None:
    """`worker_init_fn` of the training DataLoader: its workers survive a process-group SIGTERM."""
    os.setpgid(0, 0)
