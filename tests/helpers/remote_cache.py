"""A tiny classifier cache built on any store URL, and its arrays read back (tests of remote stores)."""

from __future__ import annotations

from typing import Any

import numpy as np

from helpers import tiny_models
from mtkd_cache import RunConfig, open_cache, prepare_arrays, run_teacher

__all__ = ["FACTORY", "IDS", "LABELS", "build", "read_arrays"]

FACTORY = f"{tiny_models.__name__}:tiny_factory_classifier"
IDS = np.random.default_rng(0).integers(4, 64, size=(20, 6)).astype(np.int64)
LABELS = list(np.arange(20) % 4)


def build(url: str, storage_options: dict[str, Any] | None = None) -> None:
    prepare_arrays(url, {"input_ids": IDS}, labels=LABELS, chunk_samples=8, storage_options=storage_options)
    run_teacher(url, RunConfig(teacher="fac", model=FACTORY, top_k=2), factory_kwargs={"vocab_size": 64, "num_classes": 4},
                progress=False, storage_options=storage_options)


def read_arrays(url: str, storage_options: dict[str, Any] | None = None) -> list[np.ndarray]:
    reader = open_cache(url, storage_options=storage_options)
    out = []
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c, teachers=["fac"])
        block = data.targets["fac"]
        out += [data.sample_ids, data.inputs["input_ids"], block.indices, block.logp, block.tail]
    return out


