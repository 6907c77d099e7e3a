"""Run a test module's fused-loss tests with each of the row kernels (``mtkd_train/losses/_kernels.py``).

The suite defaults to ``MTKD_KERNELS=eager`` (tests/conftest.py: compiling in every test process would
cost minutes); a module that imports :func:`row_kernels` runs each of its tests three times: eager, compiled
(torch.compile) and native (the C++ kernel, for float32 CPU logits; other dtypes take the compiled kernels).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from mtkd_cache.precompute import native as builder


@pytest.fixture(autouse=True, params=["eager", "compiled", "native"])
def row_kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "native" and builder._compiler() is None:
        pytest.skip("no C++ compiler to build the KD kernel")  # one that builds but fails its check fails the test
    if request.param == "native" and os.environ.get("MTKD_NATIVE", "").strip() == "0":
        pytest.skip("MTKD_NATIVE=0: the C++ KD kernel is switched off")
    monkeypatch.setenv("MTKD_KERNELS", request.param)
    yield request.param
