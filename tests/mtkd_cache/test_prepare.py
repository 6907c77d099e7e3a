"""`prepare` / `prepare_arrays`: the inputs every teacher run sees."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from mtkd_cache import (
    CacheExistsError,
    CacheNotFoundError,
    CacheReader,
    InputDataError,
    open_cache,
    prepare,
    prepare_arrays,
)
from tests.mtkd_cache.conftest import CHUNK_SAMPLES, MAX_LENGTH

Snapshot = Callable[[Path], dict[str, str]]


def corpus_rows(corpus: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in corpus.read_text().splitlines()]


def samples_by_row(reader: CacheReader) -> dict[int, list[np.ndarray]]:
    out: dict[int, list[np.ndarray]] = defaultdict(list)
    for s in reader.samples.to_pylist():
        out[s["source_row"]].append(reader.sample(s["sample_id"])["token_ids"])
    return out


def test_long_documents_become_consecutive_windows_and_nothing_is_dropped(
    inputs_template: Path, corpus: Path
) -> None:
    reader = open_cache(inputs_template)
    tok = reader.load_tokenizer()
    assert zarr.open_array(str(inputs_template / "inputs/token_ids"), mode="r").dtype == np.uint16
    pieces = samples_by_row(reader)
    rows = corpus_rows(corpus)
    for row, doc in enumerate(rows):
        ids = tok(doc["text"])["input_ids"]
        if len(ids) < 2:  # a single token teaches a causal LM nothing
            assert row not in pieces
            continue
        assert [len(p) for p in pieces[row]] == [
            min(MAX_LENGTH, len(ids) - s) for s in range(0, len(ids), MAX_LENGTH)
        ]
        np.testing.assert_array_equal(np.concatenate(pieces[row]), ids)
    assert (
        max(len(p) for p in pieces[len(rows) - 2]) == MAX_LENGTH and len(pieces[len(rows) - 2]) == 3
    )
    assert reader.inputs.num_positions == sum(len(p) for ps in pieces.values() for p in ps)
    assert reader.inputs.grid.chunk_samples == CHUNK_SAMPLES


def test_string_labels_are_numbered_by_first_appearance_and_domains_sorted(
    tmp_path: Path, corpus: Path, lm_dir: Path
) -> None:
    cache = tmp_path / "cache"
    meta = prepare(
        cache,
        corpus,
        tokenizer=lm_dir,
        max_length=MAX_LENGTH,
        label_column="label",
        domain_column="domain",
        chunk_samples=CHUNK_SAMPLES,
        progress=False,
    )
    assert meta.label_names == ["neg", "pos", "neu"] and meta.has_labels
    assert meta.domains == ["chat", "news"]
    rows = corpus_rows(corpus)
    reader = open_cache(cache)
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c)
        source = reader.samples.column("source_row").to_numpy()[data.sample_ids]
        assert [meta.label_names[x] for x in data.labels] == [rows[r]["label"] for r in source]
        assert [meta.domains[x] for x in data.domains] == [rows[r]["domain"] for r in source]


def test_packing_joins_documents_with_eos_and_records_where_they_start(
    tmp_path: Path, corpus: Path, lm_dir: Path
) -> None:
    cache = tmp_path / "cache"
    meta = prepare(
        cache, corpus, tokenizer=lm_dir, max_length=MAX_LENGTH, pack=True, progress=False
    )
    reader = open_cache(cache)
    tok = reader.load_tokenizer()
    assert (
        meta.packed
        and meta.tokenizer is not None
        and meta.tokenizer.eos_token_id == tok.eos_token_id
    )
    stream, starts = [], []
    for doc in corpus_rows(corpus):
        starts.append(len(stream))
        stream += tok(doc["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    samples = reader.samples.to_pylist()
    got = [reader.sample(s["sample_id"])["token_ids"] for s in samples]
    assert all(len(g) == MAX_LENGTH for g in got[:-1])
    np.testing.assert_array_equal(np.concatenate(got), stream)
    for i, s in enumerate(samples):
        lo = i * MAX_LENGTH
        assert s["doc_starts"] == [p - lo for p in starts if lo <= p < lo + MAX_LENGTH], (
            f"sample {i}"
        )


def test_pack_with_a_label_column_is_refused(tmp_path: Path, corpus: Path, lm_dir: Path) -> None:
    with pytest.raises(InputDataError, match="--pack .* --label-column"):
        prepare(
            tmp_path / "c", corpus, tokenizer=lm_dir, max_length=16, pack=True, label_column="label"
        )
    assert not (tmp_path / "c").exists()


def test_same_settings_reuse_the_inputs_untouched(
    copy_cache: Callable[..., Path],
    inputs_template: Path,
    corpus: Path,
    lm_dir: Path,
    snapshot: Snapshot,
) -> None:
    cache = copy_cache(inputs_template)
    before = snapshot(cache)
    again = prepare(
        cache,
        corpus,
        tokenizer=lm_dir,
        max_length=MAX_LENGTH,
        chunk_samples=CHUNK_SAMPLES,
        domain_column="domain",
        progress=False,
    )
    assert again == open_cache(inputs_template).inputs
    assert snapshot(cache) == before


def test_other_settings_are_refused_unless_overwrite(
    copy_cache: Callable[..., Path],
    lm_template: Path,
    corpus: Path,
    lm_dir: Path,
    snapshot: Snapshot,
) -> None:
    cache = copy_cache(lm_template)
    before = snapshot(cache)
    with pytest.raises(
        CacheExistsError, match="already holds inputs prepared with other settings.*--overwrite"
    ):
        prepare(cache, corpus, tokenizer=lm_dir, max_length=8, progress=False)
    assert snapshot(cache) == before
    meta = prepare(cache, corpus, tokenizer=lm_dir, max_length=8, overwrite=True, progress=False)
    reader = open_cache(cache)
    assert meta.max_length == 8 and reader.inputs == meta
    assert reader.teacher_names == [] and not (cache / "teachers").exists(), (
        "teachers of old inputs are deleted"
    )


def test_an_interrupted_prepare_is_not_a_cache_and_the_next_prepare_clears_it(
    copy_cache: Callable[..., Path], inputs_template: Path, corpus: Path, lm_dir: Path
) -> None:
    cache = copy_cache(inputs_template)
    (cache / "manifest.json").unlink()
    (cache / "inputs" / ".samples-x.parquet.tmp").write_bytes(b"half-written")
    with pytest.raises(
        CacheNotFoundError,
        match=r"manifest.json is missing \(inputs were started but never finished",
    ):
        open_cache(cache)
    meta = prepare(
        cache,
        corpus,
        tokenizer=lm_dir,
        max_length=MAX_LENGTH,
        chunk_samples=CHUNK_SAMPLES,
        domain_column="domain",
        progress=False,
    )
    assert not (cache / "inputs" / ".samples-x.parquet.tmp").exists()
    assert open_cache(cache).inputs.dataset_fingerprint == meta.dataset_fingerprint


def test_dataset_fingerprint_comes_from_content(
    tmp_path: Path, corpus: Path, lm_dir: Path, inputs_template: Path
) -> None:
    reference = open_cache(inputs_template).inputs.dataset_fingerprint
    rechunked = prepare(
        tmp_path / "a",
        corpus,
        tokenizer=lm_dir,
        max_length=MAX_LENGTH,
        chunk_samples=3,
        domain_column="domain",
        progress=False,
    )
    assert rechunked.dataset_fingerprint == reference, (
        "chunking and source path do not change the content"
    )
    no_domains = prepare(
        tmp_path / "d", corpus, tokenizer=lm_dir, max_length=MAX_LENGTH, progress=False
    )
    assert no_domains.dataset_fingerprint != reference, "domains are part of the content"
    rows = corpus_rows(corpus)
    rows[5]["text"] = "w0 " + rows[5]["text"]  # one more token in one document
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    changed = prepare(
        tmp_path / "b", edited, tokenizer=lm_dir, max_length=MAX_LENGTH, progress=False
    )
    assert changed.dataset_fingerprint != reference
    shorter = prepare(
        tmp_path / "c",
        corpus,
        tokenizer=lm_dir,
        max_length=MAX_LENGTH,
        max_samples=5,
        progress=False,
    )
    assert shorter.num_samples == 5 and shorter.dataset_fingerprint != reference


def test_missing_text_column_is_named(tmp_path: Path, corpus: Path, lm_dir: Path) -> None:
    with pytest.raises(InputDataError, match=r"not \['body'\].*--text-column"):
        prepare(
            tmp_path / "c",
            corpus,
            tokenizer=lm_dir,
            max_length=16,
            text_column="body",
            progress=False,
        )


def test_unknown_tokenizer_is_named(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(
        InputDataError, match=f"--tokenizer '{tmp_path / 'nope'}' could not be loaded"
    ):
        prepare(tmp_path / "c", corpus, tokenizer=tmp_path / "nope", max_length=16, progress=False)


def test_prepare_arrays_round_trip_with_unlabelled_samples(
    tmp_path: Path, snapshot: Snapshot
) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((19, 2, 3)).astype(np.float32)
    labels = np.array([i % 4 if i % 5 else -1 for i in range(19)])
    domains = [("a", "b", "c")[i % 3] for i in range(19)]
    cache = tmp_path / "cache"
    meta = prepare_arrays(cache, {"x": x}, labels=labels, domains=domains, chunk_samples=4)
    assert (meta.kind, meta.num_samples, meta.grid.num_chunks, meta.arrays) == (
        "arrays",
        19,
        5,
        {"x": {"shape": [2, 3], "dtype": "float32"}},
    )
    reader = open_cache(cache)
    assert reader.samples.column("label").to_pylist() == [None if v < 0 else int(v) for v in labels]
    got = [reader.read_chunk(c) for c in range(reader.num_chunks)]
    np.testing.assert_array_equal(np.concatenate([g.inputs["x"] for g in got]), x)
    np.testing.assert_array_equal(
        np.concatenate([g.labels for g in got]), np.where(labels < 0, -100, labels)
    )
    assert [meta.domains[d] for g in got for d in g.domains] == domains  # type: ignore[index]
    np.testing.assert_array_equal(reader.sample(7)["x"], x[7])

    before = snapshot(cache)
    assert prepare_arrays(cache, {"x": x}, labels=labels, domains=domains, chunk_samples=4) == meta
    assert snapshot(cache) == before
    with pytest.raises(CacheExistsError):
        prepare_arrays(cache, {"x": x * 2}, labels=labels, domains=domains, chunk_samples=4)
    assert snapshot(cache) == before


def test_prepare_arrays_lengths_must_agree(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match=r"same length; got \{'x': 4, 'labels': 3\}"):
        prepare_arrays(tmp_path / "c", {"x": np.zeros((4, 2))}, labels=[0, 1, 2])


def test_a_folder_that_is_not_a_cache_is_refused_and_left_untouched(
    tmp_path: Path, corpus: Path, lm_dir: Path, snapshot: Snapshot
) -> None:
    folder = tmp_path / "project"
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)
    for overwrite in (False, True):
        with pytest.raises(CacheExistsError, match=r"is not empty and is not an mtkd cache \(found \.git, notes\.txt\)"):
            prepare(folder, corpus, tokenizer=lm_dir, max_length=8, overwrite=overwrite, progress=False)
        assert snapshot(folder) == before


def test_data_inside_the_destination_is_never_deleted(
    tmp_path: Path, corpus: Path, lm_dir: Path, snapshot: Snapshot
) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    data = folder / "corpus.jsonl"
    data.write_bytes(corpus.read_bytes())
    before = snapshot(folder)
    with pytest.raises(CacheExistsError, match=r"not an mtkd cache \(found corpus\.jsonl\)"):
        prepare(folder, data, tokenizer=lm_dir, max_length=8, overwrite=True, progress=False)
    assert snapshot(folder) == before
    with pytest.raises(InputDataError, match=r"lies inside --data"):
        prepare(folder / "cache", folder, tokenizer=lm_dir, max_length=8, progress=False)
    assert snapshot(folder) == before


def test_overwrite_removes_only_mtkd_keys_of_a_cache(
    copy_cache: Callable[..., Path], inputs_template: Path, corpus: Path, lm_dir: Path
) -> None:
    cache = copy_cache(inputs_template)
    (cache / "README.md").write_text("team notes")
    (cache / "inputs" / "stray.tmp-0a1b2c3d").write_text("mtkd's half-written file")
    data = cache / "teachers" / "corpus.jsonl"
    data.parent.mkdir()
    data.write_bytes(corpus.read_bytes())
    with pytest.raises(InputDataError, match=r"--data .* lies inside the cache's 'teachers'"):
        prepare(cache, data, tokenizer=lm_dir, max_length=8, overwrite=True, progress=False)
    assert data.exists()
    data.unlink()
    meta = prepare(cache, corpus, tokenizer=lm_dir, max_length=8, overwrite=True, progress=False)
    assert (cache / "README.md").read_text() == "team notes"
    assert not (cache / "inputs" / "stray.tmp-0a1b2c3d").exists()
    assert open_cache(cache).inputs == meta and meta.max_length == 8


def test_a_manifest_that_is_not_mtkds_makes_a_foreign_folder(tmp_path: Path, corpus: Path, lm_dir: Path) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"name": "my web app"}')
    with pytest.raises(CacheExistsError, match=r"not an mtkd cache \(found manifest\.json\)"):
        prepare(folder, corpus, tokenizer=lm_dir, max_length=8, overwrite=True, progress=False)
    assert (folder / "manifest.json").read_text() == '{"name": "my web app"}'


def test_prepare_writes_its_temporaries_inside_the_cache(
    tmp_path: Path, corpus: Path, lm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill leaks nothing outside the cache: every temporary lives under it while prepare runs."""
    import tempfile

    outside = tmp_path / "system_tmp"
    outside.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(outside))
    seen: list[list[str]] = []
    from mtkd_cache.format import inputs as inputs_module

    real_flush = inputs_module.InputsWriter._flush

    def spying_flush(self: inputs_module.InputsWriter) -> None:
        seen.append(sorted(p.name for p in (tmp_path / "cache" / "inputs").iterdir()))
        real_flush(self)

    monkeypatch.setattr(inputs_module.InputsWriter, "_flush", spying_flush)
    prepare(tmp_path / "cache", corpus, tokenizer=lm_dir, max_length=8, chunk_samples=4, progress=False)
    assert list(outside.iterdir()) == []
    assert any("samples.parquet.partial" in names for names in seen)  # the growing table lives in the cache
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".partial")]


def test_overwrite_with_the_same_settings_keeps_the_inputs_and_teachers(
    copy_cache: Callable[..., Path], lm_template: Path, corpus: Path, lm_dir: Path, snapshot: Snapshot
) -> None:
    cache = copy_cache(lm_template)
    before = snapshot(cache)
    prepare(cache, corpus, tokenizer=lm_dir, max_length=MAX_LENGTH, chunk_samples=CHUNK_SAMPLES,
            domain_column="domain", overwrite=True, progress=False)
    assert snapshot(cache) == before and open_cache(cache).teacher_names == ["lm"]
