"""Tiny real caches for the data-stream tests, built once per session.

``token_cache``: 61 token samples (max_length 16, chunks of 8, so the last chunk is partial) with
a domain column and four teachers from tiny models sharing one 32-token word tokenizer:
``a`` (top-8, per-position layer 1), ``b`` (top-8, mean-pooled last layer), ``s`` (4 sampled
tokens per position) and ``cls`` (a 3-class sequence classifier, sample grid).
``array_cache``: 29 random 16x16 images with labels (some unlabelled) and domains, one ViT
teacher ``vit`` (top-3, pooled last layer).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from mtkd_cache import CacheReader, RunConfig, open_cache, prepare, prepare_arrays, run_teacher
from tests.helpers.tiny_models import (
    save_tiny_bert_classifier,
    save_tiny_causal_lm,
    save_tiny_vit_classifier,
)

VOCAB = 32
TOKEN_SAMPLES = 61
ARRAY_SAMPLES = 29


def _write_corpus(path: Path) -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(VOCAB - 4)]
    with path.open("w") as f:
        for i in range(80):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))
            f.write(json.dumps({"text": text, "dom": ("news", "code", "chat")[i % 3]}) + "\n")


@pytest.fixture(scope="session")
def token_cache_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data_token")
    lm = save_tiny_causal_lm(root / "lm", vocab_size=VOCAB, tokenizer_size=VOCAB)
    bert = save_tiny_bert_classifier(root / "bert", num_labels=3, vocab_size=VOCAB)
    _write_corpus(root / "corpus.jsonl")
    cache = root / "cache"
    prepare(
        cache,
        root / "corpus.jsonl",
        tokenizer=lm,
        max_length=16,
        chunk_samples=8,
        domain_column="dom",
        max_samples=TOKEN_SAMPLES,
        progress=False,
    )
    run_teacher(
        cache, RunConfig(teacher="a", model=str(lm), top_k=8, features=(1,)), progress=False
    )
    run_teacher(
        cache,
        RunConfig(
            teacher="b", model=str(lm), top_k=8, features=(-1,), pool="mean", value_codec="fp16"
        ),
        progress=False,
    )
    run_teacher(cache, RunConfig(teacher="s", model=str(lm), top_k=None, samples=4), progress=False)
    run_teacher(cache, RunConfig(teacher="cls", model=str(bert), top_k=3), progress=False)
    return cache


@pytest.fixture(scope="session")
def token_reader(token_cache_path: Path) -> CacheReader:
    return open_cache(token_cache_path)


@pytest.fixture(scope="session")
def array_cache_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data_array")
    vit = save_tiny_vit_classifier(root / "vit", num_labels=5, image_size=16)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((ARRAY_SAMPLES, 3, 16, 16)).astype(np.float32)
    labels = [(-1 if i % 7 == 0 else i % 5) for i in range(ARRAY_SAMPLES)]
    domains = [("sky", "sea")[i % 2] for i in range(ARRAY_SAMPLES)]
    cache = root / "cache"
    prepare_arrays(cache, {"pixel_values": pixels}, labels=labels, domains=domains, chunk_samples=8)
    run_teacher(
        cache, RunConfig(teacher="vit", model=str(vit), top_k=3, features=(-1,)), progress=False
    )
    return cache


@pytest.fixture(scope="session")
def array_reader(array_cache_path: Path) -> CacheReader:
    return open_cache(array_cache_path)


@pytest.fixture
def token_cache_copy(token_cache_path: Path, tmp_path: Path) -> Path:
    """A private copy of the token cache that a test may damage."""
    return Path(shutil.copytree(token_cache_path, tmp_path / "cache"))
