"""``loss_impl = auto`` for a student whose LM head can be fused: the faster fused path, timed once per run.

``fused_head`` never builds the ``(P, V)`` logits; ``fused`` builds them and can be faster when they fit easily
(:mod:`mtkd_train.losses._impl_choice` has the numbers). On the CPU, when one batch's logits are within
``PROBE_LOGITS``, rank 0 times both paths on synthetic inputs of the run's sizes (at most :data:`PROBE_ROWS` rows)
at set-up and every rank takes its choice. That takes about a second for a small student and ~13 s for a
SmolLM2-sized head, plus the row kernels' first compile. The choice and the timings are written to
``<out>/loss_impl.json``. Off the CPU, or at other sizes, it is ``fused_head`` as before, and that is recorded
too. ``--resume`` reads the record back instead of timing again, on whatever device the run continues, so a
resumed run takes the same path and stays bit for bit the run it continues. An explicit ``--loss-impl`` is never
second-guessed. Under DDP every rank takes rank 0's choice, and an error on rank 0 stops every rank with the same
line.
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
from mtkd_train.metrics import RunWriteError, write_error

__all__ = ["CHOICE_FILE", "choose_head_path"]

CHOICE_FILE = "loss_impl.json"
PATHS = ("fused", "fused_head")
PROBE_ROWS = 512
"""About this many loss rows are timed (whole sequences around them), to keep set-up short: a SmolLM2-sized head
(49,152 x 576) takes ~1-2 s per call at 512 rows. The ratio of the two paths moves little with the row count where
the choice is clear (0.51-0.70 at 512 rows and 0.49-0.76 at 1,024 for that head), more where they are close (at
V = 8,192, width 128, eager kernels: 1.14 at 512 rows, 1.26 at 4,096), where either path is a fair choice."""
log = logging.getLogger("mtkd_train")


def choose_head_path(out: Path, *, resume: bool, rank: int, world: int, device: torch.device, positions: int,
                     seq_len: int, hidden_size: int, head_rows: int, vocab: int, support: int, alpha: float,
                     **options: Any) -> str:
    """``"fused"`` or ``"fused_head"`` for this run (a collective under DDP: every rank calls it).

    Args:
        out: The run's folder (the choice is recorded in ``out / CHOICE_FILE``).
        resume: Take the recorded choice, wherever the run now runs; a run that recorded none (it predates the
            file) used ``fused_head``.
        positions: Loss rows of one batch; seq_len: positions per sequence; head_rows, hidden_size: the head's
            shape; vocab: the true vocabulary; support: the teachers' summed ``k``.
        options: :class:`~mtkd_train.losses.FusedOptions` of the run (``temperature``, ``kernels``, ...) and
            ``autocast``, the run's ``--amp`` dtype.

    Raises:
        ConfigError or RunWriteError on every rank when rank 0 cannot read, time or record the choice.
    """
    outcome: tuple[str, str] = ("ok", "fused_head")
    if rank == 0:
        try:
            outcome = ("ok", _rank0_choice(out, resume, device, positions, seq_len, hidden_size, head_rows, vocab,
                                           support, alpha, options))
        except (ConfigError, RunWriteError) as e:
            if world == 1:
                raise
            outcome = (type(e).__name__, str(e))
        except Exception as e:  # timing failed (a compile error, memory): every rank stops with the same line
            if world == 1:
                raise
            outcome = ("ConfigError", f"timing the fused loss paths for --loss-impl auto failed on rank 0 "
                                      f"({type(e).__name__}: {e}); pass --loss-impl fused or fused_head")
    if world > 1:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    kind, value = outcome
    if kind != "ok":
        raise (RunWriteError if kind == "RunWriteError" else ConfigError)(value)
    assert value in PATHS
    return value


def _rank0_choice(out: Path, resume: bool, device: torch.device, positions: int, seq_len: int, hidden_size: int,
                  head_rows: int, vocab: int, support: int, alpha: float, options: dict[str, Any]) -> str:
    recorded = _recorded(out) if resume else None
    if recorded is not None:
        return recorded
    timed = device.type == "cpu" and PROBE_LOGITS[0] <= positions * head_rows <= PROBE_LOGITS[1]
    if resume:
        if timed:
            log.warning("--resume: %s has no %s; continuing with fused_head, the path `auto` took before the "
                        "choice was recorded", out, CHOICE_FILE)
        return "fused_head"
    if not timed:
        _record(out, {"choice": "fused_head", "timed": False, "positions": positions, "head_rows": head_rows,
                      "device": device.type})
        return "fused_head"
    rows = min(positions, PROBE_ROWS)
    timing = time_fused_paths(rows, hidden_size, vocab, support=support, alpha=alpha, seq_len=seq_len,
                              head_rows=head_rows, device=device, **options)
    _record(out, {**timing.to_dict(), "timed": True, "positions": positions, "timed_rows": rows,
                  "seq_len": seq_len, "head_rows": head_rows, "vocab": vocab, "hidden_size": hidden_size,
                  "support": support})
    log.info("loss_impl auto: fused %.1f ms, fused_head %.1f ms on %d rows (head %d x %d) -> %s (recorded in %s)",
             timing.fused_ms, timing.fused_head_ms, rows, head_rows, hidden_size, timing.choice, out / CHOICE_FILE)
    return timing.choice


def _recorded(out: Path) -> str | None:
    """The recorded choice, or None without a file; a file that holds anything else is an error."""
    path = out / CHOICE_FILE
    if not path.exists():
        return None
    try:
        choice = json.loads(path.read_text()).get("choice")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        choice = f"unreadable ({type(e).__name__})"
    if choice not in PATHS:
        raise ConfigError(f"{path} records loss_impl {choice!r}, not fused or fused_head; restore the file, or write "
                          f'{{"choice": "fused"}} or {{"choice": "fused_head"}} into it: the path the first run\'s '
                          f"log line `loss_impl auto: ... -> PATH` names")
    return str(choice)


def _record(out: Path, record: dict[str, Any]) -> None:
    tmp = out / f".{CHOICE_FILE}.tmp"
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(tmp, out / CHOICE_FILE)
    except OSError as e:
        raise write_error(out / CHOICE_FILE, e) from e
