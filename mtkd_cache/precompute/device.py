"""Device and dtype resolution for the teacher pass, shared by the CPU and the GPU path.

The precompute command takes ``--device`` and ``--dtype`` as strings; these functions turn them into
``torch.device`` / ``torch.dtype`` once, at the edge, so that everything below works with real torch
objects. ``autocast_context`` gives the one context manager the teacher forward runs under on every
device: ``torch.autocast`` for half precision, a no-op for float32, so callers never branch on the
device type themselves.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import torch

from mtkd_cache.errors import DeviceError, DtypeError

__all__ = [
    "DeviceError",
    "DtypeError",
    "autocast_context",
    "gpu_group",
    "group_max_memory",
    "resolve_device",
    "resolve_dtype",
]

_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
_HALF_DTYPES = (torch.bfloat16, torch.float16)
_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def resolve_device(spec: str) -> torch.device:
    """Turn a device string into a ``torch.device`` that exists on this machine.

    Args:
        spec: ``"auto"`` (first CUDA device if any, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``.

    Returns:
        The resolved device. ``"cuda"`` resolves to ``cuda:0`` so the result is unambiguous.

    Raises:
        DeviceError: ``spec`` is not one of the forms above, CUDA was asked for but is not
            available, or the CUDA index is out of range.
    """
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    match = _DEVICE_RE.match(text)
    if match is None:
        raise DeviceError(
            f"device {spec!r} is not understood; expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
        )
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise DeviceError(f"device {spec!r}: the CPU has no index; pass --device cpu")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {spec!r} was requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}); pass --device cpu or --device auto"
        )
    ordinal = int(index) if index is not None else 0
    count = torch.cuda.device_count()
    if ordinal >= count:
        raise DeviceError(
            f"device {spec!r} was requested but this machine has {count} CUDA device(s) "
            f"(cuda:0..cuda:{count - 1}); pick an index below {count}"
        )
    return torch.device("cuda", ordinal)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """Turn a dtype string into the ``torch.dtype`` the teacher is loaded and run in.

    Args:
        spec: ``"auto"``, ``"bf16"``, ``"fp16"`` or ``"fp32"`` (long names such as ``"bfloat16"``
            are accepted too).
        device: The device the teacher runs on; ``"auto"`` depends on it.

    Returns:
        For ``"auto"``: bfloat16 on a CUDA device that supports it, float16 on older CUDA
        devices, float32 anywhere else. Otherwise the named dtype.

    Raises:
        DtypeError: ``spec`` names no supported dtype.
    """
    text = spec.strip().lower()
    if text == "auto":
        if device.type != "cuda":
            return torch.float32
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if text not in _DTYPES:
        raise DtypeError(
            f"dtype {spec!r} is not supported; expected one of 'auto', 'bf16', 'fp16', 'fp32'"
        )
    return _DTYPES[text]


def autocast_context(
    device: torch.device, dtype: torch.dtype
) -> contextlib.AbstractContextManager[Any]:
    """The context manager the teacher forward runs under.

    Half precision (bf16/fp16) runs under ``torch.autocast`` on the teacher's device, so a module
    that keeps some weights in float32 (norms, custom factories) still computes its matmuls in the
    requested precision. float32 gets a ``contextlib.nullcontext``: autocast would be a no-op and
    costs a dispatch per op.

    Args:
        device: The teacher's device.
        dtype: The compute dtype from ``resolve_dtype``.

    Returns:
        A context manager; enter it around the forward pass.
    """
    if dtype in _HALF_DTYPES:
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def gpu_group(local_rank: int, local_world_size: int, device_count: int) -> list[int]:
    """The GPUs one rank owns when a teacher spans several (`--device-map`): an equal, disjoint block.

    With 8 GPUs and ``torchrun --nproc_per_node 2`` rank 0 owns GPUs 0-3 and rank 1 owns 4-7.

    Raises:
        DeviceError: fewer GPUs than ranks on this node.
    """
    if device_count < local_world_size:
        raise DeviceError(
            f"--device-map: {local_world_size} ranks on this node but only {device_count} GPU(s); "
            f"start at most {device_count} processes per node (--nproc_per_node)")
    per_rank = device_count // local_world_size
    return list(range(local_rank * per_rank, (local_rank + 1) * per_rank))


def group_max_memory(group: list[int], cpu: int | str | None = None) -> dict[int | str, int | str]:
    """accelerate's ``max_memory`` confining a teacher to `group`: each GPU's free memory now
    (minus 10% for activations and the O(V) reductions), plus `cpu` for offload if given."""
    budget: dict[int | str, int | str] = {}
    for index in group:
        free, _total = torch.cuda.mem_get_info(index)
        budget[index] = int(free * 0.9)
    if cpu is not None:
        budget["cpu"] = cpu
    return budget
