"""What the linear operators' aggregation costs next to cross-entropy, at a small vocabulary.

    python -m benchmarks.aggregate_cost          # ~1 min; writes results/aggregate_cost.json

Setting: `kd_cost`'s targets (top-64 of `softmax(sigma * randn)`, sigma 4.0-5.5), P = 512,
V = 8,192, N = 1 and 4 teachers, bucket tail, the `entropy` operator; torch on one thread, process
CPU time, arms interleaved, medians over `--rounds`. Arms:

* `ce`: `F.cross_entropy` forward + backward on (P, V) logits (the yardstick of `kd_cost`);
* `weights`: the `entropy` operator's weights;
* `table`: the linear pool as it was computed before: `build_union`'s (P, N, U) table, `exp`,
  `einsum` with the weights;
* `mixture`: `linear_pool` now (`union_mixture`: scatter-add on the union, no table);
* `merged`: the whole operator call (`weights` + `mixture` + log), what the trainer pays per step.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch
import torch.nn.functional as F

from benchmarks.kd_cost import labels_for, merged_target, student_logits, teachers
from mtkd_train.aggregate import AggregationContext, build_aggregator, build_union
from mtkd_train.aggregate._pooling import linear_pool

RESULTS = Path(__file__).parent / "results" / "aggregate_cost.json"


def arms_for(n: int, p: int, vocab: int) -> dict[str, Callable[[], Any]]:
    ts, labels = teachers(p, vocab, n, seed=1), labels_for(p, vocab)
    z = student_logits(p, vocab, seed=2).requires_grad_(True)
    agg = build_aggregator("entropy", num_teachers=n, vocab_size=vocab)
    ctx = AggregationContext(labels=labels)
    w = agg.weights(ts, ctx)
    assert w is not None

    def table() -> torch.Tensor:
        u = build_union(ts, vocab_size=vocab, tail_mode="bucket")
        return torch.einsum("pn,pnu->pu", w, u.logp.exp())

    return {
        "ce": lambda: torch.autograd.grad(F.cross_entropy(z, labels), z),
        "weights": lambda: agg.weights(ts, ctx),
        "table": table,
        "mixture": lambda: linear_pool(ts, w, vocab_size=vocab, tail_mode="bucket"),
        "merged": lambda: merged_target(ts, labels, vocab),
    }


@click.command()
@click.option("--rounds", type=click.IntRange(min=3), default=15, show_default=True, help="Interleaved rounds.")
@click.option("--reps", type=int, default=5, show_default=True, help="Calls per arm per round.")
def main(rounds: int, reps: int) -> None:
    """Time the aggregation pieces against cross-entropy; write results/aggregate_cost.json."""
    torch.set_num_threads(1)
    out: dict[str, Any] = {"command": "python -m benchmarks.aggregate_cost", "torch_threads": 1,
                           "clock": "process CPU time", "settings": {}}
    for n in (1, 4):
        arms = arms_for(n, 512, 8192)
        for f in arms.values():
            f()
        times: dict[str, list[float]] = {a: [] for a in arms}
        for _ in range(rounds):
            for a, f in arms.items():
                c0 = time.process_time()
                for _ in range(reps):
                    f()
                times[a].append((time.process_time() - c0) / reps)
        ms = {a: 1e3 * statistics.median(v) for a, v in times.items()}
        out["settings"][f"P=512,V=8192,N={n}"] = {
            "median_ms": ms, "per_ce": {a: ms[a] / ms["ce"] for a in ms},
            "mixture/table": statistics.median(m / t for m, t in zip(times["mixture"], times["table"], strict=True))}
        click.echo(f"N={n}: " + ", ".join(f"{a} {v:.2f} ms" for a, v in ms.items()))
    out["loadavg_after"] = os.getloadavg()
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
