"""Teacher runs that go wrong: bad names, changed settings, misfit vocabularies, NaN teachers, a full
disk, a damaged sample table and two runs at once. Each ends in a one-line error that names the
input and the fix, writes nothing it should not, and keeps every finished chunk."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import tiny_models

import mtkd_cache.precompute.run
from mtkd_cache import (
    CacheCorruptError,
    CacheExistsError,
    CacheMismatchError,
    RunConfig,
    open_cache,
    run_teacher,
    verify_cache,
)
from mtkd_cache.cli import main
from mtkd_cache.errors import NonFiniteLogitsError, TeacherBusyError
from mtkd_cache.format.targets import TeacherWriter
from mtkd_cache.precompute.lock import TeacherLock, _start_time, check_shared_store
from tests.mtkd_cache.conftest import REPO_ROOT, TOKENIZER_SIZE
from tests.mtkd_cache.test_resume import KILL_TARGET, markers

Snapshot = Callable[[Path], dict[str, str]]
FACTORY_LM = f"{tiny_models.__name__}:tiny_factory_lm"

FAULTY_SOURCE = '''
"""Factory LMs for fault tests: logits scaled by a kwarg, padded with NaN columns, NaN for some samples."""
import torch
from helpers.tiny_models import tiny_factory_lm


class FaultyLM(torch.nn.Module):
    def __init__(self, vocab_size, pad_columns, bad_first_tokens, scale):
        super().__init__()
        self.inner = tiny_factory_lm(vocab_size)
        self.vocab_size = vocab_size
        self.padded_vocab_size = vocab_size + pad_columns
        self.pad_columns, self.bad, self.scale = pad_columns, bad_first_tokens, scale

    def forward(self, input_ids, attention_mask=None):
        logits = self.inner(input_ids).logits * self.scale  # (B, L, V)
        pad = torch.full((*logits.shape[:2], self.pad_columns), float("nan"))
        logits = torch.cat([logits, pad], dim=-1)  # NaN in the padded vocabulary: harmless
        bad = torch.isin(input_ids[:, 0], torch.tensor(self.bad, dtype=input_ids.dtype))  # (B,)
        return torch.where(bad[:, None, None], torch.full_like(logits, float("nan")), logits)


def faulty_lm(vocab_size, pad_columns=0, bad_first_tokens=(), scale=1.0):
    return FaultyLM(vocab_size, pad_columns, list(bad_first_tokens), scale)
'''


@pytest.fixture
def faulty(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    folder = tmp_path_factory.mktemp("faulty")
    (folder / "mtkd_faulty_factories.py").write_text(FAULTY_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    return "mtkd_faulty_factories:faulty_lm"


@pytest.fixture
def cache(copy_cache: Callable[..., Path], lm_template: Path) -> Path:
    return copy_cache(lm_template)


def error_lines(output: str) -> list[str]:
    """The lines click printed for an error (progress bars of model loading share the stream)."""
    return [ln for ln in output.splitlines() if ln.startswith("Error")]


def fail_at_chunk(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    real = mtkd_cache.precompute.run.run_chunk

    def failing(*args: Any, **kwargs: Any) -> Any:
        if args[3] == chunk:  # (data, teacher, meta, chunk, ...)
            raise RuntimeError(f"simulated crash in chunk {chunk}")
        return real(*args, **kwargs)

    monkeypatch.setattr(mtkd_cache.precompute.run, "run_chunk", failing)


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a\\..\\b", "..", ".hidden", "a/b", "_x", "", "a..b", "c:\\x", "x" * 129])
def test_path_like_teacher_names_are_refused_before_anything_is_written(
    name: str, cache: Path, snapshot: Snapshot
) -> None:
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"--teacher .*use a plain name"):
        RunConfig(teacher=name, model="m", top_k=8)
    result = CliRunner().invoke(main, ["run", str(cache), "--teacher", name, "--model", "m"])
    assert result.exit_code != 0 and "use a plain name" in result.output and "Traceback" not in result.output
    assert snapshot(cache) == before


def test_portable_names_are_accepted() -> None:
    for name in ("qwen7b", "Qwen2.5-7B_instruct", "a.b-c_d", "7"):
        assert RunConfig(teacher=name, model="m", top_k=8).teacher == name


# -- settings compared on resume -------------------------------------------------------------------


def test_resume_with_other_model_kwargs_is_refused(
    cache: Path, faulty: str, monkeypatch: pytest.MonkeyPatch, snapshot: Snapshot
) -> None:
    """`scale` changes the outputs but not the weights: only the recorded kwargs tell the runs apart."""
    cfg = RunConfig(teacher="f", model=faulty, top_k=4)
    fail_at_chunk(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="chunk 2"):
        run_teacher(cache, cfg, factory_kwargs={"vocab_size": TOKENIZER_SIZE, "scale": 1.0}, progress=False)
    monkeypatch.setattr(mtkd_cache.precompute.run, "run_chunk", mtkd_cache.precompute.chunk.run_chunk)
    before = snapshot(cache)
    with pytest.raises(CacheExistsError, match=r"'f' already exists .*model_kwargs.*'scale': 1\.0.*'scale': 3\.0"):
        run_teacher(cache, cfg, factory_kwargs={"vocab_size": TOKENIZER_SIZE, "scale": 3.0}, progress=False)
    assert snapshot(cache) == before
    # The same kwargs in another order and spelling (an int for a float is another value; order is not).
    meta = run_teacher(cache, cfg, factory_kwargs={"scale": 1.0, "vocab_size": TOKENIZER_SIZE}, progress=False)
    assert meta.model_kwargs == {"scale": 1.0, "vocab_size": TOKENIZER_SIZE}
    assert open_cache(cache).teacher("f").meta.model_kwargs == meta.model_kwargs


def test_a_relative_model_path_resumes_as_the_same_model(
    cache: Path, lm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(lm_dir.parent)
    fail_at_chunk(monkeypatch, 3)
    with pytest.raises(RuntimeError):
        run_teacher(cache, RunConfig(teacher="rel", model=f"./{lm_dir.name}", top_k=4), progress=False)
    done = markers(cache, "rel")
    monkeypatch.setattr(mtkd_cache.precompute.run, "run_chunk", mtkd_cache.precompute.chunk.run_chunk)
    meta = run_teacher(cache, RunConfig(teacher="rel", model=str(lm_dir), top_k=4), progress=False)
    assert meta.model == str(lm_dir.resolve())
    assert {c: markers(cache, "rel")[c] for c in done} == done, "committed chunks were recomputed"


# -- vocabulary ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab_size": 40}, r"has 40 tokens but the cache's tokenizer .* has 64"),
        ({"vocab_size": 100}, r"declares vocab_size 100 but the cache's tokenizer has 64.*padded_vocab_size=100"),
    ],
    ids=["narrower", "wider"],
)
def test_factory_vocabulary_other_than_the_tokenizers_is_refused(
    cache: Path, snapshot: Snapshot, kwargs: dict[str, int], message: str
) -> None:
    before = snapshot(cache)
    with pytest.raises(CacheMismatchError, match=message):
        run_teacher(cache, RunConfig(teacher="v", model=FACTORY_LM, top_k=4), factory_kwargs=kwargs, progress=False)
    assert snapshot(cache) == before
    result = CliRunner().invoke(main, ["run", str(cache), "--teacher", "v", "--model", FACTORY_LM,
                                       "--model-kwargs", json.dumps(kwargs)])
    assert result.exit_code == 1 and "CacheMismatchError" in result.output
    assert len(error_lines(result.output)) == 1 and snapshot(cache) == before


def test_factory_that_declares_its_padding_is_accepted_and_nan_padding_is_ignored(cache: Path, faulty: str) -> None:
    meta = run_teacher(cache, RunConfig(teacher="padded", model=faulty, top_k=4),
                       factory_kwargs={"vocab_size": TOKENIZER_SIZE, "pad_columns": 8}, progress=False)
    assert (meta.vocab_size, meta.padded_vocab_size) == (TOKENIZER_SIZE, TOKENIZER_SIZE + 8)
    chunk = open_cache(cache).read_chunk(0, teachers=["padded"]).targets["padded"]
    assert int(chunk.indices.max()) < TOKENIZER_SIZE
    assert verify_cache(cache, progress=False).ok


def test_factory_wider_than_it_declares_is_refused(cache: Path, faulty: str, snapshot: Snapshot,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import mtkd_faulty_factories  # type: ignore[import-not-found]

    monkeypatch.setattr(mtkd_faulty_factories.FaultyLM, "padded_vocab_size", TOKENIZER_SIZE, raising=False)
    real_init = mtkd_faulty_factories.FaultyLM.__init__

    def undeclared(self: Any, *args: Any) -> None:
        real_init(self, *args)
        self.padded_vocab_size = self.vocab_size  # hides its 8 extra columns

    monkeypatch.setattr(mtkd_faulty_factories.FaultyLM, "__init__", undeclared)
    before = snapshot(cache)
    with pytest.raises(CacheMismatchError, match=r"returned logits 72 wide but declares padded_vocab_size 64"):
        run_teacher(cache, RunConfig(teacher="w", model=faulty, top_k=4),
                    factory_kwargs={"vocab_size": TOKENIZER_SIZE, "pad_columns": 8}, progress=False)
    assert snapshot(cache) == before


# -- non-finite logits ----------------------------------------------------------------------------


def test_every_non_finite_sample_is_named_and_good_chunks_are_kept(cache: Path, faulty: str) -> None:
    reader = open_cache(cache)
    first = [int(reader.sample(i)["token_ids"][0]) for i in range(reader.inputs.num_samples)]
    bad_tokens = sorted({first[3], first[-1]})
    bad_ids = [i for i, t in enumerate(first) if t in bad_tokens]
    bad_chunks = {reader.grid.chunk_of_sample(i) for i in bad_ids}
    assert len(bad_ids) >= 2 and len(bad_chunks) >= 2 and len(bad_chunks) < reader.num_chunks
    cfg = RunConfig(teacher="nan", model=faulty, top_k=4)
    kwargs = {"vocab_size": TOKENIZER_SIZE, "pad_columns": 2, "bad_first_tokens": bad_tokens}
    with pytest.raises(NonFiniteLogitsError) as info:
        run_teacher(cache, cfg, factory_kwargs=kwargs, progress=False)
    ids = ", ".join(map(str, bad_ids))
    assert f"NaN/inf logits for {len(bad_ids)} sample(s), ids [{ids}]" in str(info.value)
    assert "--overwrite" in str(info.value) and "\n" not in str(info.value)
    assert info.value.sample_ids == bad_ids  # type: ignore[attr-defined]
    done = markers(cache, "nan")
    assert set(done) == set(range(reader.num_chunks)) - bad_chunks, "every good chunk is committed"
    # The rerun the message suggests for broken inputs (same settings, even with --overwrite) keeps them.
    with pytest.raises(NonFiniteLogitsError, match=f"ids \\[{ids}\\]"):
        run_teacher(cache, RunConfig(**{**cfg.__dict__, "overwrite": True}), factory_kwargs=kwargs, progress=False)
    assert markers(cache, "nan") == done, "a rerun with the same settings recomputed or wiped finished chunks"


def test_overwrite_with_the_same_settings_changes_nothing(cache: Path, lm_dir: Path, snapshot: Snapshot) -> None:
    before = snapshot(cache)
    meta = run_teacher(cache, RunConfig(teacher="lm", model=str(lm_dir), top_k=8, overwrite=True), progress=False)
    assert snapshot(cache) == before and meta.name == "lm"


# -- disk full, damaged inputs ------------------------------------------------------------------------


def test_disk_full_during_run_is_one_line_naming_the_file_and_keeps_chunks(
    cache: Path, lm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = TeacherWriter.write_chunk

    def full_at_chunk_3(self: TeacherWriter, chunk: int, **kw: Any) -> None:
        if chunk == 3:
            raise OSError(errno.ENOSPC, "No space left on device", f"{cache}/teachers/full/indices/c/3")
        real(self, chunk, **kw)

    monkeypatch.setattr(TeacherWriter, "write_chunk", full_at_chunk_3)
    result = CliRunner().invoke(main, ["run", str(cache), "--teacher", "full", "--model", str(lm_dir), "--top-k", "4"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = error_lines(result.output)
    assert "DiskFullError: disk full while writing chunk 3 of teacher 'full'" in line
    assert "teachers/full/indices/c/3" in line and "re-run the same command" in line
    assert set(markers(cache, "full")) == {0, 1, 2}
    monkeypatch.setattr(TeacherWriter, "write_chunk", real)
    run_teacher(cache, RunConfig(teacher="full", model=str(lm_dir), top_k=4), progress=False)
    assert verify_cache(cache, progress=False).ok


def test_disk_full_on_a_real_small_tmpfs(tmp_path: Path, lm_template: Path, lm_dir: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    files = [p for p in lm_template.rglob("*") if "teachers" not in p.parts]
    size_kb = sum(p.stat().st_size // 4096 + 1 for p in files) * 4 + 96  # the inputs fit, the teacher does not
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        cache = mount / "cache"
        shutil.copytree(lm_template, cache, ignore=shutil.ignore_patterns("teachers"))
        manifest = json.loads((cache / "manifest.json").read_text())
        manifest["teachers"] = []
        (cache / "manifest.json").write_text(json.dumps(manifest))
        result = CliRunner().invoke(main, ["run", str(cache), "--teacher", "t", "--model", str(lm_dir),
                                           "--top-k", "64", "--values", "fp32", "--features", "0,1,2",
                                           "--compression-level", "1"])
        assert result.exit_code == 1, result.output
        [line] = error_lines(result.output)
        assert "Traceback" not in result.output and "DiskFullError: disk full while" in line, line
        assert str(mount) in line and "re-run the same command" in line
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_damaged_sample_table_is_one_line_naming_it(cache: Path, lm_dir: Path, snapshot: Snapshot) -> None:
    table = cache / "inputs" / "samples.parquet"
    data = bytearray(table.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    table.write_bytes(bytes(data))
    before = snapshot(cache)
    with pytest.raises(CacheCorruptError, match=r"inputs/samples.parquet is not a readable Parquet file.*prepare"):
        run_teacher(cache, RunConfig(teacher="new", model=str(lm_dir), top_k=4), progress=False)
    result = CliRunner().invoke(main, ["run", str(cache), "--teacher", "new", "--model", str(lm_dir)])
    assert result.exit_code == 1 and len(error_lines(result.output)) == 1
    assert "CacheCorruptError" in result.output and "samples.parquet" in result.output
    assert snapshot(cache) == before


# -- one run per teacher ------------------------------------------------------------------------------


def test_a_live_lock_refuses_a_second_run(cache: Path, lm_dir: Path, snapshot: Snapshot) -> None:
    with TeacherLock(open_cache(cache).store, "busy"):
        before = snapshot(cache)
        with pytest.raises(TeacherBusyError, match=r"'busy' is being computed by another run \(pid \d+ on .*delete"):
            run_teacher(cache, RunConfig(teacher="busy", model=str(lm_dir), top_k=4), progress=False)
        assert snapshot(cache) == before
    assert not (cache / "teachers" / "busy.lock").exists()


def test_a_rank_that_does_not_see_rank_0s_lock_is_told_the_store_must_be_shared(
    cache: Path, copy_cache: Callable[..., Path], lm_template: Path
) -> None:
    with TeacherLock(open_cache(cache).store, "t") as lock:
        token = str(lock.record["token"])
        check_shared_store(open_cache(cache).store, "t", token, rank=1)  # the same store: fine
        elsewhere = copy_cache(lm_template, "node2_copy")  # what another node's local folder holds
        with pytest.raises(FileNotFoundError, match=r"rank 1 on .* does not see the lock rank 0 holds.*shared by every node"):
            check_shared_store(open_cache(elsewhere).store, "t", token, rank=1)


def test_a_killed_runs_lock_is_taken_over(cache: Path, lm_dir: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    lock = {"host": os.uname().nodename, "pid": pid, "start": _start_time(os.getpid()), "token": "old",
            "started": time.time(), "progress": time.time()}
    (cache / "teachers" / "t.lock").write_text(json.dumps(lock))
    run_teacher(cache, RunConfig(teacher="t", model=str(lm_dir), top_k=4), progress=False)
    assert "t" in open_cache(cache).teacher_names and not (cache / "teachers" / "t.lock").exists()


def test_the_second_of_two_identical_runs_gets_a_one_line_error(
    cache: Path, lm_dir: Path, subprocess_env: dict[str, str], venv_bin: Path
) -> None:
    args = ["run", str(cache), "--teacher", "twin", "--model", str(lm_dir), "--top-k", "4", "--batch-size", "1"]
    first = subprocess.Popen([sys.executable, str(KILL_TARGET), "2.0", *args], env=subprocess_env, cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (cache / "teachers" / "twin" / "_commits").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-2000:]
            time.sleep(0.1)
        second = subprocess.run([str(venv_bin / "mtkd-cache"), *args], env=subprocess_env, cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended before the second one started: slow it down"
    finally:
        first.kill()  # a SIGKILL leaves its lock behind
        first.communicate()
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
    [line] = error_lines(second.stderr)
    assert "TeacherBusyError: teacher 'twin' is being computed by another run" in line
    assert (cache / "teachers" / "twin.lock").exists()
    run_teacher(cache, RunConfig(teacher="twin", model=str(lm_dir), top_k=4), progress=False)  # takes over
    assert "twin" in open_cache(cache).teacher_names and verify_cache(cache, progress=False).ok
    assert not (cache / "teachers" / "twin.lock").exists()


def test_disk_full_during_prepare_is_one_line_naming_the_file(
    tmp_path: Path, corpus: Path, lm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mtkd_cache.format.inputs import InputsWriter

    def full(self: InputsWriter, sample: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache/inputs/token_ids/c/0"))

    monkeypatch.setattr(InputsWriter, "add", full)
    result = CliRunner().invoke(main, ["prepare", str(tmp_path / "cache"), "--data", str(corpus), "--tokenizer",
                                       str(lm_dir), "--max-length", "8"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = error_lines(result.output)
    assert "DiskFullError: disk full while preparing the inputs" in line and "inputs/token_ids/c/0" in line
    assert corpus.exists()
