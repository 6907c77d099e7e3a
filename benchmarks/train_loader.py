"""Loader throughput of the streaming trainer, and the setting every `train_*` benchmark shares.

    python -m benchmarks.train_loader            # builds the setting once (15 min here), then ~0.5 min

**Setting** (`TrainSetting`, built once by `ensure_setting` under `--work`, reused afterwards):
a byte-level BPE tokenizer of 8,192 tokens trained on Shakespeare's plays (`shakespeare` package);
the plays cut into 128-token samples; three caches with top-64 targets (u8log values, zstd):

* `main`: 640 samples (81,830 positions), 80 chunks of 8 samples, four *target teachers*
  t0..t3 - random Llamas (width 64, 2 layers, 1.2M parameters, 1.1M of them in the embedding and
  head) whose heads are scaled to logit std 4.0/4.5/5.0/5.5 (see `benchmarks._online`);
* `main_1x`: the first 64 samples of the same text, same teachers: the 1x cache of
  `train_memory` (`main` is its 10x cache);
* `online`: the first 64 samples again, with the four *online teachers* T0..T3 (width 256,
  6 layers, 10.1M parameters) that `train_step` also runs resident for the online baseline.

The target teachers exist because running 10M-parameter teachers over 82k positions x 4 would
cost another ~15 minutes of shared CPU; a cached step's cost depends on N, K, V and the batch,
not on the model that wrote the targets.

**Measurement** (this module's `main`): `CachedDistillDataset` alone (no student), read-ahead off
so one thread decodes; N = 1, 2, 4 teachers and a plain student step (forward + backward +
AdamW on the same batches: the consumer the loader must keep busy) are run in interleaved rounds
(N=1, N=2, N=4, student, N=1, ...). Each round reads a fresh stream (another seed) over whole
shuffle windows. Reported per arm: positions per CPU-second (`time.process_time`, all threads of
the process: the per-core rate) and stored target bytes read per CPU-second (compressed shard
bytes of every chunk decoded), as medians over rounds; and the ratios cost(N) / cost(1) and
loader rate / student rate (headroom), which are what transfer to other machines.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from mtkd_cache import CacheReader, RunConfig, open_cache, prepare, run_teacher
from mtkd_train.data import CachedDistillDataset

__all__ = [
    "RESULTS",
    "SettingPaths",
    "TrainSetting",
    "chunk_target_bytes",
    "ensure_setting",
    "interleave",
    "median",
]

RESULTS = Path(__file__).parent / "results"
DEFAULT_WORK = Path.home() / ".cache" / "mtkd" / "train-bench"
_DONE = "setting.json"  # written last: a work folder without it is rebuilt


@dataclass(frozen=True)
class ModelSize:
    """A Llama's shape: width, decoder layers, MLP width."""

    hidden: int
    layers: int
    intermediate: int


@dataclass(frozen=True)
class TrainSetting:
    """Sizes of the training benchmarks (see the module docstring)."""

    vocab: int = 8192
    """Tokenizer and model vocabulary V."""
    top_k: int = 64
    """Top-k entries stored per position (K)."""
    max_length: int = 128
    """Positions per sample (L)."""
    samples: int = 640
    """Samples of the `main` cache (the 10x cache of `train_memory`)."""
    small_samples: int = 64
    """Samples of `main_1x` and `online`."""
    chunk_samples: int = 8
    """Samples per cache chunk (1,024 positions)."""
    plays: int = 6
    """Shakespeare plays in the corpus (enough text for `samples` windows)."""
    target_teacher: ModelSize = ModelSize(64, 2, 256)
    """Architecture of t0..t3, the teachers of `main` and `main_1x`."""
    online_teacher: ModelSize = ModelSize(256, 6, 1024)
    """Architecture of T0..T3, the teachers of `online` and of the online baseline."""
    student: ModelSize = ModelSize(128, 2, 512)
    """The student trained by `train_step` and `train_memory`."""
    logit_std: tuple[float, ...] = (4.0, 4.5, 5.0, 5.5)
    """Head scale of teacher i (its logits' std): different teachers, different entropies."""
    batch_size: int = 4
    """Samples per training step (B); a step sees B * L = 512 positions."""
    shuffle_chunks: int = 4
    """Chunks per shuffle window (the trainer's default): a window is 32 samples = 8 steps."""

    @property
    def teachers(self) -> tuple[str, ...]:
        return tuple(f"t{i}" for i in range(len(self.logit_std)))

    @property
    def online_teachers(self) -> tuple[str, ...]:
        return tuple(f"T{i}" for i in range(len(self.logit_std)))

    @property
    def window_samples(self) -> int:
        return self.shuffle_chunks * self.chunk_samples

    @property
    def window_steps(self) -> int:
        return self.window_samples // self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SettingPaths:
    """Where `ensure_setting` put everything under the work folder."""

    work: Path
    setting: TrainSetting = field(default_factory=TrainSetting)

    @property
    def tokenizer(self) -> Path:
        return self.work / "tokenizer"

    @property
    def corpus(self) -> Path:
        return self.work / "corpus.jsonl"

    def cache(self, name: str) -> Path:
        """`main`, `main_1x` or `online`."""
        return self.work / "caches" / name

    def model(self, name: str) -> Path:
        """A teacher (t0.., T0..) or `student` folder."""
        return self.work / "models" / name

    def build_info(self) -> dict[str, Any]:
        return json.loads((self.work / _DONE).read_text())


# -- building the setting ------------------------------------------------------------------------
def _train_tokenizer(dest: Path, vocab: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from benchmarks._models import shakespeare_files

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(f) for f in shakespeare_files()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    if len(fast) != vocab:
        raise RuntimeError(f"the BPE trainer made {len(fast)} tokens, expected {vocab}")
    fast.save_pretrained(dest)
    return fast


def _run_teacher_job(cache: str, teacher: str, model: str, top_k: int) -> float:
    """One `run_teacher` in a worker process; returns its seconds."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run_teacher(cache, RunConfig(teacher=teacher, model=model, top_k=top_k, batch_size=8, device="cpu"),
                progress=False)
    return time.perf_counter() - t0


def ensure_setting(work: Path = DEFAULT_WORK, setting: TrainSetting | None = None, log: Callable[[str], None] = print
                   ) -> SettingPaths:
    """Build (once) the tokenizer, models and caches of the training benchmarks under `work`.

    Idempotent: a folder whose `setting.json` (written last) matches `setting` is returned as is.
    Teacher runs go through the public `run_teacher`, two at a time in worker processes.

    Returns:
        The paths of the built setting.
    """
    from benchmarks._models import shakespeare_files, shakespeare_jsonl
    from benchmarks._online import llama_config, save_llama, save_student_config

    s = setting or TrainSetting()
    paths = SettingPaths(work, s)
    done = work / _DONE
    if done.is_file() and json.loads(done.read_text()).get("setting") == json.loads(json.dumps(s.to_dict())):
        return paths
    log(f"building the training-benchmark setting under {work} (once) ...")
    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    tok = _train_tokenizer(paths.tokenizer, s.vocab)
    shakespeare_jsonl(paths.corpus, shakespeare_files()[: s.plays])

    def cfg(size: ModelSize):  # noqa: ANN202
        return llama_config(vocab=s.vocab, hidden=size.hidden, layers=size.layers, intermediate=size.intermediate,
                            max_length=s.max_length)

    for i, std in enumerate(s.logit_std):
        save_llama(paths.model(s.teachers[i]), cfg(s.target_teacher), seed=100 + i, logit_std=std, tokenizer=tok)
        save_llama(paths.model(s.online_teachers[i]), cfg(s.online_teacher), seed=200 + i, logit_std=std,
                   tokenizer=tok)
    save_student_config(paths.model("student"), cfg(s.student))
    for name, n in (("main", s.samples), ("main_1x", s.small_samples), ("online", s.small_samples)):
        prepare(paths.cache(name), paths.corpus, tokenizer=paths.tokenizer, max_length=s.max_length,
                chunk_samples=s.chunk_samples, max_samples=n, overwrite=True, progress=False)
    jobs = [("main", t) for t in s.teachers] + [("online", t) for t in s.online_teachers] + \
           [("main_1x", t) for t in s.teachers]
    seconds: dict[str, float] = {}
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        futs = {f"{c}/{t}": pool.submit(_run_teacher_job, str(paths.cache(c)), t, str(paths.model(t)), s.top_k)
                for c, t in jobs}
        for key, fut in futs.items():
            seconds[key] = round(fut.result(), 1)
            log(f"  {key}: {seconds[key]:.0f} s")
    for c, t in jobs:  # two runs finishing at once may lose one manifest entry: re-register (no recompute)
        if t not in open_cache(paths.cache(c)).teacher_names:
            run_teacher(paths.cache(c), RunConfig(teacher=t, model=str(paths.model(t)), top_k=s.top_k), progress=False)
    info = {"setting": s.to_dict(), "build_seconds": round(time.perf_counter() - t_start, 1),
            "teacher_run_seconds": seconds}
    done.write_text(json.dumps(info, indent=2))
    log(f"setting built in {info['build_seconds']:.0f} s")
    return paths


# -- measurement helpers (shared by train_step) ----------------------------------------------------
def median(values: list[float]) -> float:
    return float(statistics.median(values))


def interleave(arms: dict[str, Callable[[int], dict[str, float]]], rounds: int) -> dict[str, list[dict[str, float]]]:
    """Run `arms` in the order given, `rounds` times (A, B, ..., A, B, ...); each call gets the round."""
    out: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    for r in range(rounds):
        for name, arm in arms.items():
            out[name].append(arm(r))
    return out


def chunk_target_bytes(reader: CacheReader, teachers: tuple[str, ...]) -> np.ndarray:
    """(num_chunks,) stored (compressed) bytes of the teachers' target shards per chunk (local caches)."""
    root = Path(reader.store.path(""))
    sizes = np.zeros(reader.num_chunks, dtype=np.int64)
    for t in teachers:
        for arr in ("indices", "values", "tail", "counts"):
            for c in range(reader.num_chunks):
                f = root / "teachers" / t / arr / "c" / str(c) / "0"
                if f.is_file():
                    sizes[c] += f.stat().st_size
    return sizes


class _CountingDataset(CachedDistillDataset):
    """Counts the stored bytes of every chunk it decodes (benchmark only)."""

    def __init__(self, *args: Any, chunk_bytes: np.ndarray, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.chunk_bytes, self.bytes_read = chunk_bytes, 0

    def read_chunk(self, chunk: int):  # noqa: ANN201
        self.bytes_read += int(self.chunk_bytes[chunk])
        return super().read_chunk(chunk)


def _batches(ds: CachedDistillDataset, n: int) -> Iterator[dict[str, Any]]:
    stream = iter(ds)
    try:
        for _ in range(n):
            yield next(stream)
    finally:
        stream.close()


# -- the loader benchmark -------------------------------------------------------------------------
def _loader_arm(reader: CacheReader, teachers: tuple[str, ...], s: TrainSetting, windows: int,
                chunk_bytes: np.ndarray) -> Callable[[int], dict[str, float]]:
    def run(r: int) -> dict[str, float]:
        ds = _CountingDataset(reader, teachers, batch_size=s.batch_size, seed=1000 + r, prefetch=0,
                              shuffle_chunks=s.shuffle_chunks, chunk_bytes=chunk_bytes)
        positions = 0
        w0, c0 = time.perf_counter(), time.process_time()
        for batch in _batches(ds, windows * s.window_steps):
            positions += int(batch["position_mask"].sum())
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        return {"positions": positions, "bytes": ds.bytes_read, "wall_s": wall, "cpu_s": cpu}

    return run


def _student_arm(paths: SettingPaths, reader: CacheReader, windows: int) -> Callable[[int], dict[str, float]]:
    """Plain next-token training of the student on inputs-only batches: the consumer's rate."""
    from mtkd_train.losses import hard_label_loss
    from mtkd_train.objective import row_labels
    from mtkd_train.student import load_student

    s = paths.setting
    student = load_student(str(paths.model("student")), seed=0)
    opt = torch.optim.AdamW(student.module.parameters(), lr=3e-4)
    ds = CachedDistillDataset(reader, (), batch_size=s.batch_size, seed=7, shuffle_chunks=s.shuffle_chunks)
    batches = list(_batches(ds, s.window_steps))
    steps = max(1, windows * s.window_steps // 8)  # the student is ~100x slower: a few steps suffice

    def run(r: int) -> dict[str, float]:
        positions = 0
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(steps):
            batch = batches[i % len(batches)]
            rows = batch["position_mask"]
            logits, _ = student.forward(batch)
            loss = hard_label_loss(logits[rows], row_labels(batch, "causal_lm")[rows])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            positions += int(rows.sum())
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        return {"positions": positions, "bytes": 0, "wall_s": wall, "cpu_s": cpu}

    return run


def _summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    return {
        "positions_per_cpu_s": median([r["positions"] / r["cpu_s"] for r in runs]),
        "positions_per_wall_s": median([r["positions"] / r["wall_s"] for r in runs]),
        "target_MB_per_cpu_s": median([r["bytes"] / r["cpu_s"] / 1e6 for r in runs]),
        "stored_bytes_per_position": sum(r["bytes"] for r in runs) / max(1, sum(r["positions"] for r in runs)),
        "rounds": len(runs),
    }


def run_loader_benchmark(paths: SettingPaths, rounds: int, windows: int) -> dict[str, Any]:
    s = paths.setting
    reader = open_cache(paths.cache("main"))
    chunk_bytes = {n: chunk_target_bytes(reader, s.teachers[:n]) for n in (1, 2, 4)}
    arms: dict[str, Callable[[int], dict[str, float]]] = {
        f"N={n}": _loader_arm(reader, s.teachers[:n], s, windows, chunk_bytes[n]) for n in (1, 2, 4)
    }
    arms["student"] = _student_arm(paths, reader, windows)
    for arm in arms.values():  # warm-up: imports, page cache, allocator
        arm(rounds)
    raw = interleave(arms, rounds)
    summary = {name: _summarise(runs) for name, runs in raw.items()}
    student_rate = summary["student"]["positions_per_wall_s"]
    for n in (1, 2, 4):
        row = summary[f"N={n}"]
        # ratios of medians; per-round ratios (same round, adjacent in time) give the spread
        row["cost_vs_N1"] = summary["N=1"]["positions_per_cpu_s"] / row["positions_per_cpu_s"]
        pair = [raw["student"][r]["cpu_s"] / raw["student"][r]["positions"]
                / (raw[f"N={n}"][r]["cpu_s"] / raw[f"N={n}"][r]["positions"]) for r in range(rounds)]
        row["headroom_vs_student"] = row["positions_per_cpu_s"] / summary["student"]["positions_per_cpu_s"]
        row["headroom_vs_student_wall"] = row["positions_per_wall_s"] / student_rate
        row["headroom_per_round_min_max"] = [min(pair), max(pair)]
    return {"benchmark": "train_loader", "setting": s.to_dict(), "rounds": rounds, "windows_per_round": windows,
            "torch_threads": torch.get_num_threads(), "results": summary, "raw": raw}


def _table(res: dict[str, Any]) -> str:
    lines = ["| arm | positions / CPU-s | target MB / CPU-s | stored B / position | cost vs N=1 | loader ÷ student |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in res["results"].items():
        if name == "student":
            lines.append(f"| student step (plain, B={res['setting']['batch_size']}) | "
                         f"{row['positions_per_cpu_s']:,.0f} | – | – | – | 1 |")
            continue
        lines.append(f"| loader {name} | {row['positions_per_cpu_s']:,.0f} | {row['target_MB_per_cpu_s']:.1f} | "
                     f"{row['stored_bytes_per_position']:.0f} | {row['cost_vs_N1']:.2f} | "
                     f"{row['headroom_vs_student']:.0f} |")
    return "\n".join(lines)


@click.command()
@click.option("--work", type=click.Path(path_type=Path), default=DEFAULT_WORK, show_default=True,
              help="Folder for the tokenizer, models and caches (built once, reused).")
@click.option("--rounds", type=int, default=5, show_default=True, help="Interleaved rounds per arm.")
@click.option("--windows", type=int, default=4, show_default=True,
              help="Shuffle windows (32 samples each) a loader arm reads per round.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch intra-op threads of the student arm (as in benchmarks.train_step).")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "train_loader.json", show_default=True,
              help="JSON results file.")
def main(work: Path, rounds: int, windows: int, threads: int, out: Path) -> None:
    """Loader throughput for N = 1, 2, 4 teachers, interleaved with a plain student step."""
    torch.set_num_threads(threads)
    paths = ensure_setting(work)
    res = run_loader_benchmark(paths, rounds, windows)
    res["command"] = "python -m " + " ".join([__spec__.name if __spec__ else "benchmarks.train_loader", *sys.argv[1:]])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    click.echo(_table(res))
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
