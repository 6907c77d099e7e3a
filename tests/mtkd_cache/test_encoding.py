from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers.tiny_models import build_word_tokenizer

from mtkd_cache import CacheExistsError, ValueEncoding, open_cache, prepare, prepare_arrays
from mtkd_cache.format.codecs import decode_values, encode_values, index_dtype_for


def test_u8log_round_trip_bound_and_exact_zero() -> None:
    enc = ValueEncoding("u8log", 1 / 16)
    logp = np.array([0.0, -0.03, -1.0, -7.77, -15.0, -40.0, -np.inf], dtype=np.float32)
    codes = encode_values(logp, enc)
    assert codes[-1] == 255 and (codes[:-1] <= 254).all()
    back = decode_values(codes, enc)
    assert np.isneginf(back[-1]), "an exact zero stays zero"
    assert np.abs(back[:5] - logp[:5]).max() <= enc.step / 2 + 1e-7
    assert back[5] == np.float32(-254 / 16), "values below the grid clip to its last finite code"


def test_u8log_stores_a_float32_underflow_as_an_exact_zero() -> None:
    enc = ValueEncoding("u8log", 1 / 16)
    logp = np.array([-103.5, -104.5, -1e4, -np.finfo(np.float32).max], dtype=np.float32)
    assert np.exp(logp[0]) > 0 and (np.exp(logp[1:]) == 0).all()  # the float32 probabilities
    back = decode_values(encode_values(logp, enc), enc)
    assert back[0] == np.float32(-254 / 16), "a tiny but nonzero probability clips to the last finite code"
    assert np.isneginf(back[1:]).all(), "a probability that is 0 in float32 is stored as exactly 0"


def test_index_width_follows_the_vocabulary() -> None:
    assert index_dtype_for(65_536) == "uint16"
    assert index_dtype_for(65_537) == "uint32"
    assert index_dtype_for(262_144) == "uint32"


def test_domains_are_part_of_array_content(tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    a = prepare_arrays(tmp_path / "c", {"x": x}, labels=np.arange(10) % 2, domains=["a"] * 10)
    b = prepare_arrays(tmp_path / "c", {"x": x}, labels=np.arange(10) % 2, domains=["b"] * 10, overwrite=True)
    assert a.dataset_fingerprint != b.dataset_fingerprint
    assert open_cache(tmp_path / "c").samples.column("domain").to_pylist() == ["b"] * 10


def test_prepare_refuses_a_changed_source_file(tmp_path: Path) -> None:
    tok_dir = tmp_path / "tok"
    build_word_tokenizer(24).save_pretrained(tok_dir)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "w1 w2 w3"}\n')
    first = prepare(tmp_path / "c", data, tokenizer=tok_dir, max_length=8, progress=False)
    data.write_text('{"text": "w1 w2 w3"}\n{"text": "w4 w5 w6"}\n')
    os.utime(data, ns=(1, 1))  # a different mtime even on coarse clocks
    with pytest.raises(CacheExistsError, match="source_files"):
        prepare(tmp_path / "c", data, tokenizer=tok_dir, max_length=8, progress=False)
    again = prepare(tmp_path / "c", data, tokenizer=tok_dir, max_length=8, overwrite=True, progress=False)
    assert again.num_samples == 2 and first.num_samples == 1
