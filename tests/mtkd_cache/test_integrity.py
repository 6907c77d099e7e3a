"""Every read checks what it reads: a missing or damaged chunk, an id out of range or an edited
teacher.json is one `CacheCorruptError` naming teacher, array, chunk, file and the repair."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from mtkd_cache import CacheCorruptError, open_cache, verify_cache


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def read_all(cache: Path, teachers: tuple[str, ...] = ("lm",)) -> None:
    reader = open_cache(cache)
    for c in range(reader.num_chunks):
        reader.read_chunk(c, teachers=teachers)


def edit_array(cache: Path, key: str, edit: Callable[[np.ndarray], None], rows: slice) -> None:
    """Change stored values through zarr itself, so the crc32c is valid and only the value checks can tell."""
    arr = zarr.open_array(str(cache / key), mode="r+")
    block = arr[rows]
    edit(block)
    arr.with_config({"write_empty_chunks": True})[rows] = block


@pytest.fixture
def cache(copy_cache: Callable[..., Path], lm_template: Path) -> Path:
    return copy_cache(lm_template)


def assert_names_everything(e: pytest.ExceptionInfo[CacheCorruptError], array: str, chunk: int, cache: Path) -> None:
    msg = str(e.value)
    assert "\n" not in msg
    assert "teacher 'lm'" in msg and f"array {array!r}" in msg and f"chunk {chunk} " in msg, msg
    assert str(cache / "teachers/lm" / array / "c" / str(chunk)) in msg, msg
    assert f"mtkd-cache verify --repair {cache}" in msg and "mtkd-cache run" in msg, msg


def test_a_deleted_shard_is_an_error_never_zeros(cache: Path) -> None:
    (cache / "teachers/lm/values/c/3/0").unlink()
    reader = open_cache(cache)
    reader.read_chunk(2, teachers=["lm"])  # other chunks still read
    with pytest.raises(CacheCorruptError, match="missing") as e:
        reader.read_chunk(3, teachers=["lm"])
    assert_names_everything(e, "values", 3, cache)
    sid = int(reader.grid.sample_range(3)[0])
    with pytest.raises(CacheCorruptError, match="missing"):
        reader.sample(sid, teachers=["lm"])


def test_a_flipped_byte_is_a_checksum_error(cache: Path) -> None:
    flip_middle_byte(cache / "teachers/lm/tail/c/1")
    with pytest.raises(CacheCorruptError, match="checksum mismatch") as e:
        read_all(cache)
    assert_names_everything(e, "tail", 1, cache)
    assert isinstance(e.value, ValueError)  # errors subclass builtins


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["half", "empty"])
def test_a_truncated_shard_is_an_error(cache: Path, keep: float) -> None:
    shard = cache / "teachers/lm/indices/c/2/0"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CacheCorruptError) as e:
        open_cache(cache).read_chunk(2, teachers=["lm"])
    assert_names_everything(e, "indices", 2, cache)
    assert verify_cache(cache, progress=False).damaged == {"lm": [2]}


def test_a_damaged_input_shard_names_the_inputs_and_prepare(cache: Path) -> None:
    (cache / "inputs/token_ids/c/2").unlink()
    with pytest.raises(CacheCorruptError, match=r"inputs array 'token_ids' chunk 2 .*missing.*prepare --overwrite"):
        open_cache(cache).read_chunk(2)


@pytest.mark.parametrize(
    ("array", "edit", "message"),
    [
        ("indices", lambda b: b.__setitem__((0, -1), 60000), "token id 60000 is outside the vocabulary"),
        ("indices", lambda b: b.__setitem__((0, slice(None)), b[0, ::-1].copy()), "not strictly ascending"),
        ("tail", lambda b: b.__setitem__(0, np.nan), "tail mass is outside"),
        ("tail", lambda b: b.__setitem__(0, 1.5), "tail mass is outside"),
    ],
    ids=["out-of-vocab", "unsorted", "nan-tail", "tail-above-1"],
)
def test_values_that_pass_the_crc_are_still_checked(
    cache: Path, array: str, edit: Callable[[np.ndarray], None], message: str
) -> None:
    reader = open_cache(cache)
    r0, _ = reader.teacher("lm").rows_of_chunk(1)
    edit_array(cache, f"teachers/lm/{array}", edit, slice(r0, r0 + 4))
    with pytest.raises(CacheCorruptError, match=message) as e:
        open_cache(cache).read_chunk(1, teachers=["lm"])
    assert_names_everything(e, array, 1, cache)
    assert not verify_cache(cache, progress=False).ok


def test_an_edited_teacher_json_fails_the_reader_and_verify(cache: Path) -> None:
    path = cache / "teachers/lm/teacher.json"
    meta = json.loads(path.read_text())
    meta["values"]["step"] = 1 / 8
    path.write_text(json.dumps(meta, indent=2))
    with pytest.raises(CacheCorruptError, match=r"teacher 'lm': .*teacher.json was changed.*verify --repair"):
        open_cache(cache).teacher("lm")
    report = verify_cache(cache, progress=False)
    assert not report.ok and any("was changed" in p for p in report.problems), report.problems


def test_reformatting_teacher_json_is_not_an_edit(cache: Path) -> None:
    path = cache / "teachers/lm/teacher.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=7))
    assert open_cache(cache).teacher("lm").meta.name == "lm"


def test_a_teacher_json_naming_another_teacher_is_refused(cache: Path, lm_template: Path) -> None:
    other = cache / "teachers/other"
    os.makedirs(other)
    meta = json.loads((cache / "teachers/lm/teacher.json").read_text())
    (other / "teacher.json").write_text(json.dumps(meta))  # folder 'other', name 'lm'
    with pytest.raises(CacheCorruptError, match=r"names teacher 'lm', but it lies in the folder of 'other'"):
        open_cache(cache).teacher("other")
    assert not verify_cache(cache, progress=False).ok


def test_the_reader_never_writes_to_the_cache(
    cache: Path, snapshot: Callable[[Path], dict[str, str]]
) -> None:
    before = snapshot(cache)
    modes = {}
    for root, dirs, files in os.walk(cache):
        for name in dirs + files:
            p = Path(root) / name
            modes[p] = p.stat().st_mode
    try:
        for p in [*modes, cache]:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        read_all(cache)
        open_cache(cache).sample(0, teachers=["lm"])
        assert verify_cache(cache, progress=False).ok
    finally:
        cache.chmod(0o755)
        for p, mode in modes.items():
            p.chmod(mode)
    assert snapshot(cache) == before


def test_checks_can_be_switched_off_only_explicitly(cache: Path) -> None:
    """`check=False` (for measuring the cost) reads a deleted shard as zeros: the checks are what stops it."""
    (cache / "teachers/lm/values/c/3/0").unlink()
    data = open_cache(cache, check=False).read_chunk(3, teachers=["lm"])
    assert (data.targets["lm"].logp == 0).all()


def test_a_deleted_shard_is_an_error_on_an_object_store(lm_template: Path) -> None:
    """The same check through fsspec (memory://), where zarr also returns fill values for absent keys."""
    import fsspec

    fs = fsspec.filesystem("memory")
    url = "memory://integrity-missing"
    fs.put(str(lm_template), "/integrity-missing", recursive=True)
    try:
        reader = open_cache(url)
        assert reader.teacher_names == ["lm"]
        reader.read_chunk(1, teachers=["lm"])
        fs.rm("/integrity-missing/teachers/lm/indices/c/1/0")
        with pytest.raises(CacheCorruptError, match=r"array 'indices' chunk 1 .*missing"):
            open_cache(url).read_chunk(1, teachers=["lm"])
    finally:
        fs.rm("/integrity-missing", recursive=True)


def test_a_killed_prepare_leaves_no_temporary_file_outside_the_cache(
    tmp_path: Path, corpus: Path, lm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from mtkd_cache import prepare
    from mtkd_cache.format.inputs import InputsWriter

    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    real_flush, calls = InputsWriter._flush, {"n": 0}

    def dying_flush(self: InputsWriter) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill mid-prepare")
        real_flush(self)

    monkeypatch.setattr(InputsWriter, "_flush", dying_flush)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "cache", corpus, tokenizer=lm_dir, max_length=16, chunk_samples=8, progress=False)
    assert list(system_tmp.iterdir()) == []
    assert (tmp_path / "cache/inputs/samples.parquet.partial").exists()
    monkeypatch.undo()
    prepare(tmp_path / "cache2", corpus, tokenizer=lm_dir, max_length=16, chunk_samples=8, progress=False)
    assert not (tmp_path / "cache2/inputs/samples.parquet.partial").exists()
