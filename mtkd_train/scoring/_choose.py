"""From ranked scores to a training configuration (names, not codes, so the file is readable)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtkd_cache import CacheReader, open_cache
from mtkd_train.scoring._heldout import collect_heldout
from mtkd_train.scoring._score import HeldOut, ScoreRow, rank_operators

__all__ = ["choose", "choose_aggregate", "score_cache"]

log = logging.getLogger("mtkd_train")


def choose(rows: Sequence[ScoreRow], data: HeldOut) -> dict[str, Any]:
    """The best automatically choosable row as ``TrainConfig`` keys (``aggregate``, ``aggregate_kwargs``).

    Routing tables are written with domain names; everything else as scored.

    Raises:
        ValueError: no row may be chosen automatically.
    """
    best = next((r for r in rows if r.auto), None)
    if best is None:
        raise ValueError("no operator could be chosen automatically: score at least one of "
                         "mean, loglinear, entropy, confidence, mtbkd or routing")
    kwargs: dict[str, Any] = dict(best.kwargs)
    if "domain_weights" in kwargs and data.domain_names:
        kwargs["domain_weights"] = {data.domain_names[int(k)]: v for k, v in kwargs["domain_weights"].items()
                                    if int(k) < len(data.domain_names)}
    return {"aggregate": best.aggregate, "aggregate_kwargs": kwargs}


def score_cache(cache: str, teachers: Sequence[str], *, max_positions: int = 20_000,
                operators: Sequence[str] | None = None, storage_options: Mapping[str, Any] | None = None,
                heldout_info: dict[str, Any] | None = None) -> tuple[list[ScoreRow], dict[str, Any]]:
    """Score every operator over ``teachers`` of ``cache`` and choose one.

    Args:
        cache: Cache path or URL (ideally a held-out cache: the training cache works, the end of it
            is read).
        teachers: Teacher names.
        max_positions: Held-out positions to read.
        operators: Restrict the candidates.
        storage_options: fsspec options for a remote cache.
        heldout_info: If given, receives ``positions`` (scored) and ``aligned`` (their share of the
            positions read; below 1 with cross-tokenizer teachers, which are scored where aligned).

    Returns:
        ``(ranked rows, chosen config keys)``.
    """
    reader = open_cache(cache, storage_options=storage_options)
    data = collect_heldout(reader, teachers, max_positions=max_positions)
    if heldout_info is not None:
        heldout_info.update(positions=data.num_positions, aligned=data.aligned)
    rows = rank_operators(data, operators=operators)
    return rows, choose(rows, data)


def choose_aggregate(reader: CacheReader, teachers: Sequence[str], out: Path | None = None, *,
                     max_positions: int = 20_000) -> tuple[str, dict[str, Any]]:
    """`aggregate = "auto"`: score every operator on `reader`'s held-out positions and pick one.

    Logs the choice and, with `out`, writes the ranked table to `out/auto_aggregate.json`.

    Returns:
        ``(aggregate, aggregate_kwargs)`` for the trainer.
    """
    data = collect_heldout(reader, teachers, max_positions=max_positions)
    rows = rank_operators(data)
    chosen = choose(rows, data)
    best = next(r for r in rows if r.auto)
    log.info("aggregate=auto chose %s %s (held-out NLL %.4f over %d positions of %s, %.1f%% of those read (the rest "
             "unaligned with a cross-tokenizer teacher); best single teacher %.4f)", chosen["aggregate"],
             json.dumps(chosen["aggregate_kwargs"]), best.nll, data.num_positions, reader.url, 100 * data.aligned,
             min(r.nll for r in rows if r.note.endswith(" alone")))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "auto_aggregate.json").write_text(json.dumps(
            {"chosen": chosen, "positions": data.num_positions, "aligned": data.aligned, "cache": reader.url,
             "ranked": [r.to_dict() for r in rows]}, indent=2, default=str))
    return chosen["aggregate"], chosen["aggregate_kwargs"]
