"""A user who may read a shared S3 cache but not write it: reading works and writes nothing.

A private moto server enforces IAM (tests/services.py `secured_s3`): ``admin`` uploads the cache,
then ``reader`` (s3:GetObject and s3:ListBucket only) inspects, verifies and trains from it. The
bucket's listing (keys, sizes, ETags) is the same afterwards, and a `run` attempt is refused in
one line that names the cache and the fix (an overlay).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from click.testing import CliRunner
from services import SecuredS3, secured_s3

from mtkd_cache import inspect_cache, open_cache, verify_cache
from mtkd_cache.cli import main as cache_main
from mtkd_train.cli import main as train_main
from tests.helpers.tiny_models import save_tiny_causal_lm
from tests.mtkd_train._train_target import VOCAB, LMCache, read_metrics

URL = "s3://shared/cache"


@pytest.fixture(scope="module")
def server(lm_cache: LMCache) -> Iterator[SecuredS3]:
    with secured_s3() as s3:
        admin = fsspec.filesystem("s3", **s3.storage_options("admin"))
        s3.client("admin").create_bucket(Bucket="shared")
        admin.put(str(lm_cache.cache), "shared/cache", recursive=True)
        s3.enforce()
        yield s3


def _listing(s3: SecuredS3) -> dict[str, Any]:
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3.storage_options("admin"))
    return {p: (i["size"], i.get("ETag")) for p, i in fs.find("shared", detail=True).items()}


def test_auth_is_enforced(server: SecuredS3) -> None:
    stranger = {"key": "nobody", "secret": "nothing", "client_kwargs": server.storage_options("reader")["client_kwargs"]}
    with pytest.raises(PermissionError):
        fsspec.filesystem("s3", skip_instance_cache=True, **stranger).cat_file("shared/cache/manifest.json")
    reader = fsspec.filesystem("s3", skip_instance_cache=True, **server.storage_options("reader"))
    with pytest.raises(PermissionError):
        reader.pipe_file("shared/probe", b"x")


def test_a_read_only_user_inspects_verifies_and_trains_writing_nothing(
        server: SecuredS3, lm_cache: LMCache, tmp_path: Path) -> None:
    so = server.storage_options("reader")
    before = _listing(server)
    assert verify_cache(URL, storage_options=so).ok
    assert "a" in str(inspect_cache(URL, storage_options=so))
    assert open_cache(URL, storage_options=so).read_chunk(0, teachers=["a", "b"]).targets["a"].indices.size
    out = tmp_path / "run"
    res = CliRunner().invoke(train_main, [
        URL, "--teachers", "a,b", "--student", str(lm_cache.student), "--out", str(out), "--batch-size", "4",
        "--max-steps", "2", "--warmup-steps", "0", "--no-progress", "--num-workers", "0",
        "--storage-options", json.dumps(so)])
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert _listing(server) == before


def test_a_run_on_a_cache_you_cannot_write_says_so_in_one_line(server: SecuredS3, tmp_path: Path) -> None:
    teacher = save_tiny_causal_lm(tmp_path / "mine", vocab_size=VOCAB, tokenizer_size=VOCAB, seed=7)
    so = server.storage_options("reader")
    before = _listing(server)
    res = CliRunner().invoke(cache_main, ["--storage-options", json.dumps(so), "run", URL, "--teacher", "mine",
                                          "--model", str(teacher), "--top-k", "4", "--device", "cpu"])
    assert res.exit_code != 0
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    message = errors[0]
    assert URL in message and "permission denied" in message and "--inputs" in message and "overlay" in message
    assert so["secret"] not in message
    assert _listing(server) == before
