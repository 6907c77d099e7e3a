"""Reading and damaging what mtkd wrote, with zarr, pyarrow and safetensors only (docs/FORMAT.md).

Comparisons decode arrays and tables, so a bit-for-bit check survives mtkd re-encoding its files
(another compressor, extra checksums); damage helpers return what they changed so a trial can
prove it really damaged something.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "arrays_under", "copy_tree", "flip_byte", "inputs_equal", "metrics_records", "same_arrays",
    "shard_files", "step_losses", "student_weights", "tree_digest", "user_files_lost",
]

VOLATILE_KEYS = ("created", "updated", "mtkd_version", "time", "bytes", "bytes_per_position")
"""JSON fields that hold times, versions or stored sizes (which depend on leftover files, not on the
data): left out when two runs' metadata are compared; the arrays themselves are compared bit for bit."""


def copy_tree(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    return Path(shutil.copytree(src, dst))


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def user_files_lost(before: dict[str, str], root: Path) -> list[str]:
    """Files of the `before` digest that are gone or changed under `root`."""
    after = tree_digest(root) if root.exists() else {}
    return [k for k, v in before.items() if after.get(k) != v]


def arrays_under(root: Path) -> dict[str, np.ndarray]:
    """Every zarr array below `root`, decoded, by path relative to `root`."""
    import zarr

    out: dict[str, np.ndarray] = {}
    for meta in sorted(root.rglob("zarr.json")):
        if json.loads(meta.read_text()).get("node_type") == "array":
            out[str(meta.parent.relative_to(root))] = np.asarray(zarr.open_array(str(meta.parent), mode="r")[:])
    return out


def same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[bool, str]:
    """(equal, first difference): same names, dtypes, shapes and bytes (NaN equal to NaN)."""
    if sorted(a) != sorted(b):
        return False, f"arrays {sorted(set(a) ^ set(b))} are in only one of the two"
    for key in sorted(a):
        x, y = a[key], b[key]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False, f"{key}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        if x.tobytes() != y.tobytes():
            return False, f"{key}: {int(np.sum(x != y))} elements differ"
    if not a:
        return False, "no arrays at all"
    return True, ""


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def json_equal(a: Path, b: Path) -> bool:
    return bool(_strip(json.loads(a.read_text())) == _strip(json.loads(b.read_text())))


def inputs_equal(cache: Path, ref: Path) -> tuple[bool, str]:
    """The prepared inputs of two caches are the same: arrays, every Parquet table, inputs.json."""
    import pyarrow.parquet as pq

    if not (cache / "manifest.json").is_file():
        return False, "no manifest.json: the cache is not finished"
    ok, why = same_arrays(arrays_under(cache / "inputs"), arrays_under(ref / "inputs"))
    if not ok:
        return False, why
    for table in sorted((ref / "inputs").glob("*.parquet")):
        other = cache / "inputs" / table.name
        if not other.is_file() or not pq.read_table(other).equals(pq.read_table(table)):
            return False, f"inputs/{table.name} differs"
    if not json_equal(cache / "inputs" / "inputs.json", ref / "inputs" / "inputs.json"):
        return False, "inputs/inputs.json differs"
    return True, ""


def metrics_records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            out.append({"unparsable": line})
    return out


def step_losses(run: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl; a step logged twice keeps its later value."""
    return {int(r["step"]): float(r["loss"]) for r in metrics_records(run) if "loss" in r and "step" in r}


def student_weights(run: Path) -> dict[str, np.ndarray]:
    """The final student's tensors (every *.safetensors under run/student)."""
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted((run / "student").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def shard_files(array_dir: Path) -> list[Path]:
    """The chunk/shard objects of one zarr array (files under its `c/` folder)."""
    return sorted(p for p in (array_dir / "c").rglob("*") if p.is_file()) if (array_dir / "c").is_dir() else []


def flip_byte(path: Path, rng: random.Random, *, lo: float = 0.0, hi: float = 1.0) -> tuple[int, int, int]:
    """XOR one byte (at a random offset in [lo, hi) of the file) with a random non-zero mask.

    Returns:
        (offset, old byte, new byte); the new byte always differs from the old.
    """
    data = bytearray(path.read_bytes())
    if not data:
        raise ValueError(f"{path} is empty; nothing to flip")
    offset = rng.randrange(int(len(data) * lo), max(int(len(data) * hi), int(len(data) * lo) + 1))
    old = data[offset]
    data[offset] = old ^ rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    assert path.read_bytes()[offset] != old
    return offset, old, data[offset]
