"""Format v1 caches are refused by name with the command that migrates them; `migrate` upgrades
them in place without recomputing, and the result reads, verifies and resumes as v2."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import mtkd_cache.ops.migrate as migrate_mod
from mtkd_cache import CacheCorruptError, CacheFormatError, migrate_cache, open_cache, verify_cache
from mtkd_cache.cli import main
from mtkd_cache.format.store import CacheStore
from mtkd_cache.format.targets import TeacherWriter

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location("make_v1_cache", DATA / "make_v1_cache.py")
assert _spec is not None and _spec.loader is not None
make_v1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_v1)


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DATA / "v1_cache", tmp_path / "v1"))


def assert_targets_unchanged(cache: Path, name: str, chunks: int | None = None) -> None:
    reader = open_cache(cache)
    t = make_v1.synthetic(name)
    for c in range(chunks if chunks is not None else reader.num_chunks):
        s0, s1 = reader.grid.sample_range(c)
        data = reader.read_chunk(c, teachers=[name], features={name: [-1]})
        block = data.targets[name]
        np.testing.assert_array_equal(block.indices, t["indices"][s0:s1])
        np.testing.assert_array_equal(block.logp, t["logp"][s0:s1].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(block.tail, t["tail"][s0:s1])
        np.testing.assert_allclose(data.features[name]["layer_m1"], t["feature"][s0:s1], atol=0.05)
        np.testing.assert_array_equal(data.inputs["pixels"], make_v1.synthetic("inputs")["pixels"][s0:s1])


def test_a_v1_cache_is_refused_by_name_with_the_migrate_command(v1: Path) -> None:
    with pytest.raises(CacheFormatError, match=rf"format_version 1; .*`mtkd-cache migrate {v1}`"):
        open_cache(v1)


def test_migrate_upgrades_in_place_without_changing_a_value(v1: Path) -> None:
    result = CliRunner().invoke(main, ["migrate", str(v1)])
    assert result.exit_code == 0, result.output
    assert "format_version 1 -> 3" in result.output
    manifest = json.loads((v1 / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and "teachers" not in manifest
    assert not (v1 / "_migrate").exists() and not (v1 / "_migrate.json").exists()
    reader = open_cache(v1)
    assert reader.teacher_names == ["clf"] and reader.incomplete_teachers() == ["half"]
    assert_targets_unchanged(v1, "clf")
    assert verify_cache(v1, progress=False).ok is False  # 'half' is still incomplete
    again = migrate_cache(v1, progress=False)
    assert again.from_version == 3 and again.arrays_rewritten == 0


def test_after_migration_the_interrupted_teacher_resumes_and_deletions_are_caught(v1: Path) -> None:
    migrate_cache(v1, progress=False)
    store, reader = CacheStore(v1), open_cache(v1)
    meta = reader.teacher("clf").meta.__class__.from_dict({**json.loads((v1 / "teachers/half/_run.json").read_text())})
    writer = TeacherWriter(store, meta, reader.inputs)
    assert writer.pending() == [2], "the two chunks committed under v1 are kept"
    t = make_v1.synthetic("half")
    writer.write_chunk(2, indices=t["indices"][16:], logp=t["logp"][16:], tail=t["tail"][16:],
                       features={-1: t["feature"][16:]}, stats={"positions": 4.0})
    writer.finish()
    assert verify_cache(v1, progress=False).ok
    assert_targets_unchanged(v1, "half")
    (v1 / "teachers/clf/tail/c/1").unlink()  # v2: every shard is stored, so this is now detectable
    with pytest.raises(CacheCorruptError, match="missing"):
        open_cache(v1).read_chunk(1, teachers=["clf"])


def test_a_killed_migration_resumes(v1: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_swap = migrate_mod._swap
    calls = {"n": 0}

    def dying_swap(store: CacheStore, key: str) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill between copy and swap")
        return real_swap(store, key)

    monkeypatch.setattr(migrate_mod, "_swap", dying_swap)
    with pytest.raises(KeyboardInterrupt):
        migrate_cache(v1, progress=False)
    monkeypatch.undo()
    with pytest.raises(CacheFormatError, match="migrate"):
        open_cache(v1)  # still v1 until the manifest is written last
    migrate_cache(v1, progress=False)
    assert_targets_unchanged(v1, "clf")


def test_damaged_v1_data_is_refused_not_migrated(v1: Path) -> None:
    shard = v1 / "teachers/clf/values/c/1/0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=r"teachers/clf/values chunk 1 does not match"):
        migrate_cache(v1, progress=False)
    assert json.loads((v1 / "manifest.json").read_text())["format_version"] == 1
