"""Training straight from remote caches: a real S3-API server and a read-only HTTP server on loopback.

Credentials passed as storage options never reach config.json, metrics.jsonl, checkpoints, the
saved student or the CLI's output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
from click.testing import CliRunner
from services import CREDENTIALS

from mtkd_train.cli import main
from tests.mtkd_train._train_target import LMCache, read_metrics


def _args(cache: str, lm: LMCache, out: Path) -> list[str]:
    return [cache, "--teachers", "a,b", "--student", str(lm.student), "--out", str(out), "--batch-size", "4",
            "--max-steps", "2", "--checkpoint-every", "1", "--warmup-steps", "0", "--no-progress", "--num-workers", "0"]


def test_train_from_s3_keeps_credentials_out_of_every_file(s3_server, lm_cache: LMCache, tmp_path: Path) -> None:  # noqa: ANN001
    bucket, so = s3_server.new_bucket(), s3_server.storage_options()
    fs = fsspec.filesystem("s3", **so)
    fs.put(str(lm_cache.cache), f"{bucket}/cache", recursive=True)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [*_args(f"s3://{bucket}/cache", lm_cache, out), "--storage-options", json.dumps(so)])
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    secret = CREDENTIALS["secret"].encode()
    assert secret not in res.output.encode()
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in written) and (out / "config.json").exists()
    leaked = [str(p) for p in written if secret in p.read_bytes()]
    assert leaked == []


def test_train_from_a_read_only_http_cache(http_server, lm_cache: LMCache, tmp_path: Path) -> None:  # noqa: ANN001
    shutil.copytree(lm_cache.cache, http_server.root / "lm")
    out = tmp_path / "run"
    res = CliRunner().invoke(main, _args(f"{http_server.url}/lm", lm_cache, out))
    assert res.exit_code == 0, res.output
    assert len(read_metrics(out)) == 2
