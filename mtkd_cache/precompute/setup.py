"""Before a teacher run writes anything: load the teacher, check it fits the cache, describe it.

Checks, each a one-line error naming the teacher and the fix: the teacher's tokenizer is the
cache's; its vocabulary is the tokenizer's (an LM head may be wider, as padded real LMs are: the
extra columns are ignored everywhere, but a factory must declare them as `padded_vocab_size`);
its logits are as wide as it declares; `--top-k` fits the vocabulary. One forward on the first
sample (only when the answer needs it) gives feature widths and whether logits are per token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mtkd_cache._version import __version__
from mtkd_cache.errors import CacheMismatchError, UnsupportedTeacherError
from mtkd_cache.format.codecs import index_dtype_for
from mtkd_cache.format.fingerprint import tokenizer_fingerprint
from mtkd_cache.format.meta import Compressor, FeatureSpec, TeacherMeta, ValueEncoding
from mtkd_cache.format.reader import CacheReader
from mtkd_cache.precompute.chunk import batch_inputs
from mtkd_cache.precompute.config import RunConfig, model_key
from mtkd_cache.precompute.cross import teacher_grid, with_tokenization
from mtkd_cache.precompute.encoder import (
    check_layers,
    encoder_settings,
    feature_only_meta,
    teacher_pool,
)
from mtkd_cache.precompute.forward import forward_teacher
from mtkd_cache.precompute.models import LoadedTeacher, load_teacher

__all__ = ["setup_teacher"]


def setup_teacher(reader: CacheReader, cfg: RunConfig, model_kwargs: Mapping[str, Any] | None,
                  device: torch.device, dtype: torch.dtype, load: Callable[..., LoadedTeacher] = load_teacher,
                  own_tokenization: bool | None = None) -> tuple[LoadedTeacher, TeacherMeta, int]:
    """Load (with `load`) and check the teacher; return it, the metadata it will be stored under, and the pad id.

    Raises:
        TeacherLoadError, UnsupportedTeacherError: from `load_teacher`.
        CacheMismatchError: tokenizer or vocabulary does not fit the cache's inputs.
        ValueError: `--top-k` larger than the vocabulary.
    """
    teacher = load(cfg.model, device=device, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                           factory_kwargs=model_kwargs)
    tok, fingerprint = _teacher_tokenizer(teacher, cfg)
    reader = teacher_grid(reader, teacher, cfg, own_tokenization, tok, fingerprint)  # another tokenizer: its own grid
    teacher = _check_vocab(reader, teacher, cfg, fingerprint)
    tok = reader.inputs.tokenizer
    pad_id = tok.pad_token_id if tok and tok.pad_token_id is not None else 0
    check_layers(teacher, cfg.features, cfg.teacher)
    if reader.inputs.packed and teacher.task not in ("causal_lm", "custom"):
        raise UnsupportedTeacherError(
            f"teacher {cfg.teacher!r} is a {teacher.task} model, but the cache's inputs are packed: documents are "
            f"isolated (block-causal attention) only for causal LMs; prepare a cache without --pack for it")
    cfg = dataclasses.replace(cfg, pool=teacher_pool(cfg, teacher))
    if teacher.task == "encoder":  # no head: features only (precompute/encoder.py)
        dims = encoder_settings(reader, teacher, cfg, pad_id)
        meta = _teacher_meta(reader, teacher, cfg, model_kwargs, dtype, dims, reader.inputs.kind == "tokens")
        return teacher, feature_only_meta(meta, cfg.pool), pad_id
    dims, per_token, width = _probe(reader, teacher, cfg, pad_id)
    _check_width(reader, teacher, cfg, per_token, width)
    if cfg.top_k is not None and cfg.top_k > teacher.vocab_size:
        raise ValueError(f"--top-k {cfg.top_k} is larger than teacher {cfg.teacher!r}'s vocabulary of "
                         f"{teacher.vocab_size}; use --top-k <= {teacher.vocab_size}")
    meta = with_tokenization(_teacher_meta(reader, teacher, cfg, model_kwargs, dtype, dims, per_token), reader)
    return teacher, meta, pad_id


def _teacher_tokenizer(teacher: LoadedTeacher, cfg: RunConfig) -> tuple[Any, str | None]:
    """The teacher's tokenizer (the one `load_teacher` read, else loaded here) and its fingerprint, once per run."""
    if teacher.tokenizer_path is None or teacher.task not in ("causal_lm", "sequence_classification", "encoder"):
        return None, None
    tok = teacher.tokenizer
    if tok is None:
        from mtkd_cache.precompute.prepare import load_tokenizer

        tok = load_tokenizer(teacher.tokenizer_path, cfg.trust_remote_code)
    return tok, tokenizer_fingerprint(tok)


def _check_vocab(reader: CacheReader, teacher: LoadedTeacher, cfg: RunConfig, fp: str | None) -> LoadedTeacher:
    inputs = reader.inputs
    if inputs.tokenizer is not None and teacher.task in ("causal_lm", "sequence_classification", "encoder"):
        if fp is not None and fp != inputs.tokenizer.fingerprint:
            raise CacheMismatchError(
                f"teacher {cfg.teacher!r} ({cfg.model}) has tokenizer fingerprint {fp}, but the cache's "
                f"inputs were tokenized with {inputs.tokenizer.name_or_path!r} ({inputs.tokenizer.fingerprint}); "
                f"use a teacher that shares the tokenizer, or prepare a new cache with its tokenizer")
        if teacher.task == "causal_lm":
            if teacher.padded_vocab_size < inputs.tokenizer.vocab_size:
                raise CacheMismatchError(
                    f"teacher {cfg.teacher!r} has {teacher.padded_vocab_size} output tokens but the cache's "
                    f"tokenizer has {inputs.tokenizer.vocab_size}; the teacher cannot score these inputs")
            # The cache's tokenizer is the real vocabulary; head columns past it are padding.
            teacher = dataclasses.replace(teacher, vocab_size=inputs.tokenizer.vocab_size)
    return teacher


def _probe(reader: CacheReader, teacher: LoadedTeacher, cfg: RunConfig, pad_id: int
           ) -> tuple[dict[int, int], bool, int | None]:
    """One forward on the first sample: feature widths, whether logits are per token, logits width."""
    layers: Sequence[int] = cfg.features
    if not layers and teacher.task != "custom":  # known without a forward (a full sample's worth of compute)
        return {}, reader.inputs.kind == "tokens" and teacher.task == "causal_lm", None
    data = reader.read_chunk(0)
    tok = reader.inputs.tokenizer
    try:
        logits, hidden = forward_teacher(teacher, batch_inputs(data, [0], pad_id), want_hidden=tuple(layers))
    except IndexError as e:  # an embedding lookup past the teacher's vocabulary
        if tok is None or teacher.vocab_size >= tok.vocab_size:
            raise
        raise CacheMismatchError(
            f"teacher {cfg.teacher!r} ({cfg.model}) failed on the first sample ({e}): it has {teacher.vocab_size} "
            f"tokens but the cache's tokenizer {tok.name_or_path!r} has {tok.vocab_size}; use a teacher over "
            f"the cache's tokenizer") from e
    per_token = reader.inputs.kind == "tokens" and (
        teacher.task == "causal_lm" or (teacher.task == "custom" and int(logits.shape[1]) == int(data.lengths[0]) > 1))
    dims = {layer: int(h.shape[-1]) for layer in layers if (h := hidden[layer]) is not None} if hidden else {}
    return dims, per_token, int(logits.shape[-1])


def _check_width(reader: CacheReader, teacher: LoadedTeacher, cfg: RunConfig, per_token: bool,
                 width: int | None) -> None:
    """The logits are as wide as declared, and a per-token teacher predicts exactly the tokenizer's tokens."""
    who = f"teacher {cfg.teacher!r} ({cfg.model})"
    if width is not None and width != teacher.padded_vocab_size:
        raise CacheMismatchError(
            f"{who} returned logits {width} wide but declares padded_vocab_size {teacher.padded_vocab_size} "
            f"(vocab_size {teacher.vocab_size}); make the module's vocab_size / padded_vocab_size match its output")
    tok = reader.inputs.tokenizer
    if not per_token or tok is None or teacher.vocab_size == tok.vocab_size:
        return
    if teacher.vocab_size < tok.vocab_size:
        raise CacheMismatchError(
            f"{who} predicts {teacher.vocab_size} tokens but the cache's tokenizer {tok.name_or_path!r} has "
            f"{tok.vocab_size}; a teacher must score every token of the inputs: use one over that tokenizer")
    raise CacheMismatchError(
        f"{who} declares vocab_size {teacher.vocab_size} but the cache's tokenizer has {tok.vocab_size}, so ids "
        f"{tok.vocab_size}..{teacher.vocab_size - 1} can never be inputs or student targets; if those columns are "
        f"head padding give the module vocab_size={tok.vocab_size} and padded_vocab_size={teacher.vocab_size}, "
        f"else use a teacher over the cache's tokenizer")


def _teacher_meta(reader: CacheReader, teacher: LoadedTeacher, cfg: RunConfig, model_kwargs: Mapping[str, Any] | None,
                  dtype: torch.dtype, dims: Mapping[int, int], per_token: bool) -> TeacherMeta:
    grid = "token" if per_token else "sample"
    feats = tuple(FeatureSpec(layer=layer, pool=cfg.pool if grid == "token" else "mean",  # type: ignore[arg-type]
                              dtype=cfg.feature_dtype, dim=dims[layer]) for layer in cfg.features)  # type: ignore[arg-type]
    tok = reader.inputs.tokenizer
    return TeacherMeta(
        name=cfg.teacher, model=model_key(cfg.model), task=teacher.task, weights_hash=teacher.weights_hash,
        dtype=str(dtype).removeprefix("torch."), vocab_size=teacher.vocab_size,
        padded_vocab_size=teacher.padded_vocab_size, grid=grid, target=cfg.target,  # type: ignore[arg-type]
        values=ValueEncoding(cfg.value_codec, cfg.logp_step),  # type: ignore[arg-type]
        index_dtype=index_dtype_for(teacher.vocab_size), tail_dtype=cfg.tail_dtype,
        compressor=Compressor(cfg.compression, cfg.compression_level),  # type: ignore[arg-type]
        dataset_fingerprint=reader.inputs.dataset_fingerprint,
        tokenizer_fingerprint=None if tok is None else tok.fingerprint,
        features=feats, revision=teacher.revision, model_kwargs=dict(model_kwargs) if model_kwargs else None,
        mtkd_version=__version__,
        documents="isolated" if reader.inputs.packed and teacher.task == "causal_lm" else None,
    )
