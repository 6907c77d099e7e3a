"""From a padded batch to the rows the loss and the evaluation score (pure tensor code, no I/O).

Shapes: B samples, T rows per sample (L tokens for causal LMs, 1 for classifiers), P = number of
real rows in the batch, K kept tokens per row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mtkd_train.targets import SparseTargets, from_samples, retemper

__all__ = ["loss_rows", "row_index", "row_labels", "row_targets", "scored_rows", "take_rows", "to_device"]


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


def _next_in_document(batch: Mapping[str, Any]) -> torch.Tensor:
    """``(B, L)`` bool: row j has a next token j + 1 in its sample and (packed inputs) its document."""
    real = batch["position_mask"]
    nxt = torch.zeros_like(real)
    nxt[:, :-1] = real[:, 1:]
    if "doc_start" in batch:  # a document's last row would predict the next document's first token
        nxt[:, :-1] &= ~batch["doc_start"][:, 1:]
    if "loss_mask" in batch:  # row j learns token j + 1 only where that token is marked
        nxt[:, :-1] &= batch["loss_mask"][:, 1:]
    return nxt


def loss_rows(batch: Mapping[str, Any]) -> torch.Tensor:
    """``(B, L)`` bool: the rows of a causal-LM batch that KD and CE train.

    Every real position, as the teacher's distribution there is known; with a stored loss mask
    (instruction data, ``inputs/loss_mask``) only rows j whose next token j + 1 is marked and lies
    in the same document (so the last row of a sample never trains).
    """
    real = batch["position_mask"]
    if "loss_mask" not in batch:
        return real
    return real & _next_in_document(batch)


def row_labels(batch: Mapping[str, Any], task: str) -> torch.Tensor:
    """Hard label per row (B, T): the next token for causal LMs (-100 where there is none in the
    sample or the document, or where the loss mask leaves it out); for classifiers the sample's
    label (-100 for all samples of a cache without labels)."""
    if task == "causal_lm":
        ids = batch["input_ids"]
        nxt = torch.full_like(ids, -100)
        return torch.where(_next_in_document(batch), torch.roll(ids, -1, dims=1), nxt)
    if "labels" not in batch:
        return torch.full((len(batch["sample_ids"]), 1), -100, dtype=torch.long, device=batch["sample_ids"].device)
    return batch["labels"].view(-1, 1)


def scored_rows(batch: Mapping[str, Any], per_token: bool) -> torch.Tensor:
    """``(P,)`` flat index of the rows the loss scores: a causal LM's loss rows, else one row per sample."""
    return row_index(loss_rows(batch)) if per_token else torch.arange(len(batch["sample_ids"]))


def to_device(batch: dict[str, Any], device: torch.device, per_token: bool) -> dict[str, Any]:
    """Copy a batch to `device`, with the flat index of its scored rows made on the host first.

    `per_token` (causal LM students): the real positions; otherwise one row per sample (T = 1).
    """
    if "row_index" not in batch:
        batch = {**batch, "row_index": scored_rows(batch, per_token)}
    if device.type == "cpu":
        return batch
    return {k: _nested_to(v, device) for k, v in batch.items()}


def _nested_to(v: Any, device: torch.device) -> Any:
    if isinstance(v, dict):
        return {k: _nested_to(x, device) for k, x in v.items()}
    return v.to(device, non_blocking=True)
