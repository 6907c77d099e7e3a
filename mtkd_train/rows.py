"""From a padded batch to the rows the loss and the evaluation score (pure tensor code, no I/O).

Shapes: B samples, T rows per sample (L tokens for causal LMs, 1 for classifiers), P = number of
real rows in the batch, K kept tokens per row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mtkd_train.targets import SparseTargets, from_samples, retemper

__all__ = ["row_labels", "row_targets"]


def row_targets(target: Mapping[str, torch.Tensor], rows: torch.Tensor, capture_temperature: float,
                vocab_size: int, temperature: float = 1.0) -> SparseTargets:
    """One teacher's batch targets (B, T, K) at the real rows `rows` (B, T) -> (P, K), tempered to `temperature`.

    Every operator then aggregates distributions at the distillation temperature, whichever
    loss path runs (tempering before mixing; see docs/LOSSES.md).
    """
    if "logp" in target:
        t = SparseTargets(target["indices"][rows], target["logp"][rows], target["tail"][rows])
    else:
        t = from_samples(target["indices"][rows], target["counts"][rows])
    ratio = temperature / capture_temperature
    return retemper(t, ratio, vocab_size) if ratio != 1.0 else t


def row_labels(batch: Mapping[str, Any], task: str) -> torch.Tensor:
    """Hard label per row (B, T): the next token for causal LMs (-100 where there is none)."""
    if task == "causal_lm":
        ids, real = batch["input_ids"], batch["position_mask"]
        nxt = torch.full_like(ids, -100)
        nxt[:, :-1] = torch.where(real[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
        return nxt
    return batch["labels"].view(-1, 1)
