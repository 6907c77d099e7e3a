"""Real services for tests, as processes on loopback: an S3-API server (moto) and an HTTP server.

Each fixture starts its server on a free 127.0.0.1 port, waits (bounded) until it answers,
yields how to reach it, and stops it at the end of the session. Nothing is assumed running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["HttpServer", "S3Server", "free_port", "http_server", "s3_server", "start_process"]

CREDENTIALS = {"key": "testing-key", "secret": "testing-secret-DO-NOT-LOG"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # bounded: at most ~300 attempts
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers (404/403 are answers)
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not answer within {seconds} s")


@contextlib.contextmanager
def start_process(cmd: list[str], url: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    try:
        _wait(url, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class S3Server:
    """A moto S3 server: ``endpoint``, ``storage_options(bucket)`` for fsspec, ``new_bucket()``."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._n = 0

    def storage_options(self) -> dict[str, Any]:
        return {"key": CREDENTIALS["key"], "secret": CREDENTIALS["secret"],
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=CREDENTIALS["key"], aws_secret_access_key=CREDENTIALS["secret"])

    def new_bucket(self) -> str:
        self._n += 1
        name = f"bucket-{self._n}-{os.getpid()}"
        self.client().create_bucket(Bucket=name)
        return name


class HttpServer:
    """``python -m http.server`` serving ``root`` read-only at ``url``."""

    def __init__(self, url: str, root: Path) -> None:
        self.url, self.root = url, root


@pytest.fixture(scope="session", autouse=True)
def _chunk_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Remote reads keep chunks in a local cache (format/remote.py): a temporary one, never ~/.cache."""
    os.environ["MTKD_CHUNK_CACHE"] = str(tmp_path_factory.mktemp("chunk_cache"))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    pytest.importorskip("moto", reason='pip install "moto[server]" (in the [test] extra)')
    pytest.importorskip("s3fs")
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with start_process([exe, "-H", "127.0.0.1", "-p", str(port)], url + "/moto-api/"):
        yield S3Server(url)


@pytest.fixture(scope="session")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    pytest.importorskip("aiohttp", reason="fsspec's http filesystem needs aiohttp (in the [test] extra)")
    root = tmp_path_factory.mktemp("http_root")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)]
    with start_process(cmd, url + "/"):
        yield HttpServer(url, root)
