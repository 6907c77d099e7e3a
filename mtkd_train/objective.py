"""The per-step distillation objective: batch + student outputs -> loss terms.

Pure tensor code (no I/O). Shapes: B samples, T rows per sample (L tokens for causal LMs, 1 for
classifiers), P = number of real rows in the batch, V vocabulary/classes, N teachers.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtkd_train.aggregate import AggregationContext, build_aggregator, gate_entropy_regularizer
from mtkd_train.losses import (
    combine,
    fused_kd_ce_loss,
    fused_linear_kd_ce_loss,
    hard_label_loss,
    kd_loss,
    mixture_negentropy,
    weighted_forward_kl,
)
from mtkd_train.student import HeadInputs
from mtkd_train.targets import SparseTargets, from_samples, retemper

__all__ = ["Objective", "make_aggregator", "row_labels", "row_targets"]


def make_aggregator(name: str, num_teachers: int, vocab_size: int, kwargs: Mapping[str, Any]) -> Any:
    """Build the operator, passing `vocab_size` to those that take it."""
    from mtkd_train.aggregate._registry import AGGREGATORS

    kw = dict(kwargs)
    if "vocab_size" in inspect.signature(AGGREGATORS[name]).parameters and "vocab_size" not in kw:
        kw["vocab_size"] = vocab_size
    return build_aggregator(name, num_teachers=num_teachers, **kw)


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


class Objective(nn.Module):
    """alpha * KD(aggregate(teachers), student) + (1 - alpha) * CE + sum_t beta_t * feature loss.

    Holds the trainable parts that are not the student: the gate and the feature projections.
    """

    def __init__(self, *, teachers: Sequence[str], capture_temperatures: Sequence[float], vocab_size: int,
                 aggregate: str, aggregate_kwargs: Mapping[str, Any], loss: str, tail_mode: str, alpha: float,
                 temperature: float, gate: nn.Module | None = None, gate_entropy: float = 0.0,
                 features: nn.Module | None = None, feature_keys: Mapping[str, str] | None = None,
                 loss_impl: str = "auto"):
        super().__init__()
        self.teachers = list(teachers)
        self.capture_t = list(capture_temperatures)
        self.vocab_size = vocab_size
        self.aggregator = make_aggregator(aggregate, len(teachers), vocab_size, aggregate_kwargs)
        self.aggregate_name = aggregate
        self.loss_kind, self.tail_mode, self.alpha, self.T = loss, tail_mode, alpha, temperature
        self.gate = gate
        self.gate_entropy = gate_entropy
        self.features = features
        self.feature_keys = dict(feature_keys or {})
        self.fused = loss == "forward_kl" and loss_impl in ("auto", "fused", "fused_head")
        self.head_fused = self.fused and loss_impl == "fused_head"  # forward() then takes HeadInputs

    def forward(self, batch: Mapping[str, Any], logits: torch.Tensor | HeadInputs, hidden: torch.Tensor | None,
                student_task: str) -> dict[str, torch.Tensor]:
        """Loss terms for one micro-batch. logits (B, T, V_s), or HeadInputs if head_fused; hidden (B, T, D) or None."""
        head = logits if isinstance(logits, HeadInputs) else None
        base = logits.hidden if isinstance(logits, HeadInputs) else logits  # (B, T, V_s) or (B, T, H)
        rows = batch["position_mask"] if student_task == "causal_lm" else torch.ones(
            base.shape[:2], dtype=torch.bool, device=base.device)
        z = base[rows]  # (P, V_s) logits, or (P, H) hidden states for the head-fused loss
        labels = row_labels(batch, student_task)[rows]  # (P,)
        targets = [row_targets(batch["targets"][n], rows, tc, self.vocab_size, self.T)
                   for n, tc in zip(self.teachers, self.capture_t)]
        domains = batch.get("domains")
        ctx = AggregationContext(
            labels=labels,
            domains=None if domains is None else domains.view(-1, 1).expand(rows.shape)[rows],
            gate_logits=None if self.gate is None else self.gate(hidden[rows].detach()),  # type: ignore[index]
        )
        out: dict[str, torch.Tensor] = {}
        weights = self.aggregator.weights(targets, ctx)
        smoothing = float(getattr(self.aggregator, "prior_strength", 0.0))
        if self.fused:  # one sparse target (the merged one) + the labels, closed-form gradient
            merged = self.aggregator(targets, ctx, vocab_size=self.vocab_size, tail_mode=self.tail_mode)
            neg = (mixture_negentropy(targets, weights, self.vocab_size, smoothing)
                   if weights is not None and self.tail_mode == "spread" else None)  # = weighted_forward_kl
            kw: dict[str, Any] = dict(alpha=self.alpha, temperature=self.T, target_temperature=self.T,
                                      tail_mode=self.tail_mode, vocab_size=self.vocab_size, target_negentropy=neg)
            total, kd, ce = (fused_kd_ce_loss(z, merged, labels, **kw) if head is None else
                             fused_linear_kd_ce_loss(z, head.weight, merged, labels, bias=head.bias, **kw))
        else:
            if weights is not None and self.loss_kind == "forward_kl" and self.tail_mode == "spread":
                kd = weighted_forward_kl(z, targets, weights, temperature=self.T, target_temperature=self.T,
                                         tail_mode="spread", vocab_size=self.vocab_size, smoothing=smoothing)
            else:
                merged = self.aggregator(targets, ctx, vocab_size=self.vocab_size, tail_mode=self.tail_mode)
                kd = kd_loss(z, merged, kind=self.loss_kind, temperature=self.T, target_temperature=self.T,
                             tail_mode=self.tail_mode, vocab_size=self.vocab_size)  # type: ignore[arg-type]
            ce = hard_label_loss(z[..., : self.vocab_size], labels)  # padded head columns are not tokens
            total = combine(kd, ce, self.alpha)
        out["kd"], out["ce"] = kd, ce
        if self.gate is not None and weights is not None:
            reg = gate_entropy_regularizer(weights)
            out["gate_reg"] = reg
            total = total + self.gate_entropy * reg
            out["gate_weights"] = weights.detach().mean(0)
        elif weights is not None:
            out["teacher_weights"] = weights.detach().mean(0)
        if self.features is not None and hidden is not None:
            feats = [batch["features"][n][key] for n, key in self.feature_keys.items()]
            if feats[0].dim() == 3:  # per position: (B, T, D_t) -> (P, D_t)
                h, feats = hidden[rows], [f[rows] for f in feats]
            else:  # pooled per sample: mean of the student's real rows, (B, D_s)
                m = rows.unsqueeze(-1).to(hidden.dtype)
                h = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
            fl = self.features(h, feats)
            out["feat"] = fl
            total = total + fl
        out["loss"] = total
        return out
