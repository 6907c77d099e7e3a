"""From ranked scores to a training configuration (names, not codes, so the file is readable)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mtkd_cache import open_cache
from mtkd_train.scoring._heldout import collect_heldout
from mtkd_train.scoring._score import HeldOut, ScoreRow, rank_operators

__all__ = ["choose", "score_cache"]


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
                operators: Sequence[str] | None = None,
                storage_options: Mapping[str, Any] | None = None) -> tuple[list[ScoreRow], dict[str, Any]]:
    """Score every operator over ``teachers`` of ``cache`` and choose one.

    Args:
        cache: Cache path or URL (ideally a held-out cache: the training cache works, the end of it
            is read).
        teachers: Teacher names.
        max_positions: Held-out positions to read.
        operators: Restrict the candidates.
        storage_options: fsspec options for a remote cache.

    Returns:
        ``(ranked rows, chosen config keys)``.
    """
    reader = open_cache(cache, storage_options=storage_options)
    data = collect_heldout(reader, teachers, max_positions=max_positions)
    rows = rank_operators(data, operators=operators)
    return rows, choose(rows, data)
