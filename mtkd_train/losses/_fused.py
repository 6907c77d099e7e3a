"""Fused ``alpha * forward-KL(sparse target) + (1 - alpha) * CE`` on dense logits.

One custom autograd function computes the loss and its gradient in closed form (the math is in
:mod:`._fused_math`): the forward reads the logits once, in row chunks, for the log-sum-exps and
the tail statistic; the backward writes the gradient once, in the same chunks. At most one
``(chunk, V)`` buffer in the compute dtype exists besides the logits and their gradient, so bf16
logits are never upcast whole (one exception: bf16/fp16 logits with ``T != 1`` and
``0 < alpha < 1`` allocate a second chunk-sized temporary in the backward). The target is a single
sparse target with distinct kept tokens per row (one teacher, or the merged target of any
aggregation operator, which is where N teachers and their weights collapse into ``<= N k``
non-zeros and one tail per row); the label is the one extra non-zero of the CE term.

Cost: ``O(P V)`` reads in the forward and ``O(P V)`` reads + writes in the backward, as
``F.cross_entropy``; ``O(P C)`` for everything sparse. Memory: ``O(P C)`` saved for the backward.
At ``T = 1`` with compute-dtype logits (the trainer's usual case) the backward's scaled per-row parts
are computed once over all rows; a chunk then runs a softmax, a scale and two scatters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict, Unpack

import torch

from mtkd_train.losses._fused_math import (
    ChunkTerms,
    RowTargets,
    chunk_grad,
    chunk_stats,
    chunk_terms,
    native_stats_or,
    scaled_grad,
    t1_grad,
    t1_grad_compiled,
)
from mtkd_train.losses._kd import LossConfigError, _parse
from mtkd_train.losses._kernels import kernels_choice, resolve_kernels
from mtkd_train.targets import SparseTargets, TailMode, parse_tail_mode, retemper

__all__ = ["FusedLoss", "FusedOptions", "chunk_rows", "fused_kd_ce_loss", "mixture_negentropy", "row_targets_for", "target_negentropy"]

CHUNK_ELEMENTS = 1 << 21
"""Elements per row chunk (8 MiB of float32). Measured on a 2-core EPYC (1 thread): at V = 8,192
chunks of 8 rows cost 1.5x chunks of 128 (per-chunk op overhead), at V = 49,152 and 262,144 chunks
of 8-128 rows are within noise of each other."""
MIN_CHUNK_ROWS = 16


class FusedLoss(NamedTuple):
    """Result of a fused objective.

    Attributes:
        loss: Scalar ``alpha * kd + (1 - alpha) * ce``, differentiable.
        kd: Scalar KD loss (``T^2`` times the mean KL over the KD rows), detached.
        ce: Scalar mean cross-entropy over the labelled rows, detached.
    """

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


class FusedOptions(TypedDict, total=False):
    """Keyword options of both fused entry points; every one is optional.

    Attributes:
        temperature: Distillation temperature ``T`` (default 1).
        target_temperature: Temperature ``T_c`` the target is at (default 1); re-tempered by ``T / T_c``.
        tail_mode: ``"bucket"`` (default) or ``"spread"``.
        vocab_size: True vocabulary ``V`` (default: all logits / head rows); padded columns are dropped.
        mask: ``(...,)`` bool rows of the KD term (default all); the others may hold garbage.
        target_negentropy: ``(...,)`` replaces the target's own ``sum p log p`` in the KD value (e.g.
            :func:`mixture_negentropy`, to equal :func:`weighted_forward_kl`); the student's gradient
            does not change.
        ignore_index: Label value left out of the CE (default -100).
        chunk: Rows per chunk (default: :func:`chunk_rows`).
        kernels: ``"auto"`` (default: ``$MTKD_KERNELS``, else the C++ kernel on the CPU, compiled where
            ``torch.compile`` works), ``"native"``, ``"compiled"`` or ``"eager"``: how the two dense row loops
            at ``T = 1`` run (:mod:`._kernels`).
    """

    temperature: float
    target_temperature: float
    tail_mode: TailMode
    vocab_size: int | None
    mask: torch.Tensor | None
    target_negentropy: torch.Tensor | None
    ignore_index: int
    chunk: int | None
    kernels: str | None


@dataclass(frozen=True)
class Options:
    """:class:`FusedOptions` with their defaults filled in."""

    temperature: float = 1.0
    target_temperature: float = 1.0
    tail_mode: str = "bucket"
    vocab_size: int | None = None
    mask: torch.Tensor | None = None
    target_negentropy: torch.Tensor | None = None
    ignore_index: int = -100
    chunk: int | None = None
    kernels: str | None = None

    @classmethod
    def parse(cls, options: FusedOptions, width: int) -> tuple[Options, int]:
        """Fill the defaults and check ``vocab_size`` against the ``width`` logits / head rows."""
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise LossConfigError(f"unknown option(s) {unknown}; expected some of {sorted(cls.__dataclass_fields__)}")
        opts = cls(**options)
        vocab = width if opts.vocab_size is None else opts.vocab_size
        if not isinstance(vocab, int) or not 0 < vocab <= width:
            raise LossConfigError(f"vocab_size={opts.vocab_size!r} must be a positive int no larger than the "
                                  f"{width} logits / head rows; padded vocabulary columns beyond it are dropped")
        return opts, vocab

    def kernel(self, device: torch.device) -> str:
        """Which row kernels run: ``"native"``, ``"compiled"`` or ``"eager"`` (only ``T = 1`` has the first two)."""
        try:
            kernels_choice(self.kernels)  # a bad value is refused at any temperature
            return resolve_kernels(self.kernels, device) if self.temperature == 1.0 else "eager"
        except ValueError as err:
            raise LossConfigError(str(err)) from None


def chunk_rows(num_rows: int, vocab: int, chunk: int | None) -> int:
    """Rows per chunk: ``chunk`` if given, else about :data:`CHUNK_ELEMENTS` elements."""
    if chunk is not None:
        if not isinstance(chunk, int) or chunk < 1:
            raise LossConfigError(f"chunk_rows must be a positive int, got {chunk!r}")
        return min(chunk, max(num_rows, 1))
    return max(1, min(max(num_rows, 1), max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab, 1))))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 logits, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_targets_for(
    target: SparseTargets,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    vocab: int,
    dtype: torch.dtype,
    mask: torch.Tensor | None,
    ignore_index: int,
) -> tuple[RowTargets, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sanitise a flat ``(P, K)`` target and ``(P,)`` labels into :class:`RowTargets`.

    Rows outside ``mask`` get zero weight and a zeroed target (their values may be NaN).

    Returns:
        The row targets, ``w`` and ``tail`` with their autograd history (for the gate), and the
        ``(P,)`` bool KD rows.
    """
    p = target.logp.shape[0]
    rows = torch.ones(p, dtype=torch.bool, device=labels.device) if mask is None else mask.reshape(-1).bool()
    kept = (target.logp > -math.inf) & rows.unsqueeze(1)  # (P, K)
    zero = torch.zeros((), dtype=dtype, device=labels.device)
    logp = torch.where(kept, target.logp.to(dtype), zero)  # no NaN/-inf reaches exp or its grad
    w = torch.where(kept, logp.exp(), zero)
    tail = torch.where(rows, target.tail.to(dtype), zero).clamp(min=0.0)
    fill = torch.where(kept, target.indices, -1).amax(dim=1, keepdim=True).clamp_(min=0)  # (P, 1) a kept id, or 0
    idx = torch.where(kept, target.indices, fill)
    labelled = labels.reshape(-1) != ignore_index
    n_kd, n_ce = max(int(rows.sum()), 1), max(int(labelled.sum()), 1)
    kd_row = rows.to(dtype) * (alpha * temperature**2 / n_kd)
    ce_row = labelled.to(dtype) * ((1 - alpha) / n_ce)
    safe_labels = torch.where(labelled, labels.reshape(-1), torch.zeros_like(labels.reshape(-1)))
    n_out = (vocab - kept.sum(dim=1)).to(dtype)
    rt = RowTargets(idx, w.detach(), kept, tail.detach(), safe_labels, labelled, kd_row, ce_row, n_out)
    return rt, w, tail, rows


def target_negentropy(w: torch.Tensor, tail: torch.Tensor, rt: RowTargets, mode: str) -> torch.Tensor:
    """``(P,)`` ``sum_o p_o log p_o`` of the target itself (bucket: tail as one outcome; spread:
    tail spread over the ``n_out`` unkept tokens). Differentiable in ``w`` and ``tail``."""
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    kept_part = torch.where(rt.kept, w * torch.where(rt.kept, w, 1.0).log(), zero).sum(dim=1)
    has = tail > 0
    safe_tail = torch.where(has, tail, 1.0)
    log_unit = safe_tail.log() if mode == "bucket" else safe_tail.log() - rt.n_out.clamp(min=1).log()
    has = has & (rt.n_out > 0)  # a full support has no bucket (and no token to spread over)
    return kept_part + torch.where(has, tail * log_unit, zero)


def mixture_negentropy(
    targets: Sequence[SparseTargets], weights: torch.Tensor, vocab_size: int, smoothing: float = 0.0
) -> torch.Tensor:
    """``(P,)`` ``(1 - lam) sum_i w_i sum_v p_i log p_i - lam log V`` under the spread reading.

    Passed as ``target_negentropy`` with the merged spread target, the fused KD value equals
    :func:`weighted_forward_kl` (and so does the gradient with respect to the weights).

    Args:
        targets: N ``(P, K_i)`` sparse targets.
        weights: ``(P, N)`` mixture weights (gradients flow).
        vocab_size: ``V``.
        smoothing: ``lam`` (``prior_strength`` of ``mtbkd``).
    """
    parts = []
    for t in targets:
        kept = t.logp > -math.inf
        logp = torch.where(kept, t.logp, 0.0)
        n_out = (vocab_size - kept.sum(dim=1)).to(logp.dtype)
        has = (t.tail > 0) & (n_out > 0)
        log_u = torch.where(has, t.tail, 1.0).log() - n_out.clamp(min=1).log()
        parts.append((logp.exp() * logp * kept).sum(dim=1) + torch.where(has, t.tail * log_u, 0.0))
    neg = (weights.to(parts[0].dtype) * torch.stack(parts, dim=1)).sum(dim=1)  # (P,)
    return (1 - smoothing) * neg - smoothing * math.log(vocab_size)


class _FusedKDCE(torch.autograd.Function):
    """total = sum_p kd_row * cross_p + ce_row * ce_p over ``(P, V_s)`` logits; see module doc."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, w: torch.Tensor, tail: torch.Tensor, rt: RowTargets,
        vocab: int, temperature: float, mode: str, chunk: int, kernel: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_all = logits.detach()
        cd = compute_dtype(logits.dtype)
        p = x_all.shape[0]
        need_ce = bool(rt.labelled.any())
        native, kernel = native_stats_or(x_all[:, :vocab], rt, mode, kernel)
        if native is not None:  # one C++ pass: statistics, the support's and the label's logits
            stats, x_kept, z_label = list(native[0]), native[1], native[2]
        elif kernel != "eager":  # one read-only loop over all rows: no (chunk, V) buffer
            x_kept = x_all.gather(1, rt.idx)  # (P, C)
            stats = list(chunk_stats(x_all[:, :vocab], rt, None, temperature, mode, need_ce, x_kept, compiled=True,
                                     block=chunk))
        else:
            x_kept = x_all.gather(1, rt.idx)
            buf = torch.empty((min(chunk, p), vocab), dtype=cd, device=logits.device)
            stats = [torch.empty(p, dtype=cd, device=logits.device) for _ in range(3)]
            for a in range(0, p, chunk):
                b = min(a + chunk, p)
                got = chunk_stats(x_all[a:b, :vocab], rt.rows(a, b), buf[: b - a], temperature, mode, need_ce,
                                  x_kept[a:b])
                for dst, src in zip(stats, got, strict=True):
                    dst[a:b] = src
        if native is None:
            z_label = x_all.gather(1, rt.labels.unsqueeze(1)).squeeze(1).to(cd)
        s_kept = x_kept.to(cd) if temperature == 1.0 else x_kept.to(cd) / temperature
        terms = chunk_terms((stats[0], stats[1], stats[2]), s_kept, z_label, rt, temperature, mode)
        ctx.save_for_backward(logits, *terms, *stats, *rt)
        ctx.meta = (vocab, temperature, chunk, len(terms), len(stats), kernel)
        total = (rt.kd_row * terms.cross).sum() + (rt.ce_row * terms.ce).sum()
        ctx.mark_non_differentiable(terms.cross, terms.ce)
        return total, terms.cross, terms.ce

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, *_: Any) -> tuple[Any, ...]:  # type: ignore[override]
        vocab, temperature, chunk, n_terms, n_stats, kernel = ctx.meta
        saved = ctx.saved_tensors
        logits = saved[0]
        terms = ChunkTerms(*saved[1 : 1 + n_terms])
        stats = saved[1 + n_terms : 1 + n_terms + n_stats]
        rt = RowTargets(*saved[1 + n_terms + n_stats :])
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = _logits_grad(logits, terms, stats, rt, vocab, temperature, chunk, g, kernel)
        grad_w = terms.grad_w * g if ctx.needs_input_grad[1] else None
        grad_tail = terms.grad_tail * g if ctx.needs_input_grad[2] else None
        return grad_logits, grad_w, grad_tail, None, None, None, None, None, None


def _logits_grad(
    logits: torch.Tensor, terms: ChunkTerms, stats: tuple[torch.Tensor, ...], rt: RowTargets,
    vocab: int, temperature: float, chunk: int, g: torch.Tensor, kernel: str,
) -> torch.Tensor:
    """The gradient-writing pass (one compiled loop, or chunk by chunk); padded head columns get 0."""
    p, width = logits.shape
    grad = torch.empty_like(logits)
    if width > vocab:
        grad[:, vocab:].zero_()
    cd = compute_dtype(logits.dtype)
    if kernel != "eager":  # one dense loop over all rows, then the sparse parts chunk by chunk (or one C++ pass)
        t1_grad_compiled(logits[:, :vocab], grad[:, :vocab], stats[0], scaled_grad(terms, g.to(cd), grad.dtype),
                         rt, chunk, native=kernel == "native")
        return grad
    buf = torch.empty((min(chunk, p), vocab), dtype=cd, device=logits.device)
    scale = g.to(cd)
    if temperature == 1.0 and logits.dtype == cd:  # the per-row parts once, then softmax, scale, scatter per chunk
        sg = scaled_grad(terms, scale, grad.dtype)
        for a in range(0, p, chunk):
            b = min(a + chunk, p)
            t1_grad(logits[a:b, :vocab], grad[a:b, :vocab], buf[: b - a], sg.rows(a, b), rt.rows(a, b))
        return grad
    for a in range(0, p, chunk):
        b = min(a + chunk, p)
        part = ChunkTerms(*(t[a:b] for t in terms))
        st = (stats[0][a:b], stats[1][a:b], stats[2][a:b])
        chunk_grad(logits[a:b, :vocab], grad[a:b, :vocab], buf[: b - a], part, st, rt.rows(a, b), temperature, scale)
    return grad


def _prepare(
    target: SparseTargets, labels: torch.Tensor, leading: tuple[int, ...], vocab: int, alpha: float, opts: Options,
    dtype: torch.dtype,
) -> tuple[RowTargets, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the options and build the row targets shared by both fused entry points."""
    _parse("forward_kl", opts.temperature, opts.target_temperature, 0.1)
    parse_tail_mode(opts.tail_mode)
    if not (isinstance(alpha, int | float) and 0 <= alpha <= 1):
        raise LossConfigError(f"alpha must be in [0, 1] (weight of the KD term), got {alpha!r}")
    if tuple(target.logp.shape[:-1]) != leading:
        raise LossConfigError(f"target positions {tuple(target.logp.shape[:-1])} do not match the positions {leading}")
    if tuple(labels.shape) != leading:
        raise LossConfigError(f"labels {tuple(labels.shape)} must have the logits' positions {leading}")
    k = target.logp.shape[-1]
    flat = SparseTargets(target.indices.reshape(-1, k), target.logp.reshape(-1, k), target.tail.reshape(-1))
    if opts.temperature != opts.target_temperature:
        flat = retemper(flat, opts.temperature / opts.target_temperature, vocab)
    return row_targets_for(flat, labels, alpha=alpha, temperature=opts.temperature, vocab=vocab, dtype=dtype,
                           mask=opts.mask, ignore_index=opts.ignore_index)


def finish(
    total: torch.Tensor, cross: torch.Tensor, ce: torch.Tensor, w: torch.Tensor, tail: torch.Tensor,
    rt: RowTargets, rows: torch.Tensor, alpha: float, opts: Options,
) -> FusedLoss:
    """Add the target's own ``sum p log p`` (autograd, for the gate) and the logged means."""
    temperature, negentropy = opts.temperature, opts.target_negentropy
    neg = (target_negentropy(w, tail, rt, opts.tail_mode) if negentropy is None
           else negentropy.reshape(-1).to(w.dtype))
    neg = torch.where(rows, neg, 0.0)
    n_kd = max(int(rows.sum()), 1)
    kd_rows = torch.where(rows, cross.detach() + neg.detach(), 0.0)
    kd = temperature**2 * kd_rows.sum() / n_kd
    ce_mean = torch.where(rt.labelled, ce, 0.0).sum() / max(int(rt.labelled.sum()), 1)
    loss = total + (alpha * temperature**2 / n_kd) * neg.sum()
    return FusedLoss(loss, kd, ce_mean)


def fused_kd_ce_loss(
    student_logits: torch.Tensor,
    target: SparseTargets,
    labels: torch.Tensor,
    *,
    alpha: float,
    **options: Unpack[FusedOptions],
) -> FusedLoss:
    """``alpha * kd_loss(forward_kl) + (1 - alpha) * hard_label_loss`` in one fused pass.

    Equal (to rounding) to ``combine(kd_loss(logits, target, kind="forward_kl", ...),
    hard_label_loss(logits[..., :V], labels), alpha)``, including the gradient with respect to
    ``target.logp`` / ``target.tail`` when they require grad (a learned gate).

    Args:
        student_logits: ``(..., V_s)`` logits, any float dtype (read chunk by chunk, not upcast).
        target: ``(..., K)`` sparse target; kept indices distinct per row (a merged target).
        labels: ``(...,)`` int64 hard labels; ``ignore_index`` rows are left out of the CE.
        alpha: Weight of the KD term, in ``[0, 1]``.
        **options: :class:`FusedOptions` (temperature, target_temperature, tail_mode,
            vocab_size, mask, target_negentropy, ignore_index, chunk, kernels).

    Returns:
        :class:`FusedLoss` ``(loss, kd, ce)``.

    Raises:
        LossConfigError: a bad option or shape.
    """
    opts, vocab = Options.parse(options, student_logits.shape[-1])
    z = student_logits.reshape(-1, student_logits.shape[-1])
    cd = compute_dtype(z.dtype)
    rt, w, tail, rows = _prepare(target, labels, tuple(student_logits.shape[:-1]), vocab, alpha, opts, cd)
    size = chunk_rows(z.shape[0], vocab, opts.chunk)
    total, cross, ce = _FusedKDCE.apply(z, w, tail, rt, vocab, float(opts.temperature), opts.tail_mode, size,
                                        opts.kernel(z.device))
    return finish(total, cross, ce, w, tail, rt, rows, alpha, opts)
