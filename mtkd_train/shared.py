"""Checks that every rank of a multi-node run sees the same run folder and the same cache.

Ranks on several nodes must share one store for `out` (checkpoints are written by rank 0 and read
back by every rank on resume) and read the same cache. Before step 0, rank 0 writes a marker file
with a fresh name into `out` and every rank looks for it; the ranks also compare the cache's
fingerprint (dataset + teacher identities). A rank that sees another folder or another cache
makes every rank fail with one message, instead of a resume that silently diverges.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from mtkd_train.config import ConfigError

__all__ = ["check_shared"]


def check_shared(out: Path, cache_fingerprint: str, *, rank: int, world: int, device: torch.device) -> None:
    """Refuse a run whose ranks do not share `out` or do not read the same cache (a collective).

    Args:
        out: The run folder.
        cache_fingerprint: A fingerprint of what this rank reads (dataset and teachers).
        rank, world: This rank and the world size (nothing to check for one rank).
        device: Device of the collectives' tensors.

    Raises:
        ConfigError: on every rank, naming the ranks that differ.
    """
    if world == 1:
        return
    names: list[str | None] = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    marker = out / f".mtkd_shared_{names[0]}"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text("written by rank 0 to check that every rank sees this folder; removed at once\n")
    dist.barrier()
    seen = marker.exists()
    prints: list[object] = [None] * world
    dist.all_gather_object(prints, (seen, cache_fingerprint))
    dist.barrier()
    if rank == 0:
        marker.unlink(missing_ok=True)
    blind = [r for r, p in enumerate(prints) if not p[0]]  # type: ignore[index]
    if blind:
        raise ConfigError(f"--out {out} is not the same folder on ranks {blind} (rank 0's marker file is not there); "
                          f"put --out on a store every node shares")
    other = [r for r, p in enumerate(prints) if p[1] != prints[0][1]]  # type: ignore[index]
    if other:
        raise ConfigError(f"ranks {other} read another cache than rank 0 (dataset or teachers differ); give "
                          f"every node the same cache, e.g. on a shared store")
