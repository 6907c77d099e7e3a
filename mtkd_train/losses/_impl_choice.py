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
from typing import Any

import torch
import torch.nn.functional as F

from mtkd_train.losses._fused import fused_kd_ce_loss
from mtkd_train.losses._fused_head import fused_linear_kd_ce_loss
from mtkd_train.targets import SparseTargets

__all__ = ["MARGIN", "PROBE_LOGITS", "PathTiming", "time_fused_paths"]

PROBE_LOGITS = (1 << 22, 1 << 28)
"""Logits per batch (positions x vocabulary) for which the trainer times both paths. Below 4M the difference is
a fraction of a millisecond; above 256M (1 GiB of float32 logits, plus their gradient) ``fused_head`` is kept."""

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


def _synthetic(positions: int, hidden_size: int, vocab: int, support: int, device: torch.device,
               dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, SparseTargets, torch.Tensor]:
    """Hidden states, a head weight, a merged top-`support` target (tail 0.1) and labels of the run's sizes."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(positions, hidden_size, generator=g).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) / math.sqrt(hidden_size)).to(device, dtype)
    support = max(1, min(support, vocab))
    indices = torch.stack([torch.randperm(vocab, generator=g)[:support] for _ in range(min(positions, 64))])
    indices = indices.repeat((positions + indices.shape[0] - 1) // indices.shape[0], 1)[:positions]
    logp = torch.log_softmax(2.0 * torch.randn(positions, support, generator=g), dim=1) + math.log(0.9)
    target = SparseTargets(indices.to(device), logp.to(device), torch.full((positions,), 0.1, device=device))
    labels = torch.randint(0, vocab, (positions,), generator=g).to(device)
    return hidden, weight, target, labels


def time_fused_paths(positions: int, hidden_size: int, vocab: int, *, support: int, alpha: float,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, rounds: int = 3,
                     seed: int = 0, **options: Any) -> PathTiming:
    """Time ``fused`` (head matmul, then :func:`fused_kd_ce_loss`) against ``fused_head`` on synthetic inputs.

    Args:
        positions: Rows of one batch (batch size x sequence length).
        hidden_size: Width of the hidden states the head reads.
        vocab: Rows of the head (the student's vocabulary).
        support: Kept tokens per row of the merged target (the teachers' summed ``k``, at most ``vocab``).
        alpha: The KD weight of the run.
        device: Where to time (on CUDA each call is synchronised).
        rounds: Timed calls per path after one warm-up each (which also compiles the row kernels).
        options: :class:`FusedOptions` of the run (``temperature``, ``tail_mode``, ``kernels``, ...).

    Returns:
        The medians and ``choice``: ``"fused"`` if its median is at least :data:`MARGIN` below ``fused_head``'s.
    """
    device = torch.device(device)
    hidden, weight, target, labels = _synthetic(positions, hidden_size, vocab, support, device, dtype, seed)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def fused() -> None:
        fused_kd_ce_loss(F.linear(hidden, weight), target, labels, alpha=alpha, **options).loss.backward()

    def fused_head() -> None:
        fused_linear_kd_ce_loss(hidden, weight, target, labels, alpha=alpha, **options).loss.backward()

    def clock(fn: Any) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
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
