"""Teachers cached on their own tokenization, put on the student's rows and vocabulary.

A teacher whose `teacher.json` names a `tokenization` was run on another tokenization of the
stored text (docs/CROSS_TOKENIZER.md). For each chunk the trainer reads its rows, aligns them
with the student's by byte ends (`align_rows`: a student row takes the teacher row whose context
ends at the same byte) and projects their top-k onto the student's vocabulary with the cached
map (`project_topk`: mass mapping to no student token joins the tail). Sampled targets are
projected draw by draw (`project_samples`: draws mapping to no student token join the tail) and
come out as top-k style rows of empirical frequencies. The result carries a
`present` mask: an unaligned student row gets no KD from that teacher, and the objective
renormalises the aggregation over the teachers present at each row (`aggregate/_presence.py`).
With an identity alignment and vocabulary map the stored rows (top-k or sampled counts) are passed
through unchanged, so identical tokenizers give exactly the same-tokenizer targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from mtkd_cache import CacheReader, ChunkData, SampledBlock
from mtkd_cache.align import align_rows, project_samples, project_topk
from mtkd_cache.format.meta import TeacherMeta
from mtkd_cache.format.text import read_byte_ends
from mtkd_cache.format.tokenization import TokenizationReader
from mtkd_train.data._errors import TeacherMismatchError

__all__ = ["AlignedSampled", "AlignedTopk", "CrossTeacher", "check_alignment", "cross_teachers", "read_chunk_aligned", "student_meta"]

DEFAULT_MIN_ALIGNMENT = 0.5
"""A teacher aligned at fewer than this share of the student's rows is refused before training."""


class AlignedTopk(NamedTuple):
    """Top-k targets on the student's rows: like `TopkBlock`, plus `present` (R,) bool."""

    indices: np.ndarray
    logp: np.ndarray
    tail: np.ndarray
    present: np.ndarray


class AlignedSampled(NamedTuple):
    """Sampled targets on the student's rows (identity vocabulary map only): like `SampledBlock`, plus `present`."""

    indices: np.ndarray
    counts: np.ndarray
    present: np.ndarray


@dataclasses.dataclass
class CrossTeacher:
    """A teacher on its own tokenization: that tokenization and its map to the student's vocabulary."""

    tokenization: TokenizationReader
    vocab_map: np.ndarray

    @property
    def identity_vocab(self) -> bool:
        return bool(np.array_equal(self.vocab_map, np.arange(len(self.vocab_map))))


def cross_teachers(reader: CacheReader, teachers: Sequence[str]) -> dict[str, CrossTeacher]:
    """The teachers among `teachers` cached on their own tokenization."""
    out = {}
    for name in teachers:
        meta = reader.teacher(name).meta
        if meta.tokenization is None:
            continue
        if meta.target.kind not in ("topk", "sample"):
            raise TeacherMismatchError(f"teacher {name!r} stores {meta.target.kind!r} targets on its own tokenization; "
                                       f"only top-k or sampled targets can be mapped onto the student's vocabulary")
        tok = TokenizationReader(reader, meta.tokenization)
        out[name] = CrossTeacher(tok, tok.vocab_map())
    return out


def student_meta(reader: CacheReader, meta: TeacherMeta) -> TeacherMeta:
    """`meta` as the student sees it after alignment: the inputs' tokenizer and vocabulary."""
    tok = reader.inputs.tokenizer
    if meta.tokenization is None or tok is None:
        return meta
    return dataclasses.replace(meta, tokenizer_fingerprint=tok.fingerprint, vocab_size=tok.vocab_size,
                               padded_vocab_size=tok.vocab_size)


def check_alignment(reader: CacheReader, teachers: Sequence[str], min_rate: float = DEFAULT_MIN_ALIGNMENT) -> None:
    """Refuse a teacher aligned at fewer than `min_rate` of the student's rows (figure recorded by `run`)."""
    for name, cross in cross_teachers(reader, teachers).items():
        rate = cross.tokenization.meta.alignment_rate
        if rate < min_rate:
            raise TeacherMismatchError(
                f"teacher {name!r} (tokenizer {cross.tokenization.meta.tokenizer.name_or_path!r}) is aligned with "
                f"{100 * rate:.1f}% of the student's positions, below the minimum {100 * min_rate:.0f}%; drop it, "
                f"or lower min_alignment (--min-alignment) to train on its aligned positions only")


def read_chunk_aligned(reader: CacheReader, chunk: int, teachers: Sequence[str],
                       features: Mapping[str, Sequence[int]] | None, cross: Mapping[str, CrossTeacher]) -> ChunkData:
    """`reader.read_chunk` with the `cross` teachers' targets aligned onto the student's rows."""
    data = reader.read_chunk(chunk, [t for t in teachers if t not in cross], features)
    for name in teachers:
        if name in cross:
            data.targets[name] = aligned_targets(reader, data, name, cross[name])  # type: ignore[assignment]
    if cross:
        data.targets = {t: data.targets[t] for t in teachers}  # the objective's teacher order
    return data


def _source_rows(student_ends: np.ndarray, data: ChunkData, teacher_ends: np.ndarray, t_off: np.ndarray,
                 t_len: np.ndarray) -> np.ndarray:
    """(used,) teacher row (within its chunk) of every student row of the chunk, -1 = unaligned."""
    src = np.full(len(student_ends), -1, dtype=np.int64)
    for o, n, to, tn in zip(data.offsets, data.lengths, t_off, t_len):
        rows = align_rows(student_ends[o : o + n], teacher_ends[to : to + tn])
        src[o : o + n] = np.where(rows >= 0, rows + to, -1)
    return src


def aligned_targets(reader: CacheReader, data: ChunkData, name: str, cross: CrossTeacher
                    ) -> AlignedTopk | AlignedSampled:
    """Teacher `name`'s targets on the student rows of chunk `data.chunk`.

    Top-k rows are projected with `project_topk`; sampled rows with `project_samples` (both give
    `AlignedTopk`). An identity vocabulary map passes the stored rows through (sampled rows stay counts).
    """
    tok = cross.tokenization
    used = int(data.offsets[-1] + data.lengths[-1]) if len(data.offsets) else 0
    t_off, t_len, p0 = tok.chunk_layout(data.chunk)
    t_used = int(t_off[-1] + t_len[-1]) if len(t_off) else 0
    src = _source_rows(read_byte_ends(reader, data.chunk, used), data, tok.rows("byte_ends", p0, p0 + t_used),
                       t_off, t_len)
    block: Any = reader.teacher(name).read_targets(p0, p0 + t_used)
    present = src >= 0
    take = np.where(present, src, 0)
    if isinstance(block, SampledBlock):
        if cross.identity_vocab:
            idx, counts = block.indices[take], block.counts[take]
            idx[~present], counts[~present] = 0, 0  # the batch's padding row
            return AlignedSampled(idx, counts, present)
        idx, logp, tail = project_samples(block.indices[take], block.counts[take], cross.vocab_map)
    elif cross.identity_vocab:
        idx, logp, tail = block.indices[take], block.logp[take], block.tail[take]
    else:
        idx, logp, tail = project_topk(block.indices[take], block.logp[take], block.tail[take], cross.vocab_map)
    idx[~present], logp[~present], tail[~present] = 0, -np.inf, 1.0  # the batch's padding row
    return AlignedTopk(idx, logp, tail, present)
