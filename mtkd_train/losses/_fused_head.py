"""The fused objective of :mod:`._fused`, fused with the LM head: the ``(P, V)`` logits never exist.

In the style of Liger-Kernel's fused linear cross-entropy: the forward walks the positions in
chunks; for each chunk it computes the logits ``h_c W^T (+ b)`` into one ``(c, V)`` buffer, reads
them once for the statistics, overwrites them with their gradient (closed form,
:mod:`._fused_math`), and immediately folds that gradient into ``dL/dh_c = G_c W`` and
``dL/dW += G_c^T h_c`` (``dL/db += sum G_c``). The backward only scales these by the incoming
gradient. Peak memory is ``O(c V + P H + V H)`` instead of ``O(P V)``: at P = 4,096 and
V = 262,144 the float32 logits alone would be 4.3 GB. The matmuls run in the hidden states'
dtype; the statistics and the gradient in float32 (float64 for float64 inputs).

Cost: the same three matmuls as the unfused head (forward, two backward), and the same two
``O(P V)`` passes as :func:`fused_kd_ce_loss`, all on a chunk that stays in cache. Gradients are
computed in the forward whenever an input requires them, so call it under ``torch.no_grad()`` for
evaluation.
"""

from __future__ import annotations

from typing import Any, Unpack

import torch

from mtkd_train.losses._fused import (
    FusedLoss,
    FusedOptions,
    Options,
    _prepare,
    chunk_rows,
    compute_dtype,
    finish,
)
from mtkd_train.losses._fused_math import (
    RowTargets,
    chunk_grad,
    chunk_stats,
    chunk_terms,
    native_stats_or,
)
from mtkd_train.losses._kd import LossConfigError
from mtkd_train.targets import SparseTargets

__all__ = ["HEAD_CHUNK_ELEMENTS", "fused_linear_kd_ce_loss", "head_chunk_rows"]

HEAD_CHUNK_ELEMENTS = 1 << 24
"""Largest default ``(c, V)`` chunk of the head-fused loss (64 MiB of float32)."""
ROWS_PER_HIDDEN = 4
"""Default chunk rows per hidden unit, up to :data:`HEAD_CHUNK_ELEMENTS`."""


def head_chunk_rows(num_rows: int, vocab: int, hidden: int, chunk: int | None) -> int:
    """Rows per chunk of the head-fused loss: ``chunk`` if given, else about ``4 H`` rows (at most 64 MiB).

    Each chunk reads the ``(V, H)`` head twice (its logits, ``dL/dh``) and reads and writes its ``(V, H)``
    gradient once, so the head's traffic per position falls as ``1 / c``; with ``c = 4 H`` it is about a
    quarter of the logits' own. Measured on one thread (P = 512, V = 49,152): at H = 64 chunks of 42 rows
    (:func:`chunk_rows`' size) cost 250 ms, chunks of 256 rows 197 ms; at H = 576, 1,542 against 1,023 ms;
    at V = 262,144, H = 64, 16 rows 1,461 ms and 64 rows 1,112 ms (``benchmarks/README.md``, session 16).
    """
    if chunk is not None:
        return chunk_rows(num_rows, vocab, chunk)
    wanted = max(chunk_rows(num_rows, vocab, None), min(ROWS_PER_HIDDEN * hidden, HEAD_CHUNK_ELEMENTS // max(vocab, 1)))
    return max(1, min(max(num_rows, 1), wanted))


class _Grads:
    """Gradient accumulators of the head-fused forward (``None`` where no gradient is wanted)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: int, c: int,
                 cd: torch.dtype) -> None:
        self.h = torch.empty_like(hidden) if hidden.requires_grad else None
        self.weight = torch.zeros_like(weight) if weight.requires_grad else None
        self.bias = torch.zeros_like(bias) if bias is not None and bias.requires_grad else None
        self.w = torch.empty((p, c), dtype=cd, device=hidden.device)
        self.tail = torch.empty(p, dtype=cd, device=hidden.device)

    @property
    def any_model_grad(self) -> bool:
        return self.h is not None or self.weight is not None or self.bias is not None


def _chunk(
    h: torch.Tensor, head: torch.Tensor, bias: torch.Tensor | None, rt: RowTargets, logits: torch.Tensor,
    buf: torch.Tensor | None, temperature: float, mode: str, grads: _Grads, a: int, need_ce: bool, kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: logits, statistics, terms, then the gradient folded into the accumulators."""
    torch.mm(h, head.t(), out=logits)  # (c, V)
    if bias is not None:
        logits.add_(bias)
    native, kernel = native_stats_or(logits, rt, mode, kernel)
    if native is not None:  # one C++ pass: statistics, the support's and the label's logits
        stats, x_kept, z_label = native
    else:
        x_kept = logits.gather(1, rt.idx)  # (c, C)
        stats = chunk_stats(logits, rt, buf, temperature, mode, need_ce, x_kept, kernel != "eager")
        z_label = logits.gather(1, rt.labels.unsqueeze(1)).squeeze(1).to(stats[0].dtype)
    cd = stats[0].dtype
    s_kept = x_kept.to(cd) if temperature == 1.0 else x_kept.to(cd) / temperature
    terms = chunk_terms(stats, s_kept, z_label, rt, temperature, mode)
    b = a + h.shape[0]
    grads.w[a:b], grads.tail[a:b] = terms.grad_w, terms.grad_tail
    if grads.any_model_grad:
        one = torch.ones((), dtype=cd, device=logits.device)
        chunk_grad(logits, logits, buf, terms, stats, rt, temperature, one, kernel)  # logits := dL/dlogits
        if grads.h is not None:
            torch.mm(logits, head, out=grads.h[a:b])
        if grads.weight is not None:
            grads.weight[: head.shape[0]].addmm_(logits.t(), h)
        if grads.bias is not None:
            grads.bias[: head.shape[0]].add_(logits.sum(dim=0))
    return terms.cross, terms.ce


class _FusedLinearKDCE(torch.autograd.Function):
    """total over hidden states and a head; gradients computed in the forward (see module doc)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w: torch.Tensor,
        tail: torch.Tensor, rt: RowTargets, vocab: int, temperature: float, mode: str, chunk: int, kernel: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = hidden.shape[0]
        cd = compute_dtype(hidden.dtype)
        head = weight.detach()[:vocab]
        b_head = None if bias is None else bias.detach()[:vocab]
        grads = _Grads(hidden, weight, bias, p, rt.idx.shape[1], cd)
        size = min(chunk, max(p, 1))
        logits = torch.empty((size, vocab), dtype=hidden.dtype, device=hidden.device)
        buf = None if kernel != "eager" else torch.empty((size, vocab), dtype=cd, device=hidden.device)
        cross, ce = torch.empty(p, dtype=cd, device=hidden.device), torch.empty(p, dtype=cd, device=hidden.device)
        need_ce = bool(rt.labelled.any())
        h_all = hidden.detach()
        for a in range(0, p, size):
            b = min(a + size, p)
            cross[a:b], ce[a:b] = _chunk(h_all[a:b], head, b_head, rt.rows(a, b), logits[: b - a],
                                         None if buf is None else buf[: b - a], temperature, mode, grads, a, need_ce,
                                         kernel)
        ctx.grads = grads
        total = (rt.kd_row * cross).sum() + (rt.ce_row * ce).sum()
        ctx.mark_non_differentiable(cross, ce)
        return total, cross, ce

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, *_: Any) -> tuple[Any, ...]:  # type: ignore[override]
        grads: _Grads = ctx.grads
        one = bool(g == 1)

        def scaled(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else (t if one else t * g.to(t.dtype))

        out = (scaled(grads.h), scaled(grads.weight), scaled(grads.bias), scaled(grads.w), scaled(grads.tail))
        ctx.grads = None
        return (*out, None, None, None, None, None, None)


def fused_linear_kd_ce_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: SparseTargets,
    labels: torch.Tensor,
    *,
    alpha: float,
    bias: torch.Tensor | None = None,
    **options: Unpack[FusedOptions],
) -> FusedLoss:
    """:func:`fused_kd_ce_loss` on ``logits = hidden @ weight.T + bias``, never materialising them.

    Args:
        hidden: ``(..., H)`` final hidden states (after the last norm).
        weight: ``(V_s, H)`` LM head weight; rows beyond ``vocab_size`` (padding) get no gradient.
        target: ``(..., K)`` sparse target with distinct kept indices per row.
        labels: ``(...,)`` int64 hard labels (``ignore_index`` skipped).
        alpha: Weight of the KD term, in ``[0, 1]``.
        bias: Optional ``(V_s,)`` head bias.
        **options: :class:`FusedOptions`, as for :func:`fused_kd_ce_loss`.

    Returns:
        :class:`FusedLoss` ``(loss, kd, ce)``.

    Raises:
        LossConfigError: a bad option or shape.
    """
    opts, vocab = Options.parse(options, weight.shape[0])
    if hidden.shape[-1] != weight.shape[1]:
        raise LossConfigError(f"hidden {tuple(hidden.shape)} and head weight {tuple(weight.shape)} disagree on H")
    # The head runs in the hidden states' dtype (as nn.Linear under autocast); the cast is differentiable.
    weight = weight.to(hidden.dtype)
    bias = None if bias is None else bias.to(hidden.dtype)
    h = hidden.reshape(-1, hidden.shape[-1])
    rt, w, tail, rows = _prepare(target, labels, tuple(hidden.shape[:-1]), vocab, alpha, opts, compute_dtype(h.dtype))
    size = head_chunk_rows(h.shape[0], vocab, h.shape[1], opts.chunk)
    with torch.autocast(h.device.type, enabled=False):  # out= matmuls; the dtypes are already chosen
        total, cross, ce = _FusedLinearKDCE.apply(h, weight, bias, w, tail, rt, vocab, float(opts.temperature),
                                                  opts.tail_mode, size, opts.kernel(h.device))
    return finish(total, cross, ce, w, tail, rt, rows, alpha, opts)
