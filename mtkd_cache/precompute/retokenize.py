"""Tokenize a cache's stored text with another tokenizer, once per tokenizer (format/tokenization.py).

Each sample's text is tokenized on its own, with the tokenizer's special tokens added exactly
where the inputs' tokenizer added them: at a document's first sample (the first window of a
source row). A first pass finds the longest sample (the grid's positions per sample), a second
writes chunk by chunk, so memory is bounded by a chunk. The teacher->student vocabulary map is
computed here too (`align.build_vocab_map`). Concurrent runs of teachers sharing a tokenizer
write the same bytes, and `tokenization.json` is written last.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from mtkd_cache.align import align_rows, build_vocab_map, byte_ends, exact_pairs, token_bytes
from mtkd_cache.format.codecs import Compressor, array_checksum, chunk_codecs
from mtkd_cache.format.fingerprint import tokenizer_fingerprint
from mtkd_cache.format.layout import chunk_rows, make_grid
from mtkd_cache.format.meta import TokenizerInfo
from mtkd_cache.format.text import create_token_array, read_byte_ends, read_texts
from mtkd_cache.format.tokenization import (
    TokenizationReader,
    content_fingerprint,
    finished_meta,
    sample_table,
    tokenization_id,
    tokenization_key,
)

__all__ = ["ensure_tokenization"]

log = logging.getLogger(__name__)


def _doc_starts(reader: Any) -> np.ndarray:
    """True where a sample is its document's first (its source row differs from the previous one)."""
    rows = reader.samples.column("source_row").to_numpy()
    return np.concatenate([[True], rows[1:] != rows[:-1]]) if len(rows) else np.zeros(0, dtype=bool)


def _encode(tok: Any, pieces: Sequence[bytes | None], texts: Sequence[str], starts: np.ndarray
            ) -> list[tuple[list[int], np.ndarray, float]]:
    """(ids, byte ends, lost share) of each text; special tokens only where `starts`."""
    out = []
    for text, first in zip(texts, starts):
        ids = tok(text, add_special_tokens=bool(first), truncation=False)["input_ids"]
        ends, lost = byte_ends([pieces[i] if 0 <= i < len(pieces) else None for i in ids], text.encode())
        out.append((list(ids), ends, lost))
    return out


def ensure_tokenization(reader: Any, tok: Any, name_or_path: str, progress_log: bool = True) -> TokenizationReader:
    """The tokenization of `reader`'s stored text by `tok`, made now if the cache lacks it."""
    fp = tokenizer_fingerprint(tok)
    tid = tokenization_id(fp)
    key = tokenization_key(tid)
    if reader.store.exists(f"{key}/tokenization.json"):
        return TokenizationReader(reader, tid)
    store, g = reader.store, reader.inputs.grid
    pieces = token_bytes(tok)
    starts = _doc_starts(reader)
    longest, lost_bytes, total_bytes = 1, 0.0, 0
    for c in range(g.num_chunks):  # pass 1: the grid's width, and what the tokenizer loses
        s0, _ = g.sample_range(c)
        texts = read_texts(reader, c)
        for text, (ids, _, lost) in zip(texts, _encode(tok, pieces, texts, starts[s0:])):
            longest = max(longest, len(ids))
            size = len(text.encode())
            lost_bytes, total_bytes = lost_bytes + lost * size, total_bytes + size
    lost_share = lost_bytes / total_bytes if total_bytes else 0.0
    if lost_share > 0:
        log.warning("tokenizer %r does not reproduce the stored text: it loses %.2f%% of its bytes (normalisation); "
                    "rows there cannot align with the student's", name_or_path, 100 * lost_share)
    grid = make_grid(reader.inputs.num_samples, g.chunk_samples, longest)
    group = store.open_group(key, mode="a")
    arrays = {n: create_token_array(group, n, grid, "int32") for n in ("token_ids", "byte_ends")}
    offsets: list[int] = []
    lengths: list[int] = []
    checksums: list[str] = []
    aligned = 0
    for c in range(g.num_chunks):  # pass 2: write
        s0, _ = g.sample_range(c)
        r0, r1 = chunk_rows(grid, c, "token")
        blocks = {n: np.zeros(grid.chunk_positions, dtype=np.int32) for n in arrays}
        cursor = 0
        student = _student_ends(reader, c)
        for (ids, ends, _), own in zip(_encode(tok, pieces, read_texts(reader, c), starts[s0:]), student):
            blocks["token_ids"][cursor : cursor + len(ids)] = ids
            blocks["byte_ends"][cursor : cursor + len(ids)] = ends
            aligned += int((align_rows(own, ends) >= 0).sum())
            offsets.append(r0 + cursor)
            lengths.append(len(ids))
            cursor += len(ids)
        for n, arr in arrays.items():
            arr.resize((r1,))
            arr[r0:r1] = blocks[n]
            checksums.append(array_checksum(blocks[n]))
    store.write_table(f"{key}/samples.parquet", sample_table(offsets, lengths))
    _save_tokenizer(store, tok, f"{key}/tokenizer")
    vocab = _write_vocab_map(group, reader, tok, pieces, fp)
    text_fp = reader.inputs.text["fingerprint"]
    info = TokenizerInfo(fingerprint=fp, vocab_size=len(tok), name_or_path=name_or_path, path=f"{key}/tokenizer",
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    meta = finished_meta(id=tid, tokenizer=info, text_fingerprint=text_fp,
                         dataset_fingerprint=reader.inputs.dataset_fingerprint, grid=grid,
                         num_positions=int(sum(lengths)), fingerprint=content_fingerprint(fp, text_fp, checksums),
                         lost=lost_share, vocab_map=vocab,
                         alignment_rate=aligned / max(1, reader.inputs.num_positions))
    store.write_json(f"{key}/tokenization.json", meta.to_dict())
    return TokenizationReader(reader, tid)


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
