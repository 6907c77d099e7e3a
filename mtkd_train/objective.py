"""The per-step distillation objective: batch + student outputs -> loss terms.

Pure tensor code (no I/O). Shapes: B samples, T rows per sample (L tokens for causal LMs, 1 for
classifiers), P = number of real rows in the batch, V vocabulary/classes, N teachers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtkd_train.aggregate import (
    AggregationContext,
    AggregationInputError,
    Aggregator,
    GateNetwork,
    OperatorSetup,
    gate_entropy_regularizer,
    gate_scoring_loss,
    label_log_prob,
)
from mtkd_train.aggregate import make_aggregator as build_operator
from mtkd_train.losses import (
    combine,
    fused_kd_ce_loss,
    fused_linear_kd_ce_loss,
    hard_label_loss,
    kd_loss,
    weighted_forward_kl,
)
from mtkd_train.rows import loss_rows, row_labels, row_targets, take_rows
from mtkd_train.student import HeadInputs
from mtkd_train.targets import SparseTargets
from mtkd_train.teacher_side import LoaderMerge, Merged, TeacherSide

__all__ = ["Objective", "make_aggregator", "row_labels", "row_targets"]
# row_labels / row_targets live in mtkd_train.rows; re-exported here for existing callers.


def make_aggregator(name: str, num_teachers: int, vocab_size: int, kwargs: Mapping[str, Any], *,
                    teachers: Sequence[str] | None = None, domains: Sequence[str] | None = None) -> Aggregator:
    """Build operator `name` for `num_teachers` teachers (names in `kwargs` resolved by the operator)."""
    names = tuple(teachers) if teachers is not None else tuple(str(i) for i in range(num_teachers))
    setup = OperatorSetup(names, vocab_size, None if domains is None else tuple(domains))
    return build_operator(name, setup, kwargs)


def _hidden_at(hidden: torch.Tensor | Mapping[int, torch.Tensor] | None, layer: int) -> torch.Tensor:
    """The student hidden state of `layer`: `hidden` itself when one tensor was given."""
    if hidden is None:
        raise AggregationInputError(f"the objective needs the student's hidden state of layer {layer}; pass hidden")
    return hidden if isinstance(hidden, torch.Tensor) else hidden[layer]


class Objective(nn.Module):
    """alpha * KD(aggregate(teachers), student) + (1 - alpha) * CE + sum_t beta_t * feature loss.

    Holds the trainable parts that are not the student: the gate and the feature projections. The
    operator declares the per-batch context it reads (`Aggregator.context`); the objective fills
    exactly those fields, and builds a `GateNetwork` of width `hidden_size` when the operator asks
    for gate logits and no `gate` is given. The gate reads the student's last hidden layer; each
    feature term reads the student layer given in `feature_layers` (default the last).
    """

    def __init__(self, *, teachers: Sequence[str], capture_temperatures: Sequence[float], vocab_size: int,
                 aggregate: str, aggregate_kwargs: Mapping[str, Any], loss: str, tail_mode: str, alpha: float,
                 temperature: float, gate: nn.Module | None = None, gate_entropy: float = 0.0,
                 features: nn.Module | None = None, feature_keys: Mapping[str, str] | None = None,
                 feature_layers: Mapping[str, int] | None = None, domains: Sequence[str] | None = None,
                 hidden_size: int | None = None, loss_impl: str = "auto", kernels: str = "auto"):
        super().__init__()
        self.teachers = list(teachers)
        self.capture_t = list(capture_temperatures)
        self.vocab_size = vocab_size
        self.teacher_side = TeacherSide(tuple(teachers), tuple(capture_temperatures), vocab_size, make_aggregator(
            aggregate, len(teachers), vocab_size, aggregate_kwargs, teachers=teachers, domains=domains),
            tail_mode, temperature)
        self.aggregate_name = aggregate
        self.loss_kind, self.tail_mode, self.alpha, self.T = loss, tail_mode, alpha, temperature
        if gate is None and "gate_logits" in self.aggregator.context:
            if hidden_size is None:
                raise AggregationInputError(f"aggregator {aggregate!r} needs a gate on the student's hidden state; "
                                            f"pass hidden_size (or a gate)")
            gate = GateNetwork(hidden_size, len(self.teachers))
        self.gate = gate
        self.gate_entropy = gate_entropy
        self.features = features
        self.feature_keys = dict(feature_keys or {})
        self.fused = loss == "forward_kl" and loss_impl in ("auto", "fused", "fused_head")
        self.head_fused = self.fused and loss_impl == "fused_head"  # forward() then takes HeadInputs
        self.kernels = kernels  # auto: $MTKD_KERNELS if set
        self.feature_layers = {t: int((feature_layers or {}).get(t, -1)) for t in self.feature_keys}

    @property
    def aggregator(self) -> Aggregator:
        """The operator (held by :attr:`teacher_side`, which merges with it)."""
        return self.teacher_side.aggregator

    @aggregator.setter
    def aggregator(self, value: Aggregator) -> None:
        """Replace the operator; a transform from :meth:`loader_transform` made before keeps the old one."""
        self.teacher_side = dataclasses.replace(self.teacher_side, aggregator=value)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """The student hidden-state layers `forward` reads (empty: none)."""
        layers = [-1] if self.gate is not None else []
        layers += [self.feature_layers[t] for t in self.feature_keys] if self.features is not None else []
        return tuple(dict.fromkeys(layers))

    def _context(self, batch: Mapping[str, Any], mask: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor,
                 hidden: torch.Tensor | Mapping[int, torch.Tensor] | None) -> AggregationContext:
        """The per-batch fields the operator declared, at the real rows (P, ...)."""
        ctx = self.teacher_side.context(batch, rows, labels, tuple(mask.shape))  # type: ignore[arg-type]
        if self.gate is not None and "gate_logits" in self.aggregator.context:
            ctx = dataclasses.replace(ctx, gate_logits=self.gate(take_rows(_hidden_at(hidden, -1), rows).detach()))
        return ctx

    def loader_transform(self, student_task: str) -> LoaderMerge | None:
        """The data stream's transform that merges the teachers in the loader, or None where it cannot.

        Only the fused loss takes a merged batch, and only an operator that reads nothing of the
        student (not ``gate``) can be merged before the step (:mod:`mtkd_train.teacher_side`).
        """
        if not self.fused or not self.teacher_side.batch_only:
            return None
        return self.teacher_side.loader_transform(student_task)

    def forward(self, batch: Mapping[str, Any], logits: torch.Tensor | HeadInputs,
                hidden: torch.Tensor | Mapping[int, torch.Tensor] | None, student_task: str
                ) -> dict[str, torch.Tensor]:
        """Loss terms for one micro-batch.

        logits (B, T, V_s), or HeadInputs (hidden (B, T, H) + head weight) when head_fused;
        hidden (B, T, D), {layer: (B, T, D)} or None.
        """
        head = logits if isinstance(logits, HeadInputs) else None
        base = logits.hidden if isinstance(logits, HeadInputs) else logits  # (B, T, V_s) or (B, T, H)
        mask = batch["position_mask"] if student_task == "causal_lm" else torch.ones(
            base.shape[:2], dtype=torch.bool, device=base.device)
        if "row_index" in batch:  # a flat index made on the host gathers without a device sync
            rows = batch["row_index"]
        else:
            rows = loss_rows(batch) if student_task == "causal_lm" else mask
        z = take_rows(base, rows)  # (P, V_s) logits, or (P, H) hidden states for the head-fused loss
        labels = take_rows(row_labels(batch, student_task), rows)  # (P,)
        out: dict[str, torch.Tensor] = {}
        side = self.teacher_side
        if "merged" in batch and not (self.fused and side.batch_only):
            raise AggregationInputError(
                f"this batch was merged by the loader (TrainConfig.merge_in = loader) but the objective "
                f"({self.loss_kind}, {self.aggregate_name}) merges in the step; stream the batches without "
                f"`loader_transform` (merge_in = step)")
        if "merged" in batch:  # merged by the loader (`loader_transform`)
            m = Merged.from_batch(batch["merged"])
            total, kd, ce = self._fused(z, head, m.target, labels, m.negentropy, m.kd_rows)
            if m.teacher_weights is not None:
                out["teacher_weights"] = m.teacher_weights
            targets, gate_ctx, agg, weights = None, None, self.aggregator, None
        else:
            targets = side.targets(batch, rows)
            gate_ctx = self._context(batch, mask, rows, labels, hidden)
            # the KD target never trains the gate (it would reward the teacher the student already matches)
            ctx = gate_ctx if gate_ctx.gate_logits is None else dataclasses.replace(
                gate_ctx, gate_logits=gate_ctx.gate_logits.detach())
            # cross-tokenizer teachers may be absent at a row: aggregate over the present ones, no KD where none is
            agg, kd_at = side.operator(batch, rows)
            weights = agg.weights(targets, ctx)
            if self.fused:  # one sparse target (the merged one) + the labels, closed-form gradient
                merged, neg = side.merge(agg, targets, ctx, weights)
                total, kd, ce = self._fused(z, head, merged, labels, neg, kd_at)
            else:
                zk, tk, wk = (z, targets, weights) if kd_at is None else (
                    z[kd_at], [_at(t, kd_at) for t in targets], None if weights is None else weights[kd_at])
                if wk is not None and self.loss_kind == "forward_kl" and self.tail_mode == "spread":
                    kd = weighted_forward_kl(zk, tk, wk, temperature=self.T, target_temperature=self.T,
                                             tail_mode="spread", vocab_size=self.vocab_size, smoothing=agg._smoothing())
                else:
                    merged, _ = side.merge(agg, targets, ctx, weights, negentropy=False)
                    mk = merged if kd_at is None else _at(merged, kd_at)
                    kd = kd_loss(zk, mk, kind=self.loss_kind, temperature=self.T, target_temperature=self.T,
                                 tail_mode=self.tail_mode, vocab_size=self.vocab_size)  # type: ignore[arg-type]
                ce = hard_label_loss(z[..., : self.vocab_size], labels)  # padded head columns are not tokens
                total = combine(kd, ce, self.alpha)
        out["kd"], out["ce"] = kd, ce
        if self.gate is not None and weights is not None and targets is not None and gate_ctx is not None:
            total = total + self._gate_loss(targets, gate_ctx, labels, out, agg)
        elif weights is not None:
            out["teacher_weights"] = weights.detach().mean(0)
        if self.features is not None and hidden is not None:
            out["feat"] = self._feature_loss(self.features, batch, mask, rows, hidden)
            total = total + out["feat"]
        out["loss"] = total
        return out

    def _fused(self, z: torch.Tensor, head: HeadInputs | None, merged: SparseTargets, labels: torch.Tensor,
               neg: torch.Tensor | None, kd_at: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(alpha * KD + (1 - alpha) * CE, KD, CE)`` of the fused loss (on the logits or through the head)."""
        kw: dict[str, Any] = dict(alpha=self.alpha, temperature=self.T, target_temperature=self.T,
                                  tail_mode=self.tail_mode, vocab_size=self.vocab_size, target_negentropy=neg,
                                  mask=kd_at, kernels=self.kernels)
        if head is None:
            return fused_kd_ce_loss(z, merged, labels, **kw)
        return fused_linear_kd_ce_loss(z, head.weight, merged, labels, bias=head.bias, **kw)

    def _gate_loss(self, targets: Sequence[SparseTargets], ctx: AggregationContext, labels: torch.Tensor,
                   out: dict[str, torch.Tensor], agg: Aggregator | None = None) -> torch.Tensor:
        """The gate's own objective: a proper scoring rule on the labelled rows, plus the entropy term."""
        w = (agg or self.aggregator).weights(targets, ctx)  # (P, N), gradients to the gate only
        if w is None:
            raise AggregationInputError(f"aggregator {self.aggregate_name!r} has a gate but no linear weights")
        log_true = torch.stack([label_log_prob(t, labels, self.vocab_size) for t in targets], dim=1)
        out["gate_nll"] = gate_scoring_loss(log_true.detach(), w, labels)
        out["gate_reg"] = gate_entropy_regularizer(w)
        wd = w.detach()
        out["gate_weights"] = wd.mean(0)
        out["gate_entropy"] = -(wd * wd.clamp_min(1e-30).log()).sum(1).mean()
        return out["gate_nll"] + self.gate_entropy * out["gate_reg"]

    def _feature_loss(self, features: nn.Module, batch: Mapping[str, Any], mask: torch.Tensor, rows: torch.Tensor,
                      hidden: torch.Tensor | Mapping[int, torch.Tensor]) -> torch.Tensor:
        """sum_t beta_t * d(W_t h_t, f_t), each teacher against its own student layer."""
        feats = [batch["features"][n][key] for n, key in self.feature_keys.items()]
        hs = [_hidden_at(hidden, self.feature_layers[n]) for n in self.feature_keys]
        if feats[0].dim() == 3:  # per position: (B, T, D_t) -> (P, D_t)
            return features([take_rows(h, rows) for h in hs], [take_rows(f, rows) for f in feats])
        m = mask.unsqueeze(-1).to(hs[0].dtype)  # pooled per sample: mean of the student's real rows, (B, D_s)
        return features([(h * m).sum(1) / m.sum(1).clamp_min(1.0) for h in hs], feats)


def _at(t: SparseTargets, rows: torch.Tensor) -> SparseTargets:
    """`t` at the rows `rows` selects (a bool mask or an index over its leading dimension)."""
    return SparseTargets(*(x[rows] for x in t))
