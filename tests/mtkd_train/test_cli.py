"""`mtkd-train` command line: help, and bad input refused before any step with one clear line.

Every refusal must exit non-zero with a single `Error: ...` line (no traceback) that names the
offending key or teacher, and leave no checkpoint or metrics behind.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtkd_train.cli import _field_docs, main
from mtkd_train.config import TrainConfig
from tests.mtkd_train._train_target import IMAGE_STUDENT, ImageCache, LMCache, read_metrics


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


def _error_line(args: list[str]) -> str:
    """Run the CLI, check it failed with one `Error:` line and no traceback; return that line."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), (
        result.exception
    )  # a ClickException, not a crash
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    # a bad flag value is a click usage error: the one line comes after click's usage hint
    hint = [line for line in lines if line.startswith(("Usage: ", "Try "))]
    assert len(errors) == 1 and len(errors) + len(hint) == len(lines), result.output
    return errors[0]


def _refused(args: list[str], out: Path) -> str:
    """`_error_line`, and nothing was written: no checkpoint, no metrics."""
    line = _error_line(args)
    assert not (out / "metrics.jsonl").exists()
    assert not (out / "checkpoints").exists()
    return line


def test_help_documents_every_config_key() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    text = re.sub(r"\s+", "", result.output)
    docs = _field_docs()
    for key in (f.name for f in dataclasses.fields(TrainConfig)):
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
        (["--aggregate", "routing", "--aggregate-kwargs", '{"domain_to_teacher": {"x": "a"}}'], ["['y']", "no route"]),
        (["--aggregate", "routing", "--aggregate-kwargs", '{"domain_to_teacher": {"x": "a", "y": "zz"}}'], ["'zz'"]),
    ],
    ids=[
        "unknown-teacher", "classifier-with-lm", "weights-count", "weights-negative",
        "unknown-option", "bad-json", "alpha-high", "alpha-low", "temperature-zero",
        "temperature-negative", "feature-layer", "feature-teacher", "routing-domain",
        "routing-unrouted-domain", "routing-teacher",
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

    line = _error_line([*_base(lm_cache, out, "--alpha", "0.3"), "--resume"])
    assert "another configuration: `alpha` was 0.5, now 0.3" in line, line
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
    assert "fails verification" in line and "teacher 'b' chunk 2" in line, line


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--student-kwargs", '{"num_labels": 5}'], ["student", "5 classes", "4"]),
        (["--aggregate", "routing", "--aggregate-kwargs", '{"domain_to_teacher": {"0": "v1"}}'], ["routing", "domains"]),
    ],
    ids=["class-count", "routing-without-domains"],
)  # fmt: skip
def test_bad_classifier_setup_is_refused(
    image_cache: ImageCache, tmp_path: Path, extra: list[str], needles: list[str]
) -> None:
    out = tmp_path / "run"
    args = [str(image_cache.cache), "--teachers", "v1,v2", "--student", IMAGE_STUDENT,
            "--out", str(out), "--max-steps", "1", *extra]  # fmt: skip
    line = _refused(args, out)
    for needle in needles:
        assert needle in line, line


def test_unreadable_checkpoint_is_refused(lm_cache: LMCache, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert CliRunner().invoke(main, _base(lm_cache, out)).exit_code == 0
    latest = sorted((out / "checkpoints").iterdir())[-1]
    latest.write_bytes(latest.read_bytes()[:100])  # truncated, as by a full disk
    line = _error_line([*_base(lm_cache, out, "--max-steps", "3"), "--resume"])
    assert latest.name in line and "cannot be read" in line, line


def test_config_file_then_flags(lm_cache: LMCache, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'teachers = ["a", "b"]\nstudent = "{lm_cache.student}"\nout = "{out}"\nbatch_size = 4\n'
        'max_steps = 5\naggregate = "mean"\n[aggregate_kwargs]\nweights = [1, 3]\n'
    )
    result = CliRunner().invoke(
        main, [str(lm_cache.cache), "--config", str(cfg), "--max-steps", "2"]
    )
    assert result.exit_code == 0, result.output
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]  # the flag wins over the file
    assert records[0]["teacher_weights"] == pytest.approx([0.25, 0.75])  # the file's operator
