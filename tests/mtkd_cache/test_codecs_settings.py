"""The settings objects of `mtkd_cache.format.codecs` (`ValueEncoding`, `Compressor`): what they
accept, the exact errors for what they refuse, and the metadata round trip (written from the
survivors of a mutation run, docs/TESTING.md).
"""

from __future__ import annotations

import pytest

from mtkd_cache import Compressor, ValueEncoding
from mtkd_cache.errors import CacheFormatError


@pytest.mark.parametrize("enc", [ValueEncoding(), ValueEncoding("u8log", 0.125), ValueEncoding("fp16", 0.5),
                                 ValueEncoding("fp32", 2)])
def test_value_encoding_metadata_round_trip(enc: ValueEncoding) -> None:
    d = enc.to_dict()
    assert d == {"codec": enc.codec, "step": enc.step}
    assert ValueEncoding.from_dict(d) == enc


def test_value_encoding_defaults_and_a_missing_step() -> None:
    assert ValueEncoding() == ValueEncoding("u8log", 1 / 16)
    assert ValueEncoding.from_dict({"codec": "fp16"}) == ValueEncoding("fp16", 0.0625)


def test_value_encoding_without_a_codec_is_refused_by_name() -> None:
    with pytest.raises(CacheFormatError, match=r"^values\.codec None is not one of \('u8log', 'fp16', 'fp32'\)$"):
        ValueEncoding.from_dict({"step": 0.0625})
    with pytest.raises(CacheFormatError, match=r"^values\.codec 'u4log' is not one of \('u8log', 'fp16', 'fp32'\)$"):
        ValueEncoding("u4log")  # type: ignore[arg-type]


@pytest.mark.parametrize("step", [1e-9, 1, 0.5, 999.9])
def test_value_encoding_accepts_steps_in_the_open_range(step: float) -> None:
    assert ValueEncoding("u8log", step).step == step


@pytest.mark.parametrize("step", [0, 0.0, -0.0625, 1e3, 1000.5, float("inf"), float("nan"), True, "0.0625", None])
def test_value_encoding_refuses_other_steps_with_the_exact_message(step: object) -> None:
    with pytest.raises(CacheFormatError) as err:
        ValueEncoding("u8log", step)  # type: ignore[arg-type]
    assert str(err.value) == f"values.step must be a positive number, got {step!r}"


@pytest.mark.parametrize("comp", [Compressor(), Compressor("zstd", 19), Compressor("blosc", 5),
                                  Compressor("blosc", 1, "bitshuffle")])
def test_compressor_metadata_round_trip(comp: Compressor) -> None:
    assert Compressor.from_dict(comp.to_dict()) == comp


def test_compressor_metadata_lists_shuffle_only_for_blosc() -> None:
    assert Compressor().to_dict() == {"name": "zstd", "level": 3}
    assert Compressor("zstd", 9, "bitshuffle").to_dict() == {"name": "zstd", "level": 9}
    assert Compressor("blosc", 4).to_dict() == {"name": "blosc", "level": 4, "shuffle": "shuffle"}
    assert Compressor.from_dict({}) == Compressor("zstd", 3, "shuffle")
    assert Compressor.from_dict({"name": "blosc"}) == Compressor("blosc", 3, "shuffle")


@pytest.mark.parametrize("level", [-7, 0, 1, 22])
def test_compressor_accepts_levels_from_minus_7_to_22(level: int) -> None:
    assert Compressor("zstd", level).codec().level == level


@pytest.mark.parametrize("level", [-8, 23, True, False, 3.0, "3", None])
def test_compressor_refuses_other_levels_with_the_exact_message(level: object) -> None:
    with pytest.raises(CacheFormatError) as err:
        Compressor("zstd", level)  # type: ignore[arg-type]
    assert str(err.value) == f"compressor level must be an integer in [-7, 22], got {level!r}"
