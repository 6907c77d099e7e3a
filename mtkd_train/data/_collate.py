"""Assemble one batch from rows of decoded chunks (pure numpy -> torch, no I/O).

A batch of B samples is filled chunk by chunk (`BatchBuilder.add`), so assembling it holds at
most one decoded chunk beyond the cache's own. Token inputs are right-padded to L (the longest
sample, or a fixed length); token-grid targets and per-position features are scattered to the
same (B, L) grid with one vectorised gather per array. Cost: O(B * L * K) copies per teacher.

Padding values: input ids `pad_id`; top-k `indices` 0, `logp` -inf, `tail` 1.0 (so a padding row
is a valid "all mass unknown" distribution, tail = 1 - sum(exp(logp))); sampled `counts` 0;
features 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mtkd_cache import ChunkData

__all__ = ["BatchBuilder", "BatchSpec"]

_TARGET_DTYPES = {"indices": np.int64, "logp": np.float32, "tail": np.float32, "counts": np.int32, "present": bool}
_TARGET_FILL = {"indices": 0, "logp": -np.inf, "tail": 1.0, "counts": 0, "present": False}  # present: cross-tokenizer


@dataclass(frozen=True)
class BatchSpec:
    """What every batch of a stream holds.

    Attributes:
        token_inputs: Inputs are token ids (else named fixed-shape arrays).
        pad_id: Token id used for right padding.
        target_grids: Teacher -> "token" (one row per position) or "sample" (one row per sample).
        feature_grids: Teacher -> {feature name: "token" or "sample"}.
        pad_to: Pad token inputs to this length instead of the longest sample of the batch.
    """

    token_inputs: bool
    pad_id: int = 0
    target_grids: Mapping[str, str] = field(default_factory=dict)
    feature_grids: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    pad_to: int | None = None


class BatchBuilder:
    """Fills the arrays of one batch of `size` samples whose longest token sample has `length`.

    Args:
        spec: What the batch holds.
        size: Samples in the batch (B).
        length: Longest sample in positions (ignored for array inputs).
    """

    def __init__(self, spec: BatchSpec, size: int, length: int):
        self.spec, self.size = spec, size
        self.length = spec.pad_to if (spec.pad_to is not None and spec.token_inputs) else length
        self._arrays: dict[str, np.ndarray] = {"sample_ids": np.full(size, -1, dtype=np.int64)}
        self._targets: dict[str, dict[str, np.ndarray]] = {t: {} for t in spec.target_grids}
        self._features: dict[str, dict[str, np.ndarray]] = {t: {} for t in spec.feature_grids}
        if spec.token_inputs:
            self._arrays["input_ids"] = np.full((size, self.length), spec.pad_id, dtype=np.int64)
            self._arrays["position_mask"] = np.zeros((size, self.length), dtype=bool)

    def add(self, data: ChunkData, rows: np.ndarray, slots: np.ndarray) -> None:
        """Copy samples `rows` (indices into `data`'s samples) to batch rows `slots`.

        Args:
            data: A decoded chunk holding every teacher and feature of the spec.
            rows: (b,) int64 sample indices within the chunk.
            slots: (b,) int64 destinations in the batch.
        """
        self._arrays["sample_ids"][slots] = data.sample_ids[rows]
        token_dst: tuple[np.ndarray, ...]  # where per-position rows go: (slot, t), or (slot,)
        if self.spec.token_inputs:
            mask = np.arange(self.length)[None, :] < data.lengths[rows][:, None]  # (b, L)
            bi, ti = np.nonzero(mask)
            flat = data.offsets[rows][bi] + ti  # chunk position rows, in (b, L) row-major order
            token_src, token_dst = flat, (slots[bi], ti)
            self._arrays["input_ids"][token_dst] = data.inputs["token_ids"][flat]
            self._arrays["position_mask"][token_dst] = True
            for key in ("loss_mask", "doc_start"):  # instruction data / packed inputs (mtkd_train.rows)
                if key in data.inputs:
                    _put(self._arrays, key, (self.size, self.length), bool, False, token_dst, data.inputs[key][flat])
        else:
            token_src, token_dst = rows, (slots,)
            for name, arr in data.inputs.items():
                _put(
                    self._arrays,
                    name,
                    (self.size, *arr.shape[1:]),
                    arr.dtype,
                    0,
                    (slots,),
                    arr[rows],
                )
        for key, values in (("labels", data.labels), ("domains", data.domains)):
            if values is not None:
                _put(
                    self._arrays,
                    key,
                    (self.size,),
                    np.int64,
                    -100 if key == "labels" else -1,
                    (slots,),
                    values[rows],
                )
        sample_dst = (slots, np.zeros_like(slots))
        for name, grid in self.spec.target_grids.items():
            src, dst, t = (
                (token_src, token_dst, self.length) if grid == "token" else (rows, sample_dst, 1)
            )
            for key, arr in data.targets[name]._asdict().items():
                _put(
                    self._targets[name],
                    key,
                    (self.size, t, *arr.shape[1:]),
                    _TARGET_DTYPES[key],
                    _TARGET_FILL[key],
                    dst,
                    arr[src],
                )
        for name, grids in self.spec.feature_grids.items():
            for key, grid in grids.items():
                arr = data.features[name][key]
                if grid == "token":
                    _put(
                        self._features[name],
                        key,
                        (self.size, self.length, arr.shape[-1]),
                        np.float32,
                        0.0,
                        token_dst,
                        arr[token_src],
                    )
                else:
                    _put(
                        self._features[name],
                        key,
                        (self.size, arr.shape[-1]),
                        np.float32,
                        0.0,
                        (slots,),
                        arr[rows],
                    )

    def finish(self) -> dict[str, Any]:
        """The batch as tensors (see `CachedDistillDataset` for the keys and shapes)."""
        out: dict[str, Any] = {k: torch.from_numpy(v) for k, v in self._arrays.items()}
        if self.spec.token_inputs:
            out["attention_mask"] = out["position_mask"].long()
        out["targets"] = {
            t: {k: torch.from_numpy(v) for k, v in d.items()} for t, d in self._targets.items()
        }
        out["features"] = {
            t: {k: torch.from_numpy(v) for k, v in d.items()} for t, d in self._features.items()
        }
        return out


def _put(
    store: dict[str, np.ndarray],
    key: str,
    shape: tuple[int, ...],
    dtype: Any,
    fill: Any,
    dst: tuple[np.ndarray, ...],
    values: np.ndarray,
) -> None:
    """Write `values` at `dst` of `store[key]`, allocating it (filled with `fill`) on first use."""
    if key not in store:
        store[key] = np.full(shape, fill, dtype=dtype)
    store[key][dst] = values
