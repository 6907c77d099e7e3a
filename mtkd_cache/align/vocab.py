"""Teacher vocabulary -> student vocabulary, and teacher top-k rows projected onto it.

A teacher token maps to the student token its bytes START with: the longest student token whose
bytes are a prefix of the teacher token's bytes (``Ġthe`` -> ``Ġthe`` if the student has it,
else ``Ġth``, else ``Ġ``). At a shared boundary the teacher's next-token distribution then becomes
a distribution over the student's next token. Teacher tokens with no text (special tokens) or
whose first byte no student token starts with map to ``-1``; their mass joins the tail. Several
teacher tokens mapping to one student token add their probabilities. Building the map is
``O(V_t * max_token_bytes)`` dict look-ups, done once per tokenizer pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["build_vocab_map", "exact_pairs", "mapped_mass", "project_samples", "project_topk"]

_ROLES = ("eos_token_id", "bos_token_id", "unk_token_id", "pad_token_id")


def exact_pairs(teacher: Any, student: Any, teacher_bytes: Sequence[bytes | None],
                student_bytes: Sequence[bytes | None]) -> dict[int, int]:
    """Teacher id -> student id for tokens both tokenizers have: the same token string with the same
    bytes (so identical tokenizers map every token to itself), and special tokens of one role
    (EOS, BOS, UNK, PAD; a role the teacher gives two tokens keeps the first)."""
    s_vocab = student.get_vocab()
    out = {}
    for s, tid in teacher.get_vocab().items():
        sid = s_vocab.get(s)
        if sid is not None and tid < len(teacher_bytes) and sid < len(student_bytes) \
                and teacher_bytes[tid] == student_bytes[sid]:
            out[int(tid)] = int(sid)
    for role in _ROLES:
        tid, sid = getattr(teacher, role, None), getattr(student, role, None)
        if tid is not None and sid is not None and teacher_bytes[tid] is None and student_bytes[sid] is None:
            out.setdefault(int(tid), int(sid))
    return out


def build_vocab_map(teacher: Sequence[bytes | None], student: Sequence[bytes | None],
                    exact: Mapping[int, int] | None = None) -> np.ndarray:
    """``(V_t,)`` int32: the student id each teacher id maps to, ``-1`` for none.

    Args:
        teacher: Bytes of each teacher token (``None`` = special).
        student: Bytes of each student token. Where several student ids spell the same bytes (a
            byte-fallback ``<0x41>`` and a plain ``A``), the lowest id wins.
        exact: Teacher id -> student id pairs that take precedence (:func:`exact_pairs`: the same
            token in both vocabularies, and special tokens of the same role such as EOS).

    Returns:
        The map.
    """
    lookup: dict[bytes, int] = {}
    for sid, b in enumerate(student):
        if b and b not in lookup:
            lookup[b] = sid
    longest = max((len(b) for b in lookup), default=0)
    out = np.full(len(teacher), -1, dtype=np.int32)
    for tid, b in enumerate(teacher):
        if exact and tid in exact:
            out[tid] = exact[tid]
            continue
        if not b:
            continue
        for n in range(min(len(b), longest), 0, -1):
            hit = lookup.get(b[:n])
            if hit is not None:
                out[tid] = hit
                break
    return out


def project_topk(indices: np.ndarray, logp: np.ndarray, tail: np.ndarray, vocab_map: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher top-k rows -> rows over the student vocabulary.

    Args:
        indices: ``(R, K)`` teacher token ids.
        logp: ``(R, K)`` float32 log-probabilities (``-inf`` = padding).
        tail: ``(R,)`` mass outside the kept tokens.
        vocab_map: ``(V_t,)`` from :func:`build_vocab_map`.

    Returns:
        ``(indices, logp, tail)`` of shapes ``(R, K)``, ``(R, K)``, ``(R,)``: distinct student ids
        per row, sorted by id, padded with ``-inf``; the tail gains the unmapped mass, so each
        row's total mass is unchanged.
    """
    r, k = indices.shape
    sid = vocab_map[indices].astype(np.int64)  # (R, K)
    live = np.isfinite(logp) & (sid >= 0)
    lost = np.where(np.isfinite(logp) & (sid < 0), np.exp(logp.astype(np.float64)), 0.0).sum(1)  # (R,)
    key = np.where(live, sid, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    key = np.take_along_axis(key, order, 1)
    lp = np.take_along_axis(np.where(live, logp, -np.inf), order, 1).astype(np.float64)
    first = np.ones((r, k), dtype=bool)
    first[:, 1:] = key[:, 1:] != key[:, :-1]
    group = np.cumsum(first, axis=1) - 1  # (R, K) slot of each entry
    out_lp = np.full((r, k), -np.inf)
    np.logaddexp.at(out_lp, (np.repeat(np.arange(r), k), group.ravel()), lp.ravel())
    out_id = np.zeros((r, k), dtype=np.int64)
    np.put_along_axis(out_id, group, np.where(key == np.iinfo(np.int64).max, 0, key), 1)
    pad = np.zeros((r, k), dtype=bool)
    np.put_along_axis(pad, group, key == np.iinfo(np.int64).max, 1)
    out_lp[pad | ~np.isfinite(out_lp)] = -np.inf
    out_id[~np.isfinite(out_lp)] = 0
    return out_id, out_lp.astype(np.float32), (tail.astype(np.float64) + lost).astype(np.float32)


def project_samples(indices: np.ndarray, counts: np.ndarray, vocab_map: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher sampled rows (draws and their counts) -> top-k style rows over the student vocabulary.

    Each draw is mapped like a top-k token: the draws' empirical distribution ``count / draws``
    becomes ``logp`` over student ids (draws of teacher tokens that map to one student token add
    up), and the share of draws that map to no student token becomes the tail. Pushing a sample
    through the map gives a sample of the pushed distribution, so the mapped frequencies estimate
    the mapped teacher distribution without bias, as the unmapped frequencies do for the stored sample.

    Args:
        indices: ``(R, n)`` teacher token ids drawn.
        counts: ``(R, n)`` their counts (0 = padding).
        vocab_map: ``(V_t,)`` from :func:`build_vocab_map`.

    Returns:
        ``(indices, logp, tail)`` as :func:`project_topk`; a row without draws has all its mass in the tail.
    """
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum(1, keepdims=True)  # (R, 1)
    with np.errstate(divide="ignore"):
        logp = np.where(c > 0, np.log(np.where(c > 0, c, 1.0) / np.maximum(total, 1.0)), -np.inf)
    return project_topk(indices, logp, (total[:, 0] == 0).astype(np.float32), vocab_map)


def mapped_mass(logp: np.ndarray, indices: np.ndarray, vocab_map: np.ndarray) -> np.ndarray:
    """``(R,)`` share of each row's kept mass that maps to a student token."""
    p = np.where(np.isfinite(logp), np.exp(logp.astype(np.float64)), 0.0)
    kept = p.sum(1)
    ok = (p * (vocab_map[indices] >= 0)).sum(1)
    return np.where(kept > 0, ok / np.maximum(kept, 1e-300), 1.0)
