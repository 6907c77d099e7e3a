"""The run's metric log: `metrics.jsonl` (one JSON record per logged step) and, if asked, TensorBoard.

A component the training loop calls (`log`, `log_eval`) and the recipe closes in `close()`. On
resume the JSONL is cut back to the checkpoint's step first, so the steps re-run after a crash
are not logged twice: the file always holds each step once, in order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

__all__ = ["MetricLogger", "RunWriteError", "truncate_metrics"]


class RunWriteError(OSError):
    """A file of the run folder (metrics, the final student) cannot be written: full disk, no permission."""


def write_error(path: Path, e: OSError) -> RunWriteError:
    """The one-line error for a failed write of `path`."""
    return RunWriteError(f"{path} could not be written ({type(e).__name__}: {e}); free space on that disk or "
                         f"choose an --out with room, then --resume")


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records of `path` logged after `step` (atomic rewrite); return how many were dropped.

    A torn last line (the process was killed mid-write) is dropped too.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
    return dropped


class MetricLogger:
    """Appends step records to `out/metrics.jsonl` and mirrors scalars to TensorBoard.

    Args:
        out: The run folder.
        tensorboard: Also write `out/tensorboard` (needs the tensorboard package).
        resume_step: When resuming, the checkpoint's step: later records are dropped first.

    Raises:
        ImportError: `tensorboard` without the tensorboard package.
    """

    def __init__(self, out: Path, *, tensorboard: bool = False, resume_step: int | None = None):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        # a resume keeps the records up to its checkpoint; a fresh run in this folder (an earlier
        # attempt died before its first checkpoint) starts the file anew, so no step is logged twice
        truncate_metrics(self.path, resume_step if resume_step is not None else 0)
        self._tb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out / "tensorboard"))
        self._file: IO[str] | None = open(self.path, "a")  # noqa: SIM115 - closed in close()

    def log(self, step: int, scalars: dict[str, float], **extra: Any) -> None:
        """One training record: `{"step", **scalars, **extra}`; scalars also go to TensorBoard."""
        self._write({"step": step, **scalars, **extra})
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, step)

    def log_eval(self, step: int, result: dict[str, Any]) -> None:
        """An evaluation record `{"step", "eval": result}`."""
        self._write({"step": step, "eval": result})

    def _write(self, rec: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        try:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        except OSError as e:
            raise write_error(self.path, e) from e

    def close(self) -> None:
        """Flush and close the JSONL file and the TensorBoard writer (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
