"""The UTF-8 bytes each token id of a Hugging Face fast tokenizer stands for.

The decoder named in the tokenizer's own ``tokenizer.json`` says how a token string becomes text:

* ``ByteLevel`` (GPT-2, Llama-3, SmolLM2, Qwen): each character of the token string is one byte
  under GPT-2's ``bytes_to_unicode`` table (``Ġ`` = space, ``Ċ`` = newline).
* SentencePiece style (``Metaspace`` or ``Replace("▁", " ")``, with ``ByteFallback``: Llama-2,
  Gemma, Mistral): ``▁`` is a space and ``<0xNN>`` is the single byte ``NN``.
* anything else: the token string's own UTF-8 bytes.

Special tokens (BOS, EOS, pad, chat markers) stand for no text: ``None``. Cost ``O(V)``.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["bytes_to_unicode", "token_bytes"]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _decoder_types(spec: Any) -> set[str]:
    """Every decoder type named in a tokenizer.json ``decoder`` entry (Sequences flattened)."""
    if not isinstance(spec, dict):
        return set()
    out = {str(spec.get("type"))}
    for sub in spec.get("decoders") or ():
        out |= _decoder_types(sub)
    if spec.get("type") == "Replace" and spec.get("pattern", {}).get("String") == "▁":
        out.add("Metaspace")
    return out


def _scheme(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; load it with use_fast=True "
                        "(cross-tokenizer alignment reads the tokenizer.json decoder)")
    types = _decoder_types(json.loads(backend.to_str()).get("decoder"))
    if "ByteLevel" in types:
        return "byte_level"
    if "Metaspace" in types or "ByteFallback" in types:
        return "sentencepiece"
    return "plain"


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """Bytes of every token id ``0 .. len(tokenizer) - 1``; ``None`` for special tokens.

    Args:
        tokenizer: A ``PreTrainedTokenizerFast``.

    Returns:
        A list of length ``len(tokenizer)``.

    Raises:
        TypeError: a slow tokenizer (no ``tokenizer.json``).
    """
    scheme = _scheme(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(tok, "special", False):
            special.add(int(tid))
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    strings = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out: list[bytes | None] = []
    for tid, s in enumerate(strings):
        fallback = _BYTE_FALLBACK.match(s) if scheme == "sentencepiece" and s else None
        if fallback:  # some tokenizers register the 256 byte tokens as special: they are still text
            out.append(bytes([int(fallback.group(1), 16)]))
        elif tid in special or s is None:
            out.append(None)
        elif scheme == "byte_level":
            out.append(bytes(byte_of[c] for c in s) if all(c in byte_of for c in s) else s.encode())
        elif scheme == "sentencepiece":
            out.append(s.replace("▁", " ").encode())
        else:
            out.append(s.encode())
    return out
