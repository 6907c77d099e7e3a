"""The characters each window of a document covers, with its tokens' byte ends (for `prepare`).

A document's tokens are located in its UTF-8 bytes with `align.byte_ends` (exact unless the
tokenizer normalises). A window of tokens `[s, e)` covers the bytes from the end of token `s-1`
(0 for the first window) to the end of token `e-1`, widened to whole characters where a token
boundary falls inside a multi-byte character. The window's text is those characters; its byte
ends are relative to the text's first byte. The bytes the tokens occupy in their windows' texts,
concatenated, are the document; a window cut inside a character repeats that character at the
start of the next window's text (its first token then ends inside the text, after the character).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mtkd_cache.align import byte_ends, token_bytes

__all__ = ["text_pieces", "window_texts"]


def text_pieces(tokenizer: Any, pack: bool) -> list[bytes | None] | None:
    """The bytes of every token id when `prepare` stores the text, else None.

    Packed inputs keep no text (documents are joined); a slow tokenizer has no tokenizer.json
    to read the bytes from.
    """
    if pack:
        return None
    try:
        return token_bytes(tokenizer)
    except TypeError:
        return None


def _char_start(data: bytes, i: int) -> int:
    """`i` moved back to the first byte of the UTF-8 character it falls in."""
    while 0 < i < len(data) and (data[i] & 0xC0) == 0x80:
        i -= 1
    return i


def _char_end(data: bytes, i: int) -> int:
    """`i` moved forward past the UTF-8 character it falls in."""
    while 0 < i < len(data) and (data[i] & 0xC0) == 0x80:
        i += 1
    return i


def window_texts(ids: Sequence[int], text: str, max_length: int, pieces: Sequence[bytes | None],
                 ) -> list[tuple[str, np.ndarray]]:
    """`(text, byte_ends)` of each `max_length` window of the document `ids` tokenized from `text`.

    Args:
        ids: The document's token ids.
        text: The document's text.
        max_length: Tokens per window.
        pieces: Bytes of every token id (`align.token_bytes`; None = special token).

    Returns:
        One entry per window: its characters and an int32 `(len(window),)` array of byte ends.
    """
    data = text.encode()
    ends, _lost = byte_ends([pieces[i] if 0 <= i < len(pieces) else None for i in ids], data)
    out = []
    for start in range(0, len(ids), max_length):
        e = ends[start : start + max_length]
        a = _char_start(data, int(ends[start - 1]) if start else 0)
        b = _char_end(data, int(e[-1]))
        out.append((data[a:b].decode(), (e - a).astype(np.int32)))
    return out
