"""Random-number state of a run: seeded per rank, saved and restored per rank.

Each rank seeds `seed + rank`, so dropout masks differ across ranks. A checkpoint stores every
rank's own state (gathered to rank 0, which writes the file); a resume gives each rank its own
state back. A rank the checkpoint has no state for (the world grew) is re-seeded from
`(seed + rank, step)`, so the run stays reproducible though it is not the interrupted stream. Only
the current CUDA device's generator is saved, so a process that sees fewer GPUs still resumes.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["gather_rng_states", "restore_rng", "rng_state", "seed_all"]


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's `random` and NumPy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generators as tensors and JSON strings (loadable with `weights_only=True`)."""
    return {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
            "numpy": json.dumps([x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()]),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.empty(0, dtype=torch.uint8)}


def gather_rng_states(device: torch.device, world: int) -> list[dict[str, Any]]:
    """Every rank's `rng_state`, in rank order (a collective: every rank must call it)."""
    own = rng_state(device)
    if world == 1:
        return [own]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, own)
    return [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in states]


def restore_rng(states: Any, rank: int, device: torch.device, *, seed: int, step: int) -> None:
    """Restore this rank's state from a checkpoint's per-rank list (or a single state of old runs)."""
    if isinstance(states, dict):  # a checkpoint from before per-rank states: rank 0's for rank 0 only
        states = [states]
    if rank >= len(states):
        seed_all((seed + rank) * 1_000_003 + step)
        return
    s = states[rank]
    torch.set_rng_state(s["torch"])
    random.setstate(_tuplify(json.loads(s["python"])))
    np_state = json.loads(s["numpy"])
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    cuda = s.get("cuda")
    if device.type == "cuda" and isinstance(cuda, torch.Tensor) and cuda.numel():
        torch.cuda.set_rng_state(cuda, device)


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
