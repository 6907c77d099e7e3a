"""`merge`: copy an overlay's teachers into a cache the user may write, then verify them.

Each teacher folder is copied file by file with `teacher.json` last (a teacher is complete exactly
when its `teacher.json` exists, so a copy cut short leaves an incomplete teacher that the next
`merge` finishes); a cross-tokenizer teacher's tokenization, built in the overlay, is copied before
it, `tokenization.json` last. Every copied file is read back and compared byte for byte, then the whole
destination is verified (`verify_cache`: checksums, fingerprints). A teacher the destination
already holds is refused; the destination's inputs must carry the overlay's dataset fingerprint.
Cost: one read of every overlay file and a write plus a read-back on the destination.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mtkd_cache.errors import CacheCorruptError, CacheExistsError, CacheMismatchError
from mtkd_cache.format.overlay import OverlayReader
from mtkd_cache.format.reader import CacheReader, open_cache
from mtkd_cache.format.store import CacheStore
from mtkd_cache.format.tokenization import tokenization_key
from mtkd_cache.ops.verify import verify_cache

__all__ = ["MergeReport", "merge_overlay"]


@dataclass
class MergeReport:
    """What `merge_overlay` copied: teachers, files and bytes."""

    teachers: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0


def _copy_folder(src: CacheStore, dst: CacheStore, key: str, last: str, report: MergeReport) -> None:
    """Copy folder `key` file by file, `last` (the file whose presence marks it complete) at the end."""
    root = src.path(key)
    files = sorted(str(p) for p in src.fs.find(root))
    rel = [f"{key}/{p[len(root):].lstrip('/')}" for p in files]
    rel.sort(key=lambda k: k.endswith(f"/{last}"))  # complete only when all is there
    for key in rel:
        data = src.read_bytes(key)
        dst.write_bytes(key, data)
        if dst.read_bytes(key) != data:
            raise CacheCorruptError(f"merge: {dst.path(key)} does not read back as written; check the destination "
                                    f"storage and re-run `mtkd-cache merge`")
        report.files += 1
        report.bytes += len(data)


def merge_overlay(overlay: str | os.PathLike[str], dest: str | os.PathLike[str], *,
                  teachers: Sequence[str] | None = None,
                  storage_options: Mapping[str, Any] | None = None) -> MergeReport:
    """Copy the overlay's own complete teachers (or `teachers`) into cache `dest`, verified.

    Raises:
        CacheMismatchError: `dest`'s inputs have another dataset fingerprint than the overlay's.
        CacheExistsError: `dest` already holds one of the teachers.
        CacheCorruptError: a copy does not read back equal, or `dest` fails verification after it.
    """
    reader = open_cache(overlay, storage_options)
    if not isinstance(reader, OverlayReader):
        raise CacheMismatchError(f"{overlay} is not an overlay (it has no overlay.json); `merge` copies the teachers "
                                 f"of an overlay made with `mtkd-cache run OVERLAY --inputs CACHE`")
    target = CacheReader(CacheStore(dest, storage_options))
    if target.inputs.dataset_fingerprint != reader.inputs.dataset_fingerprint:
        raise CacheMismatchError(
            f"overlay {overlay} was computed on inputs {reader.inputs.dataset_fingerprint}, cache {dest} holds "
            f"{target.inputs.dataset_fingerprint}; merge into the cache the overlay was made for")
    names = list(teachers) if teachers else reader.overlay.teachers_with("teacher.json")
    clash = sorted(set(names) & set(target.teacher_names))
    if clash:
        raise CacheExistsError(f"cache {dest} already holds teacher(s) {clash}; merge the others with --teacher, or "
                               f"remove them from {dest} first")
    report = MergeReport()
    for name in names:
        tid = reader.teacher(name).meta.tokenization  # complete and bound to these inputs (raises otherwise)
        if tid is not None and not target.store.exists(f"{tokenization_key(tid)}/tokenization.json"):
            _copy_folder(reader.tokenization_store(tid), target.store, tokenization_key(tid), "tokenization.json",
                         report)  # the teacher's own tokenization, built in the overlay
        _copy_folder(reader.overlay, target.store, f"teachers/{name}", "teacher.json", report)
        report.teachers.append(name)
    check = verify_cache(dest, storage_options=storage_options, progress=False)
    if not check.ok:
        raise CacheCorruptError(f"after merging {names} into {dest}, verify found: {'; '.join(check.problems)}")
    return report
