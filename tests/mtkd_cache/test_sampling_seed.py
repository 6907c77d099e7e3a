"""Sampled targets: the draws of chunk c depend on (seed, c) only (`RunConfig.seed`).

Keyed by chunk, two chunks with identical content get independent draws; keyed by the seed, a
re-run reproduces them exactly and another seed does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mtkd_cache import RunConfig, open_cache, prepare, run_teacher

CHUNK = 4


@pytest.fixture(scope="module")
def twin_chunks(tmp_path_factory: pytest.TempPathFactory, lm_dir: Path) -> Path:
    """A cache of 8 identical samples in 2 chunks, with three sampled teachers (seeds 0, 0, 1)."""
    root = tmp_path_factory.mktemp("twins")
    text = " ".join(f"w{i % 7}" for i in range(12))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(2 * CHUNK)))
    cache = root / "cache"
    prepare(cache, root / "corpus.jsonl", tokenizer=lm_dir, max_length=16, chunk_samples=CHUNK,
            progress=False)  # fmt: skip
    for name, seed in (("s0", 0), ("s0_again", 0), ("s1", 1)):
        cfg = RunConfig(teacher=name, model=str(lm_dir), top_k=None, samples=8, seed=seed)
        run_teacher(cache, cfg, progress=False)
    return cache


def _draws(cache: Path, teacher: str, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    block = open_cache(cache).read_chunk(chunk, teachers=[teacher]).targets[teacher]
    return block.indices, block.counts


def test_identical_chunks_get_different_draws(twin_chunks: Path) -> None:
    reader = open_cache(twin_chunks)
    assert reader.num_chunks == 2
    a, b = reader.read_chunk(0), reader.read_chunk(1)
    np.testing.assert_array_equal(a.inputs["token_ids"], b.inputs["token_ids"])  # same content
    (ia, ca), (ib, cb) = _draws(twin_chunks, "s0", 0), _draws(twin_chunks, "s0", 1)
    assert ia.shape == ib.shape and np.all(ca.sum(-1) == 8) and np.all(cb.sum(-1) == 8)
    differ = np.any(ia != ib, axis=-1) | np.any(ca != cb, axis=-1)  # (rows,)
    assert differ.mean() > 0.5, "chunk 1 repeats chunk 0's draws: the generator is not keyed by chunk"


def test_draws_depend_on_seed_and_chunk_only(twin_chunks: Path) -> None:
    for chunk in (0, 1):
        same = _draws(twin_chunks, "s0", chunk), _draws(twin_chunks, "s0_again", chunk)
        np.testing.assert_array_equal(same[0][0], same[1][0])
        np.testing.assert_array_equal(same[0][1], same[1][1])
        other = _draws(twin_chunks, "s1", chunk)
        assert np.any(other[0] != same[0][0]) or np.any(other[1] != same[0][1])


def test_samples_within_a_chunk_get_independent_draws(twin_chunks: Path) -> None:
    """The 4 identical samples of one chunk share one generator stream, so their draws differ."""
    data = open_cache(twin_chunks).read_chunk(0, teachers=["s0"])
    block = data.targets["s0"]
    first = slice(int(data.offsets[0]), int(data.offsets[0] + data.lengths[0]))
    second = slice(int(data.offsets[1]), int(data.offsets[1] + data.lengths[1]))
    assert np.any(block.indices[first] != block.indices[second]) or np.any(
        block.counts[first] != block.counts[second]
    )
