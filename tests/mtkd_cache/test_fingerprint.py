"""Sample content hashes and the dataset fingerprint cover everything a sample is: its arrays,
its label and its domain (docs/FORMAT.md, "Fingerprints"); the tokenizer fingerprint covers what
text maps to. A change in any of them must change the fingerprint, or a teacher cached on other
labels would be accepted as current.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.tiny_models import build_word_tokenizer

from mtkd_cache import open_cache, prepare_arrays
from mtkd_cache.format.fingerprint import (
    DatasetHasher,
    sample_content,
    sample_hash,
    tokenizer_fingerprint,
)

N = 6


def _pixels() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N, 2, 3)).astype(np.float32)


def _hashes(cache: Path) -> tuple[str, list[str]]:
    reader = open_cache(cache)
    return reader.inputs.dataset_fingerprint, reader.samples.column("content_hash").to_pylist()


def _prepared(tmp_path: Path, name: str, **kw: Any) -> tuple[str, list[str]]:
    prepare_arrays(tmp_path / name, {"x": _pixels()}, chunk_samples=4, **kw)
    return _hashes(tmp_path / name)


def test_a_label_changed_in_one_sample_changes_that_hash_and_the_fingerprint(tmp_path: Path) -> None:
    fp_a, hashes_a = _prepared(tmp_path, "a", labels=[0, 1, 2, 0, 1, 2])
    fp_b, hashes_b = _prepared(tmp_path, "b", labels=[0, 1, 2, 0, 2, 2])
    assert fp_a != fp_b
    assert [i for i in range(N) if hashes_a[i] != hashes_b[i]] == [4]


def test_labelled_and_unlabelled_samples_hash_differently(tmp_path: Path) -> None:
    fp_none, hashes_none = _prepared(tmp_path, "none")
    fp_some, hashes_some = _prepared(tmp_path, "some", labels=[-1, -1, 3, -1, -1, -1])
    assert fp_none != fp_some
    assert [i for i in range(N) if hashes_none[i] != hashes_some[i]] == [2]


def test_a_domain_changed_in_one_sample_changes_that_hash(tmp_path: Path) -> None:
    fp_a, hashes_a = _prepared(tmp_path, "a", domains=["x", "y", "x", "y", "x", "y"])
    fp_b, hashes_b = _prepared(tmp_path, "b", domains=["x", "y", "x", "y", "x", "x"])
    assert fp_a != fp_b
    assert [i for i in range(N) if hashes_a[i] != hashes_b[i]] == [5]


def test_content_hash_follows_the_documented_recipe(tmp_path: Path) -> None:
    """blake2b-16 over f"{dtype.str}{shape}" + bytes of each array, then the label, then the domain.

    The label is built as an int64 0-d array, but `np.ascontiguousarray` (which the hash applies,
    like the contract test's reader) makes it 1-d, so its header is "<i8(1,)", not "<i8()".
    """
    pixels = _pixels()
    _, hashes = _prepared(tmp_path, "c", labels=[5] * N, domains=["né"] * N)
    h = hashlib.blake2b(digest_size=16)
    h.update(b"<f4(2, 3)" + pixels[1].tobytes())
    h.update(b"<i8(1,)" + np.int64(5).tobytes())
    h.update(b"|u1(3,)" + "né".encode())
    assert hashes[1] == h.hexdigest()


def test_sample_content_appends_label_then_domain() -> None:
    ids = np.arange(3)
    out = sample_content([ids], 7, "ab")
    assert len(out) == 3
    np.testing.assert_array_equal(out[0], ids)
    assert out[1].dtype == np.int64 and out[1].shape == () and int(out[1]) == 7
    assert out[2].dtype == np.uint8 and out[2].tobytes() == b"ab"
    assert len(sample_content([ids], None, None)) == 1
    assert int(sample_content([ids], 0, None)[1]) == 0  # label 0 is a label, not "no label"
    assert sample_content([ids], None, "")[1].size == 0  # an empty domain is still a domain


def test_sample_hash_sees_dtype_shape_order_and_bytes() -> None:
    a = np.arange(6, dtype=np.int64)
    base = sample_hash([a])
    assert len(base) == 32
    assert sample_hash([a.copy()]) == base
    assert sample_hash([a.reshape(2, 3)]) != base  # same bytes, other shape
    assert sample_hash([a.view(np.float64)]) != base  # same bytes, other dtype
    assert sample_hash([a[:3], a[3:]]) != sample_hash([a[3:], a[:3]])
    assert sample_hash([a[:3], a[3:]]) != base
    # a non-contiguous view hashes as its values, not its memory
    assert sample_hash([np.arange(12, dtype=np.int64)[::2]]) == sample_hash([np.arange(0, 12, 2)])


def test_dataset_hasher_is_settings_then_hashes_in_order() -> None:
    hashes = [sample_hash([np.arange(i + 1)]) for i in range(3)]
    settings = {"kind": "arrays", "b": 1, "a": [2]}
    hasher = DatasetHasher(settings)
    hasher.update(hashes)
    want = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for s in hashes:
        want.update(bytes.fromhex(s))
    assert hasher.hexdigest() == want.hexdigest()[:32]
    assert hasher.settings == settings
    reordered = DatasetHasher(settings)
    reordered.update(hashes[::-1])
    assert reordered.hexdigest() != hasher.hexdigest()
    other = DatasetHasher({**settings, "b": 2})
    other.update(hashes)
    assert other.hexdigest() != hasher.hexdigest()


def test_tokenizer_fingerprint_follows_vocab_and_special_tokens() -> None:
    a, b = build_word_tokenizer(16), build_word_tokenizer(16)
    fp = tokenizer_fingerprint(a)
    assert len(fp) == 32 and fp == tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(build_word_tokenizer(17)) != fp
    b.add_special_tokens({"eos_token": "w3"})  # same vocabulary, another EOS
    assert tokenizer_fingerprint(b) != fp


class _Tok:
    def __init__(self, vocab: dict[str, int], name: str = "t") -> None:
        self.vocab, self.name_or_path = vocab, name
        self.special_tokens_map = {"eos_token": "b"}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


class _TokFast(_Tok):
    pass


def test_tokenizer_fingerprint_ignores_fast_or_slow_and_follows_ids() -> None:
    vocab = {"a": 0, "b": 1, "é": 2}
    assert tokenizer_fingerprint(_Tok(vocab)) == tokenizer_fingerprint(_TokFast(vocab))
    payload = {"vocab": [["a", 0], ["b", 1], ["é", 2]], "special": {"eos_token": "b"}, "class": "_Tok"}
    want = hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode())
    assert tokenizer_fingerprint(_Tok(vocab)) == want.hexdigest()[:32]
    assert tokenizer_fingerprint(_Tok({"a": 1, "b": 0, "é": 2})) != tokenizer_fingerprint(_Tok(vocab))


def test_tokenizer_fingerprint_refuses_an_empty_vocabulary() -> None:
    with pytest.raises(ValueError, match="'empty_tok' has an empty vocabulary"):
        tokenizer_fingerprint(_Tok({}, name="empty_tok"))


def test_tokenizer_fingerprint_lists_the_vocabulary_by_id_not_by_token() -> None:
    vocab = {"zeta": 0, "alpha": 1}  # id order differs from alphabetical order
    payload = {"vocab": [["zeta", 0], ["alpha", 1]], "special": {"eos_token": "b"}, "class": "_Tok"}
    want = hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode())
    assert tokenizer_fingerprint(_Tok(vocab)) == want.hexdigest()[:32]


class _Nameless:
    special_tokens_map: dict[str, str] = {}

    def get_vocab(self) -> dict[str, int]:
        return {}

    def __repr__(self) -> str:
        return "<nameless tokenizer>"


def test_an_empty_vocabulary_without_a_name_is_named_by_the_tokenizer_itself() -> None:
    with pytest.raises(ValueError, match="<nameless tokenizer>"):
        tokenizer_fingerprint(_Nameless())
