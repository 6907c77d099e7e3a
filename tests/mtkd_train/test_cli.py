"""`mtkd-train` command line: help, and bad input refused before any step with one clear line.

Every refusal must exit non-zero with a single `Error: ...` line (no traceback) that names the
offending key or teacher, and leave no checkpoint or metrics behind.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtkd_train.cli import _field_docs, main
from mtkd_train.config import TrainConfig
from tests.mtkd_train._train_target import read_metrics
from tests.mtkd_train.conftest import LMCache


def _base(lm: LMCache, out: Path, *extra: str) -> list[str]:
    return [
        str(lm.cache),
        "--teachers", "a,b",
        "--student", str(lm.student),
        "--out", str(out),
        "--batch-size", "4",
        "--max-steps", "2",
        "--checkpoint-every", "1",
        *extra,
    ]  # fmt: skip


def _refused(args: list[str], out: Path) -> str:
    """Run the CLI, check it refused cleanly and wrote nothing; return the error line."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a ClickException, not a crash
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    # a bad flag value is a click usage error: the one line comes after click's usage hint
    hint = [line for line in lines if line.startswith(("Usage: ", "Try "))]
    assert len(errors) == 1 and len(errors) + len(hint) == len(lines), result.output
    assert not (out / "metrics.jsonl").exists()
    assert not (out / "checkpoints").exists()
    return errors[0]


def test_help_documents_every_config_key() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    text = re.sub(r"\s+", "", result.output)
    docs = _field_docs()
    for key in TrainConfig.keys():
        flag = "CACHE" if key == "cache" else "--" + key.replace("_", "-")
        assert flag in text, key
        assert re.sub(r"\s+", "", docs[key]) in text, f"{key}: {docs[key]!r} is not in --help"
    assert "--config" in text and "--resume" in text


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--teachers", "a,zzz"], ["'zzz'", "not in this cache"]),
        (["--teachers", "a,cls"], ["'a'", "'cls'", "grid"]),
        (["--aggregate", "mean", "--aggregate-kwargs", '{"weights": [1]}'], ["weights", "per teacher"]),
        (["--aggregate", "mean", "--aggregate-kwargs", '{"weights": [1, -1]}'], ["weights", "non-negative"]),
        (["--aggregate", "entropy", "--aggregate-kwargs", '{"tua": 2}'], ["tua"]),
        (["--aggregate-kwargs", "{not json"], ["--aggregate-kwargs", "JSON"]),
        (["--alpha", "1.5"], ["alpha", "[0, 1]"]),
        (["--alpha", "-0.1"], ["alpha"]),
        (["--temperature", "0"], ["temperature", "> 0"]),
        (["--temperature", "-2"], ["temperature"]),
        (["--features", '{"a": {"layer": 1}}'], ["'a'", "feature layer 1"]),
        (["--features", '{"b": {"layer": -1}}'], ["'b'", "feature layer -1"]),
        (["--aggregate", "routing", "--aggregate-kwargs", '{"domain_to_teacher": {"zz": "a"}}'], ["'zz'", "domain"]),
    ],
    ids=[
        "unknown-teacher", "classifier-with-lm", "weights-count", "weights-negative",
        "unknown-option", "bad-json", "alpha-high", "alpha-low", "temperature-zero",
        "temperature-negative", "feature-layer", "feature-teacher", "routing-domain",
    ],
)  # fmt: skip
def test_bad_input_is_refused_before_any_step(
    lm_cache: LMCache, tmp_path: Path, extra: list[str], needles: list[str]
) -> None:
    out = tmp_path / "run"
    line = _refused(_base(lm_cache, out, *extra), out)
    for needle in needles:
        assert needle in line, line


def test_student_narrower_than_the_teachers_is_refused(lm_cache: LMCache, tmp_path: Path) -> None:
    out = tmp_path / "run"
    line = _refused(_base(lm_cache, out, "--student", str(lm_cache.small_student)), out)
    assert "student" in line and "16" in line and "32" in line, line


def test_lm_student_for_per_sample_teacher_is_refused(lm_cache: LMCache, tmp_path: Path) -> None:
    out = tmp_path / "run"
    line = _refused(_base(lm_cache, out, "--teachers", "cls"), out)
    assert "student" in line and "cls" in line, line


def test_resume_with_another_configuration_is_refused(lm_cache: LMCache, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = CliRunner().invoke(main, _base(lm_cache, out))
    assert first.exit_code == 0, first.output
    checkpoints = sorted((out / "checkpoints").iterdir())
    metrics = read_metrics(out)

    result = CliRunner().invoke(main, [*_base(lm_cache, out, "--alpha", "0.3"), "--resume"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "another configuration" in lines[0], result.output
    assert "alpha" in lines[0] and "0.5" in lines[0] and "0.3" in lines[0], lines[0]
    assert sorted((out / "checkpoints").iterdir()) == checkpoints
    assert read_metrics(out) == metrics


def test_cache_failing_verification_is_refused(lm_cache: LMCache, tmp_path: Path) -> None:
    cache = Path(shutil.copytree(lm_cache.cache, tmp_path / "cache"))
    shard = cache / "teachers" / "b" / "values" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "run"
    args = [str(cache), *_base(lm_cache, out, "--verify-cache")[1:]]
    line = _refused(args, out)
    assert "verification" in line and "b" in line and "chunk 2" in line, line
