"""Checkpoints: one file per save, written atomically, loaded without unpickling arbitrary objects.

A checkpoint holds tensors and plain containers only (`torch.load(weights_only=True)`), plus what
it was trained on: the configuration fingerprint and each teacher's identity (a hash of its
teacher.json settings: model, weights hash, target spec, dataset fingerprint). Resuming with a
configuration that changes what a step computes, or after a teacher was re-cached with other
settings, is refused with the teacher or key named.

A save writes `step_N.pt.tmp` inside the checkpoint folder and renames it to `step_N.pt` only once
complete, so a crash or a full disk never leaves a half-written file as the latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mtkd_cache import CacheReader
from mtkd_train.config import RUN_ONLY_KEYS, TrainConfig

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint", "teacher_identities"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unwritable or from another configuration or teacher."""


def teacher_identities(reader: CacheReader, teachers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """What pins each teacher's targets: its settings' hash plus the fields a message names.

    Args:
        reader: The training cache.
        teachers: Teacher names.

    Returns:
        Teacher name -> {"hash", "model", "weights_hash", "target", "dataset_fingerprint"}.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in teachers:
        meta = reader.teacher(name).meta
        settings = json.dumps(meta.settings(), sort_keys=True, default=str)
        out[name] = {"hash": hashlib.sha256(settings.encode()).hexdigest(), "model": meta.model,
                     "weights_hash": meta.weights_hash, "target": json.dumps(meta.target.to_dict(), sort_keys=True),
                     "dataset_fingerprint": meta.dataset_fingerprint}
    return out


def _open_for_write(path: Path) -> BinaryIO:
    return open(path, "wb")  # noqa: SIM115 - closed by the caller's `with`


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], cfg: TrainConfig) -> Path:
    """Write `folder/step_{step}.pt` atomically (temporary name in the same folder, then rename).

    Raises:
        CheckpointError: the file cannot be written (a full disk, no permission); the temporary
            file is removed and the previous checkpoint stays the latest.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    try:
        with _open_for_write(tmp) as f:
            torch.save({**state, "config_fingerprint": cfg.fingerprint(), "config": _config_json(cfg)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError("... unexpected pos ...")
        tmp.unlink(missing_ok=True)
        before = latest_checkpoint(folder)
        raise CheckpointError(
            f"checkpoint {path} could not be written ({type(e).__name__}: {str(e).splitlines()[0][:200]}); free "
            f"space on that disk or choose an --out with room, then --resume (the latest complete checkpoint is "
            f"{before.name if before else 'none'})") from e
    _prune(folder, cfg.keep_checkpoints)
    return path


def _prune(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (only `step_*.pt`, the files mtkd writes here)."""
    if keep > 0:
        for old in sorted(folder.glob("step_*.pt"))[:-keep]:
            old.unlink(missing_ok=True)


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint of the highest step in `folder` (temporary files are never returned)."""
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("step_*.pt"))
    return files[-1] if files else None


def load_checkpoint(path: Path, cfg: TrainConfig, teachers: Mapping[str, Mapping[str, Any]] | None = None
                    ) -> dict[str, Any]:
    """Read a checkpoint and check it was written by this configuration and these teachers.

    Args:
        path: The checkpoint file.
        cfg: The current configuration.
        teachers: The current teachers' identities (:func:`teacher_identities`); not checked if None.

    Raises:
        CheckpointError: unreadable, another configuration, or a teacher that changed.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for truncated/corrupt files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to resume "
                              f"from an earlier one") from e
    if state.get("config_fingerprint") != cfg.fingerprint():
        raise CheckpointError(
            f"checkpoint {path} was written with another configuration: {_differences(state.get('config'), cfg)}. "
            f"Resume with the same settings, or start a new run with another --out")
    if teachers is not None:
        _check_teachers(path, state.get("teachers"), teachers)
    return state


def _check_teachers(path: Path, saved: Any, current: Mapping[str, Mapping[str, Any]]) -> None:
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"checkpoint {path} does not record which teachers it was trained on (written by an "
                              f"older mtkd); start a new run with another --out")
    for name, now in current.items():
        was = saved.get(name)
        if was is None or was.get("hash") != now["hash"]:
            changed = "; ".join(f"{k} was {was.get(k)!r}, now {now[k]!r}" for k in now
                                if k != "hash" and was is not None and was.get(k) != now[k])
            raise CheckpointError(
                f"teacher {name!r} in the cache is not the one checkpoint {path.name} was trained on "
                f"({changed or 'its teacher.json settings differ'}); it was re-cached since. Start a new run with "
                f"another --out, or restore that teacher's cache")


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
