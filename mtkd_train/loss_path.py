"""``loss_impl = auto`` for a student whose LM head can be fused: the faster fused path, timed once per run.

``fused_head`` never builds the ``(P, V)`` logits; ``fused`` builds them and can be faster when they fit easily
(:mod:`mtkd_train.losses._impl_choice` has the numbers). On the CPU, when one batch's logits are within
``PROBE_LOGITS``, rank 0 times both paths on synthetic inputs of the run's sizes (at most :data:`PROBE_ROWS` rows)
at set-up and every rank takes its choice. That takes about a second for a small student and ~13 s for a
SmolLM2-sized head, plus the row kernels' first compile. The choice and the timings are written to
``<out>/loss_impl.json``. ``--resume`` reads that file back instead of timing again, so a resumed run takes the
same path and stays bit for bit the run it continues. Elsewhere (CUDA, larger or smaller batches) it is
``fused_head``, as before. An explicit ``--loss-impl`` is never second-guessed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mtkd_train.config import ConfigError
from mtkd_train.losses._impl_choice import PROBE_LOGITS, time_fused_paths

__all__ = ["CHOICE_FILE", "choose_head_path"]

CHOICE_FILE = "loss_impl.json"
PATHS = ("fused", "fused_head")
PROBE_ROWS = 512
"""At most this many rows are timed. The head-fused path works in fixed chunks of rows, so the two paths' ratio
hardly moves with the row count: for a SmolLM2-sized head (49,152 x 576) it was 0.51-0.70 at 512 rows and
0.49-0.76 at 1,024. At 512 rows that head takes ~1-2 s per call."""
log = logging.getLogger("mtkd_train")


def choose_head_path(out: Path, *, resume: bool, rank: int, world: int, device: torch.device, positions: int,
                     hidden_size: int, vocab: int, support: int, alpha: float, **options: Any) -> str:
    """``"fused"`` or ``"fused_head"`` for this run (a collective under DDP: every rank calls it).

    Args:
        out: The run's folder (the choice is recorded in ``out / CHOICE_FILE``).
        resume: Take the recorded choice; a run recorded none (it predates the file) used ``fused_head``.
        positions: Rows of one batch; vocab, hidden_size: the head's shape; support: the teachers' summed ``k``.
        options: :class:`~mtkd_train.losses.FusedOptions` of the run (``temperature``, ``kernels``, ...).
    """
    if device.type != "cpu" or not PROBE_LOGITS[0] <= positions * vocab <= PROBE_LOGITS[1]:
        return "fused_head"
    choice = None
    if rank == 0:
        choice = _recorded(out) if resume else None
        if resume and choice is None:
            log.warning("--resume: %s has no %s; continuing with fused_head, the path `auto` took before the "
                        "choice was recorded", out, CHOICE_FILE)
            choice = "fused_head"
        if choice is None:
            rows = min(positions, PROBE_ROWS)
            timing = time_fused_paths(rows, hidden_size, vocab, support=support, alpha=alpha, device=device,
                                      **options)
            choice = timing.choice
            _record(out, {**timing.to_dict(), "positions": positions, "timed_rows": rows, "vocab": vocab,
                          "hidden_size": hidden_size, "support": support})
            log.info("loss_impl auto: fused %.1f ms, fused_head %.1f ms on %d rows (head %d x %d) -> %s "
                     "(recorded in %s)", timing.fused_ms, timing.fused_head_ms, rows, vocab, hidden_size, choice,
                     out / CHOICE_FILE)
    if world > 1:
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    assert choice in PATHS
    return choice


def _recorded(out: Path) -> str | None:
    """The recorded choice, or None without a file; a file that holds anything else is an error."""
    path = out / CHOICE_FILE
    if not path.exists():
        return None
    try:
        choice = json.loads(path.read_text()).get("choice")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not a loss_impl record ({e}); delete it to time the paths again, or pass "
                          f"--loss-impl fused or fused_head") from e
    if choice not in PATHS:
        raise ConfigError(f"{path} records loss_impl {choice!r}, not fused or fused_head; delete it to time the "
                          f"paths again, or pass --loss-impl fused or fused_head")
    return str(choice)


def _record(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{CHOICE_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, out / CHOICE_FILE)
