"""Real services for tests, as processes on loopback: an S3-API server (moto) and an HTTP server.

Each fixture starts its server on a free 127.0.0.1 port, waits (bounded) until it answers,
yields how to reach it, and stops it at the end of the session. Nothing is assumed running.
"""

from __future__ import annotations

import contextlib
import json
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

__all__ = ["HttpServer", "S3Server", "SecuredS3", "free_port", "http_server", "s3_server", "secured_s3", "start_process"]

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


# moto 5.2 computes S3 signatures wrongly for requests with a query string (every ListObjectsV2),
# so under enforced auth it would refuse all listings. This runs moto_server with the signature
# check kept for every other request; the access key still picks the IAM user whose policy decides.
_MOTO_SKIP_QUERY_SIGNATURES = """
import sys
from moto.iam import access_control as ac
from moto.server import main
_check = ac.S3IAMRequest.check_signature
ac.S3IAMRequest.check_signature = lambda self: None if "?" in self._path else _check(self)
sys.exit(main(sys.argv[1:]))
"""


@contextlib.contextmanager
def _moto(lenient_signatures: bool = False) -> Iterator[str]:
    """A moto server process on a free loopback port: yields its URL, stops it afterwards."""
    pytest.importorskip("moto", reason='pip install "moto[server]" (in the [test] extra)')
    pytest.importorskip("s3fs")
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    cmd = [sys.executable, "-c", _MOTO_SKIP_QUERY_SIGNATURES] if lenient_signatures else [exe]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with start_process([*cmd, "-H", "127.0.0.1", "-p", str(port)], url + "/moto-api/"):
        yield url


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with _moto() as url:
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


class SecuredS3:
    """A moto S3 server of its own that enforces IAM: an ``admin`` user and a read-only ``reader``.

    moto serves every request unauthenticated until ``enforce()`` (POST /moto-api/reset-auth 0);
    from then on each request must be signed by an IAM user whose policy allows it.
    """

    READ_ONLY = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"], "Resource": "*"}]}
    ADMIN = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}

    def __init__(self, endpoint: str) -> None:
        import boto3

        self.endpoint = endpoint
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        self.keys: dict[str, dict[str, str]] = {}
        for user, policy in (("admin", self.ADMIN), ("reader", self.READ_ONLY)):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName=f"{user}-policy", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            self.keys[user] = {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}

    def storage_options(self, user: str) -> dict[str, Any]:
        return {**self.keys[user], "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def client(self, user: str) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.keys[user]["key"], aws_secret_access_key=self.keys[user]["secret"])

    def enforce(self) -> None:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()


@contextlib.contextmanager
def secured_s3() -> Iterator[SecuredS3]:
    """Start a private moto server (auth not yet enforced), yield it as `SecuredS3`, stop it."""
    with _moto(lenient_signatures=True) as url:
        yield SecuredS3(url)
