"""Metadata dataclasses round-trip through JSON, and `from_dict` names what is wrong."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtkd_cache import (
    FORMAT_VERSION,
    CacheFormatError,
    ChunkGrid,
    FeatureSpec,
    InputsMeta,
    Manifest,
    RunConfig,
    TargetSpec,
    TeacherMeta,
    TokenizerInfo,
    ValueEncoding,
)

GRID = ChunkGrid(
    num_samples=50,
    num_chunks=7,
    chunk_samples=8,
    chunk_positions=128,
    inner_samples=4,
    inner_positions=64,
)
TOKENIZER = TokenizerInfo(
    fingerprint="ab" * 16, vocab_size=64, name_or_path="/models/lm", eos_token_id=3, pad_token_id=0
)
INPUTS = InputsMeta(
    kind="tokens",
    dataset_fingerprint="cd" * 16,
    num_samples=50,
    num_positions=600,
    max_length=16,
    grid=GRID,
    tokenizer=TOKENIZER,
    arrays={},
    label_names=["neg", "pos"],
    domains=["a", "b"],
    has_labels=True,
    packed=False,
    source={"data": "x.jsonl", "settings": {"max_length": 16}},
    mtkd_version="0.1.0",
    created="2025-01-01T00:00:00+00:00",
)
TEACHER = TeacherMeta(
    name="lm",
    model="/models/lm",
    task="causal_lm",
    weights_hash="ef" * 32,
    dtype="float32",
    vocab_size=64,
    padded_vocab_size=72,
    grid="token",
    target=TargetSpec("topk", k=8, temperature=2.0, seed=3),
    values=ValueEncoding("u8log", 1 / 32),
    index_dtype="uint16",
    tail_dtype="float16",
    compressor={"name": "zstd", "level": 3},
    dataset_fingerprint="cd" * 16,
    tokenizer_fingerprint="ab" * 16,
    features=(FeatureSpec(0, "none", "float16", 32), FeatureSpec(-1, "mean", "int8", 32)),
    revision="main",
    stats={"positions": 600, "mean_tail": 0.5},
    mtkd_version="0.1.0",
    created="2025-01-01T00:00:00+00:00",
)
MANIFEST = Manifest(
    format_version=FORMAT_VERSION,
    mtkd_version="0.1.0",
    dataset_fingerprint="cd" * 16,
    updated="2025-01-01T00:00:00+00:00",
)


def via_json(obj: Any) -> Any:
    return type(obj).from_dict(json.loads(json.dumps(obj.to_dict())))


@pytest.mark.parametrize(
    "obj",
    [
        GRID,
        TOKENIZER,
        INPUTS,
        TEACHER,
        MANIFEST,
        ValueEncoding("fp16"),
        TargetSpec("sample", draws=16, temperature=0.5, seed=7),
        FeatureSpec(-3, "mean", "int8", 8),
        InputsMeta(
            kind="arrays",
            dataset_fingerprint="0" * 32,
            num_samples=50,
            num_positions=50,
            max_length=1,
            grid=GRID,
            tokenizer=None,
            arrays={"pixel_values": {"shape": [3, 4, 4], "dtype": "float32"}},
        ),
        TeacherMeta(
            **{
                **TEACHER.__dict__,
                "target": TargetSpec("sample", draws=4),
                "features": (),
                "revision": None,
                "tokenizer_fingerprint": None,
                "grid": "sample",
            }
        ),
    ],
    ids=lambda o: type(o).__name__,
)
def test_round_trip_through_json(obj: Any) -> None:
    assert via_json(obj) == obj


@given(n=st.integers(1, 10_000), s=st.integers(1, 64), length=st.integers(1, 512))
def test_chunk_grid_round_trip_and_ranges(n: int, s: int, length: int) -> None:
    grid = ChunkGrid(
        num_samples=n,
        num_chunks=-(-n // s),
        chunk_samples=s,
        chunk_positions=s * length,
        inner_samples=1,
        inner_positions=length,
    )
    assert via_json(grid) == grid
    last = grid.num_chunks - 1
    assert grid.sample_range(last) == (last * s, n)
    assert grid.chunk_of_sample(n - 1) == last
    assert grid.position_range(last) == (last * s * length, grid.total_positions)


def test_files_written_by_mtkd_round_trip_field_for_field(lm_template: Path) -> None:
    for key, cls in (
        ("manifest.json", Manifest),
        ("inputs/inputs.json", InputsMeta),
        ("teachers/lm/teacher.json", TeacherMeta),
    ):
        stored = json.loads((lm_template / key).read_text())
        assert cls.from_dict(stored).to_dict() == stored, key


def test_settings_leave_out_what_does_not_change_the_result() -> None:
    settings = TEACHER.settings()
    assert not {"stats", "created", "mtkd_version"} & set(settings)
    assert (
        settings
        == TeacherMeta(
            **{**TEACHER.__dict__, "stats": {}, "created": "", "mtkd_version": "9"}
        ).settings()
    )
    assert settings != TeacherMeta(**{**TEACHER.__dict__, "dtype": "bfloat16"}).settings()


Mutate = Callable[[dict[str, Any]], None]


@pytest.mark.parametrize(
    ("cls", "obj", "mutate", "message"),
    [
        (
            TeacherMeta,
            TEACHER,
            lambda d: d.pop("vocab_size"),
            "teacher.json of 'lm': field 'vocab_size' is missing",
        ),
        (
            TeacherMeta,
            TEACHER,
            lambda d: d.update(vocab_size="64"),
            r"field 'vocab_size' is '64' \(str\), expected",
        ),
        (
            TeacherMeta,
            TEACHER,
            lambda d: d.update(vocab_size=True),
            r"field 'vocab_size' is True \(bool\)",
        ),
        (
            TeacherMeta,
            TEACHER,
            lambda d: d.update(grid="pixel"),
            r"'pixel' is not one of \('token', 'sample'\)",
        ),
        (TeacherMeta, TEACHER, lambda d: d.update(index_dtype="int64"), "'int64' is not one of"),
        (
            TeacherMeta,
            TEACHER,
            lambda d: d["values"].update(codec="u4"),
            "teacher.json of 'lm': values.codec 'u4' is not one of",
        ),
        (
            TeacherMeta,
            TEACHER,
            lambda d: d["target"].update(kind="soft"),
            "teacher.json of 'lm': target kind: 'soft' is not one of",
        ),
        (
            InputsMeta,
            INPUTS,
            lambda d: d["grid"].pop("chunk_samples"),
            "grid: field 'chunk_samples' is missing",
        ),
        (
            InputsMeta,
            INPUTS,
            lambda d: d["grid"].update(inner_samples=3),
            "inner chunks must divide",
        ),
        (
            InputsMeta,
            INPUTS,
            lambda d: d.update(kind="audio"),
            "inputs/inputs.json: inputs kind: 'audio' is not one of",
        ),
        (
            InputsMeta,
            INPUTS,
            lambda d: d["tokenizer"].pop("fingerprint"),
            "tokenizer: field 'fingerprint' is missing",
        ),
        (
            Manifest,
            MANIFEST,
            lambda d: d.update(format="zarr"),
            "format is 'zarr', expected 'mtkd-cache'",
        ),
        (
            Manifest,
            MANIFEST,
            lambda d: d.update(format_version=99),
            "format_version 99 is unknown to this mtkd",
        ),
        (
            Manifest,
            MANIFEST,
            lambda d: d.update(format_version=1),
            r"format_version 1.*`mtkd-cache migrate CACHE`",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_from_dict_names_the_field_the_value_and_what_was_expected(
    cls: Any, obj: Any, mutate: Mutate, message: str
) -> None:
    d = json.loads(json.dumps(obj.to_dict()))
    mutate(d)
    with pytest.raises(CacheFormatError, match=message):
        cls.from_dict(d)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RunConfig(teacher="a/b", model="m"), "--teacher 'a/b'"),
        (
            lambda: RunConfig(teacher="t", model="m", top_k=4, samples=4),
            "exactly one of --top-k K or --samples N",
        ),
        (
            lambda: RunConfig(teacher="t", model="m", pool="median"),
            "--pool 'median': use none, auto, mean, cls",
        ),
        (
            lambda: RunConfig(teacher="t", model="m", batch_size=0),
            "--batch-size must be >= 1, got 0",
        ),
    ],
)
def test_settings_validators_name_the_flag(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TargetSpec("topk", k=0), r"target k \(top-k entries\) must be positive, got 0"),
        (lambda: TargetSpec("sample", draws=None), "target draws .* is None"),
        (lambda: TargetSpec("topk", k=4, temperature=0.0), "target temperature must be a finite number > 0, got 0.0"),
        (lambda: TargetSpec("soft", k=4), "target kind: 'soft' is not one of"),
        (lambda: ValueEncoding("u4"), "values.codec 'u4' is not one of"),
        (lambda: FeatureSpec(1, pool="median"), "feature pool 'median' must be"),
        (lambda: TeacherMeta(**{**TEACHER.__dict__, "vocab_size": 0}), "teacher vocab_size must be positive"),
        (lambda: TeacherMeta(**{**TEACHER.__dict__, "compressor": {"name": "lz4"}}), "compressor 'lz4'"),
        (lambda: TeacherMeta(**{**TEACHER.__dict__, "grid": "pixel"}), "teacher grid: 'pixel'"),
        (lambda: Manifest(format_version=1, mtkd_version="x", dataset_fingerprint="y"), "format_version 1"),
    ],
)
def test_metadata_built_in_code_is_validated_at_construction(make: Callable[[], Any], message: str) -> None:
    """Metadata built in code is as checked as metadata read from disk, and names no CLI flag."""
    with pytest.raises(CacheFormatError, match=message) as e:
        make()
    assert "--" not in str(e.value)


def test_a_bad_stored_target_names_the_file_not_a_flag() -> None:
    d = json.loads(json.dumps(TEACHER.to_dict()))
    d["target"]["k"] = 0
    with pytest.raises(CacheFormatError, match=r"teacher.json of 'lm': target k .* got 0") as e:
        TeacherMeta.from_dict(d)
    assert "--top-k" not in str(e.value)


def test_compressor_and_stats_are_typed() -> None:
    from mtkd_cache.format.meta import Compressor, TeacherStats

    assert TEACHER.compressor == Compressor("zstd", 3)
    assert isinstance(TEACHER.stats, TeacherStats) and TEACHER.stats.positions == 600
    assert TEACHER.stats["mean_tail"] == 0.5 and "mean_entropy" not in TEACHER.stats
    assert TEACHER.to_dict()["compressor"] == {"name": "zstd", "level": 3}


@pytest.mark.parametrize("name", ["a\\..\\b", "a/b", "../x", "_run", ".hidden", "", "c:d", " x"])
def test_path_like_teacher_names_are_refused_before_anything_is_written(name: str) -> None:
    with pytest.raises(CacheFormatError, match="not a plain folder name"):
        TeacherMeta(**{**TEACHER.__dict__, "name": name})
