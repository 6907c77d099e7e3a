"""Format 3 inputs keep the text: each window's characters and its tokens' byte ends, fingerprinted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from mtkd_cache import migrate_cache, open_cache, prepare
from mtkd_cache.align import token_bytes
from mtkd_cache.format.text import read_byte_ends, read_texts
from mtkd_cache.precompute.text_spans import window_texts
from tests.helpers.bpe_tokenizers import byte_level_bpe, sentencepiece_bpe

DOCS = ["Héllo wörld, naïve café — déjà vu! " * 3, "def add(x, y):\n    return x + y\n", "To be, or not to be"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("text")
    byte_level_bpe(300).save_pretrained(root / "tok")
    with (root / "d.jsonl").open("w") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d}) + "\n")
    prepare(root / "c", root / "d.jsonl", tokenizer=root / "tok", max_length=7, chunk_samples=3, progress=False)
    return root / "c"


def test_windows_cover_each_document_and_ends_locate_every_token(cache: Path) -> None:
    """The bytes the tokens occupy in their windows' texts, concatenated, are the document; a window
    cut inside a character (here 'ö' split into byte tokens) repeats that character in both texts."""
    reader = open_cache(cache)
    pieces = token_bytes(reader.load_tokenizer())
    rows = reader.samples.column("source_row").to_pylist()
    spelled: dict[int, bytes] = {}
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c)
        ends = read_byte_ends(reader, c, int(data.offsets[-1] + data.lengths[-1]))
        for i, text in enumerate(read_texts(reader, c)):
            ids = data.inputs["token_ids"][data.offsets[i] : data.offsets[i] + data.lengths[i]]
            e = ends[data.offsets[i] : data.offsets[i] + data.lengths[i]]
            raw = text.encode()
            first = int(e[0]) - len(pieces[int(ids[0])] or b"")
            starts = np.concatenate([[first], e[:-1]])
            assert len(raw) - int(e[-1]) < 4  # past the last token: at most the rest of a split character
            assert all(raw[a:b] == pieces[t] for a, b, t in zip(starts, e, ids))  # each token spells its bytes
            sid = int(data.sample_ids[i])
            spelled[rows[sid]] = spelled.get(rows[sid], b"") + raw[first : e[-1]]
    assert [spelled[r] for r in range(len(DOCS))] == [d.encode() for d in DOCS]


def test_a_window_boundary_inside_a_character_widens_the_text() -> None:
    tok = byte_level_bpe(260)  # few merges: multi-byte characters stay split into byte tokens
    text = "é" * 9
    ids = tok(text)["input_ids"]
    out = window_texts(ids, text, 3, token_bytes(tok))
    assert "".join(t for t, _ in out).startswith("é") and all(t.encode().decode() == t for t, _ in out)
    assert all(int(e[-1]) <= len(t.encode()) for t, e in out)


def test_sentencepiece_ends_skip_its_prepended_space() -> None:
    tok = sentencepiece_bpe(500)
    text = "To be, or not"
    [(covered, ends)] = window_texts(tok(text)["input_ids"], text, 64, token_bytes(tok))
    assert covered == text and int(ends[-1]) == len(text)


def test_text_is_fingerprinted_and_listed_in_the_format(cache: Path) -> None:
    reader = open_cache(cache)
    text = reader.inputs.text
    texts = [t for c in range(reader.num_chunks) for t in read_texts(reader, c)]
    assert text is not None and len(text["fingerprint"]) == 64
    assert text["num_bytes"] == sum(len(t.encode()) for t in texts) >= sum(len(d.encode()) for d in DOCS)
    table = pq.read_table(cache / "inputs/text.parquet")  # pyarrow and zarr alone read it (docs/FORMAT.md)
    assert table.column("sample_id").to_pylist() == list(range(reader.inputs.num_samples))
    assert table.column("text").to_pylist() == texts
    ends = zarr.open_array(str(cache / "inputs/byte_ends"), mode="r")
    data = reader.read_chunk(0)
    used = int(data.offsets[-1] + data.lengths[-1])
    np.testing.assert_array_equal(ends[:used], read_byte_ends(reader, 0, used))


def test_a_version_2_cache_reads_and_migrates_to_3(cache: Path, tmp_path: Path) -> None:
    import shutil

    old = tmp_path / "v2"
    shutil.copytree(cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 2
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert open_cache(old).manifest.format_version == 2  # read as before
    report = migrate_cache(old, progress=False)
    assert (report.from_version, report.to_version) == (2, 3)
    assert json.loads((old / "manifest.json").read_text())["format_version"] == 3
