"""docs/FORMAT.md's fingerprints on labelled caches, checked by a reader that knows only the doc.

`test_format_contract.py` checks every hash of a cache without labels; here the caches carry
labels (string labels numbered by first appearance, and integer labels with unlabelled samples)
and domains, so a content hash that left the label out would no longer match what FORMAT.md says.
The reading code (everything above the fixtures) imports json, hashlib, numpy, pyarrow and zarr
only, and runs in a child process where importing mtkd_cache, torch or transformers fails.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

# --- a reader of the inputs written from docs/FORMAT.md alone -------------------------------------


def _blake(arrays: list[np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)  # FORMAT.md: header f"{dtype.str}{shape}", then C-order bytes
    for a in map(np.ascontiguousarray, arrays):
        h.update(f"{a.dtype.str}{a.shape}".encode() + a.tobytes())
    return h.hexdigest()


def _sample_arrays(root: Path, inputs: dict[str, Any], s: dict[str, Any]) -> list[np.ndarray]:
    if inputs["kind"] == "tokens":
        ids = zarr.open_array(str(root / "inputs/token_ids"), mode="r")
        return [ids[s["offset"] : s["offset"] + s["num_positions"]].astype(np.int64)]
    return [
        zarr.open_array(str(root / f"inputs/arrays/{name}"), mode="r")[s["sample_id"]]
        for name in sorted(inputs["arrays"])
    ]


def check_inputs(root_str: str) -> dict[str, Any]:
    """Recompute every content hash and the dataset fingerprint; return what was checked."""
    root = Path(root_str)
    manifest = json.loads((root / "manifest.json").read_bytes())
    inputs = json.loads((root / "inputs/inputs.json").read_bytes())
    samples = pq.read_table(root / "inputs/samples.parquet").to_pylist()
    fp = hashlib.sha256(json.dumps(inputs["source"]["fingerprint_settings"], sort_keys=True).encode())
    for s in samples:
        content = _sample_arrays(root, inputs, s)
        if s["label"] is not None:  # FORMAT.md: then the label as int64, then the domain's UTF-8 bytes
            content.append(np.asarray(s["label"], dtype=np.int64))
        if s["domain"] is not None:
            content.append(np.frombuffer(s["domain"].encode(), dtype=np.uint8))
        assert _blake(content) == s["content_hash"], f"sample {s['sample_id']}"
        fp.update(bytes.fromhex(s["content_hash"]))
    assert fp.hexdigest()[:32] == inputs["dataset_fingerprint"] == manifest["dataset_fingerprint"]
    for done in sorted(root.glob("teachers/*/teacher.json")):  # FORMAT.md v2: teacher.json marks completion
        name = done.parent.name
        meta = json.loads(done.read_bytes())
        assert meta["dataset_fingerprint"] == inputs["dataset_fingerprint"], name
    return {
        "labels": [s["label"] for s in samples],
        "domains": [s["domain"] for s in samples],
        "label_names": inputs["label_names"],
        "has_labels": inputs["has_labels"],
        "teachers": sorted(p.parent.name for p in root.glob("teachers/*/teacher.json")),
    }


# --- the caches, built with mtkd ------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_tokens(tmp_path_factory: pytest.TempPathFactory, corpus: Path, lm_dir: Path,
                    bert_dir: Path) -> Path:  # fmt: skip
    """The session corpus with its string label column and its domains, and a BERT teacher."""
    from mtkd_cache import RunConfig, prepare, run_teacher

    cache = tmp_path_factory.mktemp("labelled") / "tokens"
    prepare(cache, corpus, tokenizer=lm_dir, max_length=16, chunk_samples=8, label_column="label",
            domain_column="domain", progress=False)  # fmt: skip
    run_teacher(cache, RunConfig(teacher="bert", model=str(bert_dir), top_k=3), progress=False)
    return cache


@pytest.fixture(scope="module")
def labelled_arrays(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mtkd_cache import prepare_arrays

    cache = tmp_path_factory.mktemp("labelled") / "arrays"
    rng = np.random.default_rng(0)
    prepare_arrays(
        cache,
        {"b": rng.standard_normal((10, 3)).astype(np.float32), "a": rng.integers(0, 9, (10, 2))},
        labels=[i % 3 if i % 4 else -1 for i in range(10)],
        domains=["x", "yé"] * 5,
        chunk_samples=4,
    )
    return cache


def _check_without_mtkd(cache: Path, env: dict[str, str]) -> dict[str, Any]:
    code = (
        "import sys, json; sys.modules.update(mtkd_cache=None, mtkd_train=None, torch=None, "
        f"transformers=None); sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import test_format_contract_labels as t; "
        f"print(json.dumps(t.check_inputs({str(cache)!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_labelled_token_cache_hashes_follow_format_md(
    labelled_tokens: Path, subprocess_env: dict[str, str]
) -> None:
    seen = _check_without_mtkd(labelled_tokens, subprocess_env)
    assert seen["has_labels"] and seen["teachers"] == ["bert"]
    assert seen["label_names"] == ["neg", "pos", "neu"]  # numbered in order of first appearance
    assert set(seen["labels"]) == {0, 1, 2}
    assert set(seen["domains"]) == {"news", "chat"}


def test_labelled_array_cache_hashes_follow_format_md(
    labelled_arrays: Path, subprocess_env: dict[str, str]
) -> None:
    seen = _check_without_mtkd(labelled_arrays, subprocess_env)
    assert seen["labels"] == [None if i % 4 == 0 else i % 3 for i in range(10)]
    assert seen["domains"] == ["x", "yé"] * 5


def test_the_plain_check_sees_a_label_edited_on_disk(labelled_arrays: Path, tmp_path: Path) -> None:
    """The check is not vacuous: a relabelled sample no longer matches its stored hash."""
    import shutil

    import pyarrow as pa

    cache = Path(shutil.copytree(labelled_arrays, tmp_path / "cache"))
    table = pq.read_table(cache / "inputs/samples.parquet")
    labels = table.column("label").to_pylist()
    labels[1] = (labels[1] + 1) % 3
    i = table.schema.get_field_index("label")
    table = table.set_column(i, table.schema.field(i), pa.array(labels, type=pa.int64()))
    pq.write_table(table, cache / "inputs/samples.parquet")
    with pytest.raises(AssertionError, match="sample 1"):
        check_inputs(str(cache))
