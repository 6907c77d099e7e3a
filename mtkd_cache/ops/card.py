"""The dataset card (`README.md` with YAML metadata) of an exported cache."""

from __future__ import annotations

import json
from typing import Any

from mtkd_cache.format.reader import CacheReader

__all__ = ["dataset_card"]

_STATS = ("bytes_per_position", "mean_tail", "mean_entropy", "positions")


def _teacher(reader: CacheReader, name: str) -> dict[str, Any]:
    m = reader.teacher(name).meta
    t = m.target
    return {"name": name, "model": m.model, "revision": m.revision, "weights_hash": m.weights_hash,
            "kind": t.kind, "k": t.k, "draws": t.draws, "temperature": t.temperature,
            "encoding": {"values": m.values.to_dict(),
                         "index_dtype": m.index_dtype, "tail_dtype": m.tail_dtype},
            "dataset_fingerprint": m.dataset_fingerprint,
            "stats": {k: m.stats[k] for k in _STATS if k in m.stats}}


def dataset_card(reader: CacheReader, shapes: dict[str, list[int]], license: str, files: int, rows: int) -> str:
    """README.md for an export: YAML front matter (JSON is valid YAML) and how to load it."""
    meta = {
        "license": license,
        "tags": ["knowledge-distillation", "mtkd"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
        "mtkd": {"format_version": reader.manifest.format_version,
                 "dataset_fingerprint": reader.inputs.dataset_fingerprint,
                 "num_samples": reader.inputs.num_samples, "num_positions": reader.inputs.num_positions,
                 "teachers": [_teacher(reader, n) for n in reader.teacher_names],
                 "columns": {p: {"row_shape": s} for p, s in shapes.items()}},
    }
    yaml = "\n".join(f"{k}: {json.dumps(v)}" for k, v in meta.items())
    return f"""---
{yaml}
---

# mtkd teacher cache (export)

{rows:,} samples in {files} Parquet file(s) under `data/`, with the targets of teachers
{", ".join(reader.teacher_names) or "(none)"}. One row per sample; each stored array is a list column
named by its path in the cache, flattened row after row (`mtkd.columns.*.row_shape` gives the row
shape). Values are the stored codes (see mtkd's docs/FORMAT.md for their decoding).

## Load

With `datasets`:

```python
import datasets
ds = datasets.load_dataset("parquet", data_dir="THIS_FOLDER", split="train")
```

With mtkd (decoded, checked targets): rebuild the cache, then open it.

```bash
mtkd-cache import THIS_FOLDER CACHE && mtkd-cache verify CACHE
```
"""
