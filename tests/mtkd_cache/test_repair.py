"""`verify --repair` then `run` recomputes only the damaged chunks; completeness survives
concurrent writers; a group killed while creating its arrays is recovered by a plain rerun."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import mtkd_cache.precompute.run
from mtkd_cache import (
    CacheCorruptError,
    RunConfig,
    TeacherMeta,
    open_cache,
    run_teacher,
    verify_cache,
)
from mtkd_cache.cli import main
from mtkd_cache.format.store import CacheStore
from mtkd_cache.format.targets import TeacherWriter


def teacher_arrays(cache: Path, name: str) -> dict[str, np.ndarray]:
    root = cache / "teachers" / name
    return {str(m.parent.relative_to(root)): zarr.open_array(str(m.parent), mode="r")[:]
            for m in root.rglob("zarr.json") if json.loads(m.read_text())["node_type"] == "array"}


def test_repair_then_run_recomputes_only_the_damaged_chunk(
    copy_cache: Callable[..., Path], lm_template: Path, lm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = copy_cache(lm_template)
    shard = cache / "teachers/lm/values/c/2/0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    bad = CliRunner().invoke(main, ["verify", str(cache)])
    assert bad.exit_code == 1 and "teacher 'lm' chunk 2 array 'values'" in bad.stderr, bad.output
    repaired = CliRunner().invoke(main, ["verify", "--repair", str(cache)])
    assert repaired.exit_code == 1 and "REPAIRED: removed teachers/lm/_commits/00000002.json" in repaired.stderr
    assert not (cache / "teachers/lm/teacher.json").exists(), "the teacher is incomplete until rerun"
    assert open_cache(cache).teacher_names == []

    ran: list[int] = []
    real = mtkd_cache.precompute.run.run_chunk

    def spy(*args: Any, **kwargs: Any) -> Any:
        ran.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(mtkd_cache.precompute.run, "run_chunk", spy)
    run_teacher(cache, RunConfig(teacher="lm", model=str(lm_dir), top_k=8), progress=False)
    assert ran == [2]
    assert verify_cache(cache, progress=False).ok
    expected, got = teacher_arrays(lm_template, "lm"), teacher_arrays(cache, "lm")
    assert sorted(expected) == sorted(got)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_repair_of_an_edited_teacher_json_recomputes_nothing(
    copy_cache: Callable[..., Path], lm_template: Path, lm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = copy_cache(lm_template)
    path = cache / "teachers/lm/teacher.json"
    meta = json.loads(path.read_text())
    meta["values"]["step"] = 0.25
    path.write_text(json.dumps(meta))
    with pytest.raises(CacheCorruptError, match=r"teacher.json was changed.*verify --repair"):
        run_teacher(cache, RunConfig(teacher="lm", model=str(lm_dir), top_k=8), progress=False)
    report = verify_cache(cache, progress=False, repair=True)
    assert not report.ok and report.damaged == {"lm": []}
    monkeypatch.setattr(mtkd_cache.precompute.run, "run_chunk", lambda *a, **k: pytest.fail("recomputed"))
    run_teacher(cache, RunConfig(teacher="lm", model=str(lm_dir), top_k=8), progress=False)
    assert verify_cache(cache, progress=False).ok
    assert open_cache(cache).teacher("lm").meta.values.step == 1 / 16


def copy_teacher(cache: Path, source: str, name: str, *, create: bool = True) -> TeacherWriter:
    """A writer of teacher `name` with `source`'s settings, its chunks written from `source`'s targets."""
    store = CacheStore(cache)
    reader = open_cache(cache)
    meta = replace(reader.teacher(source).meta, name=name)
    writer = TeacherWriter(store, meta, reader.inputs)
    for c in writer.pending():
        block = reader.read_chunk(c, teachers=[source]).targets[source]
        writer.write_chunk(c, indices=block.indices, logp=block.logp, tail=block.tail,
                           stats={"positions": float(len(block.indices))})
    return writer


def test_concurrent_writers_never_lose_a_teacher(
    copy_cache: Callable[..., Path], lm_template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both writers finish inside the same window, with a delay injected between every read and write."""
    cache = copy_cache(lm_template)
    writers = [copy_teacher(cache, "lm", n) for n in ("a", "b")]
    real_read, real_write = CacheStore.read_json, CacheStore.write_json

    def slow_read(self: CacheStore, key: str) -> Any:
        out = real_read(self, key)
        time.sleep(0.05)
        return out

    def slow_write(self: CacheStore, key: str, value: Any) -> None:
        time.sleep(0.05)
        real_write(self, key, value)

    monkeypatch.setattr(CacheStore, "read_json", slow_read)
    monkeypatch.setattr(CacheStore, "write_json", slow_write)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def finish(w: TeacherWriter) -> None:
        barrier.wait()
        try:
            w.finish()
        except BaseException as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=finish, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    assert not errors
    assert open_cache(cache).teacher_names == ["a", "b", "lm"]
    assert "teachers" not in json.loads((cache / "manifest.json").read_text())
    assert verify_cache(cache, progress=False).ok


def test_a_group_killed_between_array_creations_recovers_without_overwrite(
    copy_cache: Callable[..., Path], lm_template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = copy_cache(lm_template)
    real = zarr.Group.create_array

    def killed(self: zarr.Group, name: str, **kw: Any) -> Any:
        if name == "values":
            raise KeyboardInterrupt("simulated SIGKILL after 'indices' was created")
        return real(self, name, **kw)

    monkeypatch.setattr(zarr.Group, "create_array", killed)
    with pytest.raises(KeyboardInterrupt):
        copy_teacher(cache, "lm", "half")
    monkeypatch.undo()
    assert (cache / "teachers/half/indices/zarr.json").exists()
    assert not (cache / "teachers/half/values").exists() and not (cache / "teachers/half/_run.json").exists()
    assert "half" in open_cache(cache).incomplete_teachers()

    copy_teacher(cache, "lm", "half").finish()  # no --overwrite needed
    assert open_cache(cache).teacher_names == ["half", "lm"]
    assert verify_cache(cache, progress=False).ok


def test_a_teacher_is_complete_exactly_when_its_teacher_json_exists(
    copy_cache: Callable[..., Path], lm_template: Path, lm_dir: Path
) -> None:
    """The v2 replacement of the manifest's teacher list: a rerun restores a lost teacher.json only."""
    cache = copy_cache(lm_template)
    (cache / "teachers/lm/teacher.json").unlink()
    (cache / "teachers/lm/chunks.parquet").unlink()
    assert open_cache(cache).teacher_names == [] and open_cache(cache).incomplete_teachers() == ["lm"]
    run_teacher(cache, RunConfig(teacher="lm", model=str(lm_dir), top_k=8), progress=False)
    assert open_cache(cache).teacher_names == ["lm"]
    assert TeacherMeta.from_dict(json.loads((cache / "teachers/lm/teacher.json").read_text())).name == "lm"
