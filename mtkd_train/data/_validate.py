"""Check, before the first step, that a set of cached teachers can be distilled together.

Every check reads only metadata (`manifest.json`, `teacher.json`), so it costs milliseconds
whatever the cache size, and a bad configuration fails at set-up instead of mid-run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mtkd_cache import CacheReader, TeacherMeta
from mtkd_cache.errors import CacheMismatchError, CacheNotFoundError
from mtkd_train.data._align import student_meta
from mtkd_train.data._errors import (
    IncompleteTeacherError,
    StreamConfigError,
    TeacherMismatchError,
    TeacherNotFoundError,
)

__all__ = ["validate_teachers"]

_RERUN = "re-run `mtkd-cache run --teacher {name}` on this cache with the same arguments"


def validate_teachers(
    reader: CacheReader,
    teachers: Sequence[str],
    *,
    student_vocab_size: int | None = None,
    student_tokenizer_fingerprint: str | None = None,
    features: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Refuse teachers that cannot be distilled together into one student.

    Args:
        reader: The opened cache.
        teachers: Teacher names, in the order the trainer uses them.
        student_vocab_size: The student's real output size: tokenizer length for causal LMs (a
            wider, padded head is fine, a narrower one is not), number of classes for
            classifiers (must be equal). None skips the check.
        student_tokenizer_fingerprint: `mtkd_cache` fingerprint of the student's tokenizer; must
            equal the teachers'. None skips the check.
        features: Teacher name -> hidden-state layers (HF indices) the trainer will read.

    Raises:
        StreamConfigError: no teacher, or a teacher named twice.
        TeacherNotFoundError: a name not in the cache, or a feature layer that was not cached.
        IncompleteTeacherError: a teacher whose run did not finish.
        TeacherMismatchError: dataset fingerprints, tokenizer fingerprints, vocabulary sizes or
            target grids (per-token vs per-sample) disagree between teachers or with the student.
    """
    names = list(teachers)
    if not names:
        raise StreamConfigError(
            f"no teacher given; choose one or more of {reader.teacher_names} in {reader.url}"
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StreamConfigError(
            f"teachers {dupes} are named more than once in {names}; name each once"
        )
    metas = {n: student_meta(reader, _teacher_meta(reader, n)) for n in names}  # cross-tokenizer: after alignment
    _check_dataset(reader, metas)
    _check_agree(
        metas,
        "grid",
        lambda m: m.grid,
        (
            "per-token ('token') and per-sample ('sample') targets cannot be mixed in one objective; "
            "choose teachers of one kind"
        ),
    )
    _check_tokenizer(reader, metas, student_tokenizer_fingerprint)
    _check_vocab(metas, student_vocab_size)
    _check_features(metas, features or {})


def _teacher_meta(reader: CacheReader, name: str) -> TeacherMeta:
    available = f"complete teachers in {reader.url}: {reader.teacher_names}"
    incomplete = reader.incomplete_teachers()
    if name not in reader.teacher_names:
        if name in incomplete:
            raise IncompleteTeacherError(
                f"teacher {name!r} is incomplete (its run did not finish); {_RERUN.format(name=name)} "
                f"to finish it, or drop it ({available})"
            )
        raise TeacherNotFoundError(
            f"teacher {name!r} is not in this cache; {available}"
            + (f"; incomplete: {incomplete}" if incomplete else "")
        )
    try:
        return reader.teacher(name).meta
    except CacheNotFoundError as e:
        raise IncompleteTeacherError(f"teacher {name!r}: {e}; {_RERUN.format(name=name)}") from e
    except CacheMismatchError as e:
        raise TeacherMismatchError(str(e)) from e


def _listing(metas: Mapping[str, TeacherMeta], key: Any) -> str:
    return ", ".join(f"{n!r}: {key(m)!r}" for n, m in metas.items())


def _check_agree(metas: Mapping[str, TeacherMeta], what: str, key: Any, fix: str) -> None:
    if len({key(m) for m in metas.values()}) > 1:
        raise TeacherMismatchError(f"teachers disagree on {what} ({_listing(metas, key)}); {fix}")


def _check_dataset(reader: CacheReader, metas: Mapping[str, TeacherMeta]) -> None:
    want = reader.inputs.dataset_fingerprint
    for name, meta in metas.items():
        if meta.dataset_fingerprint != want:
            raise TeacherMismatchError(
                f"teacher {name!r} was cached from dataset fingerprint {meta.dataset_fingerprint}, "
                f"this cache's inputs are {want}; {_RERUN.format(name=name)}"
            )


def _check_tokenizer(
    reader: CacheReader, metas: Mapping[str, TeacherMeta], student: str | None
) -> None:
    _check_agree(
        metas,
        "tokenizer fingerprint",
        lambda m: m.tokenizer_fingerprint,
        "distil only from teachers that share one tokenizer",
    )
    tok = reader.inputs.tokenizer
    name, meta = next(iter(metas.items()))
    have = meta.tokenizer_fingerprint
    if tok is not None and have != tok.fingerprint:
        raise TeacherMismatchError(
            f"teacher {name!r} has tokenizer fingerprint {have}, the cache's inputs "
            f"{tok.fingerprint}; {_RERUN.format(name=name)}"
        )
    if student is not None and student != have:
        raise TeacherMismatchError(
            f"the student's tokenizer fingerprint is {student}, teachers {list(metas)} were cached "
            f"with {have}; give the student the cache's tokenizer (`CacheReader.load_tokenizer()`) "
            f"or prepare a cache with the student's tokenizer"
        )


def _check_vocab(metas: Mapping[str, TeacherMeta], student: int | None) -> None:
    _check_agree(
        metas,
        "vocab_size",
        lambda m: m.vocab_size,
        "distil only from teachers with the same vocabulary (or the same classes)",
    )
    meta = next(iter(metas.values()))
    if student is None:
        return
    if meta.grid == "token" and student < meta.vocab_size:
        raise TeacherMismatchError(
            f"the student has {student} outputs but teachers {list(metas)} predict "
            f"{meta.vocab_size} tokens; use a student with the teachers' tokenizer"
        )
    if meta.grid == "sample" and student != meta.vocab_size:
        raise TeacherMismatchError(
            f"the student has {student} classes but teachers {list(metas)} have "
            f"{meta.vocab_size}; give the student {meta.vocab_size} outputs"
        )


def _check_features(
    metas: Mapping[str, TeacherMeta], features: Mapping[str, Sequence[int]]
) -> None:
    for name, layers in features.items():
        if name not in metas:
            raise StreamConfigError(
                f"features are asked of teacher {name!r}, which is not among the selected "
                f"teachers {list(metas)}; add it to the teachers or drop its features"
            )
        cached = [f.layer for f in metas[name].features]
        for layer in layers:
            if layer not in cached:
                raise TeacherNotFoundError(
                    f"teacher {name!r} has no cached feature layer {layer}; cached layers are "
                    f"{cached}; re-run `mtkd-cache run --teacher {name} --features {layer}` "
                    f"(with --overwrite) or ask for one of {cached}"
                )
