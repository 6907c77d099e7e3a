"""`verify` of the cross-tokenizer parts of a cache: each tokenization, and the values of a teacher on one.

A tokenization (`tokenizations/<id>/`, format/tokenization.py) is checked as fully as the inputs:

* `tokenization.json` parses, names its folder, derives from the inputs' text;
* `samples.parquet` lays the samples out on its grid (one row per input sample, each sample's
  rows inside its chunk, consecutive, totalling `num_positions`);
* every chunk of `token_ids` and `byte_ends` decodes (crc32c), matches the checksum recorded in
  `chunks.parquet`, and the checksums recompute the recorded fingerprint;
* values: token ids in `[0, V_teacher)`; byte ends non-decreasing within each sample and inside
  that sample's stored text (`0 <= end <= len(text bytes)`);
* `vocab_map`: `V_teacher` entries in `[-1, V_student)`, its sha256 and unmapped count as recorded,
  made toward the inputs' tokenizer.

A teacher on a tokenization has its values checked on that tokenization's rows (`check_cross_values`).
Cost: one read of each tokenization and of the stored text.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mtkd_cache.errors import (
    CacheCorruptError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheNotFoundError,
)
from mtkd_cache.format.codecs import array_checksum
from mtkd_cache.format.layout import chunk_rows
from mtkd_cache.format.meta import TeacherMeta
from mtkd_cache.format.text import read_texts
from mtkd_cache.format.tokenization import (
    PARTIAL,
    TokenizationReader,
    content_fingerprint,
    tokenization_id,
    tokenization_key,
)

__all__ = ["check_cross_values", "check_tokenizations"]

_ERRORS = (CacheCorruptError, CacheIncompleteError, CacheMismatchError, CacheNotFoundError, OSError, KeyError)


def _fix(url: str, tid: str) -> str:
    return (f"delete {url}/{tokenization_key(tid)} and the teachers that use it, then re-run `mtkd-cache run` "
            f"for them (it re-tokenizes the stored text)")


def _stores(reader: Any) -> list[Any]:
    """The stores that may hold `reader`'s tokenizations: each overlay's own folder, then the cache."""
    out = []
    while hasattr(reader, "overlay"):
        out.append(reader.overlay)
        reader = reader.base
    return [*out, reader.store]


def check_tokenizations(reader: Any, problems: list[str]) -> dict[str, bool]:
    """Check every committed tokenization of `reader`'s cache; append one line per problem.

    Returns:
        Tokenization id -> whether it is sound (teachers on an unsound one are reported too).
    """
    out = {}
    for tid in sorted({t for s in _stores(reader) for t in s.subdirs("tokenizations")}):
        if tid.startswith(PARTIAL):  # a build in progress (or killed): never read, committed by rename
            continue
        before = len(problems)
        try:
            _check_one(reader, tid, problems)
        except _ERRORS as e:
            problems.append(str(e) if str(e).startswith(f"tokenization {tid!r}") else f"tokenization {tid!r}: {e}")
        out[tid] = len(problems) == before
    return out


def _check_one(reader: Any, tid: str, problems: list[str]) -> None:
    fix = _fix(reader.url, tid)
    tok = TokenizationReader(reader, tid)  # tokenization.json present, parsed, from the inputs' text
    meta = tok.meta
    if meta.id != tid or tokenization_id(meta.tokenizer.fingerprint) != tid:
        problems.append(f"tokenization {tid!r}: tokenization.json names id {meta.id!r} / tokenizer "
                        f"{meta.tokenizer.fingerprint[:16]!r}, not its folder; {fix}")
        return
    if not _check_layout(tok, problems, fix):
        return
    recorded = f"{tok.key}/chunks.parquet"  # absent in a tokenization an earlier 0.1 build made: fingerprint only
    table = {(int(r["chunk"]), str(r["array"])): str(r["checksum"])
             for r in tok.store.read_table(recorded).to_pylist()} if tok.store.exists(recorded) else None
    sums: list[str] = []
    for c in range(tok.num_chunks):
        blocks = {}
        for name in ("token_ids", "byte_ends"):
            r0, r1 = chunk_rows(meta.grid, c, "token")
            blocks[name] = tok.rows(name, r0, r1)  # decodes (crc32c): a damaged shard raises, naming it
            sums.append(array_checksum(blocks[name]))
            if table is not None and table.get((c, name)) != sums[-1]:
                problems.append(f"tokenization {tid!r} array {name!r} chunk {c} ({tok.store.path(tok.key)}/{name}): "
                                f"checksum mismatch: the decoded data differs from what was written; {fix}")
        _check_values(reader, tok, c, blocks, problems, fix)
    if content_fingerprint(meta.tokenizer.fingerprint, meta.text_fingerprint, sums) != meta.fingerprint:
        problems.append(f"tokenization {tid!r}: its arrays do not recompute its recorded fingerprint "
                        f"{meta.fingerprint}; {fix}")
    _check_vocab_map(reader, tok, problems, fix)


def _check_layout(tok: TokenizationReader, problems: list[str], fix: str) -> bool:
    """samples.parquet: consecutive rows inside each chunk, ids in order, totalling num_positions."""
    cols, grid, tid = tok.sample_columns, tok.meta.grid, tok.id
    lengths = cols["num_positions"].astype(np.int64)
    why = None
    if not np.array_equal(cols["sample_id"], np.arange(len(lengths))):
        why = "sample ids are not 0..N-1 in order"
    elif (lengths < 0).any() or int(lengths.sum()) != tok.meta.num_positions:
        why = f"sample lengths total {int(lengths.sum())}, tokenization.json says {tok.meta.num_positions}"
    else:
        for c in range(grid.num_chunks):
            s0, s1 = grid.sample_range(c)
            r0, r1 = chunk_rows(grid, c, "token")
            want = r0 + np.concatenate([[0], np.cumsum(lengths[s0:s1])[:-1]]) if s1 > s0 else np.zeros(0, np.int64)
            if not np.array_equal(cols["offset"][s0:s1], want) or (s1 > s0 and want[-1] + lengths[s1 - 1] > r1):
                why = f"the samples of chunk {c} do not lie consecutively inside rows {r0}..{r1 - 1}"
                break
    if why:
        problems.append(f"tokenization {tid!r}: {tok.store.path(tok.key)}/samples.parquet: {why}; {fix}")
    return why is None


def _check_values(reader: Any, tok: TokenizationReader, c: int, blocks: dict[str, np.ndarray],
                  problems: list[str], fix: str) -> None:
    """Token ids in the teacher's vocabulary; byte ends non-decreasing and inside each sample's text."""
    offsets, lengths, _ = tok.chunk_layout(c)
    texts = read_texts(reader, c)
    vocab, tid = tok.meta.tokenizer.vocab_size, tok.id
    s0 = tok.meta.grid.sample_range(c)[0]
    for i, (o, n, text) in enumerate(zip(offsets, lengths, texts)):
        ids, ends = blocks["token_ids"][o : o + n], blocks["byte_ends"][o : o + n]
        size = len(text.encode())
        why = None
        if n and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            why = "token_ids", f"a token id is outside the vocabulary [0, {vocab})"
        elif n and not (np.diff(ends) >= 0).all():
            why = "byte_ends", "byte ends decrease"
        elif n and (int(ends.min()) < 0 or int(ends.max()) > size):
            why = "byte_ends", f"a byte end lies outside the sample's text [0, {size}]"
        if why:
            problems.append(f"tokenization {tid!r} array {why[0]!r} chunk {c} ({tok.store.path(tok.key)}/{why[0]}): "
                            f"sample {s0 + i}: {why[1]}; {fix}")
            return


def _check_vocab_map(reader: Any, tok: TokenizationReader, problems: list[str], fix: str) -> None:
    meta, tid = tok.meta, tok.id
    vmap = tok.vocab_map()  # sha256 as recorded, else CacheCorruptError naming the array
    student = reader.inputs.tokenizer
    why = None
    if vmap.shape != (meta.tokenizer.vocab_size,) or meta.vocab_map.get("size") != len(vmap):
        why = f"has {len(vmap)} entries, the tokenizer {meta.tokenizer.vocab_size}"
    elif student is None or meta.vocab_map.get("student_tokenizer") != student.fingerprint:
        why = "was made toward another student tokenizer than the inputs'"
    elif len(vmap) and (int(vmap.min()) < -1 or int(vmap.max()) >= student.vocab_size):
        why = f"maps a token outside the student vocabulary [-1, {student.vocab_size})"
    elif meta.vocab_map.get("unmapped") != int((vmap < 0).sum()):
        why = "unmapped count differs from tokenization.json"
    if why:
        problems.append(f"tokenization {tid!r} array 'vocab_map' {why} ({tok.store.path(tok.key)}/vocab_map); {fix}")


def check_cross_values(reader: Any, name: str, meta: TeacherMeta, chunk: int) -> None:
    """The read-time value checks of teacher `name` (on its own tokenization) over chunk `chunk`'s rows.

    Raises:
        CacheCorruptError: a target or feature row fails its kind's check (named like any read).
    """
    tok = TokenizationReader(reader, meta.tokenization or "")
    offsets, lengths, p0 = tok.chunk_layout(chunk)
    used = int(offsets[-1] + lengths[-1]) if len(offsets) else 0
    tr = reader.teacher(name)
    tr.read_targets(p0, p0 + used)
    s0, s1 = tok.meta.grid.sample_range(chunk)
    for f in meta.features:
        on = tr.feature_grid(f.layer)
        r0 = chunk_rows(tok.meta.grid, chunk, on)[0]
        tr.read_feature(f.layer, r0, r0 + (used if on == "token" else s1 - s0))
