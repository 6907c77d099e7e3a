"""Feature-only teachers: encoders and embedding models without an output head.

A Hugging Face base model (``AutoModel``: BertModel, a sentence-transformers folder, a vision
backbone) or a factory whose module declares no ``vocab_size`` / ``num_labels`` / ``num_classes``
loads as task ``encoder``. It has no distribution to store, so its teacher group holds features
only (target kind ``none``): per position (``--pool none``) or one vector per sample pooled as
the model was trained (``--pool mean|cls|...|auto``; ``auto`` reads ``1_Pooling/config.json``).
Cost per chunk: one teacher forward, plus ``O(B L D)`` pooling per stored layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtkd_cache.errors import UnsupportedTeacherError
from mtkd_cache.format.meta import TargetSpec, TeacherMeta
from mtkd_cache.format.reader import CacheReader, ChunkData
from mtkd_cache.precompute.batching import length_grouped_batches
from mtkd_cache.precompute.chunk import ChunkOutput, batch_inputs
from mtkd_cache.precompute.config import RunConfig
from mtkd_cache.precompute.device import autocast_context
from mtkd_cache.precompute.models import LoadedTeacher
from mtkd_cache.precompute.pooling import pool_hidden, resolve_pool

__all__ = ["check_layers", "encoder_hidden", "encoder_settings", "feature_only_meta", "hidden_states_of",
           "run_feature_chunk", "teacher_pool"]


def check_layers(teacher: LoadedTeacher, layers: Sequence[int], name: str) -> None:
    """Every `--features` layer exists: HF indices in [-(n+1), n] for a teacher of n layers.

    Raises:
        ValueError: a layer out of range (checked before any forward), naming the valid range.
    """
    n = teacher.num_layers
    if n is None:
        return  # a factory that does not say; the first forward checks
    bad = [layer for layer in layers if not -(n + 1) <= layer <= n]
    if bad:
        raise ValueError(f"--features {','.join(map(str, bad))}: teacher {name!r} has {n} layers, so hidden-state "
                         f"indices run from 0 (embeddings) to {n} (last), or -{n + 1} to -1; pick layers in that range")


def teacher_pool(cfg: RunConfig, teacher: LoadedTeacher) -> str:
    """`--pool` with `auto` resolved from the teacher's folder (`1_Pooling/config.json`)."""
    folder = teacher.model_id if Path(teacher.model_id).is_dir() else teacher.tokenizer_path
    return resolve_pool(cfg.pool, folder, f"teacher {cfg.teacher!r} ({cfg.model})")


def encoder_settings(reader: CacheReader, teacher: LoadedTeacher, cfg: RunConfig, pad_id: int) -> dict[int, int]:
    """Check a feature-only run's flags, then probe the stored width of each layer on the first sample.

    Raises:
        ValueError: `--top-k` / `--samples` asked of a teacher without a head, or no `--features`.
        UnsupportedTeacherError: the forward returns no hidden states.
    """
    who = f"teacher {cfg.teacher!r} ({cfg.model})"
    if cfg.top_k is not None or cfg.samples is not None:
        flag = f"--top-k {cfg.top_k}" if cfg.top_k is not None else f"--samples {cfg.samples}"
        raise ValueError(f"{flag}: {who} has no output head (a base model / encoder), so it has no token "
                         f"distribution to keep; drop {flag.split()[0]} and store its --features only")
    if not cfg.features:
        raise ValueError(f"{who} has no output head (a base model / encoder), so only its hidden states can be "
                         f"cached; add --features -1 (and --pool auto|mean|cls for sentence embeddings)")
    if reader.inputs.kind != "tokens" and cfg.pool == "none":
        raise ValueError(f"--pool none: the cache holds arrays (one row per sample); pool {who}'s features "
                         f"per sample with --pool mean or --pool cls")
    feats = _features(teacher, batch_inputs(reader.read_chunk(0), [0], pad_id), cfg.features, cfg.pool)
    return {layer: int(v.shape[-1]) for layer, v in feats.items()}


def feature_only_meta(meta: TeacherMeta, pool: str) -> TeacherMeta:
    """`meta` as a feature-only teacher: target kind `none`, every feature pooled with `pool`."""
    feats = tuple(dataclasses.replace(f, pool=pool) for f in meta.features)
    target = TargetSpec("none", temperature=meta.target.temperature, seed=meta.target.seed)
    return dataclasses.replace(meta, target=target, features=feats)


def encoder_hidden(teacher: LoadedTeacher, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Hidden states (embeddings, then one per layer; each (B, L, D) or (B, D)) without a graph.

    A factory may return the hidden states as ``.hidden_states``, a tuple, or one tensor (the last layer).
    """
    module = teacher.module
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
    with torch.inference_mode():
        out: Any = module(**inputs, output_hidden_states=True)
    hidden = hidden_states_of(out)
    if hidden is None:
        raise UnsupportedTeacherError(f"teacher {teacher.model_id!r} returned {type(out).__name__} without hidden "
                                      "states; return .hidden_states (a tuple of (B, L, D)) or the last one as a tensor")
    return hidden


def hidden_states_of(out: Any) -> tuple[torch.Tensor, ...] | None:
    """The hidden states in a forward's output: `.hidden_states`, a tuple of them, or one tensor (the last)."""
    hidden = out if isinstance(out, tuple | list) else getattr(out, "hidden_states", None)
    if hidden is None and isinstance(out, torch.Tensor):
        hidden = (out,)
    return tuple(hidden) if hidden else None


def _features(teacher: LoadedTeacher, batch: Mapping[str, torch.Tensor], layers: Sequence[int], how: str
              ) -> dict[int, torch.Tensor]:
    """layer -> stored feature: (B, L, D) per position, or (B, D') pooled (float32)."""
    hidden = encoder_hidden(teacher, batch)
    mask = batch.get("attention_mask")
    out = {}
    for layer in layers:
        if not -len(hidden) <= layer < len(hidden):
            raise ValueError(f"--features {layer}: teacher {teacher.model_id!r} returned {len(hidden)} hidden states; "
                             f"pick layers in [-{len(hidden)}, {len(hidden) - 1}]")
        out[layer] = pool_hidden(hidden[layer].float(), mask, how)
    return out


def run_feature_chunk(data: ChunkData, teacher: LoadedTeacher, meta: TeacherMeta, chunk: int, *, batch_size: int,
                      max_tokens: int | None, device: torch.device, dtype: torch.dtype, pad_id: int,
                      on_batch: Callable[[int], None] | None = None, **_: Any) -> ChunkOutput:
    """Forward every sample of one chunk and keep only the features (same contract as `chunk.run_chunk`)."""
    n = len(data.sample_ids)
    tokens = "token_ids" in data.inputs
    lengths = data.lengths.tolist() if tokens else [1] * n
    how = meta.features[0].pool  # one pooling for the teacher's layers
    rows: list[dict[int, np.ndarray]] = [{} for _ in range(n)]
    result = ChunkOutput(stats={"positions": float(sum(lengths))})
    for idx in length_grouped_batches(lengths, max_tokens, batch_size):
        with autocast_context(device, dtype):
            feats = _features(teacher, batch_inputs(data, idx, pad_id), [f.layer for f in meta.features], how)
        if on_batch is not None:
            on_batch(sum(lengths[i] for i in idx))
        for layer, v in feats.items():
            finite = torch.isfinite(v).flatten(1).all(1)  # (B,)
            result.nonfinite.extend(int(data.sample_ids[idx[b]]) for b in (~finite).nonzero().flatten().tolist())
            host = v.cpu().numpy()
            for b, i in enumerate(idx):
                rows[i][layer] = host[b, : lengths[i]] if host.ndim == 3 else host[b]
    if result.nonfinite:
        result.nonfinite = sorted(set(result.nonfinite))
        return result
    for f in meta.features:
        vals = [r[f.layer] for r in rows]
        result.features[f.layer] = np.concatenate(vals) if vals[0].ndim == 2 else np.stack(vals)
    return result
