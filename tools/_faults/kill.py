"""SIGKILL at random (seeded) moments of `prepare`, `run` and `train`, then resume and compare.

A kill is timed from the moment the command visibly starts working (its output folder appears),
plus a uniform random delay over the work time measured when the fixtures' uninterrupted
reference was built, so most kills land mid-work; each trial records whether it did. The resume
is the command a user would run next (the same command; `--resume` for training) and must give
bit-identical arrays / tables, or identical per-step losses and final weights.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from tools._faults.fixtures import Fixtures, train_args
from tools._faults.ondisk import (
    arrays_under,
    copy_tree,
    inputs_equal,
    json_equal,
    metrics_records,
    same_arrays,
    step_losses,
    student_weights,
)
from tools._faults.proc import (
    Ctx,
    Monitored,
    Outcome,
    Trial,
    any_file,
    error_line,
    judge,
    monitored,
)

__all__ = ["kill_trials", "teacher_ok", "train_same"]

WINDOW = 0.85
"""Kills fall in the first 85% of the measured work time: the rest is finishing and exiting."""


def teacher_ok(cache: Path, ref: Path, name: str) -> tuple[bool, str]:
    folder, ref_folder = cache / "teachers" / name, ref / "teachers" / name
    if not (folder / "teacher.json").is_file():
        return False, "teacher.json missing after the resume"
    manifest = json.loads((cache / "manifest.json").read_text())
    if "teachers" in manifest and name not in manifest["teachers"]:
        return False, "teacher missing from the manifest"
    ok, why = same_arrays(arrays_under(folder), arrays_under(ref_folder))
    if ok and not json_equal(folder / "teacher.json", ref_folder / "teacher.json"):
        return False, "teacher.json differs from the uninterrupted run's"
    return ok, why


def train_same(run: Path, ref: Path) -> tuple[bool, str]:
    got, want = step_losses(run), step_losses(ref)
    if got != want:
        bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        return False, f"losses of {len(bad)} step(s) differ (first: step {bad[0] if bad else '?'})"
    ok, why = same_arrays(student_weights(run), student_weights(ref))
    return ok, ("" if ok else f"final weights differ: {why}")


def _verdict(case: str, res: Monitored, out: Outcome, check: Callable[[], tuple[bool, str]], mid: bool,
             extra: str, delay: float) -> Trial:
    verdict, what = judge(out, correct=check, may_fail=False)
    kill = f"killed {delay:.2f} s into the work" + (" (mid-work)" if mid else " (work had not started / had ended)")
    if not res.killed:
        kill = "the command ended before the kill"
    what = f"{kill}{extra}; resume {what}"
    return Trial(case, verdict, what, res.out.seconds + out.seconds,
                 {"killed": res.killed, "mid_work": mid, "delay": round(delay, 3)})


def _prepare_trial(ctx: Ctx, fx: Fixtures, folder: Path, delay: float) -> list[Trial]:
    cache, tmp = folder / "cache", folder / "tmp"
    tmp.mkdir(parents=True)
    env = ctx.env({"TMPDIR": str(tmp), "TMP": str(tmp), "TEMP": str(tmp)})
    args = fx.prepare_args(cache, fx.big_corpus, 64)
    res = monitored(ctx, "cache", args, any_file(cache), kill_after=delay, env=env)
    mid = res.killed and not (cache / "manifest.json").exists()
    out = ctx.run("cache", args, env=env)
    trial = _verdict("sigkill prepare, resume", res, out, lambda: inputs_equal(cache, fx.big_ref), mid, "", delay)
    leaked = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    leak = Trial("sigkill prepare: temporaries left outside the cache", "clean" if not leaked else "wrong-outcome",
                 "no file left in TMPDIR" if not leaked else f"{len(leaked)} file(s) left in TMPDIR: {leaked[:2]}",
                 0.0, {"derived": True, "mid_work": mid})
    return [trial, leak] if res.killed else [trial]


def _run_trial(ctx: Ctx, fx: Fixtures, folder: Path, delay: float) -> list[Trial]:
    cache = copy_tree(fx.kill_inputs, folder / "cache")
    teacher = cache / "teachers" / "f"
    env = ctx.env({"FAULTS_FORWARD_DELAY": str(fx.forward_delay)})
    res = monitored(ctx, "cache", fx.kill_run_args(cache), any_file(teacher), kill_after=delay, env=env)
    commits = len(list((teacher / "_commits").glob("*.json"))) if (teacher / "_commits").is_dir() else 0
    mid = res.killed and not (teacher / "teacher.json").exists()
    out = ctx.run("cache", fx.kill_run_args(cache))
    trial = _verdict("sigkill run, resume", res, out, lambda: teacher_ok(cache, fx.kill_ref, "f"), mid,
                     f", {commits} chunk(s) committed", delay)
    trial.facts["commits"] = commits
    return [trial]


def _train_trial(ctx: Ctx, fx: Fixtures, folder: Path, delay: float) -> list[Trial]:
    run = folder / "run"
    args = train_args(fx, fx.main, run, steps=48, every=4)
    res = monitored(ctx, "train", args, lambda: (run / "metrics.jsonl").is_file(), kill_after=delay)
    logged = len(step_losses(run))
    mid = res.killed and not (run / "student").exists()
    out = ctx.run("train", [*args, "--resume"])
    complete = (run / "checkpoints").is_dir() and any(p.suffix == ".pt" for p in (run / "checkpoints").iterdir())
    if out.rc != 0 and (not complete or "no checkpoint" in error_line(out).lower()):
        out = ctx.run("train", args)  # killed before the first checkpoint: start again, as the error says
    trial = _verdict("sigkill train, resume", res, out, lambda: train_same(run, fx.ref_long), mid,
                     f", {logged} step(s) logged", delay)
    steps = [r["step"] for r in metrics_records(run) if "loss" in r]
    dup = len(steps) - len(set(steps))
    derived = Trial("metrics.jsonl after a resume", "clean" if not dup and out.rc == 0 else
                    ("silent-wrong" if dup else "wrong-outcome"),
                    f"{dup} duplicate step record(s) in metrics.jsonl" if dup else
                    ("no duplicate step records" if out.rc == 0 else "resume failed"), 0.0,
                    {"derived": True, "mid_work": mid})
    return [trial, derived] if res.killed else [trial]


def kill_trials(ctx: Ctx, fx: Fixtures, n: int, seed: int) -> list[tuple[str, Callable[[], list[Trial]]]]:
    """`n` seeded kill trials of each command, as (name, thunk) pairs for the runner."""
    rng = random.Random(seed)
    kinds = {"prepare": _prepare_trial, "run": _run_trial, "train": _train_trial}
    jobs: list[tuple[str, Callable[[], list[Trial]]]] = []
    for kind, fn in kinds.items():
        for i in range(n):
            delay = rng.uniform(0.0, WINDOW) * fx.work_seconds[kind]
            folder = ctx.work / "kill" / f"{kind}_{i:02d}"

            def job(fn: Callable[..., list[Trial]] = fn, folder: Path = folder, delay: float = delay) -> list[Trial]:
                return fn(ctx, fx, folder, delay)

            jobs.append((f"kill-{kind}-{i}", job))
    return jobs

