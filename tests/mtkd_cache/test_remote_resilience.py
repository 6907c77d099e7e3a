"""Remote caches over a flaky network, and the local chunk cache that spares a second download.

A `FlakyProxy` (tests/flaky_proxy.py, a thread-server on loopback) sits between mtkd and a real
server process (moto S3 or `python -m http.server`) and resets or 503s every 3rd request. The
S3 client's own retries are switched off (s3fs `retries`, botocore `max_attempts`), so what completes does so
through mtkd's retry (mtkd_cache/format/remote.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from flaky_proxy import FlakyProxy
from helpers.remote_cache import build, read_arrays

from mtkd_cache import verify_cache
from mtkd_cache.errors import CacheCorruptError
from mtkd_cache.format.remote import ChunkCache, is_transient
from mtkd_cache.format.store import CacheStore

NO_CLIENT_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resilience") / "cache"
    build(str(path))
    return path


@pytest.fixture(autouse=True)
def chunk_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MTKD_CHUNK_CACHE", str(tmp_path / "chunks"))
    return tmp_path / "chunks"


def _through(server: Any, proxy: FlakyProxy) -> dict[str, Any]:
    so = server.storage_options()
    return {**so, **NO_CLIENT_RETRIES, "client_kwargs": {**so["client_kwargs"], "endpoint_url": proxy.url}}


@pytest.fixture(scope="module")
def s3_cache(s3_server) -> str:  # noqa: ANN001
    url = f"s3://{s3_server.new_bucket()}/cache"
    build(url, s3_server.storage_options())
    return url


@pytest.fixture
def no_client_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own retry loop off


def test_s3_reads_and_writes_complete_through_a_proxy_that_drops_requests(
        s3_server, s3_cache: str, local_cache: Path, no_client_retries: None) -> None:  # noqa: ANN001
    with FlakyProxy(s3_server.endpoint, fail_every=3) as proxy:
        so = _through(s3_server, proxy)
        for got, want in zip(read_arrays(s3_cache, so), read_arrays(str(local_cache)), strict=True):
            np.testing.assert_array_equal(got, want)
        store = CacheStore(s3_cache.replace("/cache", "/scratch"), so)
        data = np.arange(4000, dtype=np.int32).reshape(40, 100)
        arr = zarr.create_array(store.zarr_store(), name="a", shape=data.shape, chunks=(4, 100), dtype=data.dtype)
        arr[:] = data  # 10 chunk PUTs and metadata, every 3rd request failing
        store.write_json("note.json", {"ok": True})
        writes_failed = proxy.count("PUT", outcome="reset") + proxy.count("PUT", outcome="503")
    assert proxy.count(outcome="reset") >= 3 and proxy.count(outcome="503") >= 3 and writes_failed >= 2
    direct = CacheStore(s3_cache.replace("/cache", "/scratch"), s3_server.storage_options())
    np.testing.assert_array_equal(direct.open_group("", strict=False)["a"][:], data)
    assert direct.read_json("note.json") == {"ok": True}


@pytest.mark.slow
def test_s3_prepare_and_run_complete_through_a_proxy_that_drops_requests(
        s3_server, local_cache: Path, no_client_retries: None) -> None:  # noqa: ANN001
    url = f"s3://{s3_server.new_bucket()}/cache"
    with FlakyProxy(s3_server.endpoint, fail_every=3) as proxy:
        so = _through(s3_server, proxy)
        build(url, so)  # prepare + run: every write through the flaky proxy (~40 s on moto)
        assert verify_cache(url, storage_options=so).ok
    assert proxy.count("PUT", outcome="reset") + proxy.count("PUT", outcome="503") >= 10
    for got, want in zip(read_arrays(url, s3_server.storage_options()), read_arrays(str(local_cache)), strict=True):
        np.testing.assert_array_equal(got, want)


def test_http_reads_complete_through_a_proxy_that_drops_requests(http_server, local_cache: Path) -> None:  # noqa: ANN001
    shutil.copytree(local_cache, http_server.root / "flaky")
    with FlakyProxy(http_server.url, fail_every=3) as proxy:
        url = f"{proxy.url}/flaky"
        for got, want in zip(read_arrays(url), read_arrays(str(local_cache)), strict=True):
            np.testing.assert_array_equal(got, want)
        assert verify_cache(url).ok
    assert proxy.count(outcome="reset") >= 3 and proxy.count(outcome="503") >= 3


def test_a_second_epoch_reads_chunks_from_the_local_cache(http_server, local_cache: Path, chunk_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    shutil.copytree(local_cache, http_server.root / "epochs")
    with FlakyProxy(http_server.url) as proxy:
        url = f"{proxy.url}/epochs"
        first = read_arrays(url)
        downloads = proxy.count("GET", "/c/")
        assert downloads > 0
        second = read_arrays(url)
        assert proxy.count("GET", "/c/") == downloads  # not one chunk downloaded again
        for a, b in zip(first, second, strict=True):
            np.testing.assert_array_equal(a, b)
        # a damaged cached copy is noticed (its hash) and fetched anew, never returned
        victim = next(p for p in chunk_dir.glob("*/*/*") if not p.name.startswith("."))
        victim.write_bytes(b"\0" + victim.read_bytes()[1:])
        third = read_arrays(url)
        assert proxy.count("GET", "/c/") == downloads + 1
        for a, b in zip(first, third, strict=True):
            np.testing.assert_array_equal(a, b)
        monkeypatch.setenv("MTKD_CHUNK_CACHE_BYTES", "0")  # off: every epoch downloads
        read_arrays(url)
        assert proxy.count("GET", "/c/") > downloads + 1


def test_chunk_cache_stays_under_its_limit_evicting_least_recently_used(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "lru", limit=250)
    for i in range(3):
        cache.put("ns", f"k{i}", bytes([i]) * 100)
    assert cache.size() <= 250
    assert cache.get("ns", "k0") is None and cache.get("ns", "k2") == b"\2" * 100
    cache.put("ns", "big", b"x" * 251)  # larger than the whole cache: not kept
    assert cache.get("ns", "big") is None


def test_a_flipped_byte_on_the_server_is_caught_not_returned(s3_server, s3_cache: str) -> None:  # noqa: ANN001
    bucket, so = s3_cache.removeprefix("s3://").split("/")[0], s3_server.storage_options()
    client = s3_server.client()
    key = next(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="cache/teachers/fac/")["Contents"]
               if "/c/" in o["Key"])
    good = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    data = bytearray(good)
    data[len(data) // 3] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    try:
        with pytest.raises(CacheCorruptError):
            read_arrays(s3_cache, so)
    finally:
        client.put_object(Bucket=bucket, Key=key, Body=good)


def test_only_transient_errors_are_retried() -> None:
    assert is_transient(ConnectionResetError("reset by peer"))
    assert is_transient(OSError("503 Service Unavailable"))
    try:
        try:
            raise ConnectionResetError("peer")
        except ConnectionResetError as inner:
            raise OSError("wrapped") from inner
    except OSError as e:
        assert is_transient(e)
    assert not is_transient(FileNotFoundError("missing"))
    assert not is_transient(PermissionError("forbidden"))
    assert not is_transient(ValueError("bad"))
