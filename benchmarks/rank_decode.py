"""Per-rank decoded chunks and bytes per step of DDP training streams, W = 1, 2 and 4 (issue 15, item 7).

    python -m benchmarks.rank_decode            # ~1 min here: builds a small cache, then W = 1, 2, 4

Setting: a cache of 512 token samples (max_length 64, 64 chunks of 8) with one top-32 teacher (a
tiny random Llama, V = 512) under `--work`. For each W, W real processes (`torch.multiprocessing`,
a gloo process group) stream a global batch of 32 samples (B = 32 / W per rank) for 16 steps
(one epoch, read-ahead off so the counts are exactly what the batches needed), once with `lanes = W` (the default: rank-disjoint decoding) and once with `lanes = 1`
(every rank slices every global batch: the behaviour before lanes). Each rank counts the chunks it
decoded, the stored (compressed) target bytes of those chunks, and the decoded bytes (every array
`read_chunk` returned). Rank 0 gathers the counts; results go to `benchmarks/results/rank_decode.json`.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

from mtkd_cache import ChunkData, RunConfig, open_cache, prepare, run_teacher
from mtkd_train.data import CachedDistillDataset

RESULTS = Path(__file__).parent / "results" / "rank_decode.json"
SAMPLES, CHUNK, GLOBAL_BATCH, STEPS = 512, 8, 32, 16


def build_cache(work: Path) -> Path:
    from tests.helpers.tiny_models import save_tiny_causal_lm

    cache = work / "cache"
    if (cache / "teachers" / "t" / "teacher.json").is_file():
        return cache
    lm = save_tiny_causal_lm(work / "lm", vocab_size=512, tokenizer_size=512, hidden_size=32)
    rng = random.Random(0)
    with (work / "corpus.jsonl").open("w") as f:
        for _ in range(SAMPLES):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(500)}" for _ in range(rng.randint(20, 64)))}) + "\n")
    prepare(cache, work / "corpus.jsonl", tokenizer=lm, max_length=64, chunk_samples=CHUNK, progress=False)
    run_teacher(cache, RunConfig(teacher="t", model=str(lm), top_k=32), progress=False)
    return cache


def _nbytes(data: ChunkData) -> int:
    arrays = [*data.inputs.values(), data.offsets, data.lengths]
    for block in data.targets.values():
        arrays += list(block)  # a NamedTuple of arrays
    return int(sum(a.nbytes for a in arrays))


def _stored(cache: Path) -> np.ndarray:
    reader = open_cache(cache)
    sizes = np.zeros(reader.num_chunks, dtype=np.int64)
    for arr in ("indices", "values", "tail"):
        for c in range(reader.num_chunks):
            f = cache / "teachers" / "t" / arr / "c" / str(c) / "0"
            sizes[c] += f.stat().st_size if f.is_file() else 0
    return sizes


def _rank(rank: int, world: int, cache: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stored, rows = _stored(Path(cache)), []
    for lanes in sorted({world, 1}, reverse=True):
        ds = CachedDistillDataset(cache, ["t"], batch_size=GLOBAL_BATCH // world, seed=0, lanes=lanes,
                                 prefetch=0)
        decoded = [0]
        read = ds.read_chunk

        def counting(chunk: int, read: Any = read, decoded: list[int] = decoded) -> ChunkData:
            data = read(chunk)
            decoded[0] += _nbytes(data)
            return data

        ds.read_chunk = counting  # type: ignore[method-assign]
        it = iter(ds)
        for _ in range(STEPS):
            next(it)
        chunks = it.stats.decoded  # type: ignore[attr-defined]
        mine = {"lanes": lanes, "rank": rank, "disjoint": ds.own_lanes is not None, "chunks": len(chunks),
                "reads": sum(chunks.values()), "stored_bytes": int(sum(stored[c] * n for c, n in chunks.items())),
                "decoded_bytes": decoded[0], "chunk_ids": sorted(chunks)}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        rows += gathered
        it.close()  # type: ignore[attr-defined]
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


@click.command()
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/mtkd_rank_decode"))
def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    cache = build_cache(work)
    report: dict[str, Any] = {"samples": SAMPLES, "chunk_samples": CHUNK, "global_batch": GLOBAL_BATCH,
                              "steps": STEPS, "runs": []}
    for i, world in enumerate((1, 2, 4)):
        out = work / f"w{world}.json"
        mp.spawn(_rank, args=(world, str(cache), 29600 + i, str(out)), nprocs=world, join=True)
        for r in json.loads(out.read_text()):
            r["world"] = world
            r["stored_per_step"] = r["stored_bytes"] / STEPS
            r["decoded_per_step"] = r["decoded_bytes"] / STEPS
            report["runs"].append(r)
            print(f"W={world} lanes={r['lanes']} rank {r['rank']}: {r['chunks']} chunks ({r['reads']} reads), "
                  f"{r['stored_per_step'] / 1e3:.1f} kB stored / step, {r['decoded_per_step'] / 1e3:.1f} kB decoded / step")
        overlap = _overlap([r for r in report["runs"] if r["world"] == world])
        print(f"W={world}: chunks decoded by more than one rank (lanes={world}): {overlap}")
        report.setdefault("overlap", {})[str(world)] = overlap
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")


def _overlap(runs: list[dict[str, Any]]) -> int:
    world = max(r["rank"] for r in runs) + 1
    sets = [set(r["chunk_ids"]) for r in runs if r["lanes"] == world]
    return sum(1 for c in set().union(*sets) if sum(c in s for s in sets) > 1)


if __name__ == "__main__":
    main()
