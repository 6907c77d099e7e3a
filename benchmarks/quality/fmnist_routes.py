"""The fixed routing tables of the Fashion-MNIST experiment's ``routing`` runs (see `fmnist_experiment`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from examples.fmnist.models import read_teacher_config
from mtkd_cache import TopkBlock, open_cache

__all__ = ["routing_options"]

NUM_CLASSES = 10


def _predictions(cache: Path, teachers: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each teacher's argmax class per sample, read from the cache, and the labels (N,)."""
    reader = open_cache(cache)
    preds: dict[str, list[np.ndarray]] = {t: [] for t in teachers}
    labels = []
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c, teachers=list(teachers))
        assert data.labels is not None, f"{cache} has no labels"
        labels.append(data.labels)
        for t in teachers:
            block = data.targets[t]
            assert isinstance(block, TopkBlock), f"teacher {t} in {cache} is not a top-k teacher"
            preds[t].append(np.take_along_axis(block.indices, block.logp.argmax(-1)[:, None], 1)[:, 0])
    return {t: np.concatenate(p) for t, p in preds.items()}, np.concatenate(labels)


def routing_options(regime: str, names: Sequence[str], teacher_dirs: Mapping[str, Path], val_cache: Path,
                    domains: Sequence[str]) -> dict[str, Any]:
    """`aggregate_kwargs` of the ``routing`` run over the teachers `names` for the domains present (``class<c>``).

    Specialists: domain c -> uniform weights over the specialists trained on class c. Generalists:
    domain c -> the teacher with the best ``val`` recall on class c.
    """
    present = sorted(set(domains))
    if regime == "specialists":
        covers = {t: set(read_teacher_config(str(teacher_dirs[t])).classes) for t in names}
        weights = {}
        for d in present:
            c = int(d.removeprefix("class"))
            weights[d] = [1.0 if c in covers[t] else 0.0 for t in names]
        return {"domain_weights": weights}
    preds, y = _predictions(val_cache, names)
    recall = {t: [float((preds[t][y == c] == c).mean()) for c in range(NUM_CLASSES)] for t in names}
    return {"domain_to_teacher": {d: max(names, key=lambda t: recall[t][int(d.removeprefix("class"))])
                                  for d in present}}
