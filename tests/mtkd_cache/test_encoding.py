from __future__ import annotations

from pathlib import Path

import numpy as np

from mtkd_cache import ValueEncoding, open_cache, prepare_arrays
from mtkd_cache.encoding import decode_values, encode_values, index_dtype_for


def test_u8log_round_trip_bound_and_exact_zero() -> None:
    enc = ValueEncoding("u8log", 1 / 16)
    logp = np.array([0.0, -0.03, -1.0, -7.77, -15.0, -40.0, -np.inf], dtype=np.float32)
    codes = encode_values(logp, enc)
    assert codes[-1] == 255 and (codes[:-1] <= 254).all()
    back = decode_values(codes, enc)
    assert np.isneginf(back[-1]), "an exact zero stays zero"
    assert np.abs(back[:5] - logp[:5]).max() <= enc.step / 2 + 1e-7
    assert back[5] == np.float32(-254 / 16), "values below the grid clip to its last finite code"


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
