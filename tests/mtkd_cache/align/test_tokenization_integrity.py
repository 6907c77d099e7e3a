"""A tokenization of the stored text is verified as fully as the inputs, and built safely by racing processes.

Faults: a flipped or truncated chunk of `token_ids` / `byte_ends`, byte ends rewritten (validly
encoded) to decrease or to leave the text, a vocabulary map out of range, and a cross-tokenizer
teacher's values out of range with consistent checksums: each must fail `verify` naming the
tokenization (or teacher), the array and the chunk. Races: two processes building the same
tokenization at once leave one complete tokenization, identical to a build by one process.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from helpers.bpe_tokenizers import CORPUS, byte_level_bpe, sentencepiece_bpe
from helpers.tiny_models import save_tiny_causal_lm
from transformers import AutoTokenizer

from mtkd_cache import RunConfig, open_cache, prepare, run_teacher, verify_cache
from mtkd_cache.errors import CacheMismatchError
from mtkd_cache.format.codecs import array_checksum
from mtkd_cache.format.tokenization import PARTIAL, TokenizationMeta
from mtkd_cache.precompute import retokenize


def _lm(path: Path, tok: object, seed: int) -> Path:
    save_tiny_causal_lm(path, vocab_size=len(tok), with_tokenizer=False, seed=seed)  # type: ignore[arg-type]
    tok.save_pretrained(path)  # type: ignore[attr-defined]
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a cache with top-k and sampled teachers on their own tokenization, the teacher model)."""
    root = tmp_path_factory.mktemp("tokint")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{t} {i}"}) + "\n" for i, t in enumerate(CORPUS[:5] * 2)))
    student = _lm(root / "student", byte_level_bpe(300), seed=1)
    prepare(root / "cache", data, tokenizer=student, max_length=12, chunk_samples=4, progress=False)
    other = _lm(root / "other", sentencepiece_bpe(500), seed=3)
    run_teacher(root / "cache", RunConfig(teacher="other", model=str(other), top_k=6), progress=False)
    run_teacher(root / "cache", RunConfig(teacher="other_s", model=str(other), samples=8), progress=False)
    return root / "cache", other


@pytest.fixture
def cache(built: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(built[0], tmp_path / "cache"))


def _tid(cache: Path) -> str:
    return open_cache(cache).teacher("other").meta.tokenization or ""


def _problems(cache: Path) -> list[str]:
    report = verify_cache(cache, progress=False)
    assert not report.ok
    return report.problems


def test_a_clean_cross_cache_verifies(cache: Path) -> None:
    report = verify_cache(cache, progress=False)
    assert report.ok, report.problems
    assert sorted(report.teachers_checked) == ["other", "other_s"]


@pytest.mark.parametrize("array", ["token_ids", "byte_ends"])
@pytest.mark.parametrize("fault", ["flip", "truncate"])
def test_a_damaged_tokenization_chunk_fails_verify_naming_it(cache: Path, array: str, fault: str) -> None:
    tid = _tid(cache)
    shard = cache / "tokenizations" / tid / array / "c" / "1"
    data = shard.read_bytes()
    if fault == "flip":
        b = bytearray(data)
        b[len(b) // 2] ^= 0xFF
        shard.write_bytes(bytes(b))
    else:
        shard.write_bytes(data[: len(data) // 2])
    problems = _problems(cache)
    named = [p for p in problems if f"tokenization {tid!r}" in p and f"array {array!r} chunk 1" in p]
    assert named, problems
    # its teachers are reported as standing on a damaged tokenization
    assert any("teacher 'other' runs on tokenization" in p for p in problems)


def _rewrite(cache: Path, tid: str, array: str, edit) -> None:  # noqa: ANN001
    """Rewrite a tokenization array through zarr (valid shards and crc32c: only the values are wrong)."""
    arr = zarr.open_array(str(cache / "tokenizations" / tid / array), mode="r+")
    values = arr[:]
    edit(values)
    arr[:] = values


def test_decreasing_byte_ends_fail_verify_naming_the_sample(cache: Path) -> None:
    tid = _tid(cache)
    reader = open_cache(cache)
    from mtkd_cache.format.tokenization import TokenizationReader

    o = int(TokenizationReader(reader, tid).sample_columns["offset"][5])

    def swap(v: np.ndarray) -> None:
        v[o], v[o + 1] = v[o + 1] + 1, v[o]

    _rewrite(cache, tid, "byte_ends", swap)
    problems = _problems(cache)
    assert any("array 'byte_ends' chunk 1" in p and "checksum mismatch" in p for p in problems), problems
    assert any("sample 5: byte ends decrease" in p for p in problems), problems
    assert any("do not recompute its recorded fingerprint" in p for p in problems), problems


def test_byte_ends_past_the_text_fail_verify(cache: Path) -> None:
    tid = _tid(cache)

    def past(v: np.ndarray) -> None:
        v[v > 0] += 10_000

    _rewrite(cache, tid, "byte_ends", past)
    assert any("a byte end lies outside the sample's text" in p for p in _problems(cache))


def test_an_out_of_range_vocab_map_fails_verify_naming_it(cache: Path) -> None:
    tid = _tid(cache)

    def bad(v: np.ndarray) -> None:
        v[7] = 10**6

    _rewrite(cache, tid, "vocab_map", bad)
    problems = _problems(cache)
    assert any(f"tokenization {tid!r}" in p and "vocab_map" in p and "sha256" in p for p in problems), problems


def _set_checksum(cache: Path, teacher: str, chunk: int, array: str, checksum: str) -> None:
    """Record `checksum` for (chunk, array) in the teacher's chunks.parquet, keeping its metadata."""
    path = cache / "teachers" / teacher / "chunks.parquet"
    table = pq.read_table(io.BytesIO(path.read_bytes()))
    rows = table.to_pylist()
    for r in rows:
        if r["chunk"] == chunk and r["array"] == array:
            r["checksum"] = checksum
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


@pytest.mark.parametrize(("teacher", "array"), [("other", "tail"), ("other_s", "counts")])
def test_a_cross_teachers_values_are_range_checked(cache: Path, teacher: str, array: str) -> None:
    """Out-of-range values with matching checksums: only the value checks on its own grid catch them."""
    reader = open_cache(cache)
    tok = reader.teacher(teacher)
    grid = tok.inputs.grid
    arr = zarr.open_array(str(cache / "teachers" / teacher / array), mode="r+")
    r0, r1 = grid.chunk_positions, 2 * grid.chunk_positions  # chunk 1
    block = arr[r0:r1]
    block[0] = 7 if array == "tail" else block[0] + 1  # a tail mass of 7; draw counts not summing to 8
    arr[r0:r1] = block
    _set_checksum(cache, teacher, 1, array, array_checksum(np.asarray(arr[r0:r1])))
    problems = _problems(cache)
    assert any(f"teacher {teacher!r} array {array!r} chunk 1" in p for p in problems), problems
    assert not any("checksum mismatch" in p for p in problems), problems


def _race_target(cache: str, tok_dir: str, barrier, out) -> None:  # noqa: ANN001
    tok = AutoTokenizer.from_pretrained(tok_dir)
    reader = open_cache(cache)
    build, built = retokenize._build, []

    def slow_build(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - hold the commit so both builds overlap
        meta = build(*args, **kwargs)
        built.append(True)
        time.sleep(0.5)
        return meta

    retokenize._build = slow_build
    barrier.wait()
    got = retokenize.ensure_tokenization(reader, tok, "other")
    out.put((got.meta.fingerprint, bool(built)))


def test_two_processes_building_one_tokenization_leave_one_complete_identical_copy(
        built: tuple[Path, Path], tmp_path: Path) -> None:
    ref = Path(shutil.copytree(built[0], tmp_path / "ref"))
    tid = _tid(ref)
    reference = TokenizationMeta.from_dict(json.loads((ref / "tokenizations" / tid / "tokenization.json").read_text()))
    for teacher in ("other", "other_s"):
        shutil.rmtree(ref / "teachers" / teacher)
    shutil.rmtree(ref / "tokenizations")  # now build it again, twice at once
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race_target, args=(str(ref), str(built[1]), barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    got = [out.get(timeout=5), out.get(timeout=5)]
    assert got == [(reference.fingerprint, True)] * 2  # both built it; one commit won, the other matched it
    assert [p.name for p in (ref / "tokenizations").iterdir() if p.is_dir()] == [tid]  # no build left behind
    report = verify_cache(ref, progress=False)
    assert report.ok, report.problems


def test_a_later_commit_checks_it_built_the_same_tokenization(built: tuple[Path, Path], tmp_path: Path) -> None:
    ref = Path(shutil.copytree(built[0], tmp_path / "c"))
    tid = _tid(ref)
    reader = open_cache(ref)
    tok = AutoTokenizer.from_pretrained(built[1])
    fp = reader.teacher("other").meta.tokenizer_fingerprint or ""
    late = f"tokenizations/{PARTIAL}{tid}-late"
    meta = retokenize._build(reader, reader.store, tok, "other", fp, late)
    retokenize._commit(reader.store, late, f"tokenizations/{tid}", meta)  # loses: the same, accepted
    import dataclasses

    forged = dataclasses.replace(meta, fingerprint="0" * 32)
    with pytest.raises(CacheMismatchError, match="not deterministic"):
        retokenize._commit(reader.store, late, f"tokenizations/{tid}", forged)
    assert verify_cache(ref, progress=False).ok
