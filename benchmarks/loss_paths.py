"""The two fused paths side by side: the loss on materialised logits (`fused`) against the loss fused with the LM
head (`fused_head`), forward + backward of head and loss, for student shapes from tiny to SmolLM2-sized.

This is the measurement `loss_impl = auto` makes at set-up (`mtkd_train.losses._impl_choice.time_fused_paths`: the
head on every position of whole sequences for `fused`, the loss rows taken first for `fused_head`, as a step runs
them), over a grid and at 1 and 2 threads, so the README can show where each path wins:

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python -m benchmarks.loss_paths
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import click
import torch

from mtkd_train.losses._impl_choice import time_fused_paths

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = (  # (loss rows, hidden, vocab): ~512 rows (4 sequences of 128) unless the vocabulary is large
    (512, 64, 8192),
    (512, 128, 8192),
    (512, 64, 49152),
    (512, 256, 49152),
    (512, 576, 49152),
    (128, 64, 262144),
)


@click.command()
@click.option("--threads", default="1,2", show_default=True, help="torch intra-op thread counts to run")
@click.option("--rounds", default=5, show_default=True, help="timed calls per path after one warm-up")
@click.option("--support", default=256, show_default=True, help="kept tokens per row (4 teachers x top-64)")
@click.option("--seq-len", default=128, show_default=True, help="positions per sequence (the loss rows skip the last)")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "loss_paths.json", show_default=True)
def main(threads: str, rounds: int, support: int, seq_len: int, out: Path) -> None:
    rows: list[dict[str, Any]] = []
    for t in (int(x) for x in threads.split(",")):
        torch.set_num_threads(t)
        for p, h, v in SHAPES:
            r = time_fused_paths(p, h, v, support=support, alpha=0.5, seq_len=seq_len, rounds=rounds)
            rows.append({"threads": t, "rows": p, "hidden": h, "vocab": v, **r.to_dict(),
                         "fused_over_fused_head": r.fused_ms / r.fused_head_ms})
            click.echo(f"threads {t}  P={p:4d} H={h:3d} V={v:6d}: fused {r.fused_ms:8.1f} ms, fused_head "
                       f"{r.fused_head_ms:8.1f} ms, ratio {r.fused_ms / r.fused_head_ms:.2f} -> {r.choice}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "loss_paths", "torch": torch.__version__, "cpu": platform.processor(),
                               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rounds": rounds,
                               "support": support, "seq_len": seq_len, "allocator_env": {k: os.environ.get(k) for k in
                                                                     ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")},
                               "rows": rows}, indent=1))
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
