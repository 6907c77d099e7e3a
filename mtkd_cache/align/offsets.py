"""Token ends in the text's bytes, and the student-row -> teacher-row alignment they give.

Offsets come from the tokens' own bytes (:func:`~mtkd_cache.align.token_bytes`), not from the
tokenizer's ``offset_mapping``, whose conventions differ (trimmed spaces, overlapping spans for a
character split across byte tokens, SentencePiece's phantom leading ``▁``). Where the tokens'
bytes do not spell the text exactly (a normalising tokenizer), they are matched to it with a
longest-common-subsequence diff and the share of the text's bytes no token covers is reported.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np

__all__ = ["align_rows", "alignment_rate", "byte_ends"]


def byte_ends(pieces: Sequence[bytes | None], text: bytes) -> tuple[np.ndarray, float]:
    """End offset (in ``text``'s bytes) of each token, and the share of ``text`` the tokens lose.

    Args:
        pieces: The bytes of each token of one sequence (``None`` for special tokens, which end
            where the previous token ended).
        text: The UTF-8 text that was tokenized.

    Returns:
        ``(ends, lost)``: ``ends`` int64 ``(L,)`` non-decreasing, each in ``[0, len(text)]``;
        ``lost`` in ``[0, 1]``, the fraction of ``text``'s bytes that no token reproduces.
    """
    joined = b"".join(p or b"" for p in pieces)
    ends = np.cumsum([len(p or b"") for p in pieces], dtype=np.int64) if pieces else np.zeros(0, np.int64)
    if joined == text:
        return ends, 0.0
    if joined.startswith(b" ") and joined[1:] == text:  # SentencePiece's prepended space
        return np.maximum(ends - 1, 0), 0.0
    return _diff_ends(joined, text, ends)


def _diff_ends(joined: bytes, text: bytes, ends: np.ndarray) -> tuple[np.ndarray, float]:
    """Map ends in ``joined`` to ``text`` through the matching blocks of a diff.

    A byte of ``joined`` inside a matching block maps to its partner in ``text``; an unmatched
    byte maps to the end of the previous match, so ends stay non-decreasing.
    """
    blocks = difflib.SequenceMatcher(None, joined, text, autojunk=False).get_matching_blocks()
    to_text = np.empty(len(joined) + 1, dtype=np.int64)
    prev_a = prev_b = matched = 0
    for a, b, size in blocks:  # the last block is (len(joined), len(text), 0)
        to_text[prev_a:a] = prev_b
        to_text[a : a + size + 1] = np.arange(b, b + size + 1)
        matched += size
        prev_a, prev_b = a + size + 1, b + size
    lost = 1.0 - matched / len(text) if text else 0.0
    return to_text[ends], lost


def align_rows(student_ends: np.ndarray, teacher_ends: np.ndarray) -> np.ndarray:
    """For each student row, the teacher row whose context ends at the same byte, else ``-1``.

    Row ``j`` of a causal LM predicts token ``j + 1``; its context ends at ``ends[j]``. Where
    several rows end at one byte (zero-width special tokens: BOS, EOS), the ``i``-th student row
    ending there takes the ``i``-th teacher row ending there, and is unaligned if the teacher has
    fewer. Identical tokenizations therefore align every row with itself, and a student row
    predicting a special token the teacher does not have at that byte gets none.

    Args:
        student_ends: ``(Ls,)`` int64 non-decreasing.
        teacher_ends: ``(Lt,)`` int64 non-decreasing.

    Returns:
        ``(Ls,)`` int64 teacher row or ``-1``.
    """
    s = np.asarray(student_ends, dtype=np.int64)
    t = np.asarray(teacher_ends, dtype=np.int64)
    rank = np.arange(len(s)) - np.searchsorted(s, s, side="left")  # i-th student row ending at that byte
    first = np.searchsorted(t, s, side="left")
    count = np.searchsorted(t, s, side="right") - first
    return np.where(rank < count, first + rank, -1).astype(np.int64)


def alignment_rate(rows: np.ndarray) -> float:
    """Share of student rows with a teacher row (``rows`` from :func:`align_rows`)."""
    return float((rows >= 0).mean()) if len(rows) else 1.0
