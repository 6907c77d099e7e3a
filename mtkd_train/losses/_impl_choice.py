"""Which fused path is faster on this machine: the loss on materialised logits or the loss fused with the head.

Both compute ``alpha * KD + (1 - alpha) * CE`` with the same values and gradients (to rounding). ``fused_head``
(:func:`fused_linear_kd_ce_loss`) never builds the ``(P, V)`` logits, so it is the only path when they do not fit.
When they fit easily, which path is faster depends on the CPU as much as on the sizes. For a 2-layer width-64
student at V = 49,152 and 512 positions, one of our CPUs ran ``fused_head`` at 1.28x plain training and ``fused`` at
0.89x; an AVX-512 EPYC ran them at 0.79x and 0.94x (``benchmarks/README.md``, session 15).

:func:`time_fused_paths` times both on synthetic inputs of the run's sizes: hidden states, the head's shape, a
merged sparse target of the teachers' summed ``k`` and the run's options. It alternates them, forward and backward,
and returns the medians and the faster path. ``fused`` is chosen only when it is at least :data:`MARGIN` faster,
because ``fused_head`` also bounds memory. The trainer asks only on the CPU, and only when the logits of one batch
are within :data:`PROBE_LOGITS` (``recipe.DistillRecipe._loss_impl``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from statistics import median
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from mtkd_train.losses._fused import fused_kd_ce_loss
from mtkd_train.losses._fused_head import fused_linear_kd_ce_loss
from mtkd_train.rows import take_rows
from mtkd_train.targets import SparseTargets

__all__ = ["MARGIN", "PROBE_LOGITS", "PathTiming", "time_fused_paths"]

PROBE_LOGITS = (1 << 22, 1 << 28)
"""Logits per batch (positions x head rows) for which the trainer times both paths. Below 4M the difference is a
fraction of a millisecond. Above 256M ``fused_head`` is kept: ``fused`` would hold the batch's float32 logits
(1 GiB there), the loss rows taken from them and the gradients of both."""

MARGIN = 0.05
"""``fused`` must be this much faster than ``fused_head`` to be chosen."""


@dataclass(frozen=True)
class PathTiming:
    """Median wall milliseconds of one forward + backward of each path, and the choice."""

    fused_ms: float
    fused_head_ms: float
    choice: str  # "fused" or "fused_head"

    def to_dict(self) -> dict[str, Any]:
        return {"fused_ms": self.fused_ms, "fused_head_ms": self.fused_head_ms, "choice": self.choice}


class _Inputs(NamedTuple):
    hidden: torch.Tensor  # (B, T, H): every position of the batch, as the student's body returns them
    rows: torch.Tensor  # (P,) flat index of the loss rows (all but each sequence's last position)
    weight: torch.Tensor  # (V_head, H)
    target: SparseTargets  # (P, support), indices below `vocab`
    labels: torch.Tensor  # (P,)


def _synthetic(rows: int, seq_len: int, hidden_size: int, head_rows: int, vocab: int, support: int,
               device: torch.device, dtype: torch.dtype, seed: int) -> _Inputs:
    """A batch of whole sequences with about `rows` loss rows, a head weight and a merged top-`support` target
    (tail 0.1) of the run's sizes."""
    g = torch.Generator().manual_seed(seed)
    seq_len = max(2, min(seq_len, rows + 1))  # a long context is cut: both paths cost about the same per row
    batch = max(1, math.ceil(rows / (seq_len - 1)))
    hidden = torch.randn(batch, seq_len, hidden_size, generator=g).to(device, dtype)
    index = torch.arange(batch * seq_len).view(batch, seq_len)[:, :-1].reshape(-1).to(device)  # causal shift
    p = index.numel()
    weight = (torch.randn(head_rows, hidden_size, generator=g) / math.sqrt(hidden_size)).to(device, dtype)
    support = max(1, min(support, vocab))
    indices = torch.stack([torch.randperm(vocab, generator=g)[:support] for _ in range(min(p, 64))])
    indices = indices.repeat((p + indices.shape[0] - 1) // indices.shape[0], 1)[:p]
    logp = torch.log_softmax(2.0 * torch.randn(p, support, generator=g), dim=1) + math.log(0.9)
    target = SparseTargets(indices.to(device), logp.to(device), torch.full((p,), 0.1, device=device))
    labels = torch.randint(0, vocab, (p,), generator=g).to(device)
    return _Inputs(hidden, index, weight, target, labels)


def time_fused_paths(positions: int, hidden_size: int, vocab: int, *, support: int, alpha: float,
                     seq_len: int | None = None, head_rows: int | None = None, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, autocast: torch.dtype | None = None, rounds: int = 3,
                     seed: int = 0, **options: Any) -> PathTiming:
    """Time ``fused`` against ``fused_head`` on synthetic inputs, each as the objective runs it in a step.

    ``fused``: the head on every position of the batch (what the student's forward returns), the loss rows taken
    from those logits, then :func:`fused_kd_ce_loss`. ``fused_head``: the loss rows taken from the hidden states,
    then :func:`fused_linear_kd_ce_loss`. Backward of both reaches the hidden states and the head.

    Args:
        positions: Loss rows to time (whole sequences of ``seq_len`` are built around them).
        hidden_size: Width of the hidden states the head reads.
        vocab: The true vocabulary (targets and labels lie below it; pass it as ``vocab_size`` in ``options``
            when the head is padded).
        support: Kept tokens per row of the merged target (the teachers' summed ``k``, at most ``vocab``).
        seq_len: Positions per sequence (default: one sequence of ``positions + 1``).
        head_rows: Rows of the head's weight (default ``vocab``).
        autocast: The run's autocast dtype (``--amp``), or None; both paths run under it, as in a step.
        alpha: The KD weight of the run.
        device: Where to time (on CUDA each call is synchronised).
        rounds: Timed calls per path after one warm-up each (which also compiles the row kernels).
        options: :class:`FusedOptions` of the run (``temperature``, ``tail_mode``, ``kernels``, ...).

    Returns:
        The medians and ``choice``: ``"fused"`` if its median is at least :data:`MARGIN` below ``fused_head``'s.
    """
    device = torch.device(device)
    x = _synthetic(positions, seq_len or positions + 1, hidden_size, head_rows or vocab, vocab, support, device,
                   dtype, seed)
    hidden, weight = x.hidden.requires_grad_(True), x.weight.requires_grad_(True)

    def fused() -> None:
        logits = F.linear(hidden, weight)  # (B, T, V_head), as the student's forward
        z = take_rows(logits, x.rows)
        fused_kd_ce_loss(z, x.target, x.labels, alpha=alpha, **options).loss.backward()

    def fused_head() -> None:
        h = take_rows(hidden, x.rows)
        fused_linear_kd_ce_loss(h, weight, x.target, x.labels, alpha=alpha, **options).loss.backward()

    def clock(fn: Any) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        hidden.grad = weight.grad = None
        return 1e3 * (time.perf_counter() - start)

    arms = {"fused": fused, "fused_head": fused_head}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for fn in arms.values():  # warm-up: the row kernels compile on their first call
        clock(fn)
    for _ in range(max(1, rounds)):
        for name, fn in arms.items():
            times[name].append(clock(fn))
    a, b = median(times["fused"]), median(times["fused_head"])
    return PathTiming(a, b, "fused" if a < (1 - MARGIN) * b else "fused_head")
