"""Bad inputs: each fails with an error that names the input, and leaves the cache as it was.

"As it was" is checked with a listing plus a sha256 of every file of the cache folder, taken
before and after the failed call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from helpers.tiny_models import save_tiny_causal_lm

from mtkd_cache import (
    CacheExistsError,
    CacheFormatError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheWriteError,
    RunConfig,
    open_cache,
    prepare,
    run_teacher,
    verify_cache,
)
from mtkd_cache.precompute.extract import NonFiniteLogitsError
from mtkd_cache.precompute.models import TeacherLoadError
from tests.mtkd_cache.conftest import LM_VOCAB, TOKENIZER_SIZE

Snapshot = Callable[[Path], dict[str, str]]


@pytest.fixture
def cache(copy_cache: Callable[..., Path], lm_template: Path) -> Path:
    return copy_cache(lm_template)


def test_unknown_model_path(cache: Path, snapshot: Snapshot, tmp_path: Path) -> None:
    before = snapshot(cache)
    missing = tmp_path / "no-such-model"
    with pytest.raises(TeacherLoadError, match=f"teacher path '{missing}' does not exist"):
        run_teacher(cache, RunConfig(teacher="ghost", model=str(missing), top_k=8), progress=False)
    assert snapshot(cache) == before


def test_teacher_with_another_tokenizer(cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It runs on its own tokenization of the stored text (format 3), and says what its tokenizer loses."""
    other = save_tiny_causal_lm(
        tmp_path / "other", vocab_size=LM_VOCAB, tokenizer_size=TOKENIZER_SIZE - 4
    )
    meta = run_teacher(cache, RunConfig(teacher="other", model=str(other), top_k=8), progress=False)
    assert meta.tokenization is not None and meta.tokenization == meta.tokenizer_fingerprint[:16]
    assert (cache / "tokenizations" / meta.tokenization / "tokenization.json").is_file()
    assert "loses" in caplog.text  # the word tokenizer drops the spaces between words


def test_top_k_larger_than_the_vocabulary(cache: Path, snapshot: Snapshot, lm_dir: Path) -> None:
    before = snapshot(cache)
    with pytest.raises(
        ValueError, match=rf"--top-k 100 is larger than teacher 'big_k'.*{TOKENIZER_SIZE}"
    ):
        run_teacher(cache, RunConfig(teacher="big_k", model=str(lm_dir), top_k=100), progress=False)
    assert snapshot(cache) == before


def test_nan_logits_name_the_sample(
    cache: Path, snapshot: Snapshot, factory_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(factory_dir))
    reader = open_cache(cache)
    starts = [
        tuple(reader.sample(i)["token_ids"][:3].tolist()) for i in range(reader.inputs.num_samples)
    ]
    # A sample that is the only one starting with its first three tokens (shorter samples could
    # match a shorter prefix, so the prefix must have full length).
    bad = next(
        i for i in range(10, len(starts)) if len(starts[i]) == 3 and starts.count(starts[i]) == 1
    )
    before = snapshot(cache)
    kwargs = {"vocab_size": TOKENIZER_SIZE, "num_classes": 4, "prefix": list(starts[bad])}
    with pytest.raises(NonFiniteLogitsError, match=rf"NaN/inf logits for 1 sample\(s\), ids \[{bad}\]"):
        run_teacher(
            cache,
            RunConfig(teacher="nan", model="mtkd_test_factories:nan_classifier", top_k=2),
            factory_kwargs=kwargs,
            progress=False,
        )
    # The failure happens mid-run, after the teacher group was claimed: every file that existed
    # is unchanged, and the new group is incomplete (never readable) until a successful run.
    after = snapshot(cache)
    assert {k: after[k] for k in before} == before
    assert all(k.startswith("teachers/nan/") for k in set(after) - set(before))
    reader = open_cache(cache)
    assert reader.teacher_names == ["lm"] and "nan" in reader.incomplete_teachers()
    with pytest.raises(CacheIncompleteError):
        reader.teacher("nan")


def test_existing_teacher_with_other_settings_needs_overwrite(
    cache: Path, snapshot: Snapshot, lm_dir: Path
) -> None:
    before = snapshot(cache)
    other = RunConfig(teacher="lm", model=str(lm_dir), top_k=4, value_codec="fp16")
    with pytest.raises(
        CacheExistsError, match=r"teacher 'lm' already exists .*target.*values.*--overwrite"
    ):
        run_teacher(cache, other, progress=False)
    assert snapshot(cache) == before

    meta = run_teacher(cache, RunConfig(**{**other.__dict__, "overwrite": True}), progress=False)
    assert (meta.target.k, meta.values.codec) == (4, "fp16")
    reader = open_cache(cache)
    assert reader.teacher("lm").meta.target.k == 4
    assert reader.read_chunk(0, teachers=["lm"]).targets["lm"].indices.shape[1] == 4
    assert verify_cache(cache, progress=False).ok


def test_prepare_into_a_path_under_a_regular_file(
    corpus: Path, lm_dir: Path, tmp_path: Path
) -> None:
    """Root ignores permission bits, but nobody can create a folder inside a file."""
    blocker = tmp_path / "plain-file"
    blocker.write_bytes(b"not a folder")
    target = blocker / "cache"
    with pytest.raises(CacheWriteError, match=f"cannot write .* under {target}"):
        prepare(target, corpus, tokenizer=lm_dir, max_length=16, progress=False)
    assert blocker.read_bytes() == b"not a folder" and [p.name for p in tmp_path.iterdir()] == [
        "plain-file"
    ]


class ReadOnlyMemoryFileSystem(MemoryFileSystem):
    """The in-memory filesystem with every write refused, as a read-only bucket would."""

    protocol = ("romem",)

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(str(path).removeprefix("romem://"))

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise PermissionError(f"read-only filesystem: {args[:1]}")

    pipe_file = mkdir = makedirs = rm = rm_file = _rm = touch = mv = cp_file = _refuse  # type: ignore[assignment]

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "r" not in mode:
            self._refuse(path)
        return super()._open(path, mode, *args, **kwargs)


@pytest.fixture
def read_only_cache(lm_template: Path) -> Iterator[str]:
    """``romem://...``: a copy of the lm cache in memory, readable but not writable."""
    fsspec.register_implementation("romem", ReadOnlyMemoryFileSystem, clobber=True)
    mem = fsspec.filesystem("memory")
    for path in lm_template.rglob("*"):
        if path.is_file():
            mem.pipe_file(f"/ro-cache/{path.relative_to(lm_template)}", path.read_bytes())
    yield "romem://ro-cache"
    mem.rm("/ro-cache", recursive=True)


def test_run_into_a_read_only_store(read_only_cache: str, lm_dir: Path) -> None:
    store = MemoryFileSystem.store
    before = {k: bytes(v.getvalue()) for k, v in store.items() if k.startswith("/ro-cache")}
    assert open_cache(read_only_cache).teacher_names == ["lm"]  # readable
    with pytest.raises(
        CacheWriteError, match="cannot write .* under romem://ro-cache: permission denied"
    ):
        run_teacher(
            read_only_cache, RunConfig(teacher="new", model=str(lm_dir), top_k=8), progress=False
        )
    assert {k: bytes(v.getvalue()) for k, v in store.items() if k.startswith("/ro-cache")} == before


def test_corrupt_manifest(cache: Path, snapshot: Snapshot, lm_dir: Path) -> None:
    (cache / "manifest.json").write_bytes(bytes(range(256)) * 4)
    before = snapshot(cache)
    with pytest.raises(CacheFormatError, match="manifest.json is not valid JSON"):
        open_cache(cache)
    with pytest.raises(CacheFormatError, match="manifest.json"):
        run_teacher(cache, RunConfig(teacher="new", model=str(lm_dir), top_k=8), progress=False)
    with pytest.raises(CacheFormatError, match="manifest.json"):
        verify_cache(cache, progress=False)
    assert snapshot(cache) == before


def test_manifest_that_is_json_but_not_an_object(cache: Path) -> None:
    (cache / "manifest.json").write_text(json.dumps([1, 2, 3]))
    with pytest.raises(CacheFormatError, match="manifest.json holds list, expected an object"):
        open_cache(cache)


def test_unknown_format_version(cache: Path, snapshot: Snapshot, lm_dir: Path) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["format_version"] = 99
    (cache / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(cache)
    with pytest.raises(CacheFormatError, match="format_version 99 is unknown to this mtkd"):
        open_cache(cache)
    with pytest.raises(CacheFormatError, match="format_version 99"):
        run_teacher(cache, RunConfig(teacher="new", model=str(lm_dir), top_k=8), progress=False)
    assert snapshot(cache) == before


def test_not_a_cache(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not an mtkd cache: manifest.json is missing"):
        open_cache(tmp_path)


def test_feature_layer_that_was_not_cached(cache: Path) -> None:
    reader = open_cache(cache)
    with pytest.raises(
        CacheMismatchError, match=r"teacher 'lm' has no cached feature layer 3.*--features"
    ):
        reader.read_chunk(0, features={"lm": [3]})
    assert np.all(reader.read_chunk(0).lengths > 0)
