"""Decode throughput of cached targets: positions per CPU-second, whole-shard path against zarr's.

    python -m benchmarks.loader_decode --model-dir DIR   # builds the cache once (~5-10 min), then ~2 min

**Setting** (built once under `--work`): 256 Shakespeare windows of 128 tokens (32,768 positions,
one chunk of the default size, `prepare`'s ~32k positions) run through three teachers
with `mtkd-cache run`'s defaults (u8log values, fp16 tail, zstd 3, 4 inner chunks of 8,192 rows):
`k64`, top-64 of SmolLM2-135M-Instruct (`benchmarks._models.ensure_smollm2`, or the folder given
as `--model-dir`): real targets, with SmolLM2's entropy and tail; `k128` (top-128) and `sampled`
(64 draws) from a 16.8M-parameter random Llama with SmolLM2's tokenizer (see `MODELS`). With
`--teacher-model DIR` every teacher is that model instead (and its tokenizer windows the text): the
README's run used `train_loader`'s target teacher t0. `--cache CACHE --teacher NAME ...` measures any
existing cache instead of building one.

**Arms**, interleaved in one process (`time.process_time`: every thread of the process, so the
rate is per core), median over `--rounds`:

* `<teacher>/zarr`: `CacheReader.read_chunk` through zarr's own read path (the reader before the
  whole-shard path; `ShardedArray.layout` cleared);
* `<teacher>/shards`: `CacheReader.read_chunk` as readers now do it: one GET per shard, crc32c of
  the index and of every inner chunk, numcodecs zstd, then the value checks and the decode to
  int64 ids / float32 log-probs / float32 tails;
* `<first teacher>/stream`: `CachedDistillDataset` (read-ahead off, so one thread does everything) over the
  same cache, including batch assembly (`BatchBuilder`) into (B, L, K) tensors at batch 8: what
  the trainer's loader costs per position.

Every arm reads checked data (`check=True`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from benchmarks._models import default_smollm2_dir, ensure_smollm2, shakespeare_jsonl, tiny_llama
from mtkd_cache import RunConfig, open_cache, prepare, run_teacher
from mtkd_cache.format.reader import CacheReader
from mtkd_train.data import CachedDistillDataset

RESULTS = Path(__file__).parent / "results" / "loader_decode.json"
TEACHERS = {"k64": {"top_k": 64}, "k128": {"top_k": 128}, "sampled": {"top_k": None, "samples": 64}}
MODELS = {"k64": "smollm2", "k128": "tiny", "sampled": "tiny"}
"""Which model writes each teacher: SmolLM2 for the k = 64 target; the 16.8M random Llama (SmolLM2's
tokenizer, `benchmarks._models.tiny_llama`) for the others, whose forward is ~6x cheaper on a
shared CPU. Its near-uniform distributions compress worse than SmolLM2's: a harder case to decode."""
MAX_LENGTH, SAMPLES = 128, 256


def ensure_cache(work: Path, model_dir: Path, log: Callable[[str], None] = click.echo, *,
                 teacher_model: Path | None = None) -> Path:
    """The cache of the setting (each teacher is run once; a finished teacher is kept).

    With `teacher_model`, every teacher is that model (and its tokenizer windows the text).
    """
    work.mkdir(parents=True, exist_ok=True)
    data, cache = work / "shakespeare.jsonl", work / "cache"
    if not data.exists():
        shakespeare_jsonl(data)
    if not (cache / "manifest.json").exists():
        prepare(cache, data, tokenizer=teacher_model or model_dir, max_length=MAX_LENGTH, max_samples=SAMPLES,
                progress=False)
    done = set(open_cache(cache).teacher_names)
    models = ({"smollm2": teacher_model, "tiny": teacher_model} if teacher_model is not None else
              {"smollm2": model_dir, "tiny": tiny_llama(work / "tiny-llama-17m", model_dir)})
    for name, target in TEACHERS.items():
        if name not in done:
            t0 = time.perf_counter()
            run_teacher(cache, RunConfig(teacher=name, model=str(models[MODELS[name]]), device="cpu", dtype="fp32",
                                         **target), progress=False)  # type: ignore[arg-type]
            log(f"ran teacher {name} in {time.perf_counter() - t0:.0f} s")
    return cache


def _zarr_path(reader: CacheReader, teacher: str) -> CacheReader:
    """Route `teacher`'s arrays (and the inputs) through zarr's read path, as before format/shards.py."""
    reader.read_chunk(0, teachers=[teacher])  # opens the arrays
    for arr in [*reader.teacher(teacher)._arrays.values(), *reader._input_arrays.values()]:
        arr.layout = None
    return reader


def read_chunks(reader: CacheReader, teacher: str) -> tuple[float, int]:
    """CPU seconds and positions of decoding every chunk of `teacher` once."""
    positions = 0
    t0 = time.process_time()
    for c in range(reader.num_chunks):
        positions += int(reader.read_chunk(c, teachers=[teacher]).lengths.sum())
    return time.process_time() - t0, positions


def stream(cache: Path, teacher: str, seed: int) -> tuple[float, int]:
    """CPU seconds and positions of one epoch of `CachedDistillDataset` batches (no read-ahead)."""
    ds = CachedDistillDataset(cache, [teacher], batch_size=8, seed=seed, epochs=1, prefetch=0)
    _ = ds.reader.sample_columns, ds.reader.teacher(teacher)  # opening the cache is not decoding
    positions = 0
    t0 = time.process_time()
    for batch in ds:
        mask = batch.get("position_mask")  # array inputs: one position per sample
        positions += int(mask.sum()) if mask is not None else int((batch["sample_ids"] >= 0).sum())
    return time.process_time() - t0, positions


@click.command()
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="SmolLM2 model folder (default: convert the packaged GGUF once, benchmarks._models).")
@click.option("--work", type=click.Path(path_type=Path), default=Path.home() / ".cache/mtkd/bench-decode",
              show_default=True, help="Where the cache is built (reused).")
@click.option("--cache", type=click.Path(path_type=Path), default=None,
              help="Measure this existing cache instead of building the setting (with --teacher).")
@click.option("--teacher", "teachers", multiple=True, help="Teachers of --cache to measure (repeatable).")
@click.option("--teacher-model", type=click.Path(path_type=Path), default=None,
              help="Build the setting with this model (and its tokenizer) for every teacher instead.")
@click.option("--rounds", type=click.IntRange(min=3), default=9, show_default=True, help="Interleaved rounds.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True, help="JSON results.")
def main(model_dir: Path | None, work: Path, cache: Path | None, teachers: tuple[str, ...],
         teacher_model: Path | None, rounds: int, out: Path) -> None:
    """Measure decode positions per CPU-second; write results/loader_decode.json."""
    if cache is None:
        smol = model_dir if teacher_model is not None else ensure_smollm2(model_dir or default_smollm2_dir())
        cache = ensure_cache(work, smol, teacher_model=teacher_model)  # type: ignore[arg-type]
        teachers = tuple(TEACHERS)
    readers = {t: open_cache(cache) for t in teachers}
    old = {t: _zarr_path(open_cache(cache), t) for t in teachers}
    arms: dict[str, Callable[[int], tuple[float, int]]] = {}
    for t in teachers:
        arms[f"{t}/zarr"] = lambda _r, t=t: read_chunks(old[t], t)  # type: ignore[misc]
        arms[f"{t}/shards"] = lambda _r, t=t: read_chunks(readers[t], t)  # type: ignore[misc]
    first = teachers[0]
    arms[f"{first}/stream"] = lambda r: stream(cache, first, r)  # type: ignore[arg-type]
    for arm in arms.values():
        arm(0)  # warm-up: page cache, first allocations
    runs: dict[str, list[tuple[float, int]]] = {a: [] for a in arms}
    for r in range(rounds):
        for name, arm in arms.items():
            runs[name].append(arm(r + 1))
    rate = {a: statistics.median(p / s for s, p in v) for a, v in runs.items()}
    reader = readers[first]
    result: dict[str, Any] = {
        "command": "python -m benchmarks.loader_decode " + " ".join(sys.argv[1:]), "loadavg": os.getloadavg(),
        "rounds": rounds,
        "setting": {"cache": str(cache), "positions": reader.inputs.num_positions,
                    "chunk_positions": reader.grid.chunk_positions, "inner_positions": reader.grid.inner_positions,
                    "targets": {t: readers[t].teacher(t).meta.target.to_dict() for t in teachers},
                    "stored_bytes_per_position": {t: reader.store.size_of(f"teachers/{t}") /
                                                  reader.inputs.num_positions for t in teachers}},
        "positions_per_cpu_s": rate,
        "speedup_vs_zarr": {t: rate[f"{t}/shards"] / rate[f"{t}/zarr"] for t in teachers},
        "target_k64": 1_000_000,
        "raw_cpu_s": {a: [s for s, _ in v] for a, v in runs.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for a, v in rate.items():
        click.echo(f"{a:16s} {v / 1e6:6.2f} M positions per CPU-second")


if __name__ == "__main__":
    main()
