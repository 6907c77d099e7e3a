"""The LM head + top-k of one teacher batch on the CPU: how the cores split the work (issue 9, precompute).

    python -m benchmarks.head_groups                  # ~1 min on 2 cores
    python -m benchmarks.head_groups --vocab 262144 --width 640 --rows 512

The head of the 16.8M tiny teacher (V = 49,152, D = 256) on one 2,048-row batch, then the top-64 reduction
of every row (`extract.topk_targets_checked`, the compiled kernel when it builds), in two arrangements:
* `main+workers` (sessions 10-12): the head per group of 2^24 logits on this thread's torch intra-op
  threads, the group's row blocks reduced on single-threaded workers beside it (emulated here: the code
  path no longer exists);
* `workers R`: the real `headblocks._block_results` with a pool: each single-threaded worker runs the
  head of a group of R rows and reduces its blocks (`WORKER_GROUP_ELEMENTS` set to R·V).

Arms are interleaved, `--repeats` rounds; reported: the median wall and process CPU seconds per batch.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

import mtkd_cache.precompute.headblocks as headblocks
from mtkd_cache.precompute.extract import _row_blocks, topk_targets_checked
from mtkd_cache.precompute.native import available


def _reduce(logits: torch.Tensor, mask: torch.Tensor | None) -> tuple[list[int], list[torch.Tensor]]:
    bad, outs = topk_targets_checked(logits, 64, 1.0, logits.shape[-1], mask=mask)
    return bad.nonzero().flatten().tolist(), list(outs)


def _main_plus_workers(split: headblocks.HeadSplit, flat: torch.Tensor, blocks: list[slice], vocab: int,
                       pool: ThreadPoolExecutor) -> None:
    per_group = max(1, headblocks.GROUP_ELEMENTS // ((blocks[0].stop - blocks[0].start) * vocab))
    pending: list[Future[tuple[list[int], list[torch.Tensor]]]] = []
    for g in range(0, len(blocks), per_group):
        group = blocks[g: g + per_group]
        first = group[0].start
        logits = split.logits(flat[first: group[-1].stop]).unsqueeze(1)
        submitted = [pool.submit(_reduce, logits[r.start - first: r.stop - first], None) for r in group]
        for f in pending:  # the previous group was reduced while this group's head ran
            f.result()
        pending = submitted
    for f in pending:
        f.result()


def _workers(split: headblocks.HeadSplit, flat: torch.Tensor, blocks: list[slice], vocab: int,
             pool: ThreadPoolExecutor, *, rows: int) -> None:
    headblocks.WORKER_GROUP_ELEMENTS = rows * vocab
    for _ in headblocks._block_results(split, flat, None, blocks, vocab, _reduce, pool):
        pass


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rows", type=int, default=2_048, help="positions in the batch")
    ap.add_argument("--groups", type=int, nargs="+", default=[341, 170, 85, 43, 21, 10], help="rows per worker group")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/head_groups.json"))
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    head = torch.nn.Linear(args.width, args.vocab, bias=False)
    head.weight.data.normal_(0, 0.2)
    split = headblocks.HeadSplit(body=torch.nn.Identity(), head=head, softcap=None)
    flat = torch.randn(args.rows, args.width)
    blocks = list(_row_blocks(args.rows, args.vocab, torch.device("cpu")))
    threads = torch.get_num_threads()
    arms: dict[str, Callable[[ThreadPoolExecutor], None]] = {
        "main+workers": functools.partial(_main_plus_workers, split, flat, blocks, args.vocab)}
    arms.update({f"workers {r}": functools.partial(_workers, split, flat, blocks, args.vocab, rows=r) for r in args.groups})
    wall: dict[str, list[float]] = {a: [] for a in arms}
    cpu: dict[str, list[float]] = {a: [] for a in arms}
    default = headblocks.WORKER_GROUP_ELEMENTS
    try:
        with torch.inference_mode(), ThreadPoolExecutor(threads, initializer=torch.set_num_threads,
                                                        initargs=(1,)) as pool:
            torch.set_num_threads(threads)
            for fn in arms.values():
                fn(pool)  # warm-up: the kernel build, the allocator, the worker threads
            for _ in range(args.repeats):
                for arm, fn in arms.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn(pool)
                    wall[arm].append(time.perf_counter() - t0)
                    cpu[arm].append(time.process_time() - c0)
    finally:
        headblocks.WORKER_GROUP_ELEMENTS = default
        torch.set_num_threads(threads)
    result: dict[str, Any] = {"settings": {**{k: str(v) for k, v in vars(args).items()}, "threads": threads,
                           "topk_kernel": "compiled" if available() else "torch"},
              "arms": {a: {"median_wall_s": statistics.median(wall[a]), "median_cpu_s": statistics.median(cpu[a]),
                           "wall_s": wall[a], "cpu_s": cpu[a]} for a in arms}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'arm':<16}{'wall s':>9}{'cpu s':>9}")
    for a in arms:
        print(f"{a:<16}{result['arms'][a]['median_wall_s']:>9.3f}{result['arms'][a]['median_cpu_s']:>9.3f}")
    return result


if __name__ == "__main__":
    main()
