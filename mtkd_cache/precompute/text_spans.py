"""The characters each window of a document covers, with its tokens' byte ends (for `prepare`).

A document's tokens are located in its UTF-8 bytes with `align.byte_ends` (exact unless the
tokenizer normalises). A window of tokens `[s, e)` covers the bytes from the end of token `s-1`
(0 for the first window) to the end of token `e-1`, widened to whole characters where a token
boundary falls inside a multi-byte character. The window's text is those characters; its byte
ends are relative to the text's first byte. The bytes the tokens occupy in their windows' texts,
concatenated, are the document; a window cut inside a character repeats that character at the
start of the next window's text (its first token then ends inside the text, after the character).

A special token spells nothing, except where the text holds its literal string at that point: a
chat template writes `<|im_start|>` into the rendered text, and the tokenizer reads it back as the
special token. There it spells that string (`spell`), so the tokens spell the rendered text exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtkd_cache.align import byte_ends, token_bytes

__all__ = ["prefix_text", "special_bytes", "spell", "text_pieces", "window_texts"]


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


def special_bytes(tokenizer: Any, pieces: Sequence[bytes | None]) -> dict[int, bytes]:
    """The literal string of every token that spells nothing (special tokens), as UTF-8."""
    ids = [i for i, b in enumerate(pieces) if b is None]
    return {i: str(n).encode() for i, n in zip(ids, tokenizer.convert_ids_to_tokens(ids)) if n}


def spell(ids: Sequence[int], pieces: Sequence[bytes | None], data: bytes, specials: Mapping[int, bytes]
          ) -> list[bytes | None]:
    """The bytes of each token of `ids`; a special token spells its literal string where `data` holds it there."""
    out: list[bytes | None] = []
    cur = shift = 0  # shift: SentencePiece's prepended space, which `data` does not have
    for i in ids:
        b = pieces[i] if 0 <= i < len(pieces) else None
        if b is None and i in specials and data.startswith(specials[i], cur - shift):
            b = specials[i]
        if b and cur == 0 and b.startswith(b" ") and not data.startswith(b" "):
            shift = 1
        out.append(b)
        cur += len(b or b"")
    return out


def prefix_text(ids: Sequence[int], text: str, pieces: Sequence[bytes | None], specials: Mapping[int, bytes],
                whole: bool) -> tuple[str, np.ndarray]:
    """`(text, byte_ends)` of a sample whose tokens `ids` are the first tokens of `text` (a rendering
    truncated to `--max-length`): the characters they cover (all of `text` when `whole`)."""
    data = text.encode()
    spelled = spell(ids, pieces, data, specials)
    joined = b"".join(p or b"" for p in spelled)
    cum = np.cumsum([len(p or b"") for p in spelled], dtype=np.int64) if len(spelled) else np.zeros(0, np.int64)
    if data.startswith(joined):
        ends = cum
    elif joined.startswith(b" ") and data.startswith(joined[1:]):
        ends = np.maximum(cum - 1, 0)
    else:  # the tokens do not spell the text (normalisation): match them to it
        ends, _lost = byte_ends(spelled, data)
    b = len(data) if whole or not len(ends) else _char_end(data, int(ends[-1]))
    return data[:b].decode(), np.minimum(ends, b).astype(np.int32)


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
