"""Tiny real fixtures for the fault matrix, built through mtkd's own command lines.

* two tiny Llama teachers `a`, `b` (2 layers, width 32, a 40-wide head over a 32-token word
  tokenizer: padded like real LMs) saved with `save_pretrained`, and a config-only student;
* `corpus.jsonl` (48 documents, 48 samples of <= 16 tokens) and a bigger corpus for `prepare` kills;
* `main`: the corpus prepared in chunks of 8 with teachers `a` (top-8, u8log, fp16 features),
  `b` (top-8, fp16 values, int8 features) and `s` (sampled targets, counts);
* `ref_train`: a 12-step training run on `main` (two passes over the data, feature losses on) that
  every corruption trial is compared with; `ref_long`: a 48-step run that kill trials resume;
* `kill_inputs` (chunks of 2) and `kill_ref`: a factory teacher run over it uninterrupted.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from tools._faults.ondisk import copy_tree
from tools._faults.proc import Ctx, Outcome, any_file, monitored

__all__ = ["Fixtures", "build_fixtures", "fixtures_at", "train_args", "write_corpus"]

VOCAB = 32
HEAD = 40
NUM_DOCS = 48
FACTORY_DIR = Path(__file__).with_name("teachers")
FEATURES = json.dumps({"a": {"layer": -1}, "b": {"layer": -1}})


@dataclass(frozen=True)
class Fixtures:
    root: Path
    teacher_a: Path
    teacher_b: Path
    student: Path
    other_tokenizer: Path
    corpus: Path
    big_corpus: Path
    main: Path
    ref_train: Path
    ref_long: Path
    kill_inputs: Path
    kill_ref: Path
    big_ref: Path
    forward_delay: float = 0.2
    """Seconds each forward of the run-kill teacher sleeps (FAULTS_FORWARD_DELAY)."""
    work_seconds: dict[str, float] = field(default_factory=dict)
    """prepare / run / train: measured work time of the uninterrupted reference (kill window)."""

    def kill_run_args(self, cache: Path) -> list[str]:
        """`mtkd-cache run` of the slow factory teacher used by the run-kill trials."""
        return ["run", str(cache), "--teacher", "f", "--model", "fault_factories:lm", "--model-kwargs",
                json.dumps({"width": HEAD, "vocab": VOCAB, "padded": HEAD, "seed": 3}), "--top-k", "8",
                "--features", "-1", "--batch-size", "2", "--device", "cpu"]

    def prepare_args(self, cache: Path, data: Path, chunk: int) -> list[str]:
        return ["prepare", str(cache), "--data", str(data), "--tokenizer", str(self.teacher_a),
                "--max-length", "16", "--chunk-samples", str(chunk)]


def train_args(fx: Fixtures, cache: Path, out: Path, *, steps: int = 12, every: int = 0,
               teachers: str = "a,b,s", features: bool = True) -> list[str]:
    """`mtkd-train` flags of the reference runs (mean of the teachers, feature losses on a and b)."""
    args = [str(cache), "--teachers", teachers, "--student", str(fx.student), "--out", str(out),
            "--max-steps", str(steps), "--batch-size", "8", "--aggregate", "mean", "--warmup-steps", "4",
            "--checkpoint-every", str(every), "--no-progress", "--device", "cpu", "--seed", "0"]
    return [*args, "--features", FEATURES] if features else args


def write_corpus(path: Path, n: int, seed: int, max_words: int = 16) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            words = " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(rng.randint(4, max_words)))
            f.write(json.dumps({"text": words, "dom": ("x", "y")[i % 2]}) + "\n")


def _check(out: Outcome, what: str) -> None:
    if out.rc != 0:
        raise RuntimeError(f"fixture step {what!r} failed (exit {out.rc}):\n{out.stderr[-3000:]}")


def _models(root: Path) -> tuple[Path, Path, Path, Path]:
    from tests.helpers.tiny_models import build_word_tokenizer, save_tiny_causal_lm

    a = save_tiny_causal_lm(root / "teacher_a", vocab_size=HEAD, tokenizer_size=VOCAB, seed=1)
    b = save_tiny_causal_lm(root / "teacher_b", vocab_size=HEAD, tokenizer_size=VOCAB, seed=2)
    student = save_tiny_causal_lm(root / "student", vocab_size=HEAD, tokenizer_size=VOCAB, num_layers=1, seed=4)
    for weights in student.glob("*.safetensors"):
        weights.unlink()  # config-only: initialised from config.json, as a user would start one
    other = root / "other_tokenizer"
    build_word_tokenizer(VOCAB + 4).save_pretrained(other)
    return a, b, student, other


def build_fixtures(ctx: Ctx, root: Path) -> Fixtures:
    """Build every fixture under `root` (about 10 CLI calls), or reuse a finished build there."""
    ready = root / "ready.json"
    if ready.is_file():
        fx = fixtures_at(root)
        fx.work_seconds.update(json.loads(ready.read_text()))
        return fx
    fx = _build(ctx, root)
    ready.write_text(json.dumps(fx.work_seconds))
    return fx


def fixtures_at(root: Path) -> Fixtures:
    return Fixtures(root, root / "teacher_a", root / "teacher_b", root / "student", root / "other_tokenizer",
                    root / "corpus.jsonl", root / "big_corpus.jsonl", root / "main", root / "ref_train",
                    root / "ref_long", root / "kill_inputs", root / "kill_ref", root / "big_ref")


def _build(ctx: Ctx, root: Path) -> Fixtures:
    root.mkdir(parents=True, exist_ok=True)
    a, b, _, _ = _models(root)
    corpus, big = root / "corpus.jsonl", root / "big_corpus.jsonl"
    write_corpus(corpus, NUM_DOCS, seed=0)
    write_corpus(big, 2500, seed=1, max_words=40)
    fx = fixtures_at(root)
    _check(ctx.run("cache", fx.prepare_args(fx.main, corpus, 8)), "prepare main")
    teachers = {
        "a": ["--model", str(a), "--top-k", "8", "--features", "-1"],
        "b": ["--model", str(b), "--top-k", "8", "--values", "fp16", "--features", "-1", "--feature-dtype", "int8"],
        "s": ["--model", str(a), "--samples", "8"],
    }
    for name, opts in teachers.items():
        _check(ctx.run("cache", ["run", str(fx.main), "--teacher", name, *opts, "--device", "cpu"]), f"run {name}")
    _check(ctx.run("train", train_args(fx, fx.main, fx.ref_train)), "reference training")
    res = monitored(ctx, "train", train_args(fx, fx.main, fx.ref_long, steps=48, every=4),
                    lambda: (fx.ref_long / "metrics.jsonl").is_file())
    _check(res.out, "long reference training")
    fx.work_seconds["train"] = res.work_seconds or 1.0
    _check(ctx.run("cache", fx.prepare_args(fx.kill_inputs, corpus, 2)), "prepare kill inputs")
    copy_tree(fx.kill_inputs, fx.kill_ref)
    env = ctx.env({"FAULTS_FORWARD_DELAY": str(fx.forward_delay)})
    res = monitored(ctx, "cache", fx.kill_run_args(fx.kill_ref), any_file(fx.kill_ref / "teachers" / "f"), env=env)
    _check(res.out, "kill reference run")
    fx.work_seconds["run"] = res.work_seconds or 1.0
    res = monitored(ctx, "cache", fx.prepare_args(fx.big_ref, big, 64), any_file(fx.big_ref))
    _check(res.out, "prepare big reference")
    fx.work_seconds["prepare"] = res.work_seconds or 1.0
    return fx
