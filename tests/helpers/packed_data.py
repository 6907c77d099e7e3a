"""A packed cache for tests: 14 short word documents packed to 24 tokens, a tiny Llama teacher cached
with exact (fp32) values, so isolation can be checked to 1e-4."""

from __future__ import annotations

import json
import random
from pathlib import Path

from helpers.tiny_models import save_tiny_causal_lm
from mtkd_cache import RunConfig, open_cache, prepare, run_teacher

__all__ = ["PACKED_VOCAB", "build_packed_cache", "documents"]

PACKED_VOCAB = 64


def build_packed_cache(root: Path) -> dict[str, Path]:
    """``{"cache", "teacher"}`` under ``root``: `prepare --pack` then `run` through the real paths."""
    teacher = save_tiny_causal_lm(root / "teacher", vocab_size=PACKED_VOCAB, seed=3)
    rng = random.Random(0)
    with (root / "docs.jsonl").open("w") as f:
        for _ in range(14):
            words = " ".join(f"w{rng.randrange(PACKED_VOCAB - 12)}" for _ in range(rng.randint(3, 9)))
            f.write(json.dumps({"text": words}) + "\n")
    prepare(root / "cache", root / "docs.jsonl", tokenizer=teacher, max_length=24, pack=True, chunk_samples=2,
            progress=False)
    run_teacher(root / "cache", RunConfig(teacher="t", model=str(teacher), top_k=6, value_codec="fp32",
                                          tail_dtype="float32", batch_size=3), progress=False)
    return {"cache": root / "cache", "teacher": teacher}


def documents(cache: Path) -> list[tuple[int, int, int]]:
    """(sample, start, stop) of every document of every sample, from the sample table."""
    reader = open_cache(cache)
    out = []
    for i, (starts, n) in enumerate(zip(reader.samples.column("doc_starts").to_pylist(),
                                         reader.sample_columns["num_positions"])):  # type: ignore[arg-type]
        bounds = sorted({0, *(starts or [])}) + [int(n)]
        out += [(i, a, b) for a, b in zip(bounds, bounds[1:])]
    return out
