"""Sparse teacher targets: a top-k (or sampled) slice of a full-vocabulary distribution.

A teacher's next-token distribution over a vocabulary of ``V`` tokens is stored as the ``K``
tokens it kept (``indices``), their log-probabilities under the FULL softmax (``logp``), and the
exact mass of everything else (``tail = 1 - sum(exp(logp))``). Entries with ``logp == -inf`` are
padding: they hold no token, whatever their index says, so rows may keep different numbers of
tokens inside one rectangular tensor.

Two readings of the tail (:data:`TailMode`) are used throughout ``mtkd_train``:

* ``"spread"``: the tail is spread uniformly over the ``V - K_eff`` tokens the row did not keep
  (``K_eff`` = number of non-padding entries). This gives a full distribution over ``V`` tokens.
* ``"bucket"``: the tail is one extra outcome, "any other token"; nothing is assumed about how it
  splits. The outcome space is the kept tokens plus the bucket.

Every function here is pure tensor code over a leading batch shape ``(...)``; cost is
``O(numel(indices))`` except :func:`to_dense`, which is ``O(prod(...) * V)``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

__all__ = [
    "SparseTargets",
    "TailMode",
    "TargetsError",
    "check_targets",
    "from_dense",
    "from_samples",
    "is_empty",
    "kept_count",
    "parse_tail_mode",
    "renormalize",
    "retemper",
    "spread_log_value",
    "to_dense",
]

TailMode = Literal["spread", "bucket"]
_TAIL_MODES: tuple[str, ...] = ("spread", "bucket")


class TargetsError(ValueError):
    """A sparse target or an argument about it is malformed; the message says how to fix it."""


class SparseTargets(NamedTuple):
    """A sparse slice of a full-vocabulary distribution, per position.

    Attributes:
        indices: ``(..., K)`` int64 token ids. Padding entries may hold any id.
        logp: ``(..., K)`` float32 log-probabilities of those tokens under the full-vocabulary
            softmax; ``-inf`` marks padding (or a kept token of probability zero, which is the
            same thing).
        tail: ``(...,)`` float32 probability mass outside the kept tokens.
    """

    indices: torch.Tensor
    logp: torch.Tensor
    tail: torch.Tensor


def parse_tail_mode(value: str) -> TailMode:
    """Validate a tail mode name.

    Args:
        value: ``"spread"`` or ``"bucket"``.

    Returns:
        The same string, typed as :data:`TailMode`.

    Raises:
        TargetsError: ``value`` is not a known tail mode.
    """
    if value not in _TAIL_MODES:
        raise TargetsError(f"tail_mode must be one of {_TAIL_MODES}, got {value!r}")
    return value  # type: ignore[return-value]


def _check_vocab_size(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise TargetsError(f"vocab_size must be a positive int, got {vocab_size!r}")


def kept_count(t: SparseTargets) -> torch.Tensor:
    """Number of non-padding entries per row.

    Args:
        t: Sparse targets with ``logp`` of shape ``(..., K)``.

    Returns:
        ``(...,)`` int64 count of entries with ``logp > -inf``.
    """
    return (t.logp > -math.inf).sum(dim=-1)


def is_empty(t: SparseTargets) -> torch.Tensor:
    """Rows that carry no probability mass at all (no kept token and a zero tail).

    Such rows cannot be normalised; mask their positions out of the loss.

    Args:
        t: Sparse targets.

    Returns:
        ``(...,)`` bool.
    """
    return (kept_count(t) == 0) & (t.tail <= 0)


def spread_log_value(t: SparseTargets, vocab_size: int) -> torch.Tensor:
    """Log-probability of each unkept token under the ``"spread"`` reading of the tail.

    Every token outside the kept set gets ``tail / (V - K_eff)``. Rows that kept the whole
    vocabulary (``K_eff == V``) or have a zero tail give ``-inf`` (probability zero).

    Args:
        t: Sparse targets, ``logp`` of shape ``(..., K)``.
        vocab_size: Vocabulary size ``V``.

    Returns:
        ``(...,)`` float32 ``log(tail / (V - K_eff))``.

    Raises:
        TargetsError: ``vocab_size`` is not a positive int.
    """
    _check_vocab_size(vocab_size)
    unseen = (vocab_size - kept_count(t)).to(t.tail.dtype)  # (...,)
    has_mass = (unseen > 0) & (t.tail > 0)
    safe = torch.where(has_mass, t.tail, torch.ones_like(t.tail)).log() - unseen.clamp(min=1).log()
    return torch.where(has_mass, safe, torch.full_like(safe, -math.inf))


def from_samples(indices: torch.Tensor, counts: torch.Tensor) -> SparseTargets:
    """Targets from sampled tokens (random-sampling KD): empirical frequencies, no tail.

    ``logp = log(count / sum(count))`` with ``-inf`` where ``count == 0``, and ``tail = 0``: the
    sample *is* the target distribution. A row whose counts are all zero comes out empty (see
    :func:`is_empty`).

    Args:
        indices: ``(..., K)`` int64 sampled token ids, distinct within a row.
        counts: ``(..., K)`` non-negative counts (int or float) of each id.

    Returns:
        Sparse targets with ``tail`` all zero.

    Raises:
        TargetsError: shapes differ or a count is negative.
    """
    if indices.shape != counts.shape:
        raise TargetsError(
            f"indices and counts must have the same shape, got {tuple(indices.shape)} and "
            f"{tuple(counts.shape)}"
        )
    counts = counts.to(torch.float32)
    if bool((counts < 0).any()):
        raise TargetsError("counts must be non-negative; found a negative count")
    total = counts.sum(dim=-1, keepdim=True)  # (..., 1)
    positive = counts > 0
    ratio = torch.where(positive, counts, torch.ones_like(counts)) / total.clamp(min=1e-30)
    logp = torch.where(positive, ratio.log(), torch.full_like(counts, -math.inf))
    return SparseTargets(indices.to(torch.int64), logp, torch.zeros_like(total.squeeze(-1)))


def from_dense(probs: torch.Tensor, k: int) -> SparseTargets:
    """Top-k targets of a dense distribution, with the exact tail (what the cache stores).

    Args:
        probs: ``(..., V)`` probabilities (rows sum to one).
        k: Tokens to keep, ``1 <= k <= V``.

    Returns:
        Sparse targets ``(..., k)``; ``tail`` is the summed mass of the other tokens. Kept tokens
        of probability zero are padding (``logp = -inf``).

    Raises:
        TargetsError: ``k`` out of range.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= probs.shape[-1]:
        raise TargetsError(f"k must be an int in [1, {probs.shape[-1]}], got {k!r}")
    top, idx = probs.topk(k, dim=-1)  # (..., k)
    rest = probs.scatter(-1, idx, torch.zeros_like(top)).sum(dim=-1)  # (...,)
    logp = torch.where(top > 0, top.clamp(min=1e-45).log(), -math.inf)
    return SparseTargets(idx, logp.to(torch.float32), rest.to(torch.float32))


def renormalize(t: SparseTargets) -> SparseTargets:
    """Rescale a row so that ``sum(exp(logp)) + tail == 1`` (up to float32 rounding).

    Stored 8-bit codes are close to but not exactly normalised. A negative tail (quantisation
    noise) is clamped to zero first. Empty rows (:func:`is_empty`) cannot be normalised and are
    returned unchanged; mask them.

    Args:
        t: Sparse targets, ``logp`` ``(..., K)``, ``tail`` ``(...,)``.

    Returns:
        Normalised sparse targets with the same indices.
    """
    tail = t.tail.clamp(min=0.0)  # (...,)
    log_kept = torch.logsumexp(t.logp, dim=-1)  # (...,) -inf for all-padding rows
    log_total = torch.logaddexp(log_kept, tail.clamp(min=1e-45).log())
    log_total = torch.where(tail > 0, log_total, log_kept)  # (...,)
    empty = log_total == -math.inf
    log_total = torch.where(empty, torch.zeros_like(log_total), log_total)
    logp = t.logp - log_total.unsqueeze(-1)  # (..., K) -inf stays -inf
    return SparseTargets(t.indices, logp, tail * torch.exp(-log_total))


def retemper(t: SparseTargets, temperature: float, vocab_size: int) -> SparseTargets:
    """Re-temper a target: ``p_T(v) = p(v)^(1/T) / sum_u p(u)^(1/T)``.

    The tail is read as ``"spread"`` (each of the ``V - K_eff`` unkept tokens holds
    ``u = tail / (V - K_eff)``), which is the only reading under which tempering is defined; the
    new tail is ``(V - K_eff) * u^(1/T) / Z``. ``T = 1`` is the identity. If the target was
    captured at temperature ``T_c`` and the loss wants temperature ``T``, pass ``T / T_c``.

    Args:
        t: Sparse targets, ``logp`` ``(..., K)``.
        temperature: ``T > 0``; ``T > 1`` flattens, ``T < 1`` sharpens.
        vocab_size: Vocabulary size ``V``.

    Returns:
        Tempered sparse targets on the same indices.

    Raises:
        TargetsError: ``temperature`` is not a positive finite number, or ``vocab_size`` is bad.
    """
    if not (isinstance(temperature, int | float) and 0 < temperature < math.inf):
        raise TargetsError(f"temperature must be a positive finite number, got {temperature!r}")
    log_u = spread_log_value(t, vocab_size)  # (...,)
    if temperature == 1.0:
        return t
    unseen = (vocab_size - kept_count(t)).to(t.tail.dtype)  # (...,)
    kept = t.logp / temperature  # (..., K)
    log_tail = torch.where(
        log_u > -math.inf, log_u / temperature + unseen.clamp(min=1).log(), log_u
    )  # (...,)
    log_z = torch.logaddexp(torch.logsumexp(kept, dim=-1), log_tail)  # (...,)
    log_z = torch.where(log_z > -math.inf, log_z, torch.zeros_like(log_z))  # empty rows
    return SparseTargets(t.indices, kept - log_z.unsqueeze(-1), torch.exp(log_tail - log_z))


def _support_mask(t: SparseTargets, width: int) -> torch.Tensor:
    """``(..., width)`` bool: token kept (non-padding) by the row. Duplicate-safe."""
    kept = (t.logp > -math.inf).to(t.logp.dtype)  # (..., K)
    hits = torch.zeros((*t.indices.shape[:-1], width), dtype=kept.dtype, device=kept.device)
    safe_idx = torch.where(kept > 0, t.indices, torch.zeros_like(t.indices))
    return hits.scatter_add(-1, safe_idx, kept) > 0


def to_dense(t: SparseTargets, vocab_size: int, tail_mode: TailMode = "spread") -> torch.Tensor:
    """Dense probabilities: the reference implementation the sparse code is tested against.

    Args:
        t: Sparse targets, ``indices``/``logp`` ``(..., K)``, ``tail`` ``(...,)``.
        vocab_size: Vocabulary size ``V``; every non-padding index must be in ``[0, V)``.
        tail_mode: ``"spread"`` returns ``(..., V)`` with the tail spread uniformly over the
            unkept tokens. ``"bucket"`` returns ``(..., V + 1)``: the kept probabilities, zeros
            for unkept tokens, and the tail in the last column (the "any other token" outcome).

    Returns:
        ``(..., V)`` for ``"spread"``, ``(..., V + 1)`` for ``"bucket"``; dtype of ``logp``.

    Raises:
        TargetsError: bad ``vocab_size`` or ``tail_mode``.
    """
    _check_vocab_size(vocab_size)
    parse_tail_mode(tail_mode)
    kept = t.logp > -math.inf  # (..., K)
    probs = torch.where(kept, t.logp.exp(), torch.zeros_like(t.logp))  # (..., K)
    safe_idx = torch.where(kept, t.indices, torch.zeros_like(t.indices))
    width = vocab_size + (1 if tail_mode == "bucket" else 0)
    dense = torch.zeros((*t.logp.shape[:-1], width), dtype=t.logp.dtype, device=t.logp.device)
    dense = dense.scatter_add(-1, safe_idx, probs)  # (..., width)
    if tail_mode == "bucket":
        dense[..., vocab_size] = t.tail
        return dense
    fill = spread_log_value(t, vocab_size).exp()  # (...,)
    unkept = ~_support_mask(t, vocab_size)  # (..., V)
    return dense + unkept.to(dense.dtype) * fill.unsqueeze(-1)


def check_targets(t: SparseTargets, vocab_size: int | None = None) -> None:
    """Validate structure and values; for tests, debugging and cache readers, not the hot path.

    Checks: ``indices``/``logp`` shapes match and ``tail`` drops the last axis; dtypes; no NaN;
    ``tail >= 0``; non-padding indices are distinct within a row and, when ``vocab_size`` is
    given, lie in ``[0, V)``.

    Args:
        t: Sparse targets.
        vocab_size: Optional vocabulary size for the range check.

    Raises:
        TargetsError: the first problem found, with the offending row.
    """
    if t.indices.shape != t.logp.shape or t.tail.shape != t.logp.shape[:-1]:
        raise TargetsError(
            f"shapes must be indices (..., K) == logp (..., K) and tail (...,); got "
            f"{tuple(t.indices.shape)}, {tuple(t.logp.shape)}, {tuple(t.tail.shape)}"
        )
    if t.indices.dtype != torch.int64 or not t.logp.is_floating_point():
        raise TargetsError(
            f"need int64 indices and float logp, got {t.indices.dtype}, {t.logp.dtype}"
        )
    if bool(torch.isnan(t.logp).any() | torch.isnan(t.tail).any()):
        raise TargetsError("logp or tail contains NaN; re-decode the cache rows")
    if bool((t.tail < 0).any()):
        raise TargetsError("tail must be >= 0; call renormalize() on decoded targets")
    kept = t.logp > -math.inf
    if vocab_size is not None and bool(
        (kept & ((t.indices < 0) | (t.indices >= vocab_size))).any()
    ):
        raise TargetsError(f"a kept index lies outside [0, {vocab_size}); wrong vocab_size?")
    key = torch.where(kept, t.indices, torch.full_like(t.indices, -1 - t.indices.shape[-1]))
    key = key + torch.where(kept, 0, torch.arange(t.indices.shape[-1], device=key.device))
    ordered = key.sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise TargetsError("a row keeps the same token twice; deduplicate indices in the cache")
