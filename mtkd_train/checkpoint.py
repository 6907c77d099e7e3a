"""Checkpoints: one file per save, written atomically, loaded without unpickling arbitrary objects.

A checkpoint holds tensors and plain containers only (`torch.load(weights_only=True)`), plus the
configuration fingerprint: resuming with a configuration that changes what a step computes is
refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mtkd_train.config import TrainConfig

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or from another configuration."""


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], cfg: TrainConfig) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save({**state, "config_fingerprint": cfg.fingerprint(), "config": cfg.to_dict().__repr__()}, tmp)
    os.replace(tmp, path)
    return path


def latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("step_*.pt"))
    return files[-1] if files else None


def load_checkpoint(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt files
        raise CheckpointError(f"checkpoint {path} cannot be read ({e}); delete it to resume from an earlier one") from e
    if state.get("config_fingerprint") != cfg.fingerprint():
        raise CheckpointError(
            f"checkpoint {path} was written with another configuration (fingerprint "
            f"{state.get('config_fingerprint')} vs {cfg.fingerprint()}); its config was {state.get('config')}. "
            f"Resume with the same settings, or start a new run with another --out")
    return state
