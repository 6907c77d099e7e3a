"""Which token grid a teacher runs on: the inputs', or its own tokenization of the stored text.

A causal LM whose tokenizer fingerprint differs from the inputs' runs on its own tokenization
(`retokenize.ensure_tokenization`), which requires inputs that store their text (format 3,
not packed). `own=True` forces the own-tokenization path even for the inputs' tokenizer (it then
gives the same targets through the alignment; tests prove it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mtkd_cache.errors import CacheMismatchError
from mtkd_cache.format.meta import TeacherMeta
from mtkd_cache.format.tokenization import TokenizationReader

__all__ = ["reader_for", "teacher_grid", "with_tokenization"]


def teacher_grid(reader: Any, teacher: Any, cfg: Any, own: bool | None, tok: Any, fingerprint: str | None) -> Any:
    """`reader`, or a `TokenizationReader` of the teacher's own tokenization when it needs one.

    `tok` / `fingerprint`: the teacher's tokenizer and its fingerprint (`setup._teacher_tokenizer`), loaded once per run.
    """
    inputs = reader.inputs
    if own is False or inputs.tokenizer is None or teacher.task != "causal_lm":
        return reader
    if teacher.tokenizer_path is None:
        if own:
            raise CacheMismatchError(f"teacher {cfg.teacher!r} ({cfg.model}) has no tokenizer files, so it cannot "
                                     f"run on its own tokenization; put its tokenizer next to the model")
        return reader
    if not own and fingerprint == inputs.tokenizer.fingerprint:
        return reader
    if inputs.text is None:
        raise CacheMismatchError(
            f"teacher {cfg.teacher!r} ({cfg.model}) has another tokenizer than the cache's inputs "
            f"({inputs.tokenizer.name_or_path!r}) and the cache stores no source text to re-tokenize (prepared "
            f"by an older mtkd or with --pack); re-run `mtkd-cache prepare` without --pack, or use a teacher "
            f"with the inputs' tokenizer")
    from mtkd_cache.precompute.retokenize import ensure_tokenization

    return ensure_tokenization(reader, tok, str(cfg.model))


def with_tokenization(meta: TeacherMeta, reader: Any) -> TeacherMeta:
    """`meta` recording the tokenization it runs on (unchanged on the inputs' grid)."""
    return dataclasses.replace(meta, tokenization=reader.id) if isinstance(reader, TokenizationReader) else meta


def reader_for(reader: Any, meta: TeacherMeta) -> Any:
    """The reader of the grid `meta` runs on."""
    return reader if meta.tokenization is None else TokenizationReader(reader, meta.tokenization)
