"""docs/FORMAT.md is the contract: a reader built from it with only json, pyarrow and zarr gets
exactly what `open_cache` returns.

The reading code in this module (everything above the fixtures) imports no mtkd module; mtkd is
used only to build the cache and, at the end, to compare. `test_plain_reader_needs_no_mtkd`
runs the plain reader in a child process where importing mtkd_cache, torch or transformers
fails.
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

KNOWN_VERSION = 3

# --- a reader written from docs/FORMAT.md alone ---------------------------------------------------


def _json(root: Path, key: str) -> dict[str, Any]:
    return json.loads((root / key).read_bytes())


def _array(root: Path, key: str) -> zarr.Array:
    return zarr.open_array(str(root / key), mode="r")


def _blake(arrays: list[np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _decode_values(raw: np.ndarray, values: dict[str, Any]) -> np.ndarray:
    if values["codec"] == "u8log":
        out = -raw.astype(np.float32) * np.float32(values.get("step", 1 / 16))
        out[raw == 255] = -np.inf  # code 255: probability exactly 0
        return out
    assert values["codec"] in ("fp16", "fp32")
    return raw.astype(np.float32)


def _canonical_sha256(obj: dict[str, Any]) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_every_shard_and_crc(root: Path, key: str) -> None:
    """FORMAT.md: every shard is stored (absent = lost) and inner chunks end with a crc32c."""
    meta = _json(root, f"{key}/zarr.json")
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["codecs"][-1]["name"] == "crc32c", key
    shard_rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    for c in range(-(-meta["shape"][0] // shard_rows)):
        assert (root / key / "c" / "/".join([str(c)] + ["0"] * (len(meta["shape"]) - 1))).is_file(), (key, c)


def _feature_name(layer: int) -> str:
    return f"layer_{layer}" if layer >= 0 else f"layer_m{-layer}"


def read_plain(root: Path) -> dict[str, np.ndarray]:
    """Read a whole cache following FORMAT.md; check its invariants; return every decoded value.

    Keys: ``"<sid>/token_ids"``, ``"<sid>/label"``, ``"<sid>/<teacher>/<indices|logp|tail|counts>"``
    and ``"<sid>/<teacher>/<feature name>"`` (dequantised float32).
    """
    manifest = _json(root, "manifest.json")  # first
    assert manifest["format"] == "mtkd-cache"
    if manifest["format_version"] != KNOWN_VERSION:
        raise ValueError(f"format_version {manifest['format_version']} is unknown to this reader")
    inputs = _json(root, "inputs/inputs.json")
    assert inputs["dataset_fingerprint"] == manifest["dataset_fingerprint"]
    grid = inputs["grid"]
    n, S, C = grid["num_samples"], grid["chunk_samples"], grid["chunk_positions"]
    assert grid["num_chunks"] == -(-n // S)
    samples = pq.read_table(root / "inputs/samples.parquet").to_pylist()
    assert [s["sample_id"] for s in samples] == list(range(n)) == list(range(inputs["num_samples"]))
    out: dict[str, np.ndarray] = {}

    # Inputs: token ids at [offset, offset + num_positions), samples back to back in their chunk.
    assert inputs["kind"] == "tokens"
    _check_every_shard_and_crc(root, "inputs/token_ids")
    token_ids = _array(root, "inputs/token_ids")[:]
    assert token_ids.shape == (grid["num_chunks"] * C,)
    assert inputs["num_positions"] == sum(s["num_positions"] for s in samples)
    used = np.zeros(len(token_ids), dtype=bool)
    for c in range(grid["num_chunks"]):
        cursor = c * C
        for s in samples[c * S : (c + 1) * S]:
            assert s["offset"] == cursor
            cursor += s["num_positions"]
        assert cursor <= (c + 1) * C
        used[c * C : cursor] = True
    assert not token_ids[~used].any(), "padding rows hold the fill value 0"
    hashes = []
    for s in samples:
        ids = token_ids[s["offset"] : s["offset"] + s["num_positions"]].astype(np.int64)
        content = [ids]  # FORMAT.md: arrays, then the label (int64 0-d), then the domain (UTF-8 bytes)
        if s["label"] is not None:
            content.append(np.asarray(s["label"], dtype=np.int64))
        if s["domain"] is not None:
            content.append(np.frombuffer(s["domain"].encode(), dtype=np.uint8))
        assert _blake(content) == s["content_hash"]
        hashes.append(bytes.fromhex(s["content_hash"]))
        out[f"{s['sample_id']}/token_ids"] = ids
        out[f"{s['sample_id']}/label"] = np.asarray(-100 if s["label"] is None else s["label"])
    fp = hashlib.sha256(
        json.dumps(inputs["source"]["fingerprint_settings"], sort_keys=True).encode()
    )
    for h in hashes:
        fp.update(h)
    assert fp.hexdigest()[:32] == inputs["dataset_fingerprint"]
    for row in pq.read_table(root / "inputs/chunks.parquet").to_pylist():
        c = row["chunk"]
        assert (
            _blake([_array(root, f"inputs/{row['array']}")[c * C : (c + 1) * C]]) == row["checksum"]
        )
    tok = _json(root, inputs["tokenizer"]["path"] + "/tokenizer.json")
    assert len(tok["model"]["vocab"]) == inputs["tokenizer"]["vocab_size"]

    # Teachers: complete exactly when teachers/<name>/teacher.json exists.
    for name in sorted(p.parent.name for p in (root / "teachers").glob("*/teacher.json")):
        key = f"teachers/{name}"
        meta = _json(root, f"{key}/teacher.json")
        assert meta["name"] == name and meta["dataset_fingerprint"] == inputs["dataset_fingerprint"]
        recorded = pq.read_schema(root / f"{key}/chunks.parquet").metadata[b"mtkd:teacher_json_sha256"]
        assert recorded.decode() == _canonical_sha256(meta), "teacher.json is what was written"
        for zarr_json in (root / key).glob("**/zarr.json"):
            if _json(zarr_json.parent, "zarr.json")["node_type"] == "array":
                _check_every_shard_and_crc(root, str(zarr_json.parent.relative_to(root)))
        token_grid = meta["grid"] == "token"
        rows = grid["num_chunks"] * (C if token_grid else S)
        arrays: dict[str, np.ndarray] = {}
        if meta["target"]["kind"] == "none":  # a teacher without a head: features only
            assert not (root / key / "indices").exists()
        else:
            stored = _array(root, f"{key}/indices")
            assert stored.dtype == np.dtype(meta["index_dtype"]) and stored.shape[0] == rows
            indices = stored[:].astype(np.int64)
        if meta["target"]["kind"] == "topk":
            values = _array(root, f"{key}/values")
            assert (
                values.dtype
                == {"u8log": np.uint8, "fp16": np.float16, "fp32": np.float32}[
                    meta["values"]["codec"]
                ]
            )
            arrays = {
                "indices": indices,
                "logp": _decode_values(values[:], meta["values"]),
                "tail": _array(root, f"{key}/tail")[:].astype(np.float32),
            }
            assert _array(root, f"{key}/tail").dtype == np.dtype(meta["tail_dtype"])
        elif meta["target"]["kind"] == "sample":
            arrays = {
                "indices": indices,
                "counts": _array(root, f"{key}/counts")[:].astype(np.int32),
            }
            assert np.all(arrays["counts"].sum(-1)[indices.any(-1)] == meta["target"]["draws"])
        features = {}
        for f in meta["features"]:
            fname = _feature_name(f["layer"])
            raw = _array(root, f"{key}/features/{fname}")
            assert raw.dtype == np.dtype(f["dtype"]) and raw.shape[1] == f["dim"]
            x = raw[:].astype(np.float32)
            if f["dtype"] == "int8":
                x = x * _array(root, f"{key}/features/{fname}_scale")[:][:, None]
            features[fname] = (x, f["pool"] == "none" and token_grid)
        for row in pq.read_table(root / f"{key}/chunks.parquet").to_pylist():
            c, arr = row["chunk"], row["array"]
            per_position = token_grid and not any(
                arr.startswith(f"features/{fn}") and not pos for fn, (_, pos) in features.items()
            )
            region = slice(c * C, (c + 1) * C) if per_position else slice(c * S, (c + 1) * S)
            assert _blake([_array(root, f"{key}/{arr}")[region]]) == row["checksum"], (name, c, arr)
        for s in samples:
            sid = s["sample_id"]
            r = (
                slice(s["offset"], s["offset"] + s["num_positions"])
                if token_grid
                else slice(sid, sid + 1)
            )
            for what, a in arrays.items():
                out[f"{sid}/{name}/{what}"] = a[r]
            if meta["target"]["kind"] == "topk":
                assert np.all(np.diff(arrays["indices"][r], axis=1) > 0), (
                    "indices ascending per row"
                )
            for fname, (x, per_position) in features.items():
                out[f"{sid}/{name}/{fname}"] = x[r] if per_position else x[sid : sid + 1]
    return out


def dump_plain(root: str, out: str) -> None:
    """Entry point of the child process: read with the plain reader, save everything to ``out``."""
    np.savez(out, **read_plain(Path(root)))


# --- the cache, built with mtkd -------------------------------------------------------------------


@pytest.fixture(scope="module")
def contract_cache(
    tmp_path_factory: pytest.TempPathFactory, inputs_template: Path, lm_dir: Path, bert_dir: Path
) -> Path:
    """Token grid (u8log + per-position fp16 feature), sampled, sample grid (fp16 + int8 pooled), and a
    feature-only encoder (target kind none, CLS pooling + normalize)."""
    import shutil

    from helpers.tiny_encoders import save_tiny_encoder

    from mtkd_cache import RunConfig, run_teacher

    cache = Path(shutil.copytree(inputs_template, tmp_path_factory.mktemp("contract") / "cache"))
    enc = save_tiny_encoder(tmp_path_factory.mktemp("contract_enc") / "enc", pooling="cls")
    run_teacher(cache, RunConfig(teacher="enc", model=str(enc), features=(-1,), pool="auto"), progress=False)
    run_teacher(
        cache, RunConfig(teacher="lm", model=str(lm_dir), top_k=8, features=(0,)), progress=False
    )
    run_teacher(
        cache,
        RunConfig(teacher="lm_sampled", model=str(lm_dir), top_k=None, samples=8),
        progress=False,
    )
    run_teacher(
        cache,
        RunConfig(
            teacher="bert",
            model=str(bert_dir),
            top_k=3,
            value_codec="fp16",
            features=(-1,),
            feature_dtype="int8",
        ),
        progress=False,
    )
    return cache


def test_plain_reader_needs_no_mtkd_and_equals_open_cache(
    contract_cache: Path, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    out = tmp_path / "plain.npz"
    code = (
        "import sys; sys.modules.update(mtkd_cache=None, mtkd_train=None, torch=None, transformers=None); "
        f"sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_format_contract as t; "
        f"t.dump_plain({str(contract_cache)!r}, {str(out)!r})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    plain = dict(np.load(out))

    from mtkd_cache import open_cache

    reader = open_cache(contract_cache)
    teachers = ["bert", "enc", "lm", "lm_sampled"]
    assert reader.teacher_names == teachers
    compared = set()
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c, teachers=teachers, features={"lm": [0], "bert": [-1], "enc": [-1]})
        for i, sid in enumerate(data.sample_ids.tolist()):
            pos = slice(data.offsets[i], data.offsets[i] + data.lengths[i])
            label = -100 if data.labels is None else data.labels[i]
            expected = {
                f"{sid}/token_ids": data.inputs["token_ids"][pos],
                f"{sid}/label": np.asarray(label),
            }
            for name in teachers:
                block = data.targets[name]
                rows = pos if reader.teacher(name).meta.grid == "token" else slice(i, i + 1)
                for what, value in block._asdict().items():
                    expected[f"{sid}/{name}/{what}"] = value[rows]
            expected[f"{sid}/lm/layer_0"] = data.features["lm"]["layer_0"][pos]
            expected[f"{sid}/bert/layer_m1"] = data.features["bert"]["layer_m1"][i : i + 1]
            expected[f"{sid}/enc/layer_m1"] = data.features["enc"]["layer_m1"][i : i + 1]
            for key, value in expected.items():
                np.testing.assert_array_equal(plain[key], value, err_msg=key)
                compared.add(key)
    assert compared == set(plain), "the plain reader and open_cache see the same values"


def test_plain_reader_refuses_an_unknown_format_version(copy_cache: Any, lm_template: Path) -> None:
    cache = copy_cache(lm_template)
    manifest = _json(cache, "manifest.json")
    manifest["format_version"] = 99
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format_version 99"):
        read_plain(cache)


def test_plain_reader_checks_the_hashes_of_a_labelled_cache(
    tmp_path: Path, corpus: Path, lm_dir: Path
) -> None:
    """Labels and domains enter each sample's content hash exactly as FORMAT.md says."""
    from mtkd_cache import open_cache, prepare

    cache = tmp_path / "labelled"
    prepare(cache, corpus, tokenizer=lm_dir, max_length=16, chunk_samples=8, label_column="label",
            domain_column="domain", progress=False)
    plain = read_plain(cache)  # asserts every content hash and the dataset fingerprint
    reader = open_cache(cache)
    labels = reader.samples.column("label").to_pylist()
    assert set(labels) == {0, 1, 2}
    assert [int(plain[f"{i}/label"]) for i in range(len(labels))] == labels
