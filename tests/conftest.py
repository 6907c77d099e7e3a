from __future__ import annotations

import os

import pytest
import torch
from services import _chunk_cache_in_tmp, http_server, s3_server  # noqa: F401 - session fixtures: real servers on loopback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The fused loss's row kernels: eager unless a test asks (compiling per test process costs minutes); the fused
# tests run both (tests/helpers/kernels.py).
os.environ.setdefault("MTKD_KERNELS", "eager")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
