"""One store contract, every backend: a local folder, memory://, a real S3-API server and HTTP.

The S3 server (moto) and the HTTP server (python -m http.server) are real processes on loopback,
started and stopped by the fixtures in tests/services.py. A cache written to (or served from)
each backend must read back array for array equal to the local one, pass verify, and opening it
for reading must not write a single object.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from helpers.remote_cache import build, read_arrays

from mtkd_cache import inspect_cache, verify_cache


def _listing(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, Any]:
    return {p: (i.get("size"), i.get("LastModified") or i.get("mtime") or i.get("ETag"))
            for p, i in fs.find(root, detail=True).items()}


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "cache"
    build(str(path))
    return path


@pytest.fixture(scope="module", params=["local", "memory", "s3", "http"])
def backend(request: pytest.FixtureRequest, local_cache: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[str, dict | None, Any]]:
    kind = request.param
    tmp_path = tmp_path_factory.mktemp(f"store_{kind}")
    if kind == "local":
        path = tmp_path / "c"
        build(str(path))
        yield str(path), None, (fsspec.filesystem("file"), str(path))
    elif kind == "memory":
        url = f"memory://stores-{tmp_path.name}"
        build(url)
        yield url, None, (fsspec.filesystem("memory"), url.removeprefix("memory:/"))
    elif kind == "s3":
        server = request.getfixturevalue("s3_server")
        bucket, so = server.new_bucket(), server.storage_options()
        url = f"s3://{bucket}/cache"
        build(url, so)
        yield url, so, (fsspec.filesystem("s3", **so), f"{bucket}/cache")
    else:
        server = request.getfixturevalue("http_server")
        dest = server.root / tmp_path.name
        shutil.copytree(local_cache, dest)
        yield f"{server.url}/{tmp_path.name}", None, (fsspec.filesystem("file"), str(dest))


def test_every_backend_reads_back_the_localread_arrays(backend, local_cache: Path) -> None:  # noqa: ANN001
    url, so, _ = backend
    for got, want in zip(read_arrays(url, so), read_arrays(str(local_cache)), strict=True):
        np.testing.assert_array_equal(got, want)


def test_every_backend_verifies_and_inspects(backend) -> None:  # noqa: ANN001
    url, so, _ = backend
    report = verify_cache(url, storage_options=so)
    assert report.ok, report
    info = inspect_cache(url, storage_options=so)
    assert "fac" in str(info)


def test_reading_never_writes(backend) -> None:  # noqa: ANN001
    url, so, (fs, root) = backend
    before = _listing(fs, root)
    read_arrays(url, so)
    verify_cache(url, storage_options=so)
    inspect_cache(url, storage_options=so)
    assert _listing(fs, root) == before


def test_cli_takes_storage_options_and_never_prints_them(s3_server) -> None:  # noqa: ANN001
    import json

    from click.testing import CliRunner
    from services import CREDENTIALS

    from mtkd_cache.cli import main

    bucket, so = s3_server.new_bucket(), s3_server.storage_options()
    url = f"s3://{bucket}/cache"
    build(url, so)
    for args in (["verify", url], ["inspect", url]):
        res = CliRunner().invoke(main, ["--storage-options", json.dumps(so), *args])
        assert res.exit_code == 0, res.output
        assert CREDENTIALS["secret"] not in res.output
    env = CliRunner(env={"MTKD_STORAGE_OPTIONS": json.dumps(so)}).invoke(main, ["verify", url])
    assert env.exit_code == 0 and "OK" in env.output
    bad = CliRunner().invoke(main, ["--storage-options", "{not json", "verify", url])
    assert bad.exit_code == 2 and "not valid JSON" in bad.output
