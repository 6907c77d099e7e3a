"""Checkpoints: one file per save, written atomically, loaded without unpickling arbitrary objects.

A checkpoint holds tensors and plain containers only (`torch.load(weights_only=True)`), plus the
configuration fingerprint: resuming with a configuration that changes what a step computes is
refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mtkd_train.config import RUN_ONLY_KEYS, TrainConfig

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or from another configuration."""


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], cfg: TrainConfig) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save({**state, "config_fingerprint": cfg.fingerprint(), "config": _config_json(cfg)}, tmp)
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
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to resume from an earlier one") from e
    if state.get("config_fingerprint") != cfg.fingerprint():
        raise CheckpointError(
            f"checkpoint {path} was written with another configuration: {_differences(state.get('config'), cfg)}. "
            f"Resume with the same settings, or start a new run with another --out")
    return state


def _config_json(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def _differences(saved: Any, cfg: TrainConfig) -> str:
    """The keys that change the fingerprint, with the checkpoint's and the current value."""
    try:
        old = json.loads(saved)
    except (TypeError, json.JSONDecodeError):  # written before configs were stored as JSON
        return f"its config was {saved}"
    new = json.loads(_config_json(cfg))
    keys = [k for k in new if k not in RUN_ONLY_KEYS and old.get(k) != new[k]]
    return "; ".join(f"`{k}` was {old.get(k)!r}, now {new[k]!r}" for k in keys) or f"its config was {saved}"
