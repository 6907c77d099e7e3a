"""`mtkd-cache prepare | run | inspect | verify` through click's CliRunner, on disk and `memory://`."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner, Result

from mtkd_cache import __version__, open_cache, verify_cache
from mtkd_cache.cli import main
from tests.mtkd_cache.conftest import CHUNK_SAMPLES, MAX_LENGTH


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def prepare_args(cache: str, corpus: Path, lm_dir: Path) -> list[str]:
    return [
        "prepare",
        cache,
        "--data",
        str(corpus),
        "--tokenizer",
        str(lm_dir),
        "--max-length",
        str(MAX_LENGTH),
        "--chunk-samples",
        str(CHUNK_SAMPLES),
        "--domain-column",
        "domain",
    ]


def test_prepare_run_inspect_verify(
    tmp_path: Path, corpus: Path, lm_dir: Path, bert_dir: Path
) -> None:
    cache = str(tmp_path / "cache")
    prepared = invoke(*prepare_args(cache, corpus, lm_dir))
    assert prepared.exit_code == 0, prepared.output
    inputs = open_cache(cache).inputs
    assert (
        f"prepared {inputs.num_samples:,} samples, {inputs.num_positions:,} positions"
        in prepared.stdout
    )
    assert inputs.dataset_fingerprint in prepared.stdout

    ran = invoke(
        "run", cache, "--teacher", "lm", "--model", lm_dir, "--top-k", "8", "--device", "cpu"
    )
    assert ran.exit_code == 0, ran.output
    assert f"teacher 'lm': {inputs.num_positions:,} positions" in ran.stdout
    ran = invoke(
        "run", cache, "--teacher", "bert", "--model", bert_dir, "--top-k", "2", "--values", "fp16"
    )
    assert ran.exit_code == 0, ran.output

    text = invoke("inspect", cache)
    assert text.exit_code == 0, text.output
    assert "teacher lm: causal_lm top-8 (u8log, uint16)" in text.stdout
    assert "teacher bert: sequence_classification top-2 (fp16, uint16)" in text.stdout

    as_json = invoke("inspect", cache, "--json")
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert (report["samples"], report["positions"]) == (inputs.num_samples, inputs.num_positions)
    assert sorted(report["teachers"]) == ["bert", "lm"]
    lm = report["teachers"]["lm"]
    assert (lm["k"], lm["values"], lm["grid"]) == (8, "u8log", "token")
    assert lm["bytes_per_position"] == pytest.approx(lm["bytes"] / inputs.num_positions)

    png = tmp_path / "report.png"
    plotted = invoke("inspect", cache, "--plot", png)
    assert plotted.exit_code == 0, plotted.output
    assert f"plot written to {png}" in plotted.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    verified = invoke("verify", cache)
    assert verified.exit_code == 0, verified.output
    assert "OK:" in verified.stdout and "['bert', 'lm']" in verified.stdout


@pytest.fixture
def memory_url() -> Iterator[str]:
    name = f"mtkd-cli-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def test_memory_url_prepare_run_and_open(
    memory_url: str, corpus: Path, lm_dir: Path, lm_template: Path
) -> None:
    prepared = invoke(*prepare_args(memory_url, corpus, lm_dir))
    assert prepared.exit_code == 0, prepared.output
    ran = invoke("run", memory_url, "--teacher", "lm", "--model", lm_dir, "--top-k", "8")
    assert ran.exit_code == 0, ran.output
    assert fsspec.filesystem("memory").exists(
        f"/{memory_url.removeprefix('memory://')}/manifest.json"
    )

    reader, local = open_cache(memory_url), open_cache(lm_template)
    assert reader.teacher_names == ["lm"]
    assert reader.inputs.dataset_fingerprint == local.inputs.dataset_fingerprint
    for c in range(reader.num_chunks):  # same inputs and settings as the on-disk template
        mem, disk = reader.read_chunk(c, teachers=["lm"]), local.read_chunk(c, teachers=["lm"])
        np.testing.assert_array_equal(mem.inputs["token_ids"], disk.inputs["token_ids"])
        for a, b in zip(mem.targets["lm"], disk.targets["lm"], strict=True):
            np.testing.assert_array_equal(a, b)
    assert reader.load_tokenizer()("w1 w2")["input_ids"] == [5, 6]
    assert verify_cache(memory_url, progress=False).ok


def test_user_errors_are_one_line_messages(tmp_path: Path, lm_template: Path, lm_dir: Path) -> None:
    missing = invoke(
        "run", lm_template, "--teacher", "x", "--model", tmp_path / "nope", "--top-k", "8"
    )
    assert missing.exit_code == 1
    assert (
        f"Error: TeacherLoadError: teacher path '{tmp_path / 'nope'}' does not exist"
        in missing.output
    )

    both = invoke(
        "run", lm_template, "--teacher", "x", "--model", lm_dir, "--top-k", "8", "--samples", "4"
    )
    assert both.exit_code == 1 and "give exactly one of --top-k K or --samples N" in both.output

    kwargs = invoke(
        "run", lm_template, "--teacher", "x", "--model", lm_dir, "--model-kwargs", "{oops"
    )
    assert (
        kwargs.exit_code == 2
        and "--model-kwargs" in kwargs.output
        and "not valid JSON" in kwargs.output
    )

    layers = invoke("run", lm_template, "--teacher", "x", "--model", lm_dir, "--features", "last")
    assert layers.exit_code == 2 and "comma-separated layer indices" in layers.output

    not_cache = invoke("inspect", tmp_path)
    assert not_cache.exit_code == 1 and "manifest.json is missing" in not_cache.output


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output
