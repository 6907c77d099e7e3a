"""Reading `prepare`'s source data as a stream of column batches, with bounded memory.

Local files (text, json/jsonl, parquet, csv) go through the HF `datasets` builders in
streaming mode; a folder written by `Dataset.save_to_disk` is memory-mapped; anything else is
treated as a hub dataset id (which fails offline, with a clear message).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mtkd_cache.errors import InputDataError

__all__ = ["iter_source"]

_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


def _builder_for(files: Sequence[str]) -> str:
    exts = {Path(f.removesuffix(".gz")).suffix.lower() for f in files}
    builders = {_BUILDERS.get(e) for e in exts}
    if len(builders) != 1 or None in builders:
        raise InputDataError(
            f"--data {files[0]!r}...: cannot tell the format from the extensions {sorted(exts)}; "
            f"use one of {sorted(_BUILDERS)}"
        )
    return builders.pop()  # type: ignore[return-value]


def _local_files(source: str) -> list[str] | None:
    p = Path(source)
    if p.is_file():
        return [str(p)]
    if p.is_dir() and not (p / "dataset_info.json").exists() and not (p / "state.json").exists():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _BUILDERS)
        if not files:
            raise InputDataError(f"--data {source!r}: folder holds no {sorted(_BUILDERS)} files")
        return files
    return None


def iter_source(
    source: str | os.PathLike[str], *, split: str, columns: Sequence[str], batch_size: int
) -> Iterator[dict[str, list[Any]]]:
    """Yield batches `{column: values}` of the source, in its order, `batch_size` rows at a time."""
    import datasets

    source = str(source)
    files = _local_files(source)
    if files is not None:
        ds: Any = datasets.load_dataset(_builder_for(files), data_files=files, split="train", streaming=True)
    elif Path(source).is_dir():
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise InputDataError(f"--data {source!r} has splits {list(ds)}, not {split!r}; pass --split")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(source, split=split, streaming=True)
        except Exception as e:  # the hub client raises many types; we re-raise with context
            raise InputDataError(
                f"--data {source!r} is neither a local file or folder nor a loadable dataset id ({e})"
            ) from e
    names = list(getattr(ds, "column_names", None) or getattr(ds, "features", {}) or [])
    missing = [c for c in columns if names and c not in names]
    if missing:
        raise InputDataError(
            f"--data {source!r} has columns {names}, not {missing}; pass the right --text-column/"
            f"--label-column/--domain-column"
        )
    for batch in ds.iter(batch_size=batch_size):
        yield {c: list(batch[c]) for c in columns}
