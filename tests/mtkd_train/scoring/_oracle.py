"""Factory teachers with a known answer: the data's labels are drawn from ``softmax(TABLE[context])``.

``oracle(mix=0.0)`` is exactly the data distribution; ``mix > 0`` blends its logits with another
random table (``seed``), so the teacher is worse by a known direction.
"""

from __future__ import annotations

import torch

CONTEXTS, CLASSES = 16, 5


def table(seed: int) -> torch.Tensor:
    """``(CONTEXTS, CLASSES)`` logits."""
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(CONTEXTS, CLASSES, generator=g)


class _Lookup(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.num_classes = CLASSES
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, 1) context ids -> logits (B, CLASSES)."""
        return self.logits[input_ids[:, 0]]


def oracle(mix: float = 0.0, seed: int = 1) -> torch.nn.Module:
    """A teacher at ``(1 - mix) * TABLE + mix * other_table(seed)``."""
    return _Lookup((1 - mix) * table(0) + mix * table(seed))
