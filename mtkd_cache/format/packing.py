"""Packed samples with document isolation: position ids and a block-diagonal attention mask.

A packed sample holds several documents back to back; ``doc_starts`` (stored per sample in
``samples.parquet``) lists the token offset where each begins, the first being 0. For every
document to see only itself, both the teacher run and the student get:

* position ids that restart at 0 at each document start;
* a 4-D additive attention mask ``(B, 1, L, L)``: 0 where query and key lie in the same document
  and the key is not later than the query, ``-inf`` (the dtype's minimum) elsewhere; padding keys
  are masked too. Hugging Face decoder models take it in place of the 2-D mask.

Then a packed sample's logits equal those of each document run alone. Pure tensor code,
``O(B L^2)`` for the mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["DOC_START", "doc_start_marks", "document_ids", "document_ids_from_marks", "isolated_inputs",
           "packed_attention_mask", "packed_position_ids"]

DOC_START = "doc_start"
"""Key of the per-position document-start marks in ``ChunkData.inputs`` of packed caches (not stored)."""


def document_ids(doc_starts: Sequence[Sequence[int]], length: int, lengths: Sequence[int]) -> torch.Tensor:
    """``(B, L)`` int64 document index of each token; ``-1`` on padding.

    Args:
        doc_starts: Per sample, the offsets where its documents start (``[0]`` or empty for an
            unpacked sample).
        length: ``L``, the padded length.
        lengths: Per sample, its number of real tokens.

    Raises:
        ValueError: starts not increasing, not beginning at 0, or beyond the sample's length.
    """
    out = torch.full((len(lengths), length), -1, dtype=torch.long)
    for b, (starts, n) in enumerate(zip(doc_starts, lengths)):
        s = list(starts) or [0]
        if s[0] != 0 or any(x >= y for x, y in zip(s, s[1:])) or s[-1] >= max(int(n), 1):
            raise ValueError(f"sample {b}: doc_starts {s} must start at 0, increase and lie below its "
                             f"length {n}; re-run `mtkd-cache prepare --pack`")
        marks = torch.zeros(int(n), dtype=torch.long)
        marks[torch.tensor(s[1:], dtype=torch.long)] = 1
        out[b, : int(n)] = marks.cumsum(0)
    return out


def packed_position_ids(doc: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` position ids restarting at each document (0 on padding)."""
    idx = torch.arange(doc.shape[1], device=doc.device).expand_as(doc)
    new = torch.ones_like(doc, dtype=torch.bool)
    new[:, 1:] = doc[:, 1:] != doc[:, :-1]
    start = torch.where(new, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, L)
    return torch.where(doc >= 0, idx - start, torch.zeros_like(idx))


def packed_attention_mask(doc: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, 1, L, L)`` additive causal mask within documents (see the module docstring).

    A padding query row keeps its own key open, so no row is fully masked (fully masked rows give
    NaN in SDPA); padding rows are never read.
    """
    length = doc.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=doc.device).tril()
    same = (doc.unsqueeze(2) == doc.unsqueeze(1)) & (doc.unsqueeze(1) >= 0)  # (B, Lq, Lk)
    allowed = (same & causal) | torch.eye(length, dtype=torch.bool, device=doc.device)
    zero = torch.zeros((), dtype=dtype, device=doc.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min).unsqueeze(1)


def doc_start_marks(doc_starts: Sequence[Sequence[int] | None], lengths: Sequence[int]) -> np.ndarray:
    """``(sum(lengths),)`` bool, True where a document starts, samples back to back.

    Every sample's first position is a start: a sample that begins inside a document (the rest
    of a document cut at ``max_length`` by ``prepare --pack``) sees that rest as its own document.

    Args:
        doc_starts: Per sample, the stored offsets (None or empty for an unpacked sample).
        lengths: Per sample, its number of tokens.
    """
    out = np.zeros(int(sum(int(n) for n in lengths)), dtype=bool)
    cursor = 0
    for starts, n in zip(doc_starts, lengths):
        offsets = [int(x) for x in (starts or []) if 0 <= int(x) < int(n)]
        out[cursor + np.asarray([0, *offsets], dtype=np.int64)] = True
        cursor += int(n)
    return out


def document_ids_from_marks(marks: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` int64 document index of each token from start marks ``(B, L)`` bool; -1 on padding.

    ``real`` ``(B, L)`` bool marks the sample's tokens (right padding after them).
    """
    starts = marks.clone()
    starts[:, 0] = True
    doc = starts.long().cumsum(1) - 1
    return torch.where(real, doc, torch.full_like(doc, -1))


def isolated_inputs(doc_start: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype
                    ) -> dict[str, torch.Tensor]:
    """HF decoder keywords that isolate packed documents: a 4-D ``attention_mask`` and ``position_ids``.

    Args:
        doc_start: ``(B, L)`` bool, True where a document starts (right padding False).
        attention_mask: ``(B, L)`` 2-D mask, 1 on real tokens.
        dtype: The model's floating dtype (the additive mask's).

    Returns:
        ``{"attention_mask": (B, 1, L, L), "position_ids": (B, L)}``.
    """
    doc = document_ids_from_marks(doc_start.bool(), attention_mask.bool())
    return {"attention_mask": packed_attention_mask(doc, dtype), "position_ids": packed_position_ids(doc)}
