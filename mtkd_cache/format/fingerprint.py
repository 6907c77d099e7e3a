"""Content fingerprints: of samples, of the dataset, of a tokenizer.

All come from content (never from paths, times or random values) and a failure to compute one
raises.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["DatasetHasher", "sample_content", "sample_hash", "token_sample_content", "tokenizer_fingerprint"]


def sample_hash(arrays: Iterable[np.ndarray]) -> str:
    """blake2b-128 over each array's dtype, shape and bytes: the per-sample content hash."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def sample_content(arrays: Iterable[np.ndarray], label: int | None, domain: str | None) -> list[np.ndarray]:
    """What a sample's content hash covers: its arrays, then its label and domain when present.

    The label is an int64 0-d array; the domain the uint8 array of its UTF-8 bytes (docs/FORMAT.md).
    """
    out = [np.asarray(a) for a in arrays]
    if label is not None:
        out.append(np.asarray(int(label), dtype=np.int64))
    if domain is not None:
        out.append(np.frombuffer(str(domain).encode(), dtype=np.uint8))
    return out


def token_sample_content(ids: np.ndarray, loss_mask: np.ndarray | None, label: int | None,
                         domain: str | None) -> list[np.ndarray]:
    """What a token sample's content hash covers: its ids (int64), its loss mask, label and domain.

    The loss mask, when the inputs store one, follows the ids as a ``uint8`` array of the same
    length (docs/FORMAT.md "Loss mask"); without one the hash is the one of `sample_content`.
    """
    arrays = [np.asarray(ids, dtype=np.int64)]
    if loss_mask is not None:
        arrays.append(np.asarray(loss_mask, dtype=np.uint8))
    return sample_content(arrays, label, domain)


class DatasetHasher:
    """Streams sample hashes (plus the settings that shape the inputs) into one fingerprint."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = dict(settings)
        self._h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())

    def update(self, sample_hashes: Iterable[str]) -> None:
        for s in sample_hashes:
            self._h.update(bytes.fromhex(s))

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Fingerprint of what a tokenizer maps text to: its vocabulary and special tokens.

    Two tokenizers with the same fingerprint produce the same ids for the same tokens, whatever
    folder or library version they were saved from.
    """
    vocab = tokenizer.get_vocab()
    if not vocab:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has an empty vocabulary")
    payload = {
        "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "class": type(tokenizer).__name__.replace("Fast", ""),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]
