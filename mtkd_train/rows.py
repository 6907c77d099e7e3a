"""From a padded batch to the rows the loss and the evaluation score (pure tensor code, no I/O).

Shapes: B samples, T rows per sample (L tokens for causal LMs, 1 for classifiers), P = number of
real rows in the batch, K kept tokens per row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mtkd_train.targets import SparseTargets, from_samples, retemper

__all__ = ["row_index", "row_labels", "row_targets", "take_rows", "to_device"]


def row_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices ``(P,)`` of the True rows of a ``(B, T)`` mask, in row-major order.

    Computed on the host before a batch is copied to the GPU, it lets :func:`take_rows` gather
    the real rows without the device-to-host sync a boolean mask index costs (its size P).
    """
    return mask.reshape(-1).nonzero().squeeze(1)


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` for ``x`` of shape ``(B, T, ...)``: rows a ``(B, T)`` bool mask or a ``(P,)`` flat index.

    Both give the same ``(P, ...)`` tensor; the index form does not synchronise the device.
    """
    if rows.dtype == torch.bool:
        return x[rows]
    return x.reshape(-1, *x.shape[2:]).index_select(0, rows)


def row_targets(target: Mapping[str, torch.Tensor], rows: torch.Tensor, capture_temperature: float,
                vocab_size: int, temperature: float = 1.0) -> SparseTargets:
    """One teacher's batch targets (B, T, K) at the real rows -> (P, K), tempered to `temperature`.

    `rows` is a (B, T) bool mask or a (P,) flat row index (see `take_rows`).

    Every operator then aggregates distributions at the distillation temperature, whichever
    loss path runs (tempering before mixing; see docs/LOSSES.md).
    """
    if "logp" in target:
        t = SparseTargets(*(take_rows(target[k], rows) for k in ("indices", "logp", "tail")))
    else:
        t = from_samples(take_rows(target["indices"], rows), take_rows(target["counts"], rows))
    ratio = temperature / capture_temperature
    return retemper(t, ratio, vocab_size) if ratio != 1.0 else t


def row_labels(batch: Mapping[str, Any], task: str) -> torch.Tensor:
    """Hard label per row (B, T): the next token for causal LMs (-100 where there is none); for
    classifiers the sample's label (-100 for all samples of a cache without labels)."""
    if task == "causal_lm":
        ids, real = batch["input_ids"], batch["position_mask"]
        nxt = torch.full_like(ids, -100)
        nxt[:, :-1] = torch.where(real[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
        return nxt
    if "labels" not in batch:
        return torch.full((len(batch["sample_ids"]), 1), -100, dtype=torch.long, device=batch["sample_ids"].device)
    return batch["labels"].view(-1, 1)


def to_device(batch: dict[str, Any], device: torch.device, per_token: bool) -> dict[str, Any]:
    """Copy a batch to `device`, with the flat index of its scored rows made on the host first.

    `per_token` (causal LM students): the real positions; otherwise one row per sample (T = 1).
    """
    if "row_index" not in batch:
        rows = row_index(batch["position_mask"]) if per_token else torch.arange(len(batch["sample_ids"]))
        batch = {**batch, "row_index": rows}
    if device.type == "cpu":
        return batch
    return {k: _nested_to(v, device) for k, v in batch.items()}


def _nested_to(v: Any, device: torch.device) -> Any:
    if isinstance(v, dict):
        return {k: _nested_to(x, device) for k, x in v.items()}
    return v.to(device, non_blocking=True)
