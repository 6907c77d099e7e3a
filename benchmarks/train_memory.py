"""Peak memory of a training run against cache size: the 10x cache / the 1x cache, same steps.

    python -m benchmarks.train_memory                     # ~5 min on 2 shared CPU cores

Each run is a fresh `python -m benchmarks.train_memory --child ...` process that builds a
`DistillRecipe` (4 cached teachers, `entropy` + forward KL, B = 4, the settings of
`benchmarks.train_step`) and calls the real `recipe.train()` for `--steps` steps; it reports
`resource.getrusage(RUSAGE_SELF).ru_maxrss` (peak resident set, imports included). The 1x cache is
`main_1x` (64 samples, 8 chunks), the 10x cache `main` (640 samples, 80 chunks), both from the
setting of `benchmarks.train_loader`. The two runs of a round start together (memory, unlike
time, does not suffer from sharing the cores); the ratio is of the medians over rounds.

The streaming reader holds at most (cache_chunks + prefetch + 1) decoded chunks = (4 + 2 + 1)
x 8 samples here, whatever the cache size. For the test to have teeth the 10x cache decoded in
full must be large against the process (it is ~250 MB; the report gives the figure): a reader
that held every decoded target would show a ratio well above 1.1.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from benchmarks.train_loader import DEFAULT_WORK, RESULTS, SettingPaths, ensure_setting, median

_DECODED_BYTES_PER_ROW = 64 * (8 + 4) + 4  # int64 indices + float32 logp per entry, float32 tail (K = 64)


def _child(work: Path, cache: str, steps: int) -> dict[str, Any]:
    import psutil

    from mtkd_train.config import TrainConfig
    from mtkd_train.recipe import DistillRecipe

    paths = SettingPaths(work)
    s = paths.setting
    with tempfile.TemporaryDirectory(prefix="mtkd-train-mem-") as out:
        cfg = TrainConfig(cache=str(paths.cache(cache)), teachers=s.teachers, student=str(paths.model("student")),
                          out=out, aggregate="entropy", loss="forward_kl", alpha=0.5, batch_size=s.batch_size,
                          shuffle_chunks=s.shuffle_chunks, device="cpu", amp="off", max_steps=steps,
                          checkpoint_every=10 * steps, log_every=steps)
        recipe = DistillRecipe(cfg).setup()
        rss_setup = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        losses = recipe.train()
        seconds = time.perf_counter() - t0
    return {"cache": cache, "steps": len(losses), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_setup_mb": rss_setup / 2**20, "train_seconds": seconds, "last_loss": losses[-1]}


def _spawn(work: Path, cache: str, steps: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "benchmarks.train_memory", "--child", cache, "--steps", str(steps), "--work", str(work)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=Path(__file__).resolve().parent.parent)


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"child run failed with exit code {proc.returncode}: {stdout[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_memory_benchmark(paths: SettingPaths, rounds: int, steps: int) -> dict[str, Any]:
    from mtkd_cache import open_cache

    s = paths.setting
    runs: dict[str, list[dict[str, Any]]] = {"main_1x": [], "main": []}
    for _ in range(rounds):
        procs = {c: _spawn(paths.work, c, steps) for c in runs}  # A and B side by side
        for c, p in procs.items():
            runs[c].append(_result(p))
    peak = {c: median([r["peak_rss_mb"] for r in v]) for c, v in runs.items()}
    positions = {c: open_cache(paths.cache(c)).inputs.num_positions for c in runs}
    n = len(s.teachers)
    chunk_rows = s.chunk_samples * s.max_length
    return {
        "benchmark": "train_memory", "setting": s.to_dict(), "rounds": rounds, "steps": steps,
        "peak_rss_mb_median": peak,
        "ratio_10x_over_1x": peak["main"] / peak["main_1x"],
        "per_round_ratios": [b["peak_rss_mb"] / a["peak_rss_mb"] for a, b in zip(runs["main_1x"], runs["main"])],
        "target": "<= 1.1",
        "cache_positions": positions,
        "decoded_targets_whole_cache_mb": {c: p * n * _DECODED_BYTES_PER_ROW / 2**20 for c, p in positions.items()},
        "decoded_chunk_bound_mb": (s.shuffle_chunks + 2 + 1) * chunk_rows * n * _DECODED_BYTES_PER_ROW / 2**20,
        "runs": runs,
    }


def _table(res: dict[str, Any]) -> str:
    p = res["peak_rss_mb_median"]
    d = res["decoded_targets_whole_cache_mb"]
    lo, hi = min(res["per_round_ratios"]), max(res["per_round_ratios"])
    return "\n".join([
        "| cache | positions | targets decoded in full | peak RSS (median) |", "|---|---:|---:|---:|",
        f"| 1x (`main_1x`) | {res['cache_positions']['main_1x']:,} | {d['main_1x']:.0f} MB | {p['main_1x']:.0f} MB |",
        f"| 10x (`main`) | {res['cache_positions']['main']:,} | {d['main']:.0f} MB | {p['main']:.0f} MB |",
        "", f"peak RSS 10x / 1x = {res['ratio_10x_over_1x']:.3f} (per round {lo:.3f}-{hi:.3f}; target <= 1.1); "
        f"decoded-chunk bound {res['decoded_chunk_bound_mb']:.0f} MB"])


@click.command()
@click.option("--work", type=click.Path(path_type=Path), default=DEFAULT_WORK, show_default=True,
              help="Folder of the shared setting (built once by benchmarks.train_loader.ensure_setting).")
@click.option("--rounds", type=int, default=3, show_default=True, help="Rounds (each: one 1x and one 10x run).")
@click.option("--steps", type=int, default=16, show_default=True, help="Training steps per run (8 steps = one window).")
@click.option("--child", type=click.Choice(["main", "main_1x"]), default=None, hidden=True,
              help="Internal: run one training in this process and print its peak RSS as JSON.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "train_memory.json", show_default=True,
              help="JSON results file.")
def main(work: Path, rounds: int, steps: int, child: str | None, out: Path) -> None:
    """Peak RSS of `recipe.train()` with the 10x cache / with the 1x cache."""
    if child is not None:
        click.echo(json.dumps(_child(work, child, steps)))
        return
    paths = ensure_setting(work)
    t0 = time.perf_counter()
    res = run_memory_benchmark(paths, rounds, steps)
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    res["command"] = "python -m benchmarks.train_memory " + " ".join(sys.argv[1:])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    click.echo(_table(res))
    click.echo(f"wrote {out} ({res['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
