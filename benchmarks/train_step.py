"""Training-step benchmarks of the streaming trainer: streaming overhead, distillation tax, cached vs online.

    python -m benchmarks.train_step                       # ~2.5 min on 2 shared CPU cores

Setting: `benchmarks.train_loader.TrainSetting` (built once by `ensure_setting`): V = 8,192,
K = 64, L = 128, B = 4 samples (512 positions) per step, student a Llama of width 128 and
2 layers, objective `entropy` aggregation + forward KL, alpha 0.5, T = 1 (the `mtkd-train`
defaults otherwise). The students, objectives, optimizers and datasets are built by
`DistillRecipe.setup()`; a step is the body of `DistillRecipe.train` for `grad_accum = 1`
(`_step` below: forward, objective, backward, clip, AdamW, LR schedule) without its logging.

Measurements, every one a ratio of arms run interleaved in the same process (A, B, A, B, ...):

1. **Streaming overhead**: one step streaming from the `main` cache (4 teachers) / the same
   step on the same batches held in memory (`InMemoryTargets`). A block is one shuffle window
   (8 steps), the unit in which the stream decodes chunks; a streaming block also waits for its
   read-ahead to finish before the next arm starts, so every decode is charged to streaming.
2. **Distillation tax**: plain training (hard labels only, no targets read, same stream of
   inputs) / distilling from 4 cached teachers, as student throughput (`tail_mode` bucket, the
   default). A per-component breakdown on one batch (pieces timed interleaved, as fractions of
   a plain step) says where the time goes, for both tail modes.
4. **Merge in the loader** (``--workers``, wall clock): as the trainer runs by default, a
   DataLoader with one worker process decodes each batch and merges its teachers
   (``merge_in = loader``: `mtkd_train.teacher_side`) while the step runs; against the same
   loader without the merge (``merge_in = step``: the step merges) and plain training from
   a one-worker loader of the inputs alone; and the streaming overhead of that loader against
   the same steps on merged batches held in memory. Wall clock is the figure here: the worker's
   work is off the step's critical path only if a core is free for it (a quiet 2-core machine).
3. **Cached vs online**: throughput distilling from the `online` cache / throughput of online KD
   with the same N teachers (T0..T3, 10.1M parameters each) resident and run at every step, for
   N = 1, 2, 4 (`benchmarks._online`).

Clocks: every block records the process CPU time (`time.process_time`: all threads, so the
read-ahead thread's decoding and zarr's I/O threads are charged to streaming) and the wall time.
CPU time is the primary figure: on cores shared with other jobs (load average 5-10 during our
runs) the wall time of a block mostly measures the scheduler. torch runs one intra-op thread
(`--threads`), since spinning OpenMP threads inflate CPU time when the cores are oversubscribed.
Each figure is the ratio of the arms' median block throughputs, with the min-max of the
per-round ratios (adjacent blocks) beside it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import torch

from benchmarks._online import (
    OnlineTeachers,
    llama_config,
    matmul_params,
    online_step_loss,
    save_student_config,
)
from benchmarks.train_loader import (
    DEFAULT_WORK,
    RESULTS,
    ModelSize,
    SettingPaths,
    ensure_setting,
    interleave,
    median,
)
from mtkd_cache import open_cache
from mtkd_train.aggregate import AggregationContext
from mtkd_train.config import TrainConfig
from mtkd_train.data import BatchStream, CachedDistillDataset, InMemoryTargets
from mtkd_train.losses import hard_label_loss, kd_loss, weighted_forward_kl
from mtkd_train.objective import row_labels, row_targets
from mtkd_train.recipe import DistillRecipe
from mtkd_train.student import Student, load_student

Batch = dict[str, Any]
Block = Callable[[int], dict[str, float]]


# -- steps -----------------------------------------------------------------------------------------
def _update(params: list[torch.nn.Parameter], loss: torch.Tensor, opt: torch.optim.Optimizer,
            sched: Any | None, clip: float) -> float:
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _step(recipe: DistillRecipe, batch: Batch) -> float:
    """`DistillRecipe.train`'s inner step (grad_accum 1): the real objective, clip, AdamW, schedule."""
    terms = recipe.model(batch)
    recipe.dataset.consumed(1)
    return _update(list(recipe.model.parameters()), terms["loss"], recipe.optimizer, recipe.scheduler,
                   recipe.cfg.clip_grad)


def _plain_step(recipe: DistillRecipe, batch: Batch) -> float:
    """The same student and optimizer on hard labels alone (alpha = 0, no targets in the batch)."""
    rows = batch["position_mask"]
    logits, _ = recipe.student.forward(batch)
    loss = hard_label_loss(logits[rows], row_labels(batch, "causal_lm")[rows])
    return _update(list(recipe.model.parameters()), loss, recipe.optimizer, recipe.scheduler, recipe.cfg.clip_grad)


def _recipe(paths: SettingPaths, cache: str, teachers: tuple[str, ...], out: Path, **overrides: Any) -> DistillRecipe:
    s = paths.setting
    cfg = TrainConfig(cache=str(paths.cache(cache)), teachers=teachers, student=str(paths.model("student")),
                      out=str(out), aggregate="entropy", loss="forward_kl", alpha=0.5, temperature=1.0,
                      batch_size=s.batch_size, shuffle_chunks=s.shuffle_chunks, device="cpu", amp="off",
                      max_steps=1_000_000, **overrides)
    return DistillRecipe(cfg).setup()


# -- blocks ----------------------------------------------------------------------------------------
def _drain(stream: BatchStream) -> None:
    """Wait for the stream's read-ahead, so its decoding is charged to the block that started it."""
    cache = stream.cache
    for _, fut in list(cache._pending.values()):  # private: the benchmark must see in-flight reads
        fut.result()
    for fut in list(cache._abandoned):
        fut.result()


def _stream_block(step: Callable[[Batch], float], stream: BatchStream, steps: int) -> Block:
    def run(r: int) -> dict[str, float]:
        positions = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            batch = next(stream)
            step(batch)
            positions += int(batch["position_mask"].sum())
        _drain(stream)
        return {"positions": positions, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}

    return run


def _list_block(step: Callable[[Batch], float], batches: Iterator[Batch], steps: int) -> Block:
    def run(r: int) -> dict[str, float]:
        positions = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            batch = next(batches)
            step(batch)
            positions += int(batch["position_mask"].sum())
        return {"positions": positions, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}

    return run


def _compare(raw: dict[str, list[dict[str, float]]], num: str, den: str) -> dict[str, Any]:
    """Throughput of `num` / throughput of `den`, per CPU-second (primary) and per wall-second.

    Each: the ratio of the arms' median block throughputs, and the min-max of per-round ratios.
    """
    out: dict[str, Any] = {"rounds": len(raw[num])}
    for clock, key in (("cpu", "cpu_seconds"), ("wall", "seconds")):
        rate = {k: [b["positions"] / b[key] for b in raw[k]] for k in (num, den)}
        per_round = [a / b for a, b in zip(rate[num], rate[den], strict=True)]
        out[clock] = {"ratio": median(rate[num]) / median(rate[den]),
                      "per_round_min_max": [min(per_round), max(per_round)]}
    out["ratio"] = out["cpu"]["ratio"]
    return out


# -- 1 + 2: streaming overhead and distillation tax -------------------------------------------------
def overhead_and_tax(paths: SettingPaths, rounds: int, tmp: Path) -> dict[str, Any]:
    s = paths.setting
    w = s.window_steps
    bucket = _recipe(paths, "main", s.teachers, tmp / "bucket")
    twin = CachedDistillDataset(bucket.reader, s.teachers, batch_size=s.batch_size, seed=bucket.cfg.seed,
                                shuffle_chunks=s.shuffle_chunks)
    in_memory = iter(InMemoryTargets.from_stream(twin, max_batches=(rounds + 1) * w))
    plain_ds = CachedDistillDataset(bucket.reader, (), batch_size=s.batch_size, seed=bucket.cfg.seed,
                                    shuffle_chunks=s.shuffle_chunks)
    streams = [iter(bucket.dataset), iter(plain_ds)]
    arms: dict[str, Block] = {
        "stream": _stream_block(lambda b: _step(bucket, b), streams[0], w),
        "memory": _list_block(lambda b: _step(bucket, b), in_memory, w),
        "plain": _stream_block(lambda b: _plain_step(bucket, b), streams[1], w),
    }
    try:
        for arm in arms.values():  # warm-up window, not recorded
            arm(-1)
        raw = interleave(arms, rounds)
    finally:
        for st in streams:
            st.close()
    return {
        "streaming_overhead": {**_compare(raw, "memory", "stream"), "target": "<= 1.05",
                               "meaning": "step time streaming / step time in memory (= memory rate / stream rate)"},
        "distillation_tax": {**_compare(raw, "stream", "plain"), "target": ">= 0.9",
                                    "meaning": "throughput distilling from 4 cached teachers / plain training"},
        "raw": raw,
    }


# -- where the distillation time goes ---------------------------------------------------------------
def breakdown(paths: SettingPaths, repeats: int, tmp: Path) -> dict[str, Any]:
    """Time the pieces of one distillation step on one batch, as fractions of a plain step."""
    s = paths.setting
    recipe = _recipe(paths, "main", s.teachers, tmp / "breakdown", merge_in="step")  # the raw targets, to time each piece
    obj = recipe.objective
    stream = iter(recipe.dataset)
    batch = next(stream)
    stream.close()
    rows = batch["position_mask"]
    labels = row_labels(batch, "causal_lm")[rows]
    with torch.no_grad():
        z0 = recipe.student.forward(batch)[0][rows]  # (P, V)

    def leaf() -> torch.Tensor:
        return z0.clone().requires_grad_(True)

    def targets() -> list[Any]:
        return [row_targets(batch["targets"][n], rows, tc, obj.vocab_size, obj.T) for n, tc in zip(obj.teachers, obj.capture_t)]

    ctx = AggregationContext(labels=labels)
    tg = targets()
    w = obj.aggregator.weights(tg, ctx)
    merged = obj.aggregator(tg, ctx, vocab_size=obj.vocab_size, tail_mode="bucket")

    def kd_bucket() -> None:
        z = leaf()
        kd_loss(z, merged, kind="forward_kl", tail_mode="bucket", vocab_size=obj.vocab_size).backward()

    def kd_spread() -> None:
        z = leaf()
        weighted_forward_kl(z, tg, w, tail_mode="spread", vocab_size=obj.vocab_size).backward()

    def ce() -> None:
        z = leaf()
        hard_label_loss(z, labels).backward()

    plain_stream = iter(CachedDistillDataset(recipe.reader, (), batch_size=s.batch_size,
                                             shuffle_chunks=s.shuffle_chunks))
    plain_batch = next(plain_stream)
    plain_stream.close()
    pieces: dict[str, Callable[[], Any]] = {
        "plain step (reference)": lambda: _plain_step(recipe, plain_batch),
        "distill step, bucket (whole)": lambda: _step(recipe, batch),
        "row_targets x N (gather + renorm)": targets,
        "entropy weights": lambda: obj.aggregator.weights(tg, ctx),
        "union + linear pool (bucket)": lambda: obj.aggregator(tg, ctx, vocab_size=obj.vocab_size, tail_mode="bucket"),
        "KD loss fwd+bwd, bucket (merged target)": kd_bucket,
        "KD loss fwd+bwd, spread (weighted_forward_kl, N teachers)": kd_spread,
        "CE fwd+bwd (in both steps)": ce,
    }
    wide = _wide_student(paths, tmp)
    wide_opt = torch.optim.AdamW(wide.module.parameters(), lr=recipe.cfg.lr)

    def wide_plain() -> float:
        rows_p = plain_batch["position_mask"]
        logits, _ = wide.forward(plain_batch)
        loss = hard_label_loss(logits[rows_p], row_labels(plain_batch, "causal_lm")[rows_p])
        return _update(list(wide.module.parameters()), loss, wide_opt, None, 1.0)

    pieces[WIDE] = wide_plain
    cpu: dict[str, list[float]] = {k: [] for k in pieces}
    wall: dict[str, list[float]] = {k: [] for k in pieces}
    for r in range(repeats + 1):
        for name, fn in pieces.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if r > 0:
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - t0)
    frac = {k: median(v) / median(cpu["plain step (reference)"]) for k, v in cpu.items()}
    extra = frac["distill step, bucket (whole)"] - 1.0  # the objective's cost beyond CE: independent of the student
    return {"positions": int(rows.sum()), "repeats": repeats, "clock": "process CPU time",
            "fraction_of_plain_step": frac,
            "fraction_of_plain_step_wall": {k: median(v) / median(wall["plain step (reference)"]) for k, v in wall.items()},
            "wide_student": WIDE_SIZE.__dict__,
            "projected_tax_wide_student": frac[WIDE] / (frac[WIDE] + extra)}


WIDE = "plain step, wider student (width 512, 4 layers)"
WIDE_SIZE = ModelSize(512, 4, 2048)


def _wide_student(paths: SettingPaths, tmp: Path) -> Student:
    s = paths.setting
    cfg = llama_config(vocab=s.vocab, hidden=WIDE_SIZE.hidden, layers=WIDE_SIZE.layers,
                       intermediate=WIDE_SIZE.intermediate, max_length=s.max_length)
    return load_student(str(save_student_config(tmp / "wide_student", cfg)), seed=0)


# -- 3: cached vs online ----------------------------------------------------------------------------
def cached_vs_online(paths: SettingPaths, rounds: int, online_steps: int, tmp: Path) -> dict[str, Any]:
    s = paths.setting
    w = s.window_steps
    reader = open_cache(paths.cache("online"))
    arms: dict[str, Block] = {}
    streams: list[BatchStream] = []
    for n in (1, 2, 4):
        teachers = s.online_teachers[:n]
        recipe = _recipe(paths, "online", teachers, tmp / f"cached{n}")
        streams.append(iter(recipe.dataset))
        arms[f"cached N={n}"] = _stream_block(lambda b, r=recipe: _step(r, b), streams[-1], w)
        student: Student = load_student(str(paths.model("student")), seed=0)
        opt = torch.optim.AdamW(student.module.parameters(), lr=recipe.cfg.lr, weight_decay=recipe.cfg.weight_decay)
        resident = OnlineTeachers([paths.model(t) for t in teachers], s.vocab)
        inputs = CachedDistillDataset(reader, (), batch_size=s.batch_size, shuffle_chunks=s.shuffle_chunks)

        def online(b: Batch, st: Student = student, o: torch.optim.Optimizer = opt, t: OnlineTeachers = resident) -> float:
            return _update(list(st.module.parameters()), online_step_loss(st, t, b, alpha=0.5), o, None, 1.0)

        streams.append(iter(inputs))
        arms[f"online N={n}"] = _stream_block(online, streams[-1], online_steps)
    try:
        for arm in arms.values():
            arm(-1)
        raw = interleave(arms, rounds)
    finally:
        for st in streams:
            st.close()
    out: dict[str, Any] = {f"N={n}": _compare(raw, f"cached N={n}", f"online N={n}") for n in (1, 2, 4)}
    cfg = lambda size: llama_config(vocab=s.vocab, hidden=size.hidden, layers=size.layers,  # noqa: E731
                                    intermediate=size.intermediate, max_length=s.max_length)
    t_cfg, s_cfg = cfg(s.online_teacher), cfg(s.student)
    out["models"] = {
        "teacher": {"params": _params(paths.model(s.online_teachers[0])), "matmul_params": matmul_params(t_cfg),
                    **s.online_teacher.__dict__},
        "student": {"matmul_params": matmul_params(s_cfg), **s.student.__dict__},
        "teacher_forward_flops_vs_student": matmul_params(t_cfg) / matmul_params(s_cfg),
    }
    out["raw"] = raw
    return out


def _params(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - not iterable


# -- 4: the merge in a loader worker (wall clock) ---------------------------------------------------------
def merge_in_loader(paths: SettingPaths, rounds: int, tmp: Path) -> dict[str, Any]:
    """Throughput with one DataLoader worker: merged in the worker / merged in the step / plain (wall clock)."""
    s = paths.setting
    w = s.window_steps
    loader = _recipe(paths, "main", s.teachers, tmp / "merge-loader", merge_in="loader")
    step = _recipe(paths, "main", s.teachers, tmp / "merge-step", merge_in="step")
    plain_ds = CachedDistillDataset(step.reader, (), batch_size=s.batch_size, seed=step.cfg.seed,
                                    shuffle_chunks=s.shuffle_chunks)
    assert loader.dataset.transform is not None and step.dataset.transform is None

    def batches(ds: CachedDistillDataset) -> Iterator[Batch]:
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, prefetch_factor=2)
        return iter(dl)

    twin = CachedDistillDataset(loader.reader, s.teachers, batch_size=s.batch_size, seed=loader.cfg.seed,
                                shuffle_chunks=s.shuffle_chunks, transform=loader.dataset.transform)
    in_memory = iter(InMemoryTargets.from_stream(twin, max_batches=(rounds + 1) * w))  # merged, held in memory
    its = [batches(loader.dataset), batches(step.dataset), batches(plain_ds)]
    arms: dict[str, Block] = {
        "memory": _list_block(lambda b: _step(loader, b), in_memory, w),
        "loader": _list_block(lambda b: _step(loader, b), its[0], w),
        "step": _list_block(lambda b: _step(step, b), its[1], w),
        "plain": _list_block(lambda b: _plain_step(step, b), its[2], w),
    }
    for arm in arms.values():  # warm-up window (worker start, first compile), not recorded
        arm(-1)
    raw = interleave(arms, rounds)
    del its
    return {
        "streaming_overhead_one_worker": {**_compare(raw, "memory", "loader"), "target": "<= 1.05",
                                          "meaning": "step time streaming from one worker (decoded and merged there) / "
                                                     "the same step on the merged batches held in memory (wall clock)"},
        "tax_merged_in_loader": {**_compare(raw, "loader", "plain"), "target": ">= 0.9",
                                 "meaning": "throughput distilling, teachers merged in the worker / plain (wall clock)"},
        "tax_merged_in_step": {**_compare(raw, "step", "plain"), "target": ">= 0.9",
                               "meaning": "throughput distilling, teachers merged in the step / plain (wall clock)"},
        "loader_over_step": {**_compare(raw, "loader", "step"),
                             "meaning": "throughput merging in the worker / merging in the step"},
        "raw": raw,
    }


# -- report ---------------------------------------------------------------------------------------
def _fmt(c: dict[str, Any], clock: str) -> str:
    lo, hi = c[clock]["per_round_min_max"]
    return f"{c[clock]['ratio']:.2f} ({lo:.2f}-{hi:.2f})"


def _table(res: dict[str, Any]) -> str:
    o, cvo = res["overhead_and_tax"], res.get("cached_vs_online", {})
    rows = [("streaming overhead: step time streaming / in memory (N=4)", o["streaming_overhead"], "<= 1.05"),
            ("distillation tax: throughput distilling from 4 cached teachers / plain", o["distillation_tax"], ">= 0.9")]
    rows += [(f"cached / online throughput, N={n}", cvo[f"N={n}"], "> 1") for n in (1, 2, 4) if f"N={n}" in cvo]
    m = res.get("merge_in_loader", {})
    rows += [(f"one loader worker: {label}", m[key], t) for key, label, t in (
        ("streaming_overhead_one_worker", "step time streaming / merged batches in memory", "<= 1.05"),
        ("tax_merged_in_loader", "distilling (merged in the worker) / plain", ">= 0.9"),
        ("tax_merged_in_step", "distilling (merged in the step) / plain", ">= 0.9"),
        ("loader_over_step", "merged in the worker / merged in the step", "> 1")) if key in m]
    lines = ["| measurement | CPU time: ratio (per-round min-max) | wall time: ratio (min-max) | target |",
             "|---|---:|---:|---|"]
    lines += [f"| {name} | {_fmt(c, 'cpu')} | {_fmt(c, 'wall')} | {t} |" for name, c, t in rows]
    b = res["breakdown"]
    lines += ["", f"| piece of one step (B={res['setting']['batch_size']}, P={b['positions']}) | CPU time / plain step |",
              "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in b["fraction_of_plain_step"].items()]
    lines += ["", f"projected tax for the wider student: {b['projected_tax_wide_student']:.2f}"]
    return "\n".join(lines)


@click.command()
@click.option("--work", type=click.Path(path_type=Path), default=DEFAULT_WORK, show_default=True,
              help="Folder of the shared setting (built once by benchmarks.train_loader.ensure_setting).")
@click.option("--rounds", type=int, default=4, show_default=True,
              help="Interleaved rounds for the overhead/tax arms (each block = one 8-step shuffle window).")
@click.option("--online-rounds", type=int, default=3, show_default=True, help="Interleaved rounds for cached vs online.")
@click.option("--online-steps", type=int, default=2, show_default=True, help="Steps per online block.")
@click.option("--repeats", type=int, default=7, show_default=True, help="Repeats of the per-component breakdown.")
@click.option("--online/--no-online", default=True, show_default=True,
              help="Also measure cached vs online (--no-online: overhead, tax and breakdown only).")
@click.option("--workers/--no-workers", default=True, show_default=True,
              help="Also measure the merge in a one-worker DataLoader against the merge in the step (wall clock).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch intra-op threads (1: on shared cores, spinning OpenMP threads inflate CPU time).")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "train_step.json", show_default=True,
              help="JSON results file.")
def main(work: Path, rounds: int, online_rounds: int, online_steps: int, repeats: int, online: bool, workers: bool,
         threads: int, out: Path) -> None:
    """Streaming overhead, distillation tax (with a breakdown) and cached vs online throughput."""
    torch.set_num_threads(threads)
    paths = ensure_setting(work)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtkd-train-step-") as d:
        tmp = Path(d)
        res: dict[str, Any] = {"benchmark": "train_step", "setting": paths.setting.to_dict(),
                               "torch_threads": torch.get_num_threads(), "load_average_before": os.getloadavg()}
        res["overhead_and_tax"] = overhead_and_tax(paths, rounds, tmp)
        if workers:
            res["merge_in_loader"] = merge_in_loader(paths, rounds, tmp)
        res["breakdown"] = breakdown(paths, repeats, tmp)
        if online:
            res["cached_vs_online"] = cached_vs_online(paths, online_rounds, online_steps, tmp)
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    res["load_average_after"] = os.getloadavg()
    res["command"] = "python -m benchmarks.train_step " + " ".join(sys.argv[1:])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    click.echo(_table(res))
    click.echo(f"wrote {out} ({res['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
