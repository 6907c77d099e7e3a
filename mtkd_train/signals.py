"""SIGTERM handling for the training loop: stop at a step boundary, on every rank at once.

`StopSignal` installs a SIGTERM handler that only sets a flag; the loop asks `should_stop()` once
per step, which all-reduces the flag (MAX) under DDP so every rank stops after the same step and
the final checkpoint is consistent. `restore()` puts the previous handler back.

torchrun stops a job by sending SIGTERM to each worker's whole process group, DataLoader workers
included, and SIGKILL after its grace period (`torchrun --shutdown-timeout`, default 30 s). A
DataLoader worker killed by that SIGTERM would make the training process fail before it saves, so
workers ignore SIGTERM (`ignore_sigterm`, their `worker_init_fn`) and end when the loader is shut
down. The final checkpoint then costs at most the rest of the current step plus one save.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["StopSignal", "ignore_sigterm"]


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


def ignore_sigterm(worker_id: int = 0) -> None:
    """`worker_init_fn` of the training DataLoader: its workers survive a process-group SIGTERM."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
