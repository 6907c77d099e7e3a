"""The teacher side of a distillation step: from a batch to the merged sparse target (pure tensor code).

Everything the fused loss takes from the teachers depends on the batch alone when the operator
reads nothing of the student (every operator but ``gate``): the teachers' targets at the scored
rows (tempered), the operator's weights over the teachers present at each row, the merged target
on the union of their supports, the rows that get a KD term and, under ``spread``, the mixture's
negentropy. :class:`TeacherSide` computes it. The objective calls it inside the step; the trainer
also hands it to the data stream (``CachedDistillDataset(transform=...)``), so that the loader
process merges batch ``s + 1`` while the student runs step ``s``, and the batch arrives with its
``merged`` target and ``row_index``. The step then costs what the fused loss costs: at V = 8,192
with four top-64 teachers the union's sort and its ~60 small ops are as long as the loss itself.

A merged batch is the same batch without the teachers' own ``targets`` (the step reads only the
merged one, and every tensor a worker hands over costs the training process ~0.25 ms to receive:
four teachers' arrays are 12 of a batch's 21) plus two keys; it moves to a device and through
``pin_memory`` like any other batch:

* ``row_index`` ``(P,)`` int64: the scored rows (:func:`mtkd_train.rows.row_index`);
* ``merged``: ``{"indices" (P, U) int64, "logp" (P, U) float32, "tail" (P,) float32,
  "teacher_weights" (N,) float32}`` (no weights for a non-linear operator), plus ``"kd_rows"``
  ``(P,)`` bool when some row has no teacher present and ``"negentropy"`` ``(P,)`` under
  ``spread`` with a linear operator.

The values are the ones the step would compute on the same device, bit for bit (a GPU step would
round differently from a CPU worker in the last bits: ``merge_in = auto`` merges in the step on CUDA).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mtkd_train.aggregate import AggregationContext, Aggregator, linear_pool
from mtkd_train.aggregate._presence import PresentAggregator, kd_rows, row_presence
from mtkd_train.losses import mixture_negentropy
from mtkd_train.rows import row_labels, row_targets, scored_rows, take_rows
from mtkd_train.targets import SparseTargets

__all__ = ["Merged", "TeacherSide"]


@dataclass(frozen=True)
class Merged:
    """The fused loss's teacher inputs for one batch.

    Attributes:
        target: ``(P, U)`` merged target at the scored rows.
        kd_rows: ``(P,)`` bool rows with a teacher present, or None for every row.
        negentropy: ``(P,)`` the mixture's negentropy (``spread`` with a linear operator), or None.
        teacher_weights: ``(N,)`` the operator's weights averaged over rows (for the logs), or None.
    """

    target: SparseTargets
    kd_rows: torch.Tensor | None = None
    negentropy: torch.Tensor | None = None
    teacher_weights: torch.Tensor | None = None

    def to_batch(self) -> dict[str, torch.Tensor]:
        """The ``merged`` entry of a batch (only tensors: it moves with the batch)."""
        out = {"indices": self.target.indices, "logp": self.target.logp, "tail": self.target.tail}
        for key in ("kd_rows", "negentropy", "teacher_weights"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_batch(cls, entry: Mapping[str, torch.Tensor]) -> Merged:
        return cls(SparseTargets(entry["indices"], entry["logp"], entry["tail"]), entry.get("kd_rows"),
                   entry.get("negentropy"), entry.get("teacher_weights"))


@dataclass(frozen=True)
class TeacherSide:
    """N teachers' targets in a batch, their operator, and the merge the fused loss takes.

    Attributes:
        teachers: Teacher names, in the operator's order.
        capture_temperatures: The temperature each teacher's targets were cached at.
        vocab_size: ``V`` of the student's targets.
        aggregator: The operator (built by :func:`mtkd_train.objective.make_aggregator`).
        tail_mode: ``"bucket"`` or ``"spread"``.
        temperature: Distillation temperature the targets are tempered to.
    """

    teachers: tuple[str, ...]
    capture_temperatures: tuple[float, ...]
    vocab_size: int
    aggregator: Aggregator
    tail_mode: str
    temperature: float = 1.0

    @property
    def batch_only(self) -> bool:
        """True when the merge reads only the batch (no gate on the student): the loader can do it."""
        return "gate_logits" not in self.aggregator.context

    def targets(self, batch: Mapping[str, Any], rows: torch.Tensor) -> list[SparseTargets]:
        """Each teacher's targets at the scored rows, ``(P, K_i)``, tempered to the distillation temperature."""
        return [row_targets(batch["targets"][n], rows, tc, self.vocab_size, self.temperature)
                for n, tc in zip(self.teachers, self.capture_temperatures, strict=True)]

    def operator(self, batch: Mapping[str, Any], rows: torch.Tensor) -> tuple[Aggregator, torch.Tensor | None]:
        """The operator over the teachers present at each row, and the rows with one (None: all)."""
        present = row_presence(batch["targets"], self.teachers, lambda x: take_rows(x, rows))
        return (self.aggregator, None) if present is None else (PresentAggregator(self.aggregator, present),
                                                                kd_rows(present))

    def context(self, batch: Mapping[str, Any], rows: torch.Tensor, labels: torch.Tensor,
                grid: tuple[int, int]) -> AggregationContext:
        """The batch-side fields the operator declared (labels, domains) at the scored rows.

        `grid` is ``(B, T)``, the row grid `rows` indexes (T = L for causal LMs, 1 for classifiers).
        """
        need = self.aggregator.context
        domains = batch.get("domains") if "domains" in need else None
        if domains is not None:  # one domain per sample -> one per row
            domains = take_rows(domains.view(-1, 1).expand(grid), rows)
        return AggregationContext(labels=labels if "labels" in need else None, domains=domains)

    def merge(self, agg: Aggregator, targets: Sequence[SparseTargets], ctx: AggregationContext,
              weights: torch.Tensor | None, negentropy: bool = True) -> tuple[SparseTargets, torch.Tensor | None]:
        """The merged target and, under ``spread`` with weights (and `negentropy`), the mixture's negentropy.

        A linear operator's weights, already computed, are not computed again.
        """
        if weights is None:  # a non-linear operator pools by its own rule
            return agg(targets, ctx, vocab_size=self.vocab_size, tail_mode=self.tail_mode), None  # type: ignore[arg-type]
        smoothing = agg._smoothing()
        merged = linear_pool(targets, weights, vocab_size=self.vocab_size, tail_mode=self.tail_mode,  # type: ignore[arg-type]
                             smoothing=smoothing)
        neg = (mixture_negentropy(targets, weights, self.vocab_size, smoothing)
               if negentropy and self.tail_mode == "spread" else None)  # with it the fused value equals weighted_forward_kl
        return merged, neg

    def loader_transform(self, student_task: str) -> LoaderMerge:
        """The data stream's transform for a student of `student_task` (only when :attr:`batch_only`)."""
        if not self.batch_only:
            raise ValueError("the gate reads the student's hidden state: its merge cannot run in the loader")
        return LoaderMerge(self, student_task)


@dataclass(frozen=True)
class LoaderMerge:
    """``batch -> batch`` with ``row_index`` and ``merged`` added (see the module docstring); picklable."""

    side: TeacherSide
    student_task: str

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        side, task = self.side, self.student_task
        per_token = task == "causal_lm"
        rows = scored_rows(batch, per_token)  # the rows `rows.to_device` would pick
        grid = tuple(batch["position_mask"].shape) if per_token else (len(batch["sample_ids"]), 1)
        labels = take_rows(row_labels(batch, task), rows)
        targets = side.targets(batch, rows)
        agg, kd_at = side.operator(batch, rows)
        ctx = side.context(batch, rows, labels, grid)  # type: ignore[arg-type]
        weights = agg.weights(targets, ctx)
        target, neg = side.merge(agg, targets, ctx, weights)
        merged = Merged(target, kd_at, neg, None if weights is None else weights.mean(0))
        rest = {k: v for k, v in batch.items() if k != "targets"}  # the step reads only the merged target
        return {**rest, "row_index": rows, "merged": merged.to_batch()}
