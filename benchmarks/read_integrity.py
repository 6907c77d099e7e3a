"""What checking every read costs: decode throughput with the read-time checks on and off.

    python -m benchmarks.read_integrity            # ~1-2 min on 1 CPU core; writes results/read_integrity.json

**Setting.** One synthetic top-64 teacher (u8log values, uint16 indices over a vocabulary of
8,192, fp16 tail, zstd level 3) over 65,536 rows in 4 chunks of 16,384 rows (2 inner zarr chunks
of 8,192 rows per shard, as a 32k-position token chunk has), written by `TeacherWriter`. The
same arrays are also rewritten without the crc32c codec into a second cache (the format-v1
encoding). Indices are random ascending subsets, log-probabilities a random Zipf-like spread:
they compress like real targets (about 2 bytes per entry).

**Arms** (interleaved: off, crc, on, blake2b, off, ...; `time.process_time` of reading every
chunk of the teacher with `CacheReader.read_chunk`, median over rounds):

* `off`: no crc32c in the arrays, `check=False`: the decode time the 5% budget is measured against;
* `crc`: crc32c after every compressed inner chunk, verified by zarr's codec pipeline, `check=False`;
* `on`: what readers do by default: crc32c, absent shards raise, value checks (ids in range and
  strictly ascending, log-probs, tail in [0, 1]), teacher.json hash checked at open;
* `blake2b`: the alternative design, no crc in the arrays and the blake2b-128 checksums that
  `chunks.parquet` already stores recomputed over each chunk region on read.

The numbers decide the design: the `on` overhead must stay within 5% of `off`.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from mtkd_cache import (
    CacheReader,
    TargetSpec,
    TeacherMeta,
    ValueEncoding,
    open_cache,
    prepare_arrays,
)
from mtkd_cache.format.codecs import array_checksum
from mtkd_cache.format.layout import chunk_rows
from mtkd_cache.format.store import CacheStore
from mtkd_cache.format.targets import TeacherWriter

RESULTS = Path(__file__).parent / "results" / "read_integrity.json"
ROWS, CHUNK, K, VOCAB = 65_536, 16_384, 64, 8_192


def synthetic_chunk(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """n rows of top-K targets: ascending ids, Zipf-like log-probabilities, exact tail."""
    idx = np.cumsum(rng.integers(1, VOCAB // K, size=(n, K)), axis=1)  # (n, K) strictly ascending, < VOCAB
    p = rng.pareto(1.2, size=(n, K)) + 1e-3
    p = 0.95 * p / p.sum(axis=1, keepdims=True) * rng.uniform(0.6, 1.0, size=(n, 1))
    return {"indices": idx, "logp": np.log(p).astype(np.float32), "tail": (1 - p.sum(axis=1)).astype(np.float32)}


def build(work: Path) -> tuple[Path, Path]:
    """The checked cache (v2 encoding) and its copy without crc32c; built once under `work`."""
    on, off = work / "checked", work / "plain"
    if (off / "teachers/t/teacher.json").exists():
        return on, off
    shutil.rmtree(work, ignore_errors=True)
    prepare_arrays(on, {"x": np.zeros((ROWS, 1), dtype=np.uint8)}, chunk_samples=CHUNK)
    store, reader = CacheStore(on), CacheReader(CacheStore(on))
    meta = TeacherMeta(name="t", model="synthetic", task="custom", weights_hash="0" * 64, dtype="float32",
                       vocab_size=VOCAB, padded_vocab_size=VOCAB, grid="sample", target=TargetSpec("topk", k=K),
                       values=ValueEncoding("u8log"), index_dtype="uint16", tail_dtype="float16",
                       compressor={"name": "zstd", "level": 3},  # type: ignore[arg-type]
                       dataset_fingerprint=reader.inputs.dataset_fingerprint, tokenizer_fingerprint=None)
    writer, rng = TeacherWriter(store, meta, reader.inputs), np.random.default_rng(0)
    for c in range(reader.num_chunks):
        writer.write_chunk(c, **synthetic_chunk(rng, CHUNK), stats={"positions": float(CHUNK)})
    writer.finish()
    shutil.copytree(on, off)
    for name in ("indices", "values", "tail"):  # the same arrays without crc32c (format v1's codecs)
        old = zarr.open_array(str(on / "teachers/t" / name), mode="r")
        new = zarr.create_array(str(off / "teachers/t" / name), shape=old.shape, dtype=old.dtype, chunks=old.chunks,
                                shards=old.shards, compressors=ZstdCodec(level=3), fill_value=0, overwrite=True,
                                config={"write_empty_chunks": True})
        new[:] = old[:]
    return on, off


def read_all(reader: CacheReader, blake: bool = False) -> float:
    """CPU seconds to decode every chunk of teacher `t` (and hash each region for `blake`)."""
    tr = reader.teacher("t")
    t0 = time.process_time()
    for c in range(reader.num_chunks):
        reader.read_chunk(c, teachers=["t"])
        if blake:
            r0, r1 = chunk_rows(reader.grid, c, "sample")
            for name in ("indices", "values", "tail"):
                array_checksum(np.asarray(tr._array(name)[r0:r1]))
    return time.process_time() - t0


@click.command()
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/mtkd-bench-read-integrity"),
              show_default=True, help="Where the two caches are built (reused).")
@click.option("--rounds", type=click.IntRange(min=3), default=15, show_default=True, help="Interleaved rounds.")
def main(work: Path, rounds: int) -> None:
    """Measure decode throughput with read checks on vs off; write results/read_integrity.json."""
    on_path, off_path = build(work)
    arms: dict[str, Any] = {
        "off": lambda: read_all(open_cache(off_path, check=False)),
        "crc": lambda: read_all(open_cache(on_path, check=False)),
        "on": lambda: read_all(open_cache(on_path)),
        "blake2b": lambda: read_all(open_cache(off_path, check=False), blake=True),
    }
    for arm in arms.values():
        arm()  # warm-up: page cache and imports
    times: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(rounds):
        for name, arm in arms.items():
            times[name].append(arm())
    med = {a: statistics.median(v) for a, v in times.items()}
    result = {
        "command": "python -m benchmarks.read_integrity",
        "setting": {"rows": ROWS, "chunk_rows": CHUNK, "k": K, "vocab": VOCAB, "values": "u8log",
                    "rounds": rounds, "stored_bytes": CacheStore(on_path).size_of("teachers/t")},
        "median_cpu_s": med,
        "rows_per_cpu_s": {a: ROWS / s for a, s in med.items()},
        "overhead_vs_off": {a: med[a] / med["off"] - 1 for a in arms if a != "off"},
        "budget": 0.05,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for a in arms:
        extra = "" if a == "off" else f"{result['overhead_vs_off'][a] * 100:+.1f}%"  # type: ignore[index]
        click.echo(f"{a:8s} {med[a] * 1e3:8.1f} ms  {ROWS / med[a] / 1e6:6.2f} M rows/s  {extra}")


if __name__ == "__main__":
    main()
