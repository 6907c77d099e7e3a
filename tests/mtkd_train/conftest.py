"""Tiny real caches and students for the trainer tests, built once per session.

``lm_cache``: 40 token samples (max_length 16, chunks of 8, domains ``x``/``y``) prepared with a
32-token word tokenizer, and three teachers cached from it: two tiny Llama causal LMs with
different seeds, ``a`` (top-8, last hidden layer stored per position) and ``b`` (top-8), and
``cls``, a 3-class BERT sequence classifier (per-sample targets). Once cached, the teachers' model
folders are deleted: every training test runs without any teacher on disk.
``image_cache``: 24 random 16x16 RGB images with 4 classes (every fifth unlabelled) and two tiny
ViT teachers ``v1``/``v2`` (top-3, different seeds), also deleted after caching.

Students are config-only folders (initialised from config.json, as a user would start one) or the
``tiny_image_student`` factory of ``_train_target.py``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from mtkd_cache import RunConfig, prepare, prepare_arrays, run_teacher
from tests.helpers.tiny_models import (
    save_tiny_bert_classifier,
    save_tiny_causal_lm,
    save_tiny_vit_classifier,
)
from tests.mtkd_train._train_target import (
    IMAGE_CLASSES,
    STUDENT_HEAD,
    VOCAB,
    ImageCache,
    LMCache,
)


def _write_corpus(path: Path, n: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            words = " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(rng.randint(4, 16)))
            f.write(json.dumps({"text": words, "dom": ("x", "y")[i % 2]}) + "\n")


def _config_only(path: Path) -> Path:
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    return path


@pytest.fixture(scope="session")
def lm_cache(tmp_path_factory: pytest.TempPathFactory) -> LMCache:
    root = tmp_path_factory.mktemp("train_lm")
    ta = save_tiny_causal_lm(root / "teacher_a", vocab_size=VOCAB, tokenizer_size=VOCAB, seed=1)
    tb = save_tiny_causal_lm(root / "teacher_b", vocab_size=VOCAB, tokenizer_size=VOCAB, seed=2)
    tc = save_tiny_bert_classifier(root / "teacher_cls", num_labels=3, vocab_size=VOCAB, seed=3)
    student = _config_only(
        save_tiny_causal_lm(
            root / "student", vocab_size=STUDENT_HEAD, tokenizer_size=VOCAB, num_layers=1, seed=4
        )
    )
    small = _config_only(
        save_tiny_causal_lm(root / "small_student", vocab_size=16, num_layers=1, seed=5)
    )
    _write_corpus(root / "corpus.jsonl", 40)
    cache = root / "cache"
    prepare(
        cache,
        root / "corpus.jsonl",
        tokenizer=ta,
        max_length=16,
        chunk_samples=8,
        domain_column="dom",
        progress=False,
    )
    run_teacher(
        cache, RunConfig(teacher="a", model=str(ta), top_k=8, features=(-1,)), progress=False
    )
    run_teacher(cache, RunConfig(teacher="b", model=str(tb), top_k=8), progress=False)
    run_teacher(cache, RunConfig(teacher="cls", model=str(tc), top_k=3), progress=False)
    for folder in (ta, tb, tc):
        shutil.rmtree(folder)
    return LMCache(cache, student, small, (ta, tb, tc))


@pytest.fixture(scope="session")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> ImageCache:
    root = tmp_path_factory.mktemp("train_image")
    teachers = [
        save_tiny_vit_classifier(root / f"vit{seed}", num_labels=IMAGE_CLASSES, seed=seed)
        for seed in (1, 2)
    ]
    rng = np.random.default_rng(0)
    n = 24
    pixels = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
    labels = [-1 if i % 5 == 0 else i % IMAGE_CLASSES for i in range(n)]
    cache = root / "cache"
    prepare_arrays(cache, {"pixel_values": pixels}, labels=labels, chunk_samples=8)
    for name, folder in zip(("v1", "v2"), teachers):
        run_teacher(cache, RunConfig(teacher=name, model=str(folder), top_k=3), progress=False)
        shutil.rmtree(folder)
    return ImageCache(cache, tuple(teachers))
