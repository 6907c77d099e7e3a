"""Length-grouped batching for the teacher pass.

Samples are sorted by length, longest first, and cut into consecutive batches. Neighbours in that
order have similar lengths, so right padding to the batch maximum wastes little compute; the
longest batch comes first, so a batch that does not fit in memory fails in the first seconds of a
run rather than hours in. Ties are broken by index, which makes the plan a pure function of the
lengths. Cost: one O(N log N) sort and one linear pass.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["LOGITS_BUDGET_BYTES", "length_grouped_batches", "logits_token_budget", "pad_batch"]

LOGITS_BUDGET_BYTES = int(float(os.environ.get("MTKD_LOGITS_BUDGET_MB", "2048")) * 2**20)
"""Most bytes one batch's full (B, L, V) logits may take (override: MTKD_LOGITS_BUDGET_MB)."""


def logits_token_budget(max_tokens: int | None, vocab: int, *, full_logits: bool, dtype_bytes: int,
                        budget_bytes: int | None = None) -> int | None:
    """The padded-token budget of a batch once the vocabulary is counted.

    A teacher that builds its full logits holds B·L·V values of `dtype_bytes` at once, so a batch
    gets at most `budget_bytes / (V · dtype_bytes)` padded tokens (at V = 262k in bf16: 4,096 tokens
    per 2 GiB), and `--max-tokens` can only lower that. A causal LM whose head runs per row block
    (`headblocks`) never holds them: its budget is `max_tokens` unchanged.

    Args:
        max_tokens: The user's budget (`--max-tokens`), or None.
        vocab: Logits width V (padded head).
        full_logits: Whether the teacher builds (B, L, V) logits.
        dtype_bytes: Bytes per logit (2 in bf16/fp16, 4 in fp32).
        budget_bytes: Most bytes of logits per batch; default `LOGITS_BUDGET_BYTES`.

    Returns:
        Padded tokens per batch (>= 1), or None for no budget.
    """
    if not full_logits:
        return max_tokens
    budget = LOGITS_BUDGET_BYTES if budget_bytes is None else budget_bytes
    cap = max(1, budget // max(1, vocab * dtype_bytes))
    return cap if max_tokens is None else min(max_tokens, cap)


def length_grouped_batches(
    lengths: Sequence[int], max_tokens: int | None, batch_size: int
) -> list[list[int]]:
    """Plan batches of sample indices grouped by similar length.

    A batch holds at most ``batch_size`` samples and, when ``max_tokens`` is set, at most
    ``max_tokens`` padded tokens (samples x longest sample). A single sample longer than
    ``max_tokens`` gets a batch of its own rather than being dropped.

    Args:
        lengths: (N,) token count of each sample.
        max_tokens: Budget of padded tokens per batch, or ``None`` for no budget.
        batch_size: Maximum samples per batch, >= 1.

    Returns:
        Batches of indices into ``lengths``, longest batch first. Every index appears exactly once;
        within a batch indices run from longest to shortest sample.

    Raises:
        ValueError: ``batch_size`` < 1, ``max_tokens`` < 1 or a negative length.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)  # (N,)
    if lens.size and lens.min() < 0:
        raise ValueError(f"lengths must be >= 0, sample {int(lens.argmin())} has {lens.min()}")
    # lexsort's last key is primary: length descending, then index ascending.
    order = np.lexsort((np.arange(lens.size), -lens))  # (N,)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order.tolist():
        length = int(lens[index])
        width = max(longest, length)
        too_many = len(current) >= batch_size
        too_wide = max_tokens is not None and (len(current) + 1) * width > max_tokens
        if current and (too_many or too_wide):
            batches.append(current)
            current, width = [], length
        current.append(index)
        longest = width
    if current:
        batches.append(current)
    return batches


def pad_batch(token_lists: Sequence[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token sequences into model inputs.

    Right padding keeps each sample's real tokens at positions 0..len-1, so causal-LM logits at a
    real position never depend on padding and row ``j`` means the same thing as unpadded.

    Args:
        token_lists: B one-dimensional integer arrays, each with at least one token.
        pad_id: Token id written into padded positions.

    Returns:
        ``{"input_ids": (B, L) int64, "attention_mask": (B, L) int64}`` with ``L`` the longest
        sequence; the mask is 1 on real tokens and 0 on padding.

    Raises:
        ValueError: Empty batch, a sequence that is empty or not one-dimensional.
    """
    if len(token_lists) == 0:
        raise ValueError("pad_batch needs at least one sequence, got an empty batch")
    arrays = [np.asarray(tokens) for tokens in token_lists]
    for position, tokens in enumerate(arrays):
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError(
                f"sequence {position} of the batch has shape {tokens.shape}; each sample must be "
                "a non-empty 1-D token array (drop empty samples before the teacher pass)"
            )
    width = max(tokens.size for tokens in arrays)
    input_ids = np.full((len(arrays), width), pad_id, dtype=np.int64)  # (B, L)
    attention_mask = np.zeros((len(arrays), width), dtype=np.int64)  # (B, L)
    for row, tokens in enumerate(arrays):
        input_ids[row, : tokens.size] = tokens
        attention_mask[row, : tokens.size] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
    }
