"""A batch handed from a DataLoader worker to the training process as one buffer (pure tensor code).

A worker's batch reaches the training process through shared memory, one segment and one file
descriptor per tensor, and receiving each costs the training process ~0.3 ms (a four-teacher
batch holds 9-21 tensors: several milliseconds of a step that may take 65). :class:`Handover`
wraps a batch in the worker; pickling it copies every tensor into one aligned byte buffer, so one
tensor crosses; unpickling in the training process rebuilds the same nested dict of tensors as
zero-copy views of that buffer. Nothing else changes: the receiver gets a plain batch dict, the
values bit for bit. Only used inside DataLoader workers (`BatchStream` wraps the batches there).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Handover", "unpack"]

_ALIGN = 64
"""Byte alignment of every tensor in the buffer (a cache line; a multiple of every dtype's size)."""


def _leaves(tree: Any, out: list[torch.Tensor]) -> Any:
    """`tree` with every tensor replaced by its index in `out` (nested dicts; other values kept)."""
    if isinstance(tree, torch.Tensor):
        out.append(tree)
        return _Slot(len(out) - 1)
    if isinstance(tree, dict):
        return {k: _leaves(v, out) for k, v in tree.items()}
    return tree


class _Slot(int):
    """The place of a tensor in the buffer's table (an int subclass: it pickles as itself)."""


_Table = list[tuple[int, int, torch.dtype, tuple[int, ...]]]
"""Per tensor: byte offset in the buffer, byte size, dtype, shape."""


def _pack(batch: dict[str, Any]) -> tuple[torch.Tensor, Any, _Table]:
    found: list[torch.Tensor] = []
    skeleton = _leaves(batch, found)
    table: _Table = []
    offset = 0
    for t in found:
        n = t.numel() * t.element_size()
        table.append((offset, n, t.dtype, tuple(t.shape)))
        offset += -(-n // _ALIGN) * _ALIGN
    buf = torch.empty(offset, dtype=torch.uint8)
    for t, (at, n, dtype, shape) in zip(found, table, strict=True):
        if n:
            buf[at:at + n].view(dtype).view(shape).copy_(t)
    return buf, skeleton, table


def unpack(buf: torch.Tensor, skeleton: Any, table: _Table) -> Any:
    """The batch :class:`Handover` packed: every tensor a view of `buf` (called by unpickling)."""
    def fill(tree: Any) -> Any:
        if isinstance(tree, _Slot):
            at, n, dtype, shape = table[tree]
            return buf[at:at + n].view(dtype).view(shape)
        if isinstance(tree, dict):
            return {k: fill(v) for k, v in tree.items()}
        return tree

    return fill(skeleton)


class Handover:
    """A batch that pickles as one byte buffer and unpickles as the batch itself (see the module docstring)."""

    __slots__ = ("batch",)

    def __init__(self, batch: dict[str, Any]):
        self.batch = batch

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return unpack, _pack(self.batch)
