"""`migrate_cache`: upgrade a format-version-1 or -2 cache to version 3 in place, recomputing no target.

Version 2 -> 3 rewrites only `manifest.json`: version 3 adds optional parts (the stored source
text and other tokenizations, docs/CROSS_TOKENIZER.md) that a migrated cache does not have, so
it serves teachers with the inputs' tokenizer as before. Version 1 -> 3 is as follows.

What changes (docs/FORMAT.md, "Versioning"):
1. Every zarr array is rewritten shard by shard with a crc32c after each compressed inner chunk
   and every shard stored. Each shard is checked against the blake2b checksum recorded at write
   time before it is copied, so damaged data is refused, never carried over.
2. Each commit marker gains `settings_sha256`; each finished teacher's `chunks.parquet` gains
   the sha256 of its `teacher.json`.
3. `manifest.json` loses its `teachers` list (a teacher is complete when its `teacher.json`
   exists) and says `format_version: 2`. It is written last: until then every reader refuses
   the cache by name, so nobody reads it half-migrated.

An array is copied to `_migrate/<key>`, then swapped in; `_migrate.json` journals the swaps, so
a killed migration is resumed by running it again. Cost: one read and one write of the cache.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mtkd_cache._version import FORMAT_NAME, FORMAT_VERSION, __version__
from mtkd_cache.errors import CacheCorruptError, CacheFormatError, CacheNotFoundError
from mtkd_cache.format.codecs import Compressor, array_checksum, chunk_codecs
from mtkd_cache.format.meta import TEACHER_HASH_KEY, Manifest, TeacherMeta, content_hash
from mtkd_cache.format.store import CacheStore, now_iso

__all__ = ["MigrateReport", "migrate_cache"]

_JOURNAL, _STAGE = "_migrate.json", "_migrate"
_WRITE_ALL: Any = {"write_empty_chunks": True}


@dataclass
class MigrateReport:
    """What `migrate_cache` did."""

    url: str
    from_version: int
    to_version: int = FORMAT_VERSION
    arrays_rewritten: int = 0
    teachers: list[str] = field(default_factory=list)


def _array_keys(store: CacheStore) -> list[str]:
    """Every zarr array under inputs/ and teachers/ (keys relative to the root)."""
    found = store.fs.glob(store.path("inputs/**/zarr.json")) + store.fs.glob(store.path("teachers/**/zarr.json"))
    keys = []
    for path in sorted(found):
        key = str(path)[len(store.root) + 1:].rsplit("/", 1)[0]
        if store.read_json(f"{key}/zarr.json").get("node_type") == "array":
            keys.append(key)
    return keys


def _expected(store: CacheStore, group: str) -> dict[tuple[str, int], str]:
    """(array key relative to `group`, chunk) -> recorded checksum, from chunks.parquet or commit markers."""
    out: dict[tuple[str, int], str] = {}
    if store.exists(f"{group}/chunks.parquet"):
        for row in store.read_table(f"{group}/chunks.parquet").to_pylist():
            out[(str(row["array"]), int(row["chunk"]))] = str(row["checksum"])
    for name in store.listdir(f"{group}/_commits"):
        marker = store.read_json(f"{group}/_commits/{name}")
        for arr, cs in marker.get("checksums", {}).items():
            out.setdefault((arr, int(marker["chunk"])), cs)
    return out


def _owner(key: str) -> tuple[str, str]:
    """(group, array key inside it): `inputs` or `teachers/<name>`."""
    parts = key.split("/")
    cut = 1 if parts[0] == "inputs" else 2
    return "/".join(parts[:cut]), "/".join(parts[cut:])


def _compressor(store: CacheStore, group: str) -> Compressor:
    if group.startswith("teachers/"):
        for marker in ("teacher.json", "_run.json"):
            if store.exists(f"{group}/{marker}"):
                return Compressor.from_dict(store.read_json(f"{group}/{marker}").get("compressor", {}))
    return Compressor()


def _copy_array(store: CacheStore, key: str, expected: Mapping[tuple[str, int], str]) -> None:
    """Copy array `key` to `_migrate/<key>` with v2 codecs, checking each shard's recorded checksum."""
    group, rel = _owner(key)
    old: Any = store.open_group("", mode="r", strict=False)[key]
    shard = old.shards[0] if old.shards else old.chunks[0]
    root = store.open_group("", mode="a")
    new: Any = root.create_array(f"{_STAGE}/{key}", shape=old.shape, dtype=old.dtype, chunks=old.chunks,
                                 shards=old.shards, compressors=chunk_codecs(_compressor(store, group)),
                                 fill_value=0, overwrite=True)
    new = new.with_config(_WRITE_ALL)
    for c in range(-(-old.shape[0] // shard)):
        try:
            block = np.asarray(old[c * shard:(c + 1) * shard])
            damaged = (want := expected.get((rel, c))) is not None and array_checksum(block) != want
        except Exception:  # noqa: BLE001 - a damaged v1 shard fails in zstd with any error type
            damaged = True
        if damaged:
            raise CacheCorruptError(
                f"{store.url}: {key} chunk {c} does not match its recorded checksum; this cache is damaged and "
                f"cannot be migrated as it is: check it with `mtkd-cache verify` of the mtkd that wrote it "
                f"(format v1), re-run the damaged teacher there, then migrate")
        new[c * shard:(c + 1) * shard] = block


def _swap(store: CacheStore, key: str) -> None:
    store.remove(key)
    store.fs.mv(store.path(f"{_STAGE}/{key}"), store.path(key), recursive=True)


def _rewrite_arrays(store: CacheStore, report: MigrateReport, progress: bool) -> None:
    journal = store.read_json(_JOURNAL) if store.exists(_JOURNAL) else {"done": [], "staged": None}
    if journal["staged"]:  # killed between copying and swapping: the staged copy is complete
        _swap(store, journal["staged"])
        journal = {"done": [*journal["done"], journal["staged"]], "staged": None}
        store.write_json(_JOURNAL, journal)
    keys = [k for k in _array_keys(store) if k not in journal["done"]]
    expected = {g: _expected(store, g) for g in {_owner(k)[0] for k in keys}}
    for key in tqdm(keys, desc="migrate", unit=" arrays", disable=not progress):
        _copy_array(store, key, expected[_owner(key)[0]])
        store.write_json(_JOURNAL, {**journal, "staged": key})
        _swap(store, key)
        journal = {"done": [*journal["done"], key], "staged": None}
        store.write_json(_JOURNAL, journal)
        report.arrays_rewritten += 1


def _upgrade_teacher(store: CacheStore, name: str) -> bool:
    """Add settings hashes to the commit markers and the teacher.json hash; True if complete."""
    key = f"teachers/{name}"
    if store.exists(f"{key}/teacher.json"):
        raw = store.read_json(f"{key}/teacher.json")
        settings_hash = TeacherMeta.from_dict(raw).settings_hash()
    elif store.exists(f"{key}/_run.json"):
        raw, settings_hash = None, content_hash(store.read_json(f"{key}/_run.json"))
    else:
        return False
    for marker_name in store.listdir(f"{key}/_commits"):
        marker = store.read_json(f"{key}/_commits/{marker_name}")
        if marker.get("settings_sha256") != settings_hash:
            store.write_json(f"{key}/_commits/{marker_name}", {**marker, "settings_sha256": settings_hash})
    if raw is None:
        return False
    table = store.read_table(f"{key}/chunks.parquet")
    store.write_table(f"{key}/chunks.parquet", table.replace_schema_metadata({TEACHER_HASH_KEY: content_hash(raw)}))
    return True


def migrate_cache(url: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None,
                  progress: bool = True) -> MigrateReport:
    """Upgrade the cache at `url` to the current format version in place (no target is recomputed).

    Safe to re-run after a kill; a cache already at the current version is left untouched.

    Returns:
        A `MigrateReport` (versions, arrays rewritten, complete teachers).

    Raises:
        CacheNotFoundError: no manifest. CacheFormatError: not an mtkd cache, or a version this
            mtkd cannot upgrade. CacheCorruptError: a stored chunk does not match its checksum.
    """
    store = CacheStore(url, storage_options)
    if not store.exists("manifest.json"):
        raise CacheNotFoundError(f"{store.url} is not an mtkd cache: manifest.json is missing")
    raw = store.read_json("manifest.json")
    if raw.get("format") != FORMAT_NAME:
        raise CacheFormatError(f"{store.url}: manifest.json format is {raw.get('format')!r}, not an mtkd cache")
    version = raw.get("format_version")
    report = MigrateReport(url=store.url, from_version=int(version) if isinstance(version, int) else -1)
    if version == FORMAT_VERSION:
        report.teachers = store.teachers_with("teacher.json")
        return report
    if version not in (1, 2):
        raise CacheFormatError(f"{store.url}: format_version {version!r} cannot be migrated by this mtkd "
                               f"(it upgrades versions 1 and 2 to {FORMAT_VERSION})")
    store.check_writable()
    if version == 1:
        _rewrite_arrays(store, report, progress)
        report.teachers = [n for n in store.subdirs("teachers") if _upgrade_teacher(store, n)]
    else:  # 2 -> 3 adds only optional parts (stored text, tokenizations): the manifest says 3
        report.teachers = store.teachers_with("teacher.json")
    manifest = Manifest(format_version=FORMAT_VERSION, mtkd_version=__version__,
                        dataset_fingerprint=str(raw["dataset_fingerprint"]), updated=now_iso())
    store.write_json("manifest.json", manifest.to_dict())
    store.remove(_STAGE)
    store.remove(_JOURNAL)
    return report
