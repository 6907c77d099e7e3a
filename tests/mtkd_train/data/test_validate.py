"""validate_teachers: every way a teacher set can be unusable fails before the first step."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mtkd_cache import CacheReader, open_cache
from mtkd_train.data import (
    IncompleteTeacherError,
    StreamConfigError,
    TeacherMismatchError,
    TeacherNotFoundError,
    validate_teachers,
)


def _edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def _rewrite_teacher_json(cache: Path, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    """A teacher written with other metadata: teacher.json changed and re-recorded in chunks.parquet
    (editing teacher.json alone is tampering, which the reader refuses: tests/mtkd_cache/test_integrity.py)."""
    import pyarrow.parquet as pq

    from mtkd_cache.format.meta import TEACHER_HASH_KEY, content_hash

    _edit_json(cache / "teachers" / name / "teacher.json", change)
    table = pq.read_table(cache / "teachers" / name / "chunks.parquet")
    digest = content_hash(json.loads((cache / "teachers" / name / "teacher.json").read_text()))
    pq.write_table(table.replace_schema_metadata({TEACHER_HASH_KEY: digest}), cache / "teachers" / name / "chunks.parquet")


def test_compatible_teachers_pass(token_reader: CacheReader) -> None:
    fp = token_reader.inputs.tokenizer.fingerprint  # type: ignore[union-attr]
    validate_teachers(
        token_reader,
        ["a", "b", "s"],
        features={"a": [1], "b": [-1]},
        student_vocab_size=40,
        student_tokenizer_fingerprint=fp,
    )
    validate_teachers(token_reader, ["cls"], student_vocab_size=3)


def test_unknown_teacher_lists_the_available_ones(token_reader: CacheReader) -> None:
    with pytest.raises(
        TeacherNotFoundError, match=r"'qwen7b' is not in this cache.*\['a', 'b', 'cls', 's'\]"
    ):
        validate_teachers(token_reader, ["a", "qwen7b"])
    with pytest.raises(LookupError):  # the builtin base works too
        validate_teachers(token_reader, ["qwen7b"])


def test_teacher_without_teacher_json_is_incomplete(token_cache_copy: Path) -> None:
    """A teacher is complete exactly when its teacher.json exists (format v2: no manifest list)."""
    (token_cache_copy / "teachers" / "b" / "teacher.json").unlink()
    with pytest.raises(
        IncompleteTeacherError, match=r"'b' is incomplete.*mtkd-cache run --teacher b"
    ):
        validate_teachers(open_cache(token_cache_copy), ["a", "b"])


def test_token_and_sample_grid_teachers_cannot_be_mixed(token_reader: CacheReader) -> None:
    with pytest.raises(
        TeacherMismatchError, match=r"grid.*'a': 'token'.*'cls': 'sample'.*one kind"
    ):
        validate_teachers(token_reader, ["a", "cls"])


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("vocab_size", 40, r"vocab_size \('a': 32, 'b': 40\)"),
        ("tokenizer_fingerprint", "0" * 32, r"tokenizer fingerprint.*'b': '0{32}'"),
        ("dataset_fingerprint", "f" * 32, r"'b'.*dataset fingerprint f{32}.*mtkd-cache run"),
    ],
)
def test_teachers_that_disagree_are_refused(
    token_cache_copy: Path, field: str, value: Any, pattern: str
) -> None:
    _rewrite_teacher_json(token_cache_copy, "b", lambda d: d.update({field: value}))
    with pytest.raises(TeacherMismatchError, match=pattern):
        validate_teachers(open_cache(token_cache_copy), ["a", "b"])


def test_student_must_share_tokenizer_and_cover_the_vocabulary(token_reader: CacheReader) -> None:
    with pytest.raises(TeacherMismatchError, match=r"student has 16 outputs.*predict 32 tokens"):
        validate_teachers(token_reader, ["a"], student_vocab_size=16)
    with pytest.raises(
        TeacherMismatchError, match=r"student's tokenizer fingerprint is beef.*load_tokenizer"
    ):
        validate_teachers(token_reader, ["a"], student_tokenizer_fingerprint="beef")
    with pytest.raises(TeacherMismatchError, match=r"student has 4 classes.*have 3"):
        validate_teachers(token_reader, ["cls"], student_vocab_size=4)


def test_feature_layer_that_was_not_cached(token_reader: CacheReader) -> None:
    with pytest.raises(
        TeacherNotFoundError, match=r"'a' has no cached feature layer 0; cached layers are \[1\]"
    ):
        validate_teachers(token_reader, ["a"], features={"a": [1, 0]})
    with pytest.raises(StreamConfigError, match=r"teacher 'b', which is not among the selected"):
        validate_teachers(token_reader, ["a"], features={"b": [-1]})


def test_empty_or_repeated_teacher_lists(token_reader: CacheReader) -> None:
    with pytest.raises(StreamConfigError, match="no teacher given"):
        validate_teachers(token_reader, [])
    with pytest.raises(StreamConfigError, match=r"\['a'\] are named more than once"):
        validate_teachers(token_reader, ["a", "b", "a"])
