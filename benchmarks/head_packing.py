"""The LM head of the precompute on the CPU: MKL's packed weight against a plain F.linear (issue 9, precompute).

    python -m benchmarks.head_packing                 # ~1 min on 2 cores
    python -m benchmarks.head_packing --vocab 262144 --width 640 --rows 512

The head of the 16.8M tiny teacher (V = 49,152, D = 256) on one 2,048-row batch, run by the real
`headblocks._block_results` (the head per group of 2^24 logits on this thread's torch threads, the group's
row blocks reduced to top-64 on single-threaded workers beside it, the compiled kernel when it builds),
in two arms: `plain` (`packed_head.MIN_ROWS` set out of reach, so every head call is `F.linear`) and
`packed` (`packed_head.linear`: the weight packed once). Arms are interleaved, `--repeats` rounds;
reported: the median wall and process CPU seconds per batch, and whether the two arms' targets are equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

import mtkd_cache.precompute.headblocks as headblocks
from mtkd_cache.precompute import packed_head
from mtkd_cache.precompute.extract import _row_blocks, topk_targets_checked
from mtkd_cache.precompute.native import available


def _batch(split: headblocks.HeadSplit, flat: torch.Tensor, vocab: int, pool: ThreadPoolExecutor,
           packed: bool) -> list[torch.Tensor]:
    """Top-64 (indices, logp, tail, entropy, top1) of every row, as `reduce_by_head_blocks` makes them."""
    def reduce(logits: torch.Tensor, mask: torch.Tensor | None) -> tuple[list[int], list[torch.Tensor]]:
        bad, outs = topk_targets_checked(logits, 64, 1.0, vocab, mask=mask)
        return bad.nonzero().flatten().tolist(), list(outs)

    min_rows = packed_head.MIN_ROWS
    packed_head.MIN_ROWS = min_rows if packed else 1 << 62
    try:
        blocks = list(_row_blocks(flat.shape[0], vocab, torch.device("cpu")))
        results = list(headblocks._block_results(split, flat, None, blocks, vocab, reduce, pool))
    finally:
        packed_head.MIN_ROWS = min_rows
    return [torch.cat(parts) for parts in zip(*(outs for *_, outs in results))]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rows", type=int, default=2_048, help="positions in the batch")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/head_packing.json"))
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    head = torch.nn.Linear(args.width, args.vocab, bias=False).requires_grad_(False)
    head.weight.normal_(0, 0.02)  # a freshly initialised Llama's head: logits of std ~0.3 on normed states
    split = headblocks.HeadSplit(body=torch.nn.Identity(), head=head, softcap=None)
    flat = torch.randn(args.rows, args.width)
    threads = torch.get_num_threads()
    wall: dict[str, list[float]] = {"plain": [], "packed": []}
    cpu: dict[str, list[float]] = {"plain": [], "packed": []}
    out: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode(), ThreadPoolExecutor(threads, initializer=torch.set_num_threads,
                                                    initargs=(1,)) as pool:
        try:
            for arm in wall:  # warm-up: the kernel build, the packing, the worker threads
                out[arm] = _batch(split, flat, args.vocab, pool, arm == "packed")
            torch.set_num_threads(threads)  # the workers' initializer lowered the default of new threads
            for _ in range(args.repeats):
                for arm in wall:
                    t0, c0 = time.perf_counter(), time.process_time()
                    _batch(split, flat, args.vocab, pool, arm == "packed")
                    wall[arm].append(time.perf_counter() - t0)
                    cpu[arm].append(time.process_time() - c0)
        finally:
            torch.set_num_threads(threads)
    equal = all(torch.equal(a, b) for a, b in zip(out["plain"], out["packed"]))
    result: dict[str, Any] = {
        "settings": {**{k: str(v) for k, v in vars(args).items()}, "threads": threads,
                     "topk_kernel": "compiled" if available() else "torch",
                     "mkl": torch.backends.mkl.is_available()},
        "targets_equal": equal,
        "arms": {a: {"median_wall_s": statistics.median(wall[a]), "median_cpu_s": statistics.median(cpu[a]),
                     "wall_s": wall[a], "cpu_s": cpu[a]} for a in wall}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'arm':<8}{'wall s':>9}{'cpu s':>9}   targets equal: {equal}")
    for a in wall:
        print(f"{a:<8}{result['arms'][a]['median_wall_s']:>9.3f}{result['arms'][a]['median_cpu_s']:>9.3f}")
    return result


if __name__ == "__main__":
    main()
