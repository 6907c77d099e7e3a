"""The optional per-position loss mask of token inputs (``inputs/loss_mask``, docs/FORMAT.md).

``prepare --messages-column`` / ``--prompt-column`` store, next to ``inputs/token_ids``, a
``uint8`` array of the same shape, chunks and shards: 1 where the token is one to learn (an
assistant reply, a completion), 0 elsewhere. Under the causal convention row ``j`` predicts token
``j + 1``, so row ``j`` is trained when ``loss_mask[j + 1]`` is 1. A cache without the array
trains every position, so caches written before it read unchanged.

The mask is part of each sample's content hash (``fingerprint.token_sample_content``), so the
same tokens with another mask are other inputs. Cost: one byte per position before zstd.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["LOSS_MASK", "create_loss_mask_array", "next_token_rows"]

LOSS_MASK = "loss_mask"
"""The array's name under ``inputs/`` and its key in ``ChunkData.inputs``."""


def create_loss_mask_array(group: Any, like: Any, **kwargs: Any) -> Any:
    """Create ``inputs/loss_mask`` in zarr group ``group`` with the chunks and shards of ``like``.

    Args:
        group: The ``inputs`` zarr group.
        like: The ``token_ids`` array whose layout the mask shares.
        kwargs: ``compressors`` and ``config`` of the token ids.
    """
    return group.create_array(LOSS_MASK, shape=(0,), dtype="uint8", chunks=like.chunks, shards=like.shards,
                              fill_value=0, overwrite=True, **kwargs)


def next_token_rows(loss_mask: np.ndarray | None, length: int) -> np.ndarray | None:
    """``(L,)`` bool: rows ``j`` whose next token ``j + 1`` is marked (the last row never is).

    Args:
        loss_mask: ``(L,)`` per-token mask or None (every row trainable: returns None).
        length: ``L``.
    """
    if loss_mask is None:
        return None
    rows = np.zeros(length, dtype=bool)
    rows[:-1] = np.asarray(loss_mask[1:length], dtype=bool)
    return rows
