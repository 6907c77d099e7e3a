"""Collect held-out positions of N cached teachers (I/O: reads a cache, returns tensors).

A position of a token-grid cache is a row ``j`` of a sample whose next token ``j + 1`` exists;
its label is that token (the causal convention of docs/FORMAT.md). A sample-grid cache gives one
position per labelled sample. Targets are re-tempered from their capture temperature to 1, so
the scores are of the teachers' real distributions. A teacher on its own tokenization is aligned
onto the student's rows and vocabulary (docs/CROSS_TOKENIZER.md): only the positions every such
teacher is aligned with are scored, and `HeldOut.aligned` gives their share.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mtkd_cache import CacheReader
from mtkd_train.data._align import cross_teachers, read_chunk_aligned, student_meta
from mtkd_train.scoring._score import HeldOut
from mtkd_train.targets import SparseTargets, from_samples, retemper

__all__ = ["collect_heldout"]


def _rows(data, grid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # noqa: ANN001 - ChunkData
    """Rows, their labels and their sample index within the chunk."""
    if grid == "token":
        toks = data.inputs["token_ids"]
        rows = [np.arange(o, o + n - 1) for o, n in zip(data.offsets, data.lengths)]
        owner = [np.full(int(n) - 1, i) for i, n in enumerate(data.lengths)]
        r = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
        return r, toks[r + 1].astype(np.int64), np.concatenate(owner).astype(np.int64) if owner else r
    labels = data.labels if data.labels is not None else np.full(len(data.sample_ids), -100)
    r = np.flatnonzero(labels >= 0)
    return r, labels[r].astype(np.int64), r


def _targets(block, rows: np.ndarray, capture_t: float, vocab: int) -> SparseTargets:  # noqa: ANN001
    if hasattr(block, "counts"):  # sampled (also a cross-tokenizer teacher's with an identity map)
        t = from_samples(torch.from_numpy(block.indices[rows]).long(), torch.from_numpy(block.counts[rows]).long())
    else:
        t = SparseTargets(torch.from_numpy(block.indices[rows]).long(), torch.from_numpy(block.logp[rows]).float(),
                          torch.from_numpy(block.tail[rows]).float())
    return retemper(t, 1.0 / capture_t, vocab) if capture_t != 1.0 else t


def collect_heldout(reader: CacheReader, teachers: Sequence[str], *, max_positions: int = 20_000,
                    chunks: Sequence[int] | None = None) -> HeldOut:
    """Read up to ``max_positions`` labelled positions of ``teachers``.

    Args:
        reader: An open cache.
        teachers: Complete teachers of that cache, sharing one vocabulary and grid.
        max_positions: Stop after this many positions (whole chunks are read).
        chunks: Chunks to read, in order (default: all, from the last backwards — the end of a
            cache is the usual held-out slice).

    Returns:
        The :class:`HeldOut` positions.

    Raises:
        ValueError: the teachers disagree on vocabulary or grid, or no labelled position exists.
    """
    metas = [student_meta(reader, reader.teacher(t).meta) for t in teachers]  # cross-tokenizer: after alignment
    vocabs, grids = {m.vocab_size for m in metas}, {m.grid for m in metas}
    if len(vocabs) != 1 or len(grids) != 1:
        raise ValueError(f"teachers {list(teachers)} must share one vocabulary and grid to be scored together; "
                         f"got vocabularies {sorted(vocabs)} and grids {sorted(grids)}")
    vocab, grid = vocabs.pop(), grids.pop()
    order = list(chunks) if chunks is not None else list(range(reader.num_chunks))[::-1]
    parts: list[list[SparseTargets]] = [[] for _ in teachers]
    labels, domains, got, seen = [], [], 0, 0
    cross = cross_teachers(reader, teachers)
    for c in order:
        data = read_chunk_aligned(reader, c, teachers, None, cross)
        rows, y, owner = _rows(data, grid)
        seen += len(rows)
        if cross:  # the positions every cross-tokenizer teacher is aligned with
            keep = np.logical_and.reduce([data.targets[t].present[rows] for t in cross])  # type: ignore[union-attr]
            rows, y, owner = rows[keep], y[keep], owner[keep]
        for i, (name, m) in enumerate(zip(teachers, metas)):
            parts[i].append(_targets(data.targets[name], rows, m.target.temperature, vocab))
        labels.append(torch.from_numpy(y))
        if data.domains is not None:
            domains.append(torch.from_numpy(np.asarray(data.domains)[owner].astype(np.int64)))
        got += len(y)
        if got >= max_positions:
            break
    if got == 0:
        raise ValueError(f"cache {reader.url} has no labelled position to score teachers on "
                         "(a token cache needs samples of 2+ tokens; a sample cache needs labels"
                         + (f"; the cross-tokenizer teachers {sorted(cross)} share no aligned position)" if cross else ")"))
    cat = [_cat(p, max_positions) for p in parts]
    return HeldOut(tuple(cat), torch.cat(labels)[:max_positions], vocab,
                   torch.cat(domains)[:max_positions] if len(domains) == len(labels) else None,
                   tuple(reader.inputs.domains or ()), tuple(teachers), aligned=got / max(seen, 1))


def _cat(parts: list[SparseTargets], limit: int) -> SparseTargets:
    k = max(p.logp.shape[1] for p in parts)

    def pad(t: SparseTargets) -> SparseTargets:
        extra = k - t.logp.shape[1]
        if not extra:
            return t
        return SparseTargets(torch.nn.functional.pad(t.indices, (0, extra)),
                             torch.nn.functional.pad(t.logp, (0, extra), value=-float("inf")), t.tail)

    ps = [pad(p) for p in parts]
    return SparseTargets(torch.cat([p.indices for p in ps])[:limit], torch.cat([p.logp for p in ps])[:limit],
                         torch.cat([p.tail for p in ps])[:limit])
