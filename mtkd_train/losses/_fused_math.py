"""Closed-form forward KL + cross-entropy on sparse targets: one row chunk at a time.

The pieces shared by the logits-level (:mod:`._fused`) and the LM-head-level
(:mod:`._fused_head`) fused objectives. For a row with logits ``z`` (``V`` tokens), ``s = z / T``,
``lse_T = logsumexp(s)``, ``q = softmax(s)``, and a sparse target with probabilities ``w_j`` on
distinct tokens ``S`` (``W = sum_S w``) and tail ``t``, the part of ``KL(p || q)`` that depends on
the student (its *cross* term) is

* bucket: ``-sum_S w_j (s_j - lse_T) - t log r``, ``r = sum_{v not in S} q_v`` (the student's mass
  off the support, from a log-sum-exp over the off-support logits: no ``1 - sum`` cancellation);
* spread: ``-sum_S w_j (s_j - lse_T) - u sum_{v not in S} (s_v - lse_T)``, ``u = t / (V - |S|)``.

Its gradient with respect to ``s`` is ``A q - B`` plus a correction on ``S``:

* bucket: ``A = W + t - t/r``, ``B = 0``, correction ``q_j t/r - w_j``;
* spread: ``A = W + u (V - |S|)``, ``B = u``, correction ``u - w_j``;

(on ``S`` the sum is ``(W + t) q_j - w_j``, resp. ``(W + u (V - |S|)) q_j - w_j``: the support's values are
written whole, not added as corrections, as ``A q_j`` and ``q_j t/r`` cancel to nothing where a confident
student leaves ``r`` tiny and ``t/r`` huge)

and the cross-entropy ``lse_1 - z_y`` adds ``q^(1) - onehot(y)``. So one pass over the row gives
the statistics (``lse_T``, ``lse_1``, the off-support log-mass or the row sum) and one pass writes
the gradient: the same two passes as ``F.cross_entropy``. The cross term is linear in ``(w, t)``;
its gradient with respect to them (``lse_T - s_j`` and ``-log r`` or the spread analogue) comes
from the statistics for free, which is how a learned gate gets its gradient.

Every function works on a chunk of ``c`` rows and a caller-owned ``(c, V)`` buffer in the compute
dtype (float32, or float64 for float64 logits); ``x`` may be bf16/fp16 (read, never upcast whole).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mtkd_train.losses import _native
from mtkd_train.losses._kernels import row_stats, scaled_exp_

__all__ = ["ChunkTerms", "RowTargets", "ScaledGrad", "add_sparse", "chunk_grad", "chunk_stats", "chunk_terms",
           "native_stats", "native_stats_or", "scaled_grad", "t1_grad", "t1_grad_compiled"]


class RowTargets(NamedTuple):
    """Flat per-row target and weights, already sanitised (no NaN on excluded rows).

    Attributes:
        idx: ``(P, C)`` int64 token ids; padding entries point at a kept token of the same row
            (or 0 in a row with none), so scatters need no spare column.
        w: ``(P, C)`` target probabilities, 0 on padding (compute dtype).
        kept: ``(P, C)`` bool, non-padding entries.
        tail: ``(P,)`` tail mass (0 on excluded rows).
        labels: ``(P,)`` int64 hard labels, ignored ones replaced by 0.
        labelled: ``(P,)`` bool, rows with a real label (their CE is computed even at alpha = 1).
        kd_row: ``(P,)`` weight of the row's cross term (``alpha T^2 / n_kd`` or 0).
        ce_row: ``(P,)`` weight of the row's cross-entropy (``(1 - alpha) / n_ce`` or 0).
        n_out: ``(P,)`` number of tokens off the support, ``V - |S|`` (compute dtype).
    """

    idx: torch.Tensor
    w: torch.Tensor
    kept: torch.Tensor
    tail: torch.Tensor
    labels: torch.Tensor
    labelled: torch.Tensor
    kd_row: torch.Tensor
    ce_row: torch.Tensor
    n_out: torch.Tensor

    def rows(self, a: int, b: int) -> RowTargets:
        """The chunk of rows ``[a, b)``."""
        return RowTargets(*(t[a:b] for t in self))


class ChunkTerms(NamedTuple):
    """Per-row results for one chunk: loss pieces, gradient coefficients, target gradients."""

    cross: torch.Tensor  # (c,) KD cross term
    ce: torch.Tensor  # (c,) cross-entropy
    coef_t: torch.Tensor  # (c,) multiplies q at temperature T in d/dz
    coef_1: torch.Tensor  # (c,) multiplies q at temperature 1 (0 when folded into coef_t)
    shift: torch.Tensor  # (c,) subtracted from every token's d/dz
    support: torch.Tensor  # (c, C) the whole d/dz on the support (before the label's), written over the dense value
    label_corr: torch.Tensor  # (c,) added at the label
    grad_w: torch.Tensor  # (c, C) d total / d w
    grad_tail: torch.Tensor  # (c,) d total / d tail


def chunk_stats(
    x: torch.Tensor, rt: RowTargets, buf: torch.Tensor | None, temperature: float, mode: str, need_ce: bool,
    x_kept: torch.Tensor, compiled: bool = False, block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One read of the chunk: ``lse_T``, ``lse_1`` and the tail statistic, each ``(c,)``.

    The tail statistic is ``log sum_{v not in S} exp(s_v)`` (bucket) or ``sum_v s_v`` (spread).
    ``x_kept`` is ``x.gather(1, rt.idx)`` (the caller needs it too, so it is gathered once).
    ``buf`` (``(c, V)``, compute dtype) is overwritten; with ``compiled`` (the row kernels of
    :mod:`._kernels`, ``T = 1`` only, any ``x`` dtype) it is not used and may be None, and ``block`` bounds the
    rows whose exact off-support mass is summed at once (default: all ``c``).
    """
    if temperature == 1.0 and compiled:
        return _stats_t1(x, rt, None, mode, x_kept, block)
    assert buf is not None
    if temperature == 1.0 and x.dtype == buf.dtype:
        return _stats_t1(x, rt, buf, mode, x_kept)
    inv_t = 1.0 / temperature
    m = x.amax(dim=1, keepdim=True).to(buf.dtype)  # (c, 1)
    torch.sub(x, m, out=buf)
    if temperature != 1.0:
        buf.mul_(inv_t)
    buf.exp_()
    lse_t = (m.squeeze(1) * inv_t) + buf.sum(dim=1).log()
    if mode == "bucket":
        buf.scatter_(1, rt.idx, 0.0)  # padding points at a kept token: zeroed anyway
        rest = buf.sum(dim=1)
        has = rt.kept.any(dim=1)
        aux = torch.where(has, m.squeeze(1) * inv_t + rest.log(), lse_t)
    else:
        aux = x.sum(dim=1, dtype=buf.dtype) * inv_t
    if temperature == 1.0 or not need_ce:
        return lse_t, lse_t, aux
    torch.sub(x, m, out=buf)
    buf.exp_()
    return lse_t, m.squeeze(1) + buf.sum(dim=1).log(), aux


RISKY_REST = 1e-2
"""Below this off-support mass, ``r = 1 - sum_S q`` loses digits; such rows get the exact masked sum."""


def native_stats(
    x: torch.Tensor, rt: RowTargets, mode: str
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor] | None:
    """:func:`chunk_stats` at ``T = 1`` by the C++ kernel (:mod:`._native`) with the gathers it saves:
    ``((lse, lse, aux), x[idx], x[label])``, or None where the kernel does not take ``x`` (not float32 on
    the CPU; the caller then runs the compiled kernels)."""
    if not (_native.applies(x) and _native.ids_in_range(x.shape[1], rt.idx, rt.labels)):
        return None
    lse, x_kept, z_label, aux = _native.kd_stats(x, rt.idx, rt.kept, rt.labels, mode, RISKY_REST, ids_checked=True)
    return (lse, lse, aux), x_kept, z_label


def native_stats_or(
    x: torch.Tensor, rt: RowTargets, mode: str, kernel: str
) -> tuple[tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor] | None, str]:
    """:func:`native_stats` when ``kernel`` is "native", and the kernel the rest of the chunk runs: "compiled"
    for rows the C++ kernel does not take (its backward then runs compiled too), else ``kernel``."""
    if kernel != "native":
        return None, kernel
    native = native_stats(x, rt, mode)
    return native, "native" if native is not None else "compiled"


def _stats_t1(
    x: torch.Tensor, rt: RowTargets, buf: torch.Tensor | None, mode: str, x_kept: torch.Tensor,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunk_stats` at ``T = 1``: the compiled row kernel (``buf`` None), or one fused log-softmax.

    Eager: ``lse = z_j - log_softmax(z)_j`` at one column ``j`` per row (:func:`_lse_at_column`): two
    ``O(c)`` gathers instead of two ``(c, V)`` max passes. Bucket: ``r = 1 - sum_S q`` in float64, ``q_j =
    exp(z_j - lse)`` from the gathered logits; rows where ``r < RISKY_REST`` are recomputed exactly as a
    masked sum over their ``exp(z - lse)``, ``block`` rows at a time (a confident student may make every row
    risky: never a float32 copy of all of them).
    """
    if buf is None:
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        lse, total = row_stats(x, cd, mode != "bucket")
    else:
        cd = buf.dtype
        torch.ops.aten._log_softmax.out(x, 1, False, out=buf)  # buf := log q
        lse = _lse_at_column(x, buf, rt, x_kept)
        total = None if mode == "bucket" else x.sum(dim=1, dtype=cd)
    if total is not None:
        return lse, lse, total
    q_kept = torch.where(rt.kept, (x_kept.double() - lse.double().unsqueeze(1)).exp(), 0.0)  # (c, C)
    rest = (1.0 - q_kept.sum(dim=1)).clamp(min=0.0)  # (c,) float64
    risky = (rest < RISKY_REST).nonzero().squeeze(1)
    step = max(1, block or x.shape[0])
    for a in range(0, risky.numel(), step):
        part = risky[a : a + step]
        q = buf[part].exp_() if buf is not None else (x[part].to(cd) - lse[part].unsqueeze(1)).exp_()
        exact = q.scatter_(1, rt.idx[part], 0.0).sum(dim=1, dtype=torch.float64)
        rest = rest.index_copy(0, part, exact)
    has = rt.kept.any(dim=1)
    log_rest = torch.where(has, rest.log().to(cd) + lse, lse)
    return lse, lse, log_rest


LSE_COLUMN_FLOOR = -12.0
"""A row's log-sum-exp is read as ``z_j - log q_j`` only where ``log q_j >= -12``: its float32 rounding
is then within ~1e-6 (an ulp of 12), as good as the max-based formula's."""


def _lse_at_column(x: torch.Tensor, logq: torch.Tensor, rt: RowTargets, x_kept: torch.Tensor) -> torch.Tensor:
    """``(c,)`` ``logsumexp(x)`` from ``logq = log_softmax(x)``, read as ``z_j - log q_j`` at the support token
    or label of largest logit. Where that log-probability is below ``LSE_COLUMN_FLOOR`` (or not finite)
    the row takes the exact ``max z - max log_softmax(z)`` (the log-softmax at the argmax is in
    ``[-log V, 0]``), so no digits are lost either way."""
    cand = torch.cat([torch.where(rt.kept, x_kept.to(logq.dtype), -math.inf),
                      x.gather(1, rt.labels.unsqueeze(1)).to(logq.dtype)], dim=1)  # (c, C + 1)
    best = cand.argmax(dim=1, keepdim=True)  # (c, 1)
    col = torch.cat([rt.idx, rt.labels.unsqueeze(1)], dim=1).gather(1, best)
    at = logq.gather(1, col).squeeze(1)
    lse = cand.gather(1, best).squeeze(1) - at
    exact = ~(at >= LSE_COLUMN_FLOOR)  # also NaN / -inf
    if bool(exact.any()):
        rows = exact.nonzero().squeeze(1)
        lse = lse.index_copy(0, rows, x[rows].amax(dim=1).to(logq.dtype) - logq[rows].amax(dim=1))
    return lse


def chunk_terms(
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    s_kept: torch.Tensor,
    z_label: torch.Tensor,
    rt: RowTargets,
    temperature: float,
    mode: str,
) -> ChunkTerms:
    """Loss pieces and gradient coefficients of a chunk from its statistics (no ``V`` work).

    Args:
        stats: From :func:`chunk_stats`.
        s_kept: ``(c, C)`` ``z[idx] / T`` in the compute dtype.
        z_label: ``(c,)`` ``z[label]`` in the compute dtype.
        rt: The chunk's targets.
        temperature: ``T``.
        mode: ``"bucket"`` or ``"spread"``.
    """
    lse_t, lse_1, aux = stats
    zero = torch.zeros((), dtype=lse_t.dtype, device=lse_t.device)
    neg_logq = torch.where(rt.kept, lse_t.unsqueeze(1) - s_kept, zero)  # (c, C) -log q_j on S
    cross = (rt.w * neg_logq).sum(dim=1)
    q_kept = torch.exp(-neg_logq)
    w_sum = rt.w.sum(dim=1)
    has_tail = rt.tail > 0
    if mode == "bucket":
        # a row whose support is the whole vocabulary has no bucket outcome: its tail is left out
        # (as in the reference path; docs/LOSSES.md "A full support has no bucket")
        bucket = has_tail & (rt.n_out > 0)
        neg_log_r = lse_t - aux  # -log r
        cross = cross + torch.where(bucket, rt.tail * neg_log_r, zero)
        t_over_r = torch.where(bucket, rt.tail * torch.exp(neg_log_r), zero)
        whole = w_sum + torch.where(bucket, rt.tail, zero)  # A + t/r: the support's coefficient
        coef = whole - t_over_r
        shift = torch.zeros_like(coef)
        grad_tail = torch.where(bucket, neg_log_r, zero)
    else:
        out = rt.n_out > 0
        u = torch.where(out & has_tail, rt.tail / rt.n_out.clamp(min=1), zero)
        s_off = aux - torch.where(rt.kept, s_kept, zero).sum(dim=1)  # sum of s off the support
        neg_logq_off = torch.where(out, (rt.n_out * lse_t - s_off) / rt.n_out.clamp(min=1), zero)
        cross = cross + u * rt.n_out * neg_logq_off
        coef = w_sum + u * rt.n_out
        whole = coef  # the shift u and the correction's u cancel on the support
        shift = u
        grad_tail = neg_logq_off
    kd, ce_w, inv_t = rt.kd_row, rt.ce_row, 1.0 / temperature
    ce = lse_1 - z_label
    folded = temperature == 1.0
    labelled = rt.kept & (ce_w > 0).unsqueeze(1)  # lse_1 is only computed for rows with a CE term
    q1_kept = q_kept if folded else torch.exp(torch.where(labelled, s_kept * temperature - lse_1.unsqueeze(1), -math.inf))
    support = torch.where(rt.kept, kd.unsqueeze(1) * (whole.unsqueeze(1) * q_kept - rt.w) * inv_t
                          + torch.where(labelled, ce_w.unsqueeze(1) * q1_kept, zero), zero)
    return ChunkTerms(
        cross=cross,
        ce=ce,
        coef_t=kd * coef * inv_t + (ce_w if folded else 0.0),
        coef_1=torch.zeros_like(ce) if folded else ce_w,
        shift=kd * shift * inv_t,
        support=support,
        label_corr=-ce_w,
        grad_w=kd.unsqueeze(1) * neg_logq,
        grad_tail=kd * grad_tail,
    )


def chunk_grad(
    x: torch.Tensor,
    out: torch.Tensor,
    buf: torch.Tensor | None,
    terms: ChunkTerms,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rt: RowTargets,
    temperature: float,
    scale: torch.Tensor,
    kernel: str = "eager",
) -> None:
    """Write ``scale * d total / d z`` for the chunk into ``out`` (``(c, V)``, any float dtype).

    ``out`` may be ``x`` itself (the head-fused path overwrites its logits chunk); ``buf`` is the
    compute-dtype scratch (it may be ``out`` when ``out`` has the compute dtype and is not ``x``), unused
    with the ``"compiled"`` or ``"native"`` ``kernel`` (:mod:`._kernels`, at ``T = 1``).
    """
    lse_t, lse_1, _ = stats
    if temperature == 1.0 and kernel != "eager":
        t1_grad_compiled(x, out, lse_t, scaled_grad(terms, scale, out.dtype), rt, native=kernel == "native")
        return
    assert buf is not None, "the eager path needs a (c, V) compute-dtype buffer"
    if temperature == 1.0 and x.dtype == buf.dtype:
        t1_grad(x, out, buf, scaled_grad(terms, scale, out.dtype), rt)
        return
    work = out if out.dtype == buf.dtype else buf
    if terms.coef_1.any() and work.data_ptr() != buf.data_ptr():
        torch.sub(x, lse_1.unsqueeze(1), out=buf)  # the T = 1 softmax for the CE term, first,
        buf.exp_().mul_((terms.coef_1 * scale).unsqueeze(1))  # as `work` may overwrite `x`
        one = buf
    else:
        one = None
    torch.sub(x, (lse_t * temperature).unsqueeze(1), out=work)
    if temperature != 1.0:
        work.mul_(1.0 / temperature)
    work.exp_().mul_((terms.coef_t * scale).unsqueeze(1))
    if one is not None:
        work.add_(one)
    elif bool(terms.coef_1.any()):  # work is buf: no room for a second softmax, add it in place
        work.add_(torch.exp(x.to(buf.dtype) - lse_1.unsqueeze(1)) * (terms.coef_1 * scale).unsqueeze(1))
    add_sparse(work, scaled_grad(terms, scale, work.dtype), rt)
    if work.data_ptr() != out.data_ptr():
        out.copy_(work)


class ScaledGrad(NamedTuple):
    """The per-row parts of ``scale * d total / d z`` (``(c, V)`` = ``coef * q - shift`` off the support,
    ``support`` on it, plus the label's correction), computed once for all rows and sliced per chunk."""

    coef: torch.Tensor  # (c, 1) multiplies q (at T = 1, with the CE weight folded in)
    shift: torch.Tensor | None  # (c, 1) subtracted from every token (spread; compute dtype), None when all zero
    support: torch.Tensor  # (c, C) the value on the support in the gradient's dtype (padding entries: anything)
    label: torch.Tensor  # (c, 1) added at the label

    def rows(self, a: int, b: int) -> ScaledGrad:
        return ScaledGrad(self.coef[a:b], None if self.shift is None else self.shift[a:b], self.support[a:b],
                          self.label[a:b])


def scaled_grad(terms: ChunkTerms, scale: torch.Tensor, dtype: torch.dtype) -> ScaledGrad:
    """:class:`ScaledGrad` of ``terms`` times ``scale``, the sparse parts in the gradient's ``dtype``."""
    # the shift stays in the compute dtype: subtracted before the result is rounded to `dtype`
    shift = (terms.shift * scale).unsqueeze(1) if bool(terms.shift.any()) else None
    return ScaledGrad((terms.coef_t * scale).unsqueeze(1), shift, (terms.support * scale).to(dtype),
                      (terms.label_corr * scale).unsqueeze(1).to(dtype))


def t1_grad(x: torch.Tensor, out: torch.Tensor, buf: torch.Tensor, sg: ScaledGrad, rt: RowTargets) -> None:
    """``out := sg.coef * softmax(x) + sparse`` (``T = 1``, compute-dtype ``x``): q from one fused softmax
    kernel, written straight into ``out`` when it can hold it (else via ``buf``), then scaled in place."""
    q = out if (out.dtype == buf.dtype and out.is_contiguous() and out.data_ptr() != x.data_ptr()) else buf
    torch.ops.aten._softmax.out(x, 1, False, out=q)
    torch.mul(q, sg.coef, out=out)
    add_sparse(out, sg, rt)


def t1_grad_compiled(x: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sg: ScaledGrad, rt: RowTargets,
                     block: int | None = None, native: bool = False) -> None:
    """:func:`t1_grad` by the compiled kernel: ``out := coef * exp(x - lse) - shift`` in one loop (``out`` may be
    ``x``; any float dtypes), then the sparse parts ``block`` rows at a time (a scatter into bf16/fp16 on the
    CPU works on a float32 copy of what it is given). With ``native`` (only where :func:`native_stats` took
    these rows in the forward, which checked their ids), float32 CPU rows take the C++ kernel (:mod:`._native`),
    which writes the sparse parts in the same row loop."""
    if native and _native.applies(x, out):
        _native.kd_grad(x, out, lse, sg.coef, sg.shift, rt.idx, rt.kept, sg.support, rt.labels, sg.label,
                        ids_checked=True)
        return
    scaled_exp_(out, x, lse, sg.coef, sg.shift)
    sparse = sg._replace(shift=None)
    step = max(1, block or out.shape[0])
    has_empty = bool((~rt.kept.any(dim=1)).any())  # one device sync, not one per block
    for a in range(0, out.shape[0], step):
        b = min(a + step, out.shape[0])
        add_sparse(out[a:b], sparse.rows(a, b), rt.rows(a, b), has_empty)


def add_sparse(out: torch.Tensor, sg: ScaledGrad, rt: RowTargets, has_empty: bool | None = None) -> None:
    """The per-row shift, the support's values (written; padding entries repeat the value of the kept token
    they point at, so the scatter writes it twice, and a row without a kept token writes back what its padding
    entries point at) and the label's correction (added last: the label may lie on the support).
    ``has_empty``: whether any row of ``rt`` has no kept token, when the caller knows (no device sync here)."""
    if sg.shift is not None:
        out.sub_(sg.shift)
    at_fill = torch.where(rt.kept, rt.idx, -1).argmax(dim=1, keepdim=True)  # the kept entry padding points at
    values = torch.where(rt.kept, sg.support, sg.support.gather(1, at_fill))
    empty = ~rt.kept.any(dim=1)
    if has_empty if has_empty is not None else bool(empty.any()):
        values = torch.where(empty.unsqueeze(1), out.gather(1, rt.idx), values)
    out.scatter_(1, rt.idx, values)
    out.scatter_add_(1, rt.labels.unsqueeze(1), sg.label)
