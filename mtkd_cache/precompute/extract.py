"""Teacher target extraction: full logits and hidden states in, compressed targets out.

Everything here is pure torch with no I/O. It runs on the teacher's device right after the forward
pass, so only the compressed results (top-k indices and log-probabilities, sampled token counts,
pooled or int8 features) ever cross to the host.

Position convention for causal LMs: row ``j`` of a sample's targets holds the teacher's
distribution over the token at position ``j + 1``, i.e. it is computed from the raw logits at
position ``j``. No shift is applied on the teacher side; the student shifts its labels exactly as
in ordinary next-token training, and the last row of a sequence predicts the token after it.
Classifiers produce one row per sample (position 0).

Cost: on the CPU, ``topk_targets[_with_stats|_checked]`` run the compiled kernel of ``native.py``
when it is available (two reads of each row while it is in cache, ~5x less CPU time than the torch
path below at V = 49,152; ``MTKD_NATIVE=0`` turns it off). The torch path, used on other devices and
without a compiler: ``topk_targets[_with_stats|_checked]``, ``distribution_stats`` and ``check_finite`` (one row
sum; ``topk_targets_checked`` needs none) are O(B T V) and work through the rows in blocks of
about ``_BLOCK_ELEMENTS`` logits: each block is ranked, normalised into a float32 buffer and
masked in place while it is still in cache, instead of streaming several (B, T, V) temporaries
through memory (on a 2-core CPU with SmolLM2's 49k vocabulary, ~3x less CPU time than
whole-tensor ops; ``benchmarks/precompute_overhead.py``). Every reduction is per row, so the
block size changes results by float rounding at most. ``sample_targets`` softmaxes one row block at a time
and draws ``n`` tokens per row in O(B T (V + n log n)), never (B T, V) float32 at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Literal

import torch

from mtkd_cache.errors import NonFiniteLogitsError, TopKTooLargeError
from mtkd_cache.precompute import native

__all__ = [
    "NonFiniteLogitsError",
    "TopKTooLargeError",
    "check_finite",
    "nonfinite_samples",
    "dequantize_int8_rows",
    "distribution_stats",
    "pool_features",
    "quantize_int8_rows",
    "sample_targets",
    "topk_targets",
    "topk_targets_checked",
    "topk_targets_with_stats",
]


def _real_vocab_logits(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """Validate (B, T, V_padded) logits and return the (B, T, V) view over the real vocabulary."""
    if logits.ndim != 3:
        raise ValueError(
            f"logits must have shape (batch, positions, vocab), got {tuple(logits.shape)}; "
            "classifier outputs (B, V) need a position axis: logits.unsqueeze(1)"
        )
    padded = logits.shape[-1]
    if vocab_size is None:
        return logits
    if not 1 <= vocab_size <= padded:
        raise ValueError(
            f"vocab_size={vocab_size} must be between 1 and the logits width {padded}; "
            "pass the tokenizer's vocabulary size, not a larger number"
        )
    return logits[..., :vocab_size]


# Logits per row block of the O(V) reductions: 4 MiB of float32 stays in a CPU core's cache; on a
# GPU, large blocks keep the launches few while bounding the float32 working copy.
_BLOCK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}


def _row_blocks(rows: int, vocab: int, device: torch.device) -> Iterator[slice]:
    """Consecutive slices over ``rows`` rows of ``vocab`` logits, each about one block."""
    step = max(1, _BLOCK_ELEMENTS.get(device.type, 1 << 26) // max(1, vocab))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def topk_targets(
    logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities of the teacher distribution, plus the mass left outside them.

    The distribution is ``log_softmax(logits[..., :vocab_size] / temperature)`` in float32, so
    columns a padded LM head adds beyond the real vocabulary take no probability mass. The tail
    is the sum of the probabilities of the non-kept tokens: it is computed from the entries it
    describes rather than as ``1 - sum(p_topk)``, so it keeps its relative precision when tiny and
    is never negative.

    Args:
        logits: (B, T, V_padded) raw teacher logits, any float dtype.
        k: Number of entries to keep per row, 1 <= k <= V.
        temperature: Softmax temperature, > 0.
        vocab_size: Real vocabulary size V; ``None`` means the full logits width.

    Returns:
        ``(indices, logp, tail)``: indices (B, T, k) int64 sorted ascending along the last axis
        (sorted indices delta-code well), logp (B, T, k) float32 permuted with them, and
        tail (B, T) float32 in [0, 1], the probability of all tokens outside the top k.

    Raises:
        TopKTooLargeError: ``k`` exceeds the vocabulary size.
        ValueError: Bad shape, ``vocab_size`` or ``temperature``.
    """
    indices, top_logp, tail, _, _, _ = _checked_topk(logits, k, temperature, vocab_size, with_stats=False)
    return indices, top_logp, tail


def _checked_topk(logits: torch.Tensor, k: int, temperature: float, vocab_size: int | None, *, with_stats: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                             torch.Tensor | None]:
    """Validate ``k`` and ``temperature`` against the real vocabulary, then run the row-blocked top-k."""
    real = _real_vocab_logits(logits, vocab_size)  # (B, T, V)
    vocab = real.shape[-1]
    if not 1 <= k <= vocab:
        raise TopKTooLargeError(
            f"k={k} top-k entries were requested but the vocabulary has {vocab} tokens; "
            f"pass a top-k between 1 and {vocab}"
        )
    _check_temperature(temperature)
    return _topk_blocks(real, k, temperature, with_stats=with_stats)


def topk_targets_with_stats(
    logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``topk_targets`` plus ``distribution_stats`` in one pass over the logits.

    Same arguments, values and errors as ``topk_targets`` (the first three outputs are equal);
    the stats reuse its normalised block and probabilities, so they cost one dot product per row
    instead of a second pass over the logits (``distribution_stats``).

    Returns:
        ``(indices, logp, tail, entropy, top1)``: the first three as ``topk_targets``, then
        entropy (B, T) float32 in nats and top1 (B, T) float32, the largest probability.
    """
    indices, top_logp, tail, entropy, top1, _ = _checked_topk(logits, k, temperature, vocab_size, with_stats=True)
    assert entropy is not None and top1 is not None  # with_stats=True always returns them
    return indices, top_logp, tail, entropy, top1


def topk_targets_checked(
    logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    *,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``nonfinite_samples`` and ``topk_targets_with_stats`` in the same pass over the logits.

    The finiteness check rides on values the pass computes anyway: a row with NaN or +inf has a
    non-finite maximum, and a row with -inf has a NaN entropy (its probability 0 times its
    shifted logit -inf). Those rows (and rows whose float32 arithmetic overflowed) are re-checked
    exactly, as ``nonfinite_samples`` does, so the answer is the same without its separate read
    of every logit.

    Args:
        logits, k, temperature, vocab_size: As ``topk_targets``.
        mask: Optional (B, T) attention mask, as ``nonfinite_samples``.

    Returns:
        ``(bad, outputs)``: bad (B,) bool as ``nonfinite_samples`` returns it, and the five
        outputs of ``topk_targets_with_stats`` (meaningless for the bad samples' rows).
    """
    _check_mask(logits, mask)
    indices, top_logp, tail, entropy, top1, finite = _checked_topk(logits, k, temperature, vocab_size,
                                                                   with_stats=True)
    assert entropy is not None and top1 is not None and finite is not None  # with_stats=True returns them
    real = _real_vocab_logits(logits, vocab_size)  # (B, T, V)
    bad = _bad_samples(real.reshape(-1, real.shape[-1]), finite.reshape(-1), logits.shape, mask)
    return bad, (indices, top_logp, tail, entropy, top1)


def _topk_blocks(
    real: torch.Tensor, k: int, temperature: float, *, with_stats: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The block loop of ``topk_targets[_with_stats|_checked]`` over validated (B, T, V) logits.

    On the CPU the compiled kernel does all of this when it is available (``_topk_native``); the rest
    of this docstring is the torch path.

    Per block: the maxima of the column groups (``_group_maxima``), which give the row max (with
    the columns in no group; ``amax`` itself for a vocabulary too small for groups) and start the
    top-k (``_topk_rows``) on the (tempered) logits themselves, in their own dtype; one exp of the
    shifted logits; the sum of its non-kept entries (the tail, computed from the entries it
    describes, so never negative and precise when tiny) plus the k kept ones is the row sum ``S``
    (so ``log p = shifted - log S`` without a log-softmax pass or a sum of its own), and the stats
    reuse the same buffers: ``H = log S - sum p * shifted`` (one dot per row, ``_row_dots``) and
    ``top1 = 1 / S``. With the stats, ``finite`` flags the
    rows whose max and entropy are finite (see ``topk_targets_checked``).
    """
    batch, positions, vocab = real.shape
    rows_total = batch * positions
    flat = real.reshape(rows_total, vocab)  # (N, V), a view when the logits are contiguous
    if real.device.type == "cpu" and native.available():
        outputs = [o.reshape(batch, positions, *o.shape[1:]) for o in _topk_native(flat, k, temperature)]
        stats = outputs[3:] if with_stats else [None, None, None]
        return outputs[0], outputs[1], outputs[2], stats[0], stats[1], stats[2]
    indices = torch.empty(rows_total, k, dtype=torch.int64, device=real.device)  # (N, k)
    top_logp = torch.empty(rows_total, k, dtype=torch.float32, device=real.device)  # (N, k)
    tail = torch.empty(rows_total, dtype=torch.float32, device=real.device)  # (N,)
    entropy = torch.empty(rows_total, dtype=torch.float32, device=real.device) if with_stats else None  # (N,)
    top1 = torch.empty(rows_total, dtype=torch.float32, device=real.device) if with_stats else None  # (N,)
    finite = torch.empty(rows_total, dtype=torch.bool, device=real.device) if with_stats else None  # (N,)
    step = max(1, _BLOCK_ELEMENTS.get(real.device.type, 1 << 26) // max(1, vocab))
    # two block buffers reused by every block: fresh (n, V) temporaries are fresh pages (mmap) each
    # time, whose first-touch faults cost more than the arithmetic (~3x the loop's CPU time)
    bufs = _scratch((2, min(step, rows_total), vocab), real.device)
    for rows in _row_blocks(rows_total, vocab, real.device):
        n = rows.stop - rows.start
        shifted, unnorm = bufs[0, :n], bufs[1, :n]  # (n, V) each
        scaled = flat[rows]  # (n, V) the logits / T, in their dtype when T = 1
        if temperature != 1.0 and scaled.dtype == torch.float32:
            scaled = torch.div(scaled, temperature, out=shifted)
        elif temperature != 1.0:  # bf16/fp16 divided in their own dtype would round (or overflow) first
            scaled = shifted.copy_(scaled).div_(temperature)
        best = _group_maxima(scaled)  # (n, V // 64) or None for a small vocabulary
        row_max = _row_max(scaled, best)  # (n, 1) float32
        block_top, block_idx = _topk_rows(scaled, k, best)  # (n, k) each, unshifted
        torch.sub(scaled, row_max, out=shifted)  # (n, V) <= 0, the row max at 0
        torch.exp(shifted, out=unnorm)  # (n, V) exp(shifted); sums to S >= 1 per row
        # sum_v exp(shifted_v) * shifted_v, before the scatter below zeroes the kept entries
        weighted = _row_dots(unnorm, shifted) if entropy is not None else None  # (n,)
        # (top - max): the same float32 steps as reading the top-k from `shifted`
        block_shifted = block_top.to(torch.float32) - row_max  # (n, k)
        rest = unnorm.scatter_(-1, block_idx, 0.0).sum(dim=-1)  # (n,) the non-kept mass, unnormalised
        total = rest + block_shifted.exp().sum(dim=-1)  # (n,) S, without a pass of its own
        log_total = total.log()  # (n,) log p = shifted - log S
        if top1 is not None:  # the max of shifted is 0, so the top-1 probability is 1 / S
            top1[rows] = total.reciprocal()
        if weighted is not None and entropy is not None and finite is not None:  # H = log S - sum_v p_v shifted_v
            block_h = log_total - weighted / total
            entropy[rows] = block_h
            finite[rows] = torch.isfinite(block_h) & torch.isfinite(row_max.squeeze(-1))
        block_sorted, order = torch.sort(block_idx, dim=-1)  # (n, k)
        indices[rows] = block_sorted
        top_logp[rows] = torch.gather(block_shifted, -1, order) - log_total.unsqueeze(-1)
        tail[rows] = (rest / total).clamp_(0.0, 1.0)
    shape = (batch, positions)
    return (indices.reshape(*shape, k), top_logp.reshape(*shape, k), tail.reshape(shape),
            None if entropy is None else entropy.reshape(shape), None if top1 is None else top1.reshape(shape),
            None if finite is None else finite.reshape(shape))


def _topk_native(flat: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, ...]:
    """``_topk_blocks``'s six outputs for (N, V) CPU logits from the compiled kernel (``native.py``).

    Float32 logits at T = 1 go to it as they are; otherwise each row block is first tempered in float32
    into a reused buffer (the same float32 steps as the torch path).
    """
    as_is = flat.dtype == torch.float32 and temperature == 1.0 and flat.stride(-1) == 1
    if as_is or flat.shape[0] == 0:  # no rows: nothing to temper
        out = native.topk_rows(flat if as_is else flat.float().contiguous(), k)
        assert out is not None  # available() was checked by the caller
        return out
    vocab = flat.shape[-1]
    step = max(1, _BLOCK_ELEMENTS["cpu"] // max(1, vocab))
    buf = _scratch((1, min(step, flat.shape[0]), vocab), flat.device)[0]
    pieces = []
    for rows in _row_blocks(flat.shape[0], vocab, flat.device):
        block = buf[: rows.stop - rows.start].copy_(flat[rows])  # (n, V) float32
        if temperature != 1.0:
            block.div_(temperature)
        out = native.topk_rows(block, k)
        assert out is not None
        pieces.append(out)
    return tuple(torch.cat(parts) for parts in zip(*pieces))


_DOT_MIN_VOCAB = 4096
"""From this row length on, ``_row_dots`` on the CPU takes one BLAS dot per row (it pays per call)."""


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) float32 dot products of the rows of two (n, V) float32 blocks; ``b`` may be overwritten.

    On the CPU, long rows take one ``torch.dot`` each: one read of both blocks, against a product
    written and read again by ``(a * b).sum(-1)`` (~2x its time at V = 49,152; ``torch.bmm`` and
    ``torch.linalg.vecdot`` are slower still). Elsewhere, and for short rows, the elementwise form.
    MKL's float32 dot sums less accurately than ``sum``'s cascade: up to ~4e-6 relative on 50,000-long
    rows of many repeated values, against ~1e-7 (the entropy it feeds is a cache statistic only).
    """
    if a.device.type != "cpu" or a.shape[-1] < _DOT_MIN_VOCAB:
        return torch.mul(a, b, out=b).sum(dim=-1)
    out = torch.empty(a.shape[0], dtype=a.dtype)
    for i in range(a.shape[0]):
        torch.dot(a[i], b[i], out=out[i])
    return out


_SCRATCH = threading.local()  # per thread: each reduction worker reuses its own buffer


def _scratch(shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """A float32 buffer of `shape`, reused across calls on the CPU by the calling thread (contents undefined).

    The head-blocked runs call the reductions once per row block, so a buffer per call would be
    fresh pages every block. Other devices allocate (their caching allocators reuse memory).
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=torch.float32, device=device)
    need = shape[0] * shape[1] * shape[2]
    held = getattr(_SCRATCH, "buf", None)
    if held is None or held.numel() < need:
        held = _SCRATCH.buf = torch.empty(need, dtype=torch.float32)
    return held[:need].view(shape)


_GROUP = 64
"""Columns per group of `_topk_rows`'s first stage."""

_SUBGROUP = 8
"""Candidates per subgroup of `_topk_rows`'s second stage."""


def _group_maxima(x: torch.Tensor) -> torch.Tensor | None:
    """(n, W) maxima of the strided column groups of (n, V) rows, W = V // 64; None when V < 8 * 64.

    Group j holds the columns j, j + W, j + 2W, ... (64 of them), so the maxima are one vertical
    max over 64 rows of W contiguous logits: a vectorised pass, where 64 adjacent columns would
    need a short horizontal reduction per group. Columns from 64 W on are in no group.
    """
    width = x.shape[-1] // _GROUP
    if width < 8:  # too few groups for any k: `_topk_rows` uses torch.topk itself
        return None
    return x[:, : width * _GROUP].view(x.shape[0], _GROUP, width).amax(dim=1)


def _row_max(x: torch.Tensor, best: torch.Tensor | None) -> torch.Tensor:
    """(n, 1) float32 row maxima of (n, V) rows, from their group maxima when given."""
    if best is None:
        return x.amax(dim=-1, keepdim=True).to(torch.float32)
    top = best.amax(dim=-1, keepdim=True)  # (n, 1)
    body = best.shape[-1] * _GROUP
    if body < x.shape[-1]:
        top = torch.maximum(top, x[:, body:].amax(dim=-1, keepdim=True))
    return top.to(torch.float32)


def _topk_rows(x: torch.Tensor, k: int, best: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k, dim=-1, sorted=False)`` of (n, V) rows, in three cheap stages.

    The k-th largest of the group maxima is a lower bound of the k-th largest entry (k groups
    reach it, each with its max), so every top-k entry lies in one of the k groups with the
    largest maxima: rank the ``V / 64`` group maxima (``best``, from ``_group_maxima``), keep
    those ``64 k`` candidates (plus the ``V mod 64`` columns in no group), then the same again
    with subgroups of 8 candidates, and take the top-k of the last ``8 k`` (plus fewer than 8 in
    no subgroup). On one CPU thread at V = 49,152, k = 64 this takes ~1.0 ms per 21 rows against
    2.8 for ``torch.topk`` over all V and 1.5 for the two stages before session 10;
    ``torch.topk`` itself is used when the groups are too few to gain. Ties may keep another of
    equal values than ``torch.topk`` would.
    """
    n, vocab = x.shape
    width = vocab // _GROUP
    if width < 8 * k:
        return torch.topk(x, k, dim=-1, sorted=False)
    if best is None:
        best = _group_maxima(x)
        assert best is not None  # width >= 8 k >= 8
    body = width * _GROUP
    chosen = torch.topk(best, k, dim=-1, sorted=False).indices  # (n, k) groups
    cols = (chosen.unsqueeze(-1) + torch.arange(0, body, width, device=x.device)).reshape(n, k * _GROUP)
    cols = _with_rest(cols, body, vocab)  # (n, c) candidate columns
    values = x.gather(1, cols)  # (n, c)
    stride = values.shape[1] // _SUBGROUP
    whole = stride * _SUBGROUP
    # strided again (subgroup j = candidates j, j + stride, ...): a vertical max, ~10x cheaper than
    # a max over 8 adjacent entries
    sub = values[:, :whole].view(n, _SUBGROUP, stride).amax(dim=1)  # (n, c // 8)
    picked = torch.topk(sub, k, dim=-1, sorted=False).indices  # (n, k) subgroups
    at = (picked.unsqueeze(-1) + torch.arange(0, whole, stride, device=x.device)).reshape(n, k * _SUBGROUP)
    at = _with_rest(at, whole, values.shape[1])  # (n, c') positions among the candidates
    cols, values = cols.gather(1, at), values.gather(1, at)
    top, where = torch.topk(values, k, dim=-1, sorted=False)  # (n, k)
    return top, cols.gather(1, where)


def _with_rest(cols: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """(n, c) int64 columns plus the columns ``start..stop`` in no group, which are always candidates."""
    if start >= stop:
        return cols
    rest = torch.arange(start, stop, device=cols.device).expand(cols.shape[0], stop - start)
    return torch.cat([cols, rest], dim=1)


def distribution_stats(
    logits: torch.Tensor,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy and top-1 probability of the full teacher distribution, per position.

    The distribution is the one ``topk_targets`` stores: ``softmax(logits[..., :vocab_size] /
    temperature)`` in float32.

    Args:
        logits: (B, T, V_padded) raw teacher logits, any float dtype.
        temperature: Softmax temperature, > 0.
        vocab_size: Real vocabulary size V; ``None`` means the full logits width.

    Returns:
        ``(entropy, top1)``, each (B, T) float32: ``-sum(p log p)`` in nats and ``max(p)``.

    Raises:
        ValueError: Bad shape, ``vocab_size`` or ``temperature``.
    """
    real = _real_vocab_logits(logits, vocab_size)  # (B, T, V)
    _check_temperature(temperature)
    batch, positions, vocab = real.shape
    flat = real.reshape(batch * positions, vocab)  # (N, V)
    entropy = torch.empty(batch * positions, dtype=torch.float32, device=real.device)  # (N,)
    top1 = torch.empty(batch * positions, dtype=torch.float32, device=real.device)  # (N,)
    for rows in _row_blocks(flat.shape[0], vocab, real.device):
        block = flat[rows].to(torch.float32)  # (n, V)
        if temperature != 1.0:
            block = block / temperature
        logp = torch.log_softmax(block, dim=-1)  # (n, V)
        top1[rows] = logp.amax(dim=-1).exp_()
        entropy[rows] = torch.linalg.vecdot(logp.exp(), logp).neg_()
    return entropy.reshape(batch, positions), top1.reshape(batch, positions)


def sample_targets(
    logits: torch.Tensor,
    n_draws: int,
    temperature: float,
    generator: torch.Generator,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled sparse targets: ``n_draws`` i.i.d. tokens per row, stored as unique tokens + counts.

    ``count / n_draws`` is an unbiased estimate of ``softmax(logits / temperature)`` (random
    sampling KD). Draws use ``torch.multinomial`` with replacement, so the result is a pure
    function of the logits and the generator state. Duplicates are merged without a Python loop:
    sort each row, mark where the value changes, and scatter-add ones into the group slots.

    Args:
        logits: (B, T, V_padded) raw teacher logits, any float dtype.
        n_draws: Draws per row, >= 1.
        temperature: Softmax temperature, > 0.
        generator: Source of randomness; must live on ``logits.device``.
        vocab_size: Real vocabulary size V; ``None`` means the full logits width.

    Returns:
        ``(indices, counts)``, each (B, T, n_draws). Per row the first ``u`` slots hold the ``u``
        distinct drawn tokens in ascending order (int64) and their counts (int32, > 0); the
        remaining slots have count 0 and repeat the last drawn token, so every index row is
        non-decreasing. Counts sum to ``n_draws`` per row.

    Raises:
        ValueError: Bad shape, ``n_draws``, ``vocab_size`` or ``temperature``; torch raises if a
            row contains NaN/inf (run ``check_finite`` first).
    """
    real = _real_vocab_logits(logits, vocab_size)  # (B, T, V)
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    _check_temperature(temperature)
    batch, positions, vocab = real.shape
    flat = real.reshape(-1, vocab)  # (N, V), a view when the logits are contiguous
    draws = torch.empty(flat.shape[0], n_draws, dtype=torch.int64, device=real.device)  # (N, n)
    for rows in _row_blocks(flat.shape[0], vocab, real.device):  # float32 copy of one block at a time
        probs = torch.softmax(flat[rows].to(torch.float32) / temperature, dim=-1)  # (n_rows, V)
        draws[rows] = torch.multinomial(probs, n_draws, replacement=True, generator=generator)
    draws, _ = torch.sort(draws, dim=-1)  # (N, n)
    is_new = torch.ones_like(draws, dtype=torch.bool)  # (N, n)
    is_new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    group = torch.cumsum(is_new, dim=-1) - 1  # (N, n) slot of each draw's token
    counts = torch.zeros_like(draws, dtype=torch.int32)
    counts.scatter_add_(-1, group, torch.ones_like(counts))  # (N, n)
    # Every draw in a group has the same token, so duplicate writes agree.
    indices = torch.zeros_like(draws).scatter_(-1, group, draws)  # (N, n)
    last = torch.gather(indices, -1, group[:, -1:])  # (N, 1) largest drawn token
    indices = torch.where(counts > 0, indices, last)
    shape = (batch, positions, n_draws)
    return indices.reshape(shape), counts.reshape(shape)


def nonfinite_samples(
    logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Which samples have NaN or inf among the logits that count.

    Only the real vocabulary ``logits[..., :vocab_size]`` counts (a padded LM head's extra
    columns take no probability mass, so NaN there is harmless), and only the positions where
    ``mask`` is 1. Reduced on the device, one row sum per block (see the module docstring).

    Args:
        logits: (B, T, V_padded) or (B, V_padded) teacher logits.
        mask: Optional (B, T) attention mask; positions where it is 0 (padding) are ignored.
        vocab_size: Real vocabulary size; ``None`` means the full width.

    Returns:
        (B,) bool on the logits' device, True for a sample with a non-finite logit.

    Raises:
        ValueError: ``mask`` does not match the logits.
    """
    _check_mask(logits, mask)
    width = logits.shape[-1]
    vocab = width if vocab_size is None else min(vocab_size, width)
    flat = logits.reshape(-1, width)[:, :vocab]  # (B T, V) or (B, V), a view
    finite = torch.empty(flat.shape[0], dtype=torch.bool, device=logits.device)  # one per row
    for block in _row_blocks(flat.shape[0], vocab, logits.device):
        # A finite row sum implies finite entries (inf and NaN propagate): one read, no temporaries.
        finite[block] = torch.isfinite(flat[block].sum(dim=-1, dtype=torch.float32))
    return _bad_samples(flat, finite, logits.shape, mask)


def _check_mask(logits: torch.Tensor, mask: torch.Tensor | None) -> None:
    if mask is not None and (logits.ndim != 3 or mask.shape != logits.shape[:2]):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not match logits {tuple(logits.shape)}; "
            "expected (B, T) for (B, T, V) logits"
        )


def _bad_samples(flat: torch.Tensor, finite: torch.Tensor, shape: torch.Size, mask: torch.Tensor | None
                 ) -> torch.Tensor:
    """(B,) bool: samples with a non-finite logit at a position `mask` keeps.

    `finite` (N,) is a cheap per-row test that may only err towards False (a float32 sum, an
    entropy or logits / T can overflow on finite logits); those rows of `flat` (N, V) are re-checked
    exactly, in place in `finite`.
    """
    suspect = (~finite).nonzero().flatten()
    if suspect.numel():  # exact re-check
        finite[suspect] = torch.isfinite(flat[suspect]).all(dim=-1)
    finite = finite.reshape(shape[:-1])  # (B, T) or (B,)
    if mask is not None:
        finite = finite | ~mask.to(finite.device).bool()
    return ~finite.reshape(shape[0], -1).all(dim=1)  # (B,)


NONFINITE_FIX = (
    "this usually means fp16 overflow (re-run with --dtype bf16 or --dtype fp32 plus --overwrite: the dtype "
    "is a stored setting, so the teacher is recomputed) or broken inputs for those samples"
)


def check_finite(
    logits: torch.Tensor,
    sample_ids: Sequence[int] | torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> None:
    """Raise if any sample's logits contain NaN or inf (see ``nonfinite_samples``).

    Args:
        logits: (B, T, V) or (B, V) teacher logits.
        sample_ids: (B,) dataset ids of the samples in the batch, used in the message.
        mask: Optional (B, T) attention mask; positions where it is 0 (padding) are ignored.
        vocab_size: Real vocabulary size; columns past it are ignored.

    Raises:
        NonFiniteLogitsError: Naming every sample id whose rows contain NaN/inf.
        ValueError: ``sample_ids`` does not have one id per sample.
    """
    if len(sample_ids) != logits.shape[0]:
        raise ValueError(
            f"sample_ids has {len(sample_ids)} ids for a batch of {logits.shape[0]} samples"
        )
    bad = nonfinite_samples(logits, mask=mask, vocab_size=vocab_size)  # (B,)
    if not bool(bad.any()):
        return
    ids = [int(sample_ids[i]) for i in bad.nonzero().flatten().tolist()]
    raise NonFiniteLogitsError(f"the teacher produced NaN/inf logits for sample ids {ids}; {NONFINITE_FIX}")


def pool_features(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    how: Literal["none", "mean"],
) -> torch.Tensor:
    """Reduce one layer's hidden states to the features that get stored.

    Args:
        hidden: (B, T, D) hidden states of one layer.
        mask: (B, T) attention mask, 1 for real tokens and 0 for padding.
        how: ``"none"`` keeps every position; ``"mean"`` averages over the real tokens.

    Returns:
        ``"none"``: ``hidden`` unchanged, (B, T, D). ``"mean"``: (B, D) float32 masked mean; a
        sample with no real tokens gets zeros.

    Raises:
        ValueError: Unknown ``how`` or mismatched shapes.
    """
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and mask {tuple(mask.shape)} must be (B, T, D) "
            "and (B, T)"
        )
    if how == "none":
        return hidden
    if how == "mean":
        weights = mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
        total = (hidden.to(torch.float32) * weights).sum(dim=1)  # (B, D)
        return total / weights.sum(dim=1).clamp_min(1.0)  # (B, D)
    raise ValueError(f"feature pooling {how!r} is not supported; expected 'none' or 'mean'")


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantisation: ``x ~= q * scale[..., None]``.

    ``scale = max|x| / 127`` per row, so the row's largest magnitude maps to +-127 and every
    element is off by at most ``scale / 2`` after ``dequantize_int8_rows``. All-zero rows get
    ``scale = 0`` and ``q = 0``. ``x`` must be finite.

    Args:
        x: (..., D) floating tensor.

    Returns:
        ``(q, scale)``: q (..., D) int8 in [-127, 127], scale (...) float32.
    """
    x32 = x.to(torch.float32)  # (..., D)
    scale = x32.abs().amax(dim=-1) / 127.0  # (...)
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))  # (...)
    q = torch.round(x32 * inverse.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)  # (..., D)
    return q, scale


def dequantize_int8_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Invert ``quantize_int8_rows``.

    Args:
        q: (..., D) int8.
        scale: (...) float32 per-row scales.

    Returns:
        (..., D) float32.
    """
    return q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)
