"""The fused loss on a confident student: every row's off-support mass below ``RISKY_REST`` (issue 9).

When the student puts more than 99% of its mass on the target's support, ``1 - sum_S q`` has lost its digits
and every path sums the row's off-support mass again from the entries themselves
(`mtkd_train/losses/_fused_math.py`, `csrc/kd_rows.cpp`). This times that case: P = 512 rows, a support of 256
(the size of a four-teacher merge at k = 64), the student's logits raised by 12 on the support, one thread.
Arms interleaved (native, compiled, CE, ...), forward + backward, process CPU time, medians.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 OMP_NUM_THREADS=1 \\
        python -m benchmarks.kd_confident --out benchmarks/results/kd_confident.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from statistics import median
from typing import Any

import click
import torch
import torch.nn.functional as F

from mtkd_train.losses import fused_kd_ce_loss
from mtkd_train.targets import SparseTargets

P, C = 512, 256


def case(vocab: int, rounds: int) -> dict[str, Any]:
    """Medians (ms) of the three arms at one vocabulary, and how many rows were confident."""
    torch.manual_seed(0)
    base = torch.randn(P, vocab) * 4
    vals, idx = torch.log_softmax(base, -1).topk(C, -1)
    target = SparseTargets(idx, vals, (1 - vals.exp().sum(-1)).clamp(min=0))
    labels = idx[:, 0].clone()
    z = base.scatter_add(1, idx, torch.full((P, C), 12.0)).requires_grad_(True)
    rest = 1 - torch.softmax(z.detach(), -1).gather(1, idx).sum(1)

    def fused(kernels: str) -> None:
        fused_kd_ce_loss(z, target, labels, alpha=0.5, kernels=kernels).loss.backward()

    arms = {"native": lambda: fused("native"), "compiled": lambda: fused("compiled"),
            "ce": lambda: F.cross_entropy(z, labels).backward()}
    times: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(rounds + 2):  # two warm-up rounds
        for a, run in arms.items():
            t = time.process_time()
            run()
            z.grad = None
            if r >= 2:
                times[a].append(time.process_time() - t)
    ms = {a: 1e3 * median(v) for a, v in times.items()}
    return {"V": vocab, "P": P, "support": C, "confident_rows": int((rest < 1e-2).sum()), "median_ms": ms,
            "native/ce": ms["native"] / ms["ce"], "compiled/ce": ms["compiled"] / ms["ce"]}


@click.command()
@click.option("--vocabs", default="8192,49152", show_default=True, help="Vocabulary sizes.")
@click.option("--rounds", default=9, show_default=True, help="Interleaved rounds per vocabulary.")
@click.option("--out", type=click.Path(path_type=Path), default=Path(__file__).parent / "results" / "kd_confident.json",
              show_default=True, help="JSON results file.")
def main(vocabs: str, rounds: int, out: Path) -> None:
    """Time the fused loss's kernels on a confident student against cross-entropy."""
    torch.set_num_threads(1)
    res = [case(int(v), rounds) for v in vocabs.split(",")]
    for r in res:
        ms = r["median_ms"]
        click.echo(f"V={r['V']}: {r['confident_rows']}/{P} confident rows; native {ms['native']:.2f} ms, "
                   f"compiled {ms['compiled']:.2f} ms, CE {ms['ce']:.2f} ms")
    out.write_text(json.dumps({"benchmark": "kd_confident", "cases": res}, indent=2))


if __name__ == "__main__":
    main()
