"""Sentence-embedding pooling, as the model was trained: the modes of sentence-transformers.

A sentence-transformers folder names its pooling in ``modules.json`` -> ``1_Pooling/config.json``
(``pooling_mode_cls_token``, ``..._mean_tokens``, ``..._max_tokens``, ``..._mean_sqrt_len_tokens``,
``..._weightedmean_tokens``, ``..._lasttoken``) and an L2 normalisation by a ``Normalize`` module.
:func:`read_pooling` reads them (JSON only; nothing from the folder is imported or executed) and
:func:`pool` applies them exactly as sentence-transformers' ``Pooling`` does: the enabled modes
concatenated in the order cls, max, mean, mean_sqrt_len, weightedmean, lasttoken. Pure tensor
code, ``O(B L D)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mtkd_cache.format.meta import POOL_MODES

__all__ = ["POOLING_MODES", "PoolingSpec", "pool", "pool_hidden", "read_pooling", "resolve_pool"]

POOLING_MODES = POOL_MODES
_ST_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
            "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
            "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}


@dataclass(frozen=True)
class PoolingSpec:
    """How hidden states ``(B, L, D)`` become one vector per sample.

    Attributes:
        modes: Enabled modes, a non-empty subset of :data:`POOLING_MODES`, kept in that order.
        normalize: L2-normalise the pooled vector.
    """

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in POOLING_MODES]
        if not self.modes or bad:
            raise ValueError(f"pooling modes {list(self.modes)} must be a non-empty subset of {list(POOLING_MODES)}")
        object.__setattr__(self, "modes", tuple(m for m in POOLING_MODES if m in self.modes))

    @classmethod
    def parse(cls, value: str) -> PoolingSpec:
        """``"mean"``, ``"cls"``, ``"mean+max"``, ``"mean,normalize"`` -> spec."""
        parts = [p for p in value.replace(",", "+").split("+") if p]
        return cls(tuple(p for p in parts if p != "normalize"), "normalize" in parts)

    def __str__(self) -> str:
        return "+".join(self.modes + (("normalize",) if self.normalize else ()))


def read_pooling(folder: str | Path) -> PoolingSpec | None:
    """The pooling a sentence-transformers folder declares, or ``None`` if it declares none.

    Raises:
        ValueError: ``modules.json`` names a Pooling module whose config is missing or enables no mode.
    """
    root = Path(folder)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    pooling = [m for m in modules if str(m.get("type", "")).endswith("Pooling")]
    if not pooling:
        return None
    cfg_file = root / pooling[0].get("path", "") / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{modules_file} names a Pooling module but {cfg_file} is missing; "
                         "restore the folder or pass the pooling explicitly (--pool mean|cls|...)")
    cfg = json.loads(cfg_file.read_text())
    modes = tuple(m for m, key in _ST_KEYS.items() if cfg.get(key))
    if not modes:
        raise ValueError(f"{cfg_file} enables no pooling mode; pass the pooling explicitly (--pool mean|cls|...)")
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    return PoolingSpec(modes, normalize)


def pool(hidden: torch.Tensor, mask: torch.Tensor, spec: PoolingSpec) -> torch.Tensor:
    """Pool hidden states.

    Args:
        hidden: ``(B, L, D)``.
        mask: ``(B, L)`` 1 for real tokens (left or right padding).
        spec: The pooling.

    Returns:
        ``(B, D * len(spec.modes))`` float32.
    """
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and mask {tuple(mask.shape)} must be (B, L, D) and (B, L)")
    h = hidden.to(torch.float32)
    m = mask.to(torch.float32).unsqueeze(-1)  # (B, L, 1)
    count = m.sum(1).clamp_min(1e-9)  # (B, 1)
    out = []
    for mode in spec.modes:
        if mode == "cls":
            out.append(h[:, 0])
        elif mode == "max":
            out.append(torch.where(m > 0, h, torch.full_like(h, -1e9)).max(1).values)
        elif mode == "mean":
            out.append((h * m).sum(1) / count)
        elif mode == "mean_sqrt_len":
            out.append((h * m).sum(1) / count.sqrt())
        elif mode == "weightedmean":
            w = m * torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device).view(1, -1, 1)
            out.append((h * w).sum(1) / w.sum(1).clamp_min(1e-9))
        else:  # lasttoken: the last real position of each row
            pos = (m.squeeze(-1) * torch.arange(h.shape[1], device=h.device)).argmax(1)  # (B,)
            out.append(h[torch.arange(h.shape[0], device=h.device), pos])
    v = torch.cat(out, dim=-1)
    return torch.nn.functional.normalize(v, p=2, dim=1) if spec.normalize else v


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """A feature as stored: ``hidden`` unchanged for ``"none"``, else :func:`pool` with the parsed spec.

    Args:
        hidden: ``(B, L, D)``; a ``(B, D)`` tensor (already one vector per sample) is returned as is.
        mask: ``(B, L)``, or None for all positions real.
        how: ``"none"`` or a pooling string such as ``"mean"``, ``"cls"``, ``"mean+normalize"``.
    """
    if how == "none" or hidden.ndim == 2:
        return hidden
    m = mask if mask is not None else torch.ones(hidden.shape[:2], device=hidden.device)
    return pool(hidden, m.to(hidden.device), PoolingSpec.parse(how))


def resolve_pool(value: str, folder: str | None, where: str) -> str:
    """``--pool``: ``"auto"`` becomes the pooling the model folder declares (``1_Pooling/config.json``).

    Args:
        value: ``"none"``, ``"auto"`` or a pooling string (``"mean"``, ``"cls"``, ``"mean+normalize"``).
        folder: The teacher's model folder (None for a factory).
        where: The teacher, for error messages.

    Raises:
        ValueError: ``auto`` but the folder declares no pooling (or there is no folder).
    """
    if value != "auto":
        return value if value == "none" else str(PoolingSpec.parse(value))
    spec = read_pooling(folder) if folder is not None and Path(folder).is_dir() else None
    if spec is None:
        raise ValueError(f"--pool auto: {where} has no sentence-transformers pooling (modules.json + "
                         f"1_Pooling/config.json) in its folder; pass the pooling, e.g. --pool mean or --pool cls")
    return str(spec)
