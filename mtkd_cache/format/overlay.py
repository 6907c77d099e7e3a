"""Overlays: teachers stored apart from the cache whose inputs they were computed on.

An overlay is a folder (any fsspec URL) the user owns, holding `overlay.json` and
`teachers/<name>/` exactly as a cache would. `overlay.json` names the base (the shared cache, or
another overlay) by URL and the dataset fingerprint of its inputs. Opening an overlay opens its
base, refuses it when the fingerprint differs, and reads the overlay's teachers next to the
base's; every teacher is also checked against the inputs' fingerprint when opened
(`CacheReader.teacher`). The base is only read, never written.
"""

from __future__ import annotations

from typing import Any

from mtkd_cache.errors import CacheExistsError, CacheFormatError, CacheMismatchError
from mtkd_cache.format.reader import CacheReader, open_cache
from mtkd_cache.format.store import CacheStore

__all__ = ["OVERLAY_FILE", "OverlayReader", "create_overlay", "is_overlay", "open_overlay", "reader_for_run"]

OVERLAY_FILE = "overlay.json"


class OverlayReader(CacheReader):
    """A cache reader whose inputs come from `base` and whose teachers come from both.

    A teacher stored in the overlay hides one of the same name in the base.
    """

    def __init__(self, overlay: CacheStore, base: CacheReader, *, check: bool = True):
        # the inputs are the base's (already opened and checked): share them, do not re-read
        self.__dict__.update({k: v for k, v in base.__dict__.items() if k not in ("_teachers", "check")})
        self.check, self._teachers, self.overlay, self.base = check, {}, overlay, base

    def __repr__(self) -> str:
        return f"OverlayReader({self.overlay.url!r} over {self.base!r})"

    @property
    def url(self) -> str:
        return self.overlay.url

    @property
    def teacher_names(self) -> list[str]:
        return sorted(set(self.overlay.teachers_with("teacher.json")) | set(self.base.teacher_names))

    def incomplete_teachers(self) -> list[str]:
        done = set(self.teacher_names)
        return [n for n in self.overlay.subdirs("teachers") if n not in done] + self.base.incomplete_teachers()

    def teacher_store(self, name: str) -> CacheStore:
        if self.overlay.exists(f"teachers/{name}/teacher.json") or name not in self.base.teacher_names:
            return self.overlay
        return self.base.teacher_store(name)

    def tokenization_store(self, tid: str) -> CacheStore:
        from mtkd_cache.format.tokenization import tokenization_key

        if self.overlay.exists(f"{tokenization_key(tid)}/tokenization.json"):
            return self.overlay
        return self.base.tokenization_store(tid)

    @property
    def write_store(self) -> CacheStore:
        return self.overlay  # the base is only read


def is_overlay(store: CacheStore) -> bool:
    """Whether `store` is an overlay: it holds `overlay.json` and no manifest of its own."""
    return not store.exists("manifest.json") and store.exists(OVERLAY_FILE)


def _read_record(store: CacheStore) -> dict[str, Any]:
    rec = store.read_json(OVERLAY_FILE)
    if not isinstance(rec.get("base"), str) or not isinstance(rec.get("dataset_fingerprint"), str):
        raise CacheFormatError(f"{store.path(OVERLAY_FILE)} must hold 'base' (a URL) and 'dataset_fingerprint' "
                               f"(strings); it is damaged — restore it or re-create the overlay with `run --inputs`")
    return rec


def open_overlay(store: CacheStore, *, check: bool = True) -> OverlayReader:
    """Open the overlay at `store` over its base (same storage options), checking the fingerprint.

    Raises:
        CacheMismatchError: the base's inputs are not those the overlay was bound to.
    """
    rec = _read_record(store)
    base = open_cache(rec["base"], store.storage_options or None, check=check)
    fp = base.inputs.dataset_fingerprint
    if fp != rec["dataset_fingerprint"]:
        raise CacheMismatchError(
            f"overlay {store.url} was made for inputs with dataset fingerprint {rec['dataset_fingerprint']}, but "
            f"its base {rec['base']} now has {fp}; point the overlay at the cache it was made for, or re-run "
            f"its teachers with `mtkd-cache run OVERLAY --inputs {rec['base']} --overwrite`")
    return OverlayReader(store, base, check=check)


def create_overlay(store: CacheStore, base_url: str) -> OverlayReader:
    """Bind the overlay at `store` to the cache (or overlay) at `base_url`, or reopen it if it is bound.

    Writes `overlay.json` (base URL and dataset fingerprint) when absent; never writes to the base.

    Raises:
        CacheExistsError: `store` is a cache of its own, or an overlay bound to another base.
    """
    if store.exists("manifest.json"):
        raise CacheExistsError(f"{store.url} is a cache with its own inputs, not an overlay; drop --inputs to "
                               f"add the teacher to it, or choose an empty location for the overlay")
    base = open_cache(base_url, store.storage_options or None)
    if store.exists(OVERLAY_FILE):
        rec = _read_record(store)
        if rec["base"] != base_url:
            raise CacheExistsError(f"overlay {store.url} is bound to {rec['base']}, not {base_url}; use another "
                                   f"location for an overlay of {base_url}")
        return open_overlay(store)
    store.write_json(OVERLAY_FILE, {"base": base_url, "dataset_fingerprint": base.inputs.dataset_fingerprint})
    return OverlayReader(store, base)


def reader_for_run(store: CacheStore, inputs: str | None) -> CacheReader:
    """The reader a teacher run computes from: the overlay over `inputs`, an existing overlay, or the cache."""
    if inputs:
        return create_overlay(store, inputs)
    if not store.exists("manifest.json") and store.exists(OVERLAY_FILE):
        return open_overlay(store)
    return CacheReader(store)
