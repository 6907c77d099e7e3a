"""Which positions of a global batch a rank takes: its own lanes' (disjoint decoding) or a slice."""

from __future__ import annotations

import numpy as np

__all__ = ["lane_share", "rank_slice"]


def lane_share(lanes: np.ndarray, own: range, batch: int, rank: int) -> np.ndarray | None:
    """Rank's offsets in a full global batch whose positions lie in `lanes` (-1 = tail).

    The rank takes its own lanes' positions, then tail positions in rank order up to `batch`;
    None if some rank owns more than `batch` positions (never in a full batch when L | B*R).
    """
    per = len(own)
    owner = np.where(lanes >= 0, lanes // per, -1)
    world = len(lanes) // batch
    owned = np.bincount(owner[owner >= 0], minlength=world)[:world]
    deficit = batch - owned
    if (deficit < 0).any():
        return None
    free = np.flatnonzero(owner < 0)
    start = int(deficit[:rank].sum())
    take = free[start : start + int(deficit[rank])]
    return np.sort(np.concatenate([np.flatnonzero(owner == rank), take])).astype(np.int64)


def rank_slice(size: int, batch: int, world: int, rank: int) -> tuple[int, int]:
    """Rank's [lo, hi) of a global batch of `size` <= batch * world samples (even split if short)."""
    if size == batch * world:
        return rank * batch, (rank + 1) * batch
    base, extra = divmod(size, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)
