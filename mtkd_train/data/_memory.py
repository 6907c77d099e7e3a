"""`InMemoryTargets`: every batch of one pass held in memory, for streaming-overhead benchmarks.

Iterating it costs no I/O or decoding, so a training loop timed over it and over the
`CachedDistillDataset` it was built from measures what streaming costs. Memory is the whole
pass; use it on small caches only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from mtkd_train.data._dataset import CachedDistillDataset
from mtkd_train.data._errors import StreamConfigError

__all__ = ["InMemoryTargets"]

Batch = dict[str, Any]


class InMemoryTargets(Dataset):  # type: ignore[type-arg]
    """A list of ready batches; a map-style dataset (`DataLoader(m, batch_size=None)`) and a list.

    Args:
        batches: The batches, in order.
    """

    def __init__(self, batches: Sequence[Batch]):
        self.batches = list(batches)

    @classmethod
    def from_stream(
        cls, dataset: CachedDistillDataset, max_batches: int | None = None
    ) -> InMemoryTargets:
        """Materialise the batches `dataset` yields from its current state, in this process.

        Args:
            dataset: A finite stream (`epochs` set), or any stream with `max_batches`.
            max_batches: Stop after this many batches.

        Raises:
            StreamConfigError: the stream is endless and `max_batches` is None.
        """
        if dataset.epochs is None and max_batches is None:
            raise StreamConfigError(
                "the stream is endless (epochs=None); pass epochs=1 to the dataset or "
                "max_batches to InMemoryTargets.from_stream"
            )
        out: list[Batch] = []
        stream = iter(dataset)
        try:
            for batch in stream:
                if max_batches is not None and len(out) >= max_batches:
                    break
                out.append(batch)
        finally:
            stream.close()
        return cls(out)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> Batch:
        return self.batches[index]

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    @property
    def nbytes(self) -> int:
        """Bytes held by all tensors of all batches."""
        return sum(_nbytes(b) for b in self.batches)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0
