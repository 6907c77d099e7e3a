"""Factory teachers and students for the fault matrix (`--model fault_factories:lm`).

This folder is put on the children's PYTHONPATH. Every factory is seeded, so equal kwargs give
byte-identical weights. `FAULTS_FORWARD_DELAY` (seconds) slows each teacher forward pass down,
like a big teacher, so that a SIGKILL can land between chunk commits; it does not change outputs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Output:
    """HF-style output: `.logits` (B, L, W) and `.hidden_states`."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None


class FaultLM(torch.nn.Module):
    """Embedding -> tanh(linear) -> head of `width` columns, with optional NaN injection.

    `vocab_size` is the width it declares as real tokens; columns past it are padding.
    NaN goes to every position of samples whose first token is in `nan_first_tokens`, and to the
    padding columns with `nan_padding`.
    """

    def __init__(self, width: int, vocab: int, padded: int | None, hidden: int,
                 nan_first_tokens: Sequence[int], nan_padding: bool, scale: float = 1.0) -> None:
        super().__init__()
        self.vocab_size = vocab
        if padded is not None:
            self.padded_vocab_size = padded
        self.hidden_size = hidden
        self.num_layers = 1
        self.embed = torch.nn.Embedding(max(width, 64), hidden)
        self.layer = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, width)
        self.nan_first = list(nan_first_tokens)
        self.nan_padding = nan_padding
        self.scale = scale

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> Output:
        """input_ids (B, L) -> logits (B, L, W); hidden states (embeddings, layer) (B, L, D)."""
        delay = float(os.environ.get("FAULTS_FORWARD_DELAY", "0") or 0)
        if delay > 0:
            time.sleep(delay)
        embedded = self.embed(input_ids)  # (B, L, D)
        hidden = torch.tanh(self.layer(embedded))  # (B, L, D)
        logits = self.head(hidden) * self.scale  # (B, L, W)
        if self.nan_first:
            bad = torch.isin(input_ids[:, 0], torch.tensor(self.nan_first, device=input_ids.device))  # (B,)
            logits = torch.where(bad[:, None, None], torch.full_like(logits, float("nan")), logits)
        if self.nan_padding and logits.shape[-1] > self.vocab_size:
            logits = logits.clone()
            logits[..., self.vocab_size:] = float("nan")
        return Output(logits, (embedded, hidden) if output_hidden_states else None)


def lm(width: int = 40, vocab: int | None = None, padded: int | None = None, hidden: int = 16, seed: int = 0,
       nan_first_tokens: Sequence[int] = (), nan_padding: bool = False, scale: float = 1.0) -> FaultLM:
    """A seeded `FaultLM`; `vocab` defaults to `width` (no padding columns). `scale` multiplies the
    logits: another model with the same weights (the weights hash cannot tell them apart)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return FaultLM(width, width if vocab is None else vocab, padded, hidden, nan_first_tokens, nan_padding,
                       scale)
