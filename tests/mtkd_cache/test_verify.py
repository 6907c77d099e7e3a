"""`verify_cache` / `mtkd-cache verify`: passes on a clean cache, names every damaged chunk."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtkd_cache import open_cache, verify_cache
from mtkd_cache.cli import main


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def chunks_named(problems: list[str]) -> set[int]:
    return {int(m) for p in problems for m in re.findall(r"chunk (\d+)", p)}


@pytest.fixture
def cache(copy_cache: Callable[..., Path], lm_template: Path) -> Path:
    return copy_cache(lm_template)


def test_clean_cache_passes(cache: Path) -> None:
    report = verify_cache(cache, progress=False)
    n = open_cache(cache).num_chunks
    assert report.ok and report.problems == []
    assert report.teachers_checked == ["lm"]
    assert report.chunks_checked == n * (2 + 3)  # token_ids, byte_ends + indices/values/tail per chunk


def test_flipped_byte_in_a_teacher_shard_is_reported_with_its_chunk(cache: Path) -> None:
    flip_middle_byte(cache / "teachers/lm/values/c/2/0")
    report = verify_cache(cache, progress=False)
    assert not report.ok
    assert chunks_named(report.problems) == {2}
    assert all("teacher 'lm'" in p and "'values'" in p for p in report.problems), report.problems


def test_flipped_byte_in_an_input_shard_is_reported_with_its_chunk(cache: Path) -> None:
    flip_middle_byte(cache / "inputs/token_ids/c/3")
    report = verify_cache(cache, progress=False)
    assert not report.ok
    assert 3 in chunks_named(report.problems)
    assert any(p.startswith("inputs chunk 3") and "token_ids" in p for p in report.problems), (
        report.problems
    )


def test_missing_shard_is_reported_with_its_chunk(cache: Path) -> None:
    (cache / "teachers/lm/indices/c/4/0").unlink()
    report = verify_cache(cache, progress=False)
    assert not report.ok
    assert chunks_named(report.problems) == {4}
    assert any("'indices'" in p for p in report.problems)


def test_teacher_without_teacher_json_is_reported_incomplete(cache: Path) -> None:
    (cache / "teachers/lm/teacher.json").unlink()
    report = verify_cache(cache, progress=False)
    assert not report.ok
    assert any("'lm' is incomplete" in p for p in report.problems)


def test_cli_verify_exits_non_zero_and_names_the_chunk(cache: Path) -> None:
    runner = CliRunner()
    clean = runner.invoke(main, ["verify", str(cache)])
    assert clean.exit_code == 0, clean.output
    assert clean.stdout.startswith("OK")

    flip_middle_byte(cache / "teachers/lm/tail/c/1")
    bad = runner.invoke(main, ["verify", str(cache)])
    assert bad.exit_code == 1
    assert "PROBLEM: teacher 'lm' chunk 1 array 'tail'" in bad.stderr
    assert "FAILED" in bad.stdout

    as_json = runner.invoke(main, ["verify", str(cache), "--json"])
    assert as_json.exit_code == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and chunks_named(report["problems"]) == {1}
