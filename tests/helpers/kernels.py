"""Run a test module's fused-loss tests with both row kernels (``mtkd_train/losses/_kernels.py``).

The suite defaults to ``MTKD_KERNELS=eager`` (tests/conftest.py: compiling in every test process would
cost minutes); a module that imports :func:`row_kernels` runs each of its tests twice, eager and compiled.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, params=["eager", "compiled"])
def row_kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("MTKD_KERNELS", request.param)
    yield request.param
