"""Remote read throughput (moto S3 on loopback ÷ local disk) and export/import time ÷ a plain copy.

    python -m benchmarks.remote_export [--samples 4096] [--length 256] [--k 16]

Builds one token cache (random token ids, one teacher with random top-k targets written through
the real writer), then, side by side on the same cache:
- reads every chunk (inputs + targets, checked) from the local folder, and from a moto S3 server
  process on loopback, first epoch (downloads) and second epoch (local chunk cache);
- times `export_cache`, `import_cache` and `shutil.copytree` of the cache folder.
Prints one JSON record with positions/s and the ratios. Loopback is the ceiling of any network,
so the S3 ratio measures protocol and request overhead, not bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _build(path: Path, n: int, length: int, k: int) -> None:
    from mtkd_cache import RunConfig, prepare_arrays, run_teacher

    ids = np.random.default_rng(0).integers(4, 1000, size=(n, length)).astype(np.int64)
    prepare_arrays(path, {"input_ids": ids}, labels=list(np.arange(n) % 4), chunk_samples=512)
    run_teacher(path, RunConfig(teacher="t", model="helpers.tiny_models:tiny_factory_classifier", top_k=k,
                                device="cpu"),
                factory_kwargs={"vocab_size": 1000, "num_classes": 64}, progress=False)


def _read_all(url: str, so: dict[str, Any] | None) -> tuple[float, int]:
    from mtkd_cache import open_cache

    t = time.perf_counter()
    reader = open_cache(url, storage_options=so)
    rows = 0
    for c in range(reader.num_chunks):
        d = reader.read_chunk(c, teachers=["t"])
        rows += int(d.inputs["input_ids"].size)
    return time.perf_counter() - t, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--k", type=int, default=16)
    args = ap.parse_args()
    import fsspec
    from services import S3Server, _moto

    from mtkd_cache.ops.export import export_cache, import_cache

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MTKD_CHUNK_CACHE"] = str(root / "chunks")
        cache = root / "cache"
        _build(cache, args.samples, args.length, args.k)
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        out: dict[str, Any] = {"samples": args.samples, "cache_bytes": size,
                               "cache_files": sum(1 for p in cache.rglob("*") if p.is_file())}
        local, values = _read_all(str(cache), None)
        out["local_s"] = local
        with _moto() as url:
            s3 = S3Server(url)
            so, bucket = s3.storage_options(), s3.new_bucket()
            fsspec.filesystem("s3", **so).put(str(cache), f"{bucket}/cache", recursive=True)
            first, _ = _read_all(f"s3://{bucket}/cache", so)
            second, _ = _read_all(f"s3://{bucket}/cache", so)
        out.update(s3_first_epoch_s=first, s3_second_epoch_s=second, values=values,
                   s3_over_local_throughput_first=local / first, s3_over_local_throughput_second=local / second)
        t = time.perf_counter()
        shutil.copytree(cache, root / "copy")
        copy = time.perf_counter() - t
        t = time.perf_counter()
        rep = export_cache(cache, root / "export")
        export = time.perf_counter() - t
        t = time.perf_counter()
        import_cache(root / "export", root / "back")
        imp = time.perf_counter() - t
        out.update(copy_s=copy, export_s=export, import_s=imp, export_files=rep.files,
                   export_over_copy=export / copy, import_over_copy=imp / copy)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
