"""Assemble one batch from rows of decoded chunks (pure numpy -> torch, no I/O).

A batch of B samples is filled chunk by chunk (`BatchBuilder.add`), so assembling it holds at
most one decoded chunk beyond the cache's own. Token inputs are right-padded to L (the longest
sample, or a fixed length); token-grid targets and per-position features go to the same (B, L)
grid, one slice copy per sample and array (a sample's positions are contiguous in its chunk).
Cost: O(B * L * K) copies per teacher, each element written once.

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

    Arrays are allocated uninitialised on first use and every element is written once: a token sample's
    positions are one slice copy per array (a sample's rows are contiguous in its chunk), its padding one
    fill; slots no `add` wrote get the fill in `finish`. A (B, L, K) fill before the scatter wrote each
    element twice and was most of the assembly's time.

    Args:
        spec: What the batch holds.
        size: Samples in the batch (B).
        length: Longest sample in positions (ignored for array inputs: they have one position per sample).
    """

    def __init__(self, spec: BatchSpec, size: int, length: int):
        self.spec, self.size = spec, size
        # array inputs: one position per sample, so token-grid targets and features are (B, 1, ...)
        self.length = (spec.pad_to if spec.pad_to is not None else length) if spec.token_inputs else 1
        self._arrays: dict[str, np.ndarray] = {}
        self._targets: dict[str, dict[str, np.ndarray]] = {t: {} for t in spec.target_grids}
        self._features: dict[str, dict[str, np.ndarray]] = {t: {} for t in spec.feature_grids}
        self._unset: dict[int, tuple[np.ndarray, np.ndarray, Any]] = {}  # id(array): (array, slots not written, fill)
        self._new(self._arrays, "sample_ids", (size,), np.int64, -1)
        if spec.token_inputs:
            self._new(self._arrays, "input_ids", (size, self.length), np.int64, spec.pad_id)
            self._new(self._arrays, "position_mask", (size, self.length), bool, False)

    def _new(self, store: dict[str, np.ndarray], key: str, shape: tuple[int, ...], dtype: Any, fill: Any) -> np.ndarray:
        if key not in store:
            store[key] = np.empty(shape, dtype=dtype)
            self._unset[id(store[key])] = (store[key], np.ones(self.size, dtype=bool), fill)
        return store[key]

    def _written(self, array: np.ndarray, slots: np.ndarray) -> None:
        self._unset[id(array)][1][slots] = False

    def _rows(self, store: dict[str, np.ndarray], key: str, shape: tuple[int, ...], dtype: Any, fill: Any,
              spans: list[tuple[int, int, int]], slots: np.ndarray, values: np.ndarray) -> None:
        """Per (slot, start, n) of `spans` (`slots`: their slots): values[start:start + n] to slot's first n
        positions, `fill` after."""
        out = self._new(store, key, shape, dtype, fill)
        for slot, start, n in spans:
            out[slot, :n] = values[start: start + n]
            out[slot, n:] = fill
        self._written(out, slots)

    def _slots(self, store: dict[str, np.ndarray], key: str, shape: tuple[int, ...], dtype: Any, fill: Any,
               dst: tuple[np.ndarray, ...], values: np.ndarray) -> None:
        """`values` (one row per slot) to `dst` = (slots,) or (slots, zeros)."""
        out = self._new(store, key, shape, dtype, fill)
        out[dst] = values
        self._written(out, dst[0])

    def add(self, data: ChunkData, rows: np.ndarray, slots: np.ndarray) -> None:
        """Copy samples `rows` (indices into `data`'s samples) to batch rows `slots`.

        Args:
            data: A decoded chunk holding every teacher and feature of the spec.
            rows: (b,) int64 sample indices within the chunk.
            slots: (b,) int64 destinations in the batch.
        """
        self._slots(self._arrays, "sample_ids", (self.size,), np.int64, -1, (slots,), data.sample_ids[rows])
        spans: list[tuple[int, int, int]] = []  # token samples: (slot, first chunk row, positions kept)
        if self.spec.token_inputs:
            kept = np.minimum(data.lengths[rows], self.length)
            spans = list(zip(slots.tolist(), data.offsets[rows].tolist(), kept.tolist()))
            shape = (self.size, self.length)
            self._rows(self._arrays, "input_ids", shape, np.int64, self.spec.pad_id, spans, slots, data.inputs["token_ids"])
            mask = self._arrays["position_mask"]
            for slot, _, n in spans:
                mask[slot, :n], mask[slot, n:] = True, False
            self._written(mask, slots)
            for key in ("loss_mask", "doc_start"):  # instruction data / packed inputs (mtkd_train.rows)
                if key in data.inputs:
                    self._rows(self._arrays, key, shape, bool, False, spans, slots, data.inputs[key])
        else:
            for name, arr in data.inputs.items():
                self._slots(self._arrays, name, (self.size, *arr.shape[1:]), arr.dtype, 0, (slots,), arr[rows])
        for key, values in (("labels", data.labels), ("domains", data.domains)):
            if values is not None:
                self._slots(self._arrays, key, (self.size,), np.int64, -100 if key == "labels" else -1, (slots,),
                            values[rows])
        per_sample = (slots, np.zeros_like(slots))
        for name, grid in self.spec.target_grids.items():
            for key, arr in data.targets[name]._asdict().items():
                dtype, fill = _TARGET_DTYPES[key], _TARGET_FILL[key]
                if grid == "token" and self.spec.token_inputs:
                    self._rows(self._targets[name], key, (self.size, self.length, *arr.shape[1:]), dtype, fill, spans,
                               slots, arr)
                elif grid == "token":  # array inputs: one position per sample
                    self._slots(self._targets[name], key, (self.size, self.length, *arr.shape[1:]), dtype, fill,
                                per_sample, arr[rows])
                else:
                    self._slots(self._targets[name], key, (self.size, 1, *arr.shape[1:]), dtype, fill, per_sample,
                                arr[rows])
        for name, grids in self.spec.feature_grids.items():
            for key, grid in grids.items():
                arr = data.features[name][key]
                if grid == "token" and self.spec.token_inputs:
                    self._rows(self._features[name], key, (self.size, self.length, arr.shape[-1]), np.float32, 0.0,
                               spans, slots, arr)
                elif grid == "token":
                    self._slots(self._features[name], key, (self.size, self.length, arr.shape[-1]), np.float32, 0.0,
                                per_sample, arr[rows])
                else:
                    self._slots(self._features[name], key, (self.size, arr.shape[-1]), np.float32, 0.0, (slots,),
                                arr[rows])

    def finish(self) -> dict[str, Any]:
        """The batch as tensors (see `CachedDistillDataset` for the keys and shapes)."""
        for arr, unset, fill in self._unset.values():  # slots that no `add` wrote: padding
            if unset.any():
                arr[unset] = fill
        self._unset = {}
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
