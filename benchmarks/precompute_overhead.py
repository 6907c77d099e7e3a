"""Precompute overhead: wall time of `run_teacher` over the bare teacher forward, same inputs.

Ratio = T_run / T_bare, where
* T_bare: the teacher forward alone (`module(**batch)` under `torch.inference_mode`), same model
  folder, dtype, threads and batches as the runner plans them (one `length_grouped_batches` plan
  per chunk, padded by `pad_batch`); batches are built before the clock starts;
* T_run: `run_teacher` on the same cache (read inputs, forward, finiteness check, entropy stats,
  device-side top-k, host copy, encode, compress, checksum, write, commit, finish). It is
  reported twice: the steady-state pipeline (`run_teacher` minus `load_teacher`, which a real,
  hours-long run pays once) and the total wall time including the load.

Runs are interleaved bare, run, bare, run, ... in one process so both see the same machine load
(this CPU is shared); the headline is the median of the per-pair ratios. A last, separate run
is instrumented (timing wrappers on the runner's calls) to split T_run into stages; its writer
stage runs in a thread, overlapped with the next chunk's forward.

    python -m benchmarks.precompute_overhead                    # SmolLM2-135M and a 16.8M random Llama
    python -m benchmarks.precompute_overhead --teachers smollm2 --repeats 5

Cost: (2 x repeats + 2) passes of each teacher over its cache; 15-30 min on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks._models import default_smollm2_dir, ensure_smollm2, shakespeare_jsonl, tiny_llama
from mtkd_cache.errors import CacheExistsError
from mtkd_cache.format.reader import CacheReader
from mtkd_cache.format.store import CacheStore
from mtkd_cache.precompute import chunk as chunk_mod
from mtkd_cache.precompute import native
from mtkd_cache.precompute import run as run_mod
from mtkd_cache.precompute.batching import length_grouped_batches
from mtkd_cache.precompute.config import RunConfig
from mtkd_cache.precompute.models import LoadedTeacher, load_teacher
from mtkd_cache.precompute.prepare import prepare

__all__ = ["TeacherCase", "main", "measure_case"]

RESULTS = Path(__file__).parent / "results"
_RUN_NAME = "overhead"
_LAST_CPU: dict[str, float] = {}  # process CPU seconds of the last bare forward (all threads)


@dataclass(frozen=True)
class TeacherCase:
    """One teacher to measure and the cache it runs over."""

    key: str
    """Short name in the results ("smollm2", "tiny")."""
    description: str
    model_dir: Path
    samples: int
    """Samples of `max_length` tokens (whole Shakespeare windows) in its cache."""


# -- inputs ----------------------------------------------------------------------------------------
def prepare_cache(work: Path, model_dir: Path, *, max_length: int, samples: int, chunk_samples: int) -> Path:
    """A cache of `samples` windows of Shakespeare (idempotent: `prepare` keeps matching inputs)."""
    work.mkdir(parents=True, exist_ok=True)
    data = work / "shakespeare.jsonl"
    if not data.exists():
        shakespeare_jsonl(data)
    cache = work / f"cache_L{max_length}_n{samples}_c{chunk_samples}"
    try:
        prepare(cache, data, tokenizer=model_dir, max_length=max_length, max_samples=samples,
                chunk_samples=chunk_samples, progress=False)
    except CacheExistsError:  # made by another mtkd version; it is scratch, so rebuild it
        prepare(cache, data, tokenizer=model_dir, max_length=max_length, max_samples=samples,
                chunk_samples=chunk_samples, progress=False, overwrite=True)
    return cache


def planned_batches(cache: Path, cfg: RunConfig) -> list[dict[str, torch.Tensor]]:
    """The batches `run_teacher` forwards, in its order (same plan, same padding)."""
    reader = CacheReader(CacheStore(cache))
    tok = reader.inputs.tokenizer
    pad_id = tok.pad_token_id if tok and tok.pad_token_id is not None else 0
    out = []
    for c in range(reader.inputs.grid.num_chunks):
        data = reader.read_chunk(c)
        for idx in length_grouped_batches(data.lengths.tolist(), cfg.max_tokens, cfg.batch_size):
            out.append(chunk_mod.batch_inputs(data, idx, pad_id))
    return out


# -- the two timed things --------------------------------------------------------------------------
def time_bare(teacher: LoadedTeacher, batches: list[dict[str, torch.Tensor]]) -> float:
    """Seconds for the teacher forward alone over `batches`."""
    module = teacher.module
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for batch in batches:
            module(**batch)
    _LAST_CPU["bare"] = time.process_time() - c0
    return time.perf_counter() - t0


@contextlib.contextmanager
def _timing(owner: Any, name: str, acc: dict[str, float], key: str, *, in_chunk: bool = False) -> Iterator[None]:
    """Patch `owner.name` with a wrapper that adds its wall time to `acc[key]` and the calling thread's
    CPU time to `acc[key + "_cpu"]` (thread-safe). On the reduction workers the two differ: four
    threads (two intra-op, two workers) share two cores, so a call's wall time counts the time its
    thread waited for a core; only the CPU time is what the call costs.

    With `in_chunk`, only calls made while `_run_chunk` runs count (not the runner's set-up probe).
    """
    original = getattr(owner, name)
    lock = threading.Lock()

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counted = not in_chunk or acc.get("_inside", 0.0) > 0
        if key == "run_chunk":
            acc["_inside"] = 1.0
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                if counted:
                    acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0
                    acc[key + "_cpu"] = acc.get(key + "_cpu", 0.0) + time.thread_time() - c0
                if key == "run_chunk":
                    acc["_inside"] = 0.0

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _clear_run(cache: Path) -> None:
    store = CacheStore(cache)
    if store.exists(f"teachers/{_RUN_NAME}"):
        store.remove(f"teachers/{_RUN_NAME}")


def time_run(cache: Path, cfg: RunConfig, *, stages: bool = False) -> dict[str, float]:
    """Wall seconds of one `run_teacher` call from scratch; `load` is the `load_teacher` part.

    With `stages`, the runner's calls are wrapped to split the time (see `stage_table`).
    """
    _clear_run(cache)
    acc: dict[str, float] = {}
    with contextlib.ExitStack() as patches:
        patches.enter_context(_timing(run_mod, "load_teacher", acc, "load"))
        if stages:
            targets = [(run_mod, "_process", "process"), (run_mod, "run_chunk", "run_chunk"),
                       (CacheReader, "read_chunk", "read_inputs"), (chunk_mod, "forward_teacher", "forward"),
                       (chunk_mod, "nonfinite_samples", "check_finite"), (run_mod, "_commit", "writer_thread"),
                       (run_mod.TeacherWriter, "finish", "finish"), (chunk_mod, "_reduce_batch", "reductions"),
                       (chunk_mod, "topk_targets_checked", "topk"), (chunk_mod, "forward_body", "forward_body"),
                       (chunk_mod, "reduce_by_head_blocks", "head_blocks")]
            for owner, name, key in targets:
                # inputs are read before `run_chunk` is entered (its argument): counted on every call
                patches.enter_context(_timing(owner, name, acc, key, in_chunk=key == "forward"))
        t0, c0 = time.perf_counter(), time.process_time()
        meta = run_mod.run_teacher(cache, cfg, progress=False)
        acc["total"] = time.perf_counter() - t0
        acc["cpu_total"] = time.process_time() - c0
    acc["pipeline"] = acc["total"] - acc["load"]
    acc["bytes_per_position"] = float(meta.stats["bytes_per_position"])
    return acc


def stage_table(acc: dict[str, float]) -> dict[str, float]:
    """Stages of an instrumented run (seconds). The main-thread stages add up to `total`.

    A causal LM's forward is its body (`forward_body`), then the head per group of row blocks with
    the reductions (`reduce_by_head_blocks`: the head's matmuls on this thread, the reductions on
    the single-threaded workers, overlapped with the next group's head). Other teachers build
    their full logits (`forward_teacher`), then `_reduce_batch` splits the batch over the workers.
    The reductions (finiteness check, top-k + tail, entropy and top-1 in one pass since session 10)
    are reported twice: the workers' CPU seconds, which is what they cost, and their wall seconds,
    which also count the time a worker waited for one of the two cores (four threads share them).
    """
    on_head = acc.get("head_blocks", 0.0) > 0
    forward = acc.get("forward", 0.0) + acc.get("forward_body", 0.0)
    waited = acc.get("head_blocks", 0.0) if on_head else acc.get("reductions", 0.0)  # main thread, after the body
    return {
        "load_teacher": acc["load"],
        "setup (tokenizer check, probe, claim)": acc["total"] - acc["load"] - acc["process"] - acc["finish"],
        "read inputs": acc["read_inputs"],
        "forward (body, or full logits)": forward,
        ("head per block group + waiting for the reductions" if on_head else "waiting for the reductions"): waited,
        "reductions, worker CPU (thread-s)": acc.get("topk_cpu", 0.0) + acc.get("check_finite_cpu", 0.0),
        "reductions, worker wall (thread-s)": acc.get("topk", 0.0) + acc.get("check_finite", 0.0),
        "other in-loop (host copy, split)": acc["run_chunk"] - forward - waited,
        "wait for writer (last chunk's commit)": acc["process"] - acc["run_chunk"] - acc["read_inputs"],
        "finish (parquet, teacher.json, manifest)": acc["finish"],
        "writer thread, overlapped (encode+compress+checksum+write)": acc["writer_thread"],
    }


# -- driver ----------------------------------------------------------------------------------------
def measure_case(case: TeacherCase, work: Path, *, repeats: int, max_length: int, chunk_samples: int,
                 batch_size: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Interleaved bare/run measurements of one teacher, plus one instrumented run."""
    cache = prepare_cache(work, case.model_dir, max_length=max_length, samples=case.samples,
                          chunk_samples=chunk_samples)
    cfg = RunConfig(teacher=_RUN_NAME, model=str(case.model_dir), top_k=64, batch_size=batch_size,
                           device="cpu", dtype="fp32")
    batches = planned_batches(cache, cfg)
    positions = int(sum(int(b["attention_mask"].sum()) for b in batches))
    padded = int(sum(b["attention_mask"].numel() for b in batches))
    teacher = load_teacher(str(case.model_dir), device=torch.device("cpu"), dtype=torch.float32)
    n_params = sum(p.numel() for p in teacher.module.parameters())
    log(f"[{case.key}] {n_params / 1e6:.1f}M params, {len(batches)} batches, {positions} positions "
        f"({padded} padded), threads={torch.get_num_threads()}")
    with torch.inference_mode():  # warm-up: first-call allocations and kernel selection
        teacher.module(**batches[-1])
    bare, runs, bare_cpu = [], [], []
    for i in range(repeats):
        bare.append(time_bare(teacher, batches))
        bare_cpu.append(_LAST_CPU["bare"])
        runs.append(time_run(cache, cfg))
        log(f"[{case.key}] pair {i}: bare {bare[-1]:.2f}s  run {runs[-1]['total']:.2f}s "
            f"(load {runs[-1]['load']:.2f}s)  ratio {runs[-1]['pipeline'] / bare[-1]:.3f}")
    staged = time_run(cache, cfg, stages=True)
    staged_bare = time_bare(teacher, batches)
    log(f"[{case.key}] instrumented run {staged['total']:.2f}s, bare after it {staged_bare:.2f}s")
    _clear_run(cache)
    ratios = [r["pipeline"] / b for r, b in zip(runs, bare)]
    ratios_total = [r["total"] / b for r, b in zip(runs, bare)]
    return {
        "teacher": case.description, "model_dir": str(case.model_dir), "parameters": n_params,
        "positions": positions, "padded_positions": padded, "batches": len(batches),
        "bare_s": bare, "run_total_s": [r["total"] for r in runs], "run_load_s": [r["load"] for r in runs],
        "run_pipeline_s": [r["pipeline"] for r in runs],
        "ratio_pipeline_per_pair": ratios, "ratio_total_per_pair": ratios_total,
        "median_ratio_pipeline": statistics.median(ratios), "median_ratio_total": statistics.median(ratios_total),
        "bare_cpu_s": bare_cpu, "run_total_cpu_s": [r["cpu_total"] for r in runs],
        "median_ratio_total_cpu": statistics.median(r["cpu_total"] / b for r, b in zip(runs, bare_cpu)),
        "median_bare_s": statistics.median(bare), "median_run_pipeline_s": statistics.median(r["pipeline"] for r in runs),
        "bare_positions_per_s": positions / statistics.median(bare),
        "bytes_per_position": runs[-1]["bytes_per_position"],
        "stages_s": stage_table(collections.defaultdict(float, staged)), "stages_bare_s": staged_bare,
    }


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "loadavg_at_start": os.getloadavg(),
            "topk_kernel": "compiled" if native.available() else "torch"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", default="smollm2,tiny", help="comma list of smollm2, tiny")
    ap.add_argument("--repeats", type=int, default=3, help="bare/run pairs per teacher")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per sample")
    ap.add_argument("--smollm2-samples", type=int, default=48, help="samples in SmolLM2's cache")
    ap.add_argument("--tiny-samples", type=int, default=64, help="samples in the tiny teacher's cache")
    ap.add_argument("--chunk-samples", type=int, default=8, help="samples per chunk (commit unit)")
    ap.add_argument("--batch-size", type=int, default=8, help="RunConfig.batch_size")
    ap.add_argument("--model-dir", type=Path, default=None, help="SmolLM2 folder (default ~/.cache/mtkd/smollm2-135m)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "mtkd" / "bench", help="scratch folder")
    ap.add_argument("--out", type=Path, default=RESULTS / "precompute_overhead.json")
    args = ap.parse_args(argv)

    smol = ensure_smollm2(args.model_dir or default_smollm2_dir())
    cases = {
        "smollm2": TeacherCase("smollm2", "SmolLM2-135M-Instruct (real, GGUF Q4_1 dequantized to fp32)", smol,
                               args.smollm2_samples),
        "tiny": TeacherCase("tiny", "random Llama, 4 layers x 256, tied 49,152-token head (SmolLM2 tokenizer)",
                            tiny_llama(args.work / "tiny-llama-17m", smol), args.tiny_samples),
    }
    result: dict[str, Any] = {"machine": _machine(), "settings": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "teachers": {}}
    for key in args.teachers.split(","):
        result["teachers"][key] = measure_case(cases[key], args.work, repeats=args.repeats,
                                               max_length=args.max_length, chunk_samples=args.chunk_samples,
                                               batch_size=args.batch_size)
        t = result["teachers"][key]
        print(f"[{key}] median ratio (pipeline) {t['median_ratio_pipeline']:.3f}, with load "
              f"{t['median_ratio_total']:.3f}; stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in t["stages_s"].items()))
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
