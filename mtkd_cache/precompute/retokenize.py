"""Tokenize a cache's stored text with another tokenizer, once per tokenizer (format/tokenization.py).

Each sample's text is tokenized on its own, with the tokenizer's special tokens added exactly
where the inputs' tokenizer added them: at a document's first sample (the first window of a
source row). A first pass finds the longest sample (the grid's positions per sample), a second
writes chunk by chunk, so memory is bounded by a chunk. The teacher->student vocabulary map is
computed here too (`align.build_vocab_map`), and a checksum table (`chunks.parquet`, one row per
chunk and array, as a teacher's) lets `verify` name a damaged chunk. The whole tokenization is
built under a temporary key and committed at once (`_commit`), so concurrent builders (torchrun
ranks, runs of teachers sharing a tokenizer) never see or leave a half-written one.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from mtkd_cache.align import align_rows, build_vocab_map, byte_ends, exact_pairs, token_bytes
from mtkd_cache.errors import CacheMismatchError
from mtkd_cache.format.codecs import Compressor, array_checksum, chunk_codecs
from mtkd_cache.format.fingerprint import tokenizer_fingerprint
from mtkd_cache.format.layout import chunk_rows, make_grid
from mtkd_cache.format.meta import TokenizerInfo
from mtkd_cache.format.text import create_token_array, read_byte_ends, read_texts
from mtkd_cache.format.tokenization import (
    CHUNKS_SCHEMA,
    PARTIAL,
    TokenizationMeta,
    TokenizationReader,
    content_fingerprint,
    finished_meta,
    sample_table,
    tokenization_id,
    tokenization_key,
)
from mtkd_cache.precompute.text_spans import special_bytes, spell

__all__ = ["ensure_tokenization"]

log = logging.getLogger(__name__)


def _doc_starts(reader: Any) -> np.ndarray:
    """True where a sample is its document's first (its source row differs from the previous one)."""
    rows = reader.samples.column("source_row").to_numpy()
    return np.concatenate([[True], rows[1:] != rows[:-1]]) if len(rows) else np.zeros(0, dtype=bool)


def _encode(tok: Any, pieces: Sequence[bytes | None], specials: Mapping[int, bytes], texts: Sequence[str],
            starts: np.ndarray) -> list[tuple[list[int], np.ndarray, float]]:
    """(ids, byte ends, lost share) of each text; special tokens only where `starts`, and spelling their
    literal string where the text holds it (a rendered chat template's markers: `text_spans.spell`)."""
    out = []
    for text, first in zip(texts, starts):
        ids = tok(text, add_special_tokens=bool(first), truncation=False)["input_ids"]
        data = text.encode()
        ends, lost = byte_ends(spell(ids, pieces, data, specials), data)
        out.append((list(ids), ends, lost))
    return out


def ensure_tokenization(reader: Any, tok: Any, name_or_path: str, progress_log: bool = True) -> TokenizationReader:
    """The tokenization of `reader`'s stored text by `tok`, made now if the cache lacks it.

    Built under a temporary key of its own, then committed (`_commit`): any number of processes
    (torchrun ranks, concurrent runs of teachers sharing the tokenizer) may build it at once; the
    first commit wins and the others check that they built the same tokenization.
    """
    fp = tokenizer_fingerprint(tok)
    tid = tokenization_id(fp)
    key = tokenization_key(tid)
    if reader.tokenization_store(tid).exists(f"{key}/tokenization.json"):
        return TokenizationReader(reader, tid)
    store = reader.write_store  # an overlay builds in its own folder: the base is only read
    tmp = f"tokenizations/{PARTIAL}{tid}-{uuid.uuid4().hex[:12]}"
    try:
        meta = _build(reader, store, tok, name_or_path, fp, tmp)
        _commit(store, tmp, key, meta)
    finally:
        store.remove(tmp)  # a lost race's or a failed build's (what this process wrote)
    return TokenizationReader(reader, tid)


def _measure(reader: Any, tok: Any, pieces: Sequence[bytes | None], specials: Mapping[int, bytes], starts: np.ndarray,
             name: str) -> tuple[int, float]:
    """Pass 1: the longest sample in the tokenizer's tokens, and the share of the text's bytes it loses."""
    g = reader.inputs.grid
    longest, lost_bytes, total_bytes = 1, 0.0, 0
    for c in range(g.num_chunks):
        s0, _ = g.sample_range(c)
        texts = read_texts(reader, c)
        for text, (ids, _, lost) in zip(texts, _encode(tok, pieces, specials, texts, starts[s0:])):
            longest = max(longest, len(ids))
            size = len(text.encode())
            lost_bytes, total_bytes = lost_bytes + lost * size, total_bytes + size
    lost_share = lost_bytes / total_bytes if total_bytes else 0.0
    if lost_share > 0:
        log.warning("tokenizer %r does not reproduce the stored text: it loses %.2f%% of its bytes (normalisation); "
                    "rows there cannot align with the student's", name, 100 * lost_share)
    return longest, lost_share


def _build(reader: Any, store: Any, tok: Any, name_or_path: str, fp: str, at: str) -> TokenizationMeta:
    """Write the whole tokenization under key `at` of `store` (tokenization.json last); its metadata."""
    g = reader.inputs.grid
    tid = tokenization_id(fp)
    pieces, starts = token_bytes(tok), _doc_starts(reader)
    specials = special_bytes(tok, pieces)
    longest, lost_share = _measure(reader, tok, pieces, specials, starts, name_or_path)
    grid = make_grid(reader.inputs.num_samples, g.chunk_samples, longest)
    group = store.open_group(at, mode="a")
    arrays = {n: create_token_array(group, n, grid, "int32") for n in ("token_ids", "byte_ends")}
    offsets: list[int] = []
    lengths: list[int] = []
    rows: list[dict[str, Any]] = []
    aligned = 0
    for c in range(g.num_chunks):  # pass 2: write
        s0, _ = g.sample_range(c)
        r0, r1 = chunk_rows(grid, c, "token")
        blocks = {n: np.zeros(grid.chunk_positions, dtype=np.int32) for n in arrays}
        cursor = 0
        for (ids, ends, _), own in zip(_encode(tok, pieces, specials, read_texts(reader, c), starts[s0:]),
                                       _student_ends(reader, c)):
            blocks["token_ids"][cursor : cursor + len(ids)] = ids
            blocks["byte_ends"][cursor : cursor + len(ids)] = ends
            aligned += int((align_rows(own, ends) >= 0).sum())
            offsets.append(r0 + cursor)
            lengths.append(len(ids))
            cursor += len(ids)
        for n, arr in arrays.items():
            arr.resize((r1,))
            arr[r0:r1] = blocks[n]
            rows.append({"chunk": c, "array": n, "checksum": array_checksum(blocks[n])})
    store.write_table(f"{at}/samples.parquet", sample_table(offsets, lengths))
    store.write_table(f"{at}/chunks.parquet", pa.Table.from_pylist(rows, schema=CHUNKS_SCHEMA))
    _save_tokenizer(store, tok, f"{at}/tokenizer")
    vocab = _write_vocab_map(group, reader, tok, pieces, fp)
    text_fp = reader.inputs.text["fingerprint"]
    info = TokenizerInfo(fingerprint=fp, vocab_size=len(tok), name_or_path=name_or_path,
                         path=f"{tokenization_key(tid)}/tokenizer", eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    meta = finished_meta(id=tid, tokenizer=info, text_fingerprint=text_fp,
                         dataset_fingerprint=reader.inputs.dataset_fingerprint, grid=grid,
                         num_positions=int(sum(lengths)),
                         fingerprint=content_fingerprint(fp, text_fp, [r["checksum"] for r in rows]),
                         lost=lost_share, vocab_map=vocab,
                         alignment_rate=aligned / max(1, reader.inputs.num_positions))
    store.write_json(f"{at}/tokenization.json", meta.to_dict())
    return meta


def _commit(store: Any, tmp: str, key: str, meta: TokenizationMeta) -> None:
    """Move the finished build `tmp` to `key`; if another process committed first, check it is the same.

    A local cache renames the folder (atomic: the tokenization appears whole, with its
    tokenization.json, or not at all; a rename onto a non-empty folder fails, so the first one
    wins). An object store has no rename: the files are copied and tokenization.json is written
    last; concurrent builders copy identical bytes (the build is deterministic), which the
    equality check below confirms.
    """
    done = f"{key}/tokenization.json"
    for _ in range(2):
        if store.exists(done):
            break
        if not store.is_local:
            for src in sorted(store.fs.find(store.path(tmp))):
                rel = src[len(store.path(tmp)) + 1 :]
                if rel != "tokenization.json":
                    store.write_bytes(f"{key}/{rel}", store.read_bytes(f"{tmp}/{rel}"))
            store.write_json(done, meta.to_dict())
            return
        try:
            os.rename(store.path(tmp), store.path(key))
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if not store.exists(done):  # a build an older mtkd left unfinished in place: not a live one
                store.remove(key)
    _same_as_committed(store, key, meta)


def _same_as_committed(store: Any, key: str, meta: TokenizationMeta) -> None:
    """Another process committed this tokenization first: refuse unless it built exactly this one."""
    have = TokenizationMeta.from_dict(store.read_json(f"{key}/tokenization.json"))
    mine = (meta.fingerprint, meta.vocab_map.get("sha256"), meta.num_positions, meta.grid)
    theirs = (have.fingerprint, have.vocab_map.get("sha256"), have.num_positions, have.grid)
    if mine != theirs:
        raise CacheMismatchError(
            f"tokenizer {meta.tokenizer.name_or_path!r} built tokenization {meta.id!r} of {store.url} differently "
            f"in two concurrent runs (fingerprints {have.fingerprint} and {meta.fingerprint}): its tokenization is "
            f"not deterministic, so teachers on it cannot be aligned reliably; use another tokenizer")


def _student_ends(reader: Any, chunk: int) -> list[np.ndarray]:
    """The inputs' byte ends of each sample of `chunk`."""
    s0, s1 = reader.inputs.grid.sample_range(chunk)
    cols = reader.sample_columns
    offsets = cols["offset"][s0:s1] - chunk_rows(reader.inputs.grid, chunk, "token")[0]
    lengths = cols["num_positions"][s0:s1].astype(np.int64)
    ends = read_byte_ends(reader, chunk, int(offsets[-1] + lengths[-1]) if len(offsets) else 0)
    return [ends[o : o + n] for o, n in zip(offsets, lengths)]


def _write_vocab_map(group: Any, reader: Any, tok: Any, pieces: Sequence[bytes | None], fp: str) -> dict[str, Any]:
    """Store the teacher->student map; its entry in tokenization.json (with the student's fingerprint)."""
    student = reader.inputs.tokenizer
    student_tok = reader.load_tokenizer()
    student_pieces = token_bytes(student_tok)
    exact = exact_pairs(tok, student_tok, pieces, student_pieces)
    vmap = build_vocab_map(pieces, student_pieces, exact).astype(np.int32)
    arr = group.create_array("vocab_map", shape=vmap.shape, dtype="int32", chunks=vmap.shape,
                             compressors=chunk_codecs(Compressor()), fill_value=-1, overwrite=True)
    arr[:] = vmap
    return {"teacher_tokenizer": fp, "student_tokenizer": student.fingerprint, "size": int(len(vmap)),
            "unmapped": int((vmap < 0).sum()), "sha256": hashlib.sha256(vmap.astype("<i4").tobytes()).hexdigest()}


def _save_tokenizer(store: Any, tok: Any, key: str) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        for f in sorted(Path(d).iterdir()):
            if f.is_file():
                store.write_bytes(f"{key}/{f.name}", f.read_bytes())
