"""The precompute's top-k pass on the CPU: the compiled kernel against the torch path (issue 9, precompute).

    python -m benchmarks.topk_kernel                  # ~1 min, one thread

`extract.topk_targets_checked` (top-64, log-sum-exp, tail, entropy, top-1 and the finiteness check) on blocks
of 21 rows x V = 49,152 (the CPU row block, `extract._BLOCK_ELEMENTS`), with the compiled kernel
(`precompute/native.py`) and with the torch path (the kernel switched off), interleaved per round, on one
thread. Two sources of rows: `hot` (the same block again: its rows in the core's cache, as right after
the head's matmul on a small group) and `fresh` (a new 64 MiB head output per round: the rows come from
memory, as in a run). Logits: a freshly initialised Llama head's scale (std ~0.3) plus a few peaked
rows. Reported: the median CPU nanoseconds per logit, and the largest differences between the two paths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mtkd_cache.precompute import extract, native


def _run(x: torch.Tensor, lib: object) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    native._STATE["lib"] = lib
    return extract.topk_targets_checked(x, 64, 1.0, x.shape[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--rows", type=int, default=21, help="rows per block")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/topk_kernel.json"))
    args = ap.parse_args(argv)
    if not native.available():
        raise SystemExit("the compiled top-k kernel is not available here (no C++ compiler?); "
                         "see mtkd_cache/precompute/native.py")
    lib = native._STATE["lib"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    head = torch.randn(args.vocab, 256) * 0.02
    hidden = torch.randn(4_096, 256)
    blocks = 4_096 // args.rows
    arms = {"compiled": lib, "torch": None}
    ns: dict[str, dict[str, list[float]]] = {src: {a: [] for a in arms} for src in ("hot", "fresh")}
    worst = {"logp": 0.0, "tail_rel": 0.0, "entropy": 0.0, "top1": 0.0}
    flags_equal = True
    try:
        with torch.inference_mode():
            hot = (hidden[: args.rows] @ head.t()).unsqueeze(1)
            hot[:3, 0, :50] += 8.0  # a few peaked rows
            for _ in range(args.rounds):
                for name, lib_ in arms.items():
                    t0 = time.thread_time()
                    for _ in range(20):
                        _run(hot, lib_)
                    ns["hot"][name].append((time.thread_time() - t0) / 20 / hot.numel() * 1e9)
                    logits = (hidden @ head.t()).unsqueeze(1)  # fresh: written by the matmul, read once
                    t0 = time.thread_time()
                    for b in range(blocks):
                        _run(logits[b * args.rows: (b + 1) * args.rows], lib_)
                    ns["fresh"][name].append((time.thread_time() - t0) / (blocks * args.rows * args.vocab) * 1e9)
            (bad_c, out_c), (bad_t, out_t) = _run(hot, lib), _run(hot, None)
    finally:
        native._STATE["lib"] = lib
        torch.set_num_threads(threads)
    flags_equal = bool(torch.equal(bad_c, bad_t))
    worst["logp"] = (out_c[1].sort(-1).values - out_t[1].sort(-1).values).abs().max().item()
    worst["tail_rel"] = ((out_c[2] - out_t[2]).abs() / out_t[2].abs().clamp_min(1e-6)).max().item()
    worst["entropy"] = (out_c[3] - out_t[3]).abs().max().item()
    worst["top1"] = (out_c[4] - out_t[4]).abs().max().item()
    result: dict[str, Any] = {
        "settings": {**{k: str(v) for k, v in vars(args).items()}, "threads": 1},
        "ns_per_logit": {src: {a: statistics.median(v) for a, v in per.items()} for src, per in ns.items()},
        "rounds": ns, "bad_flags_equal": flags_equal, "largest_difference": worst}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'rows':<8}{'compiled':>10}{'torch':>10}{'ratio':>8}   CPU ns per logit, medians of {args.rounds}")
    for src, per in result["ns_per_logit"].items():
        print(f"{src:<8}{per['compiled']:>10.3f}{per['torch']:>10.3f}{per['torch'] / per['compiled']:>8.2f}")
    print(f"bad flags equal: {flags_equal}; largest differences: {worst}")
    return result


if __name__ == "__main__":
    main()
