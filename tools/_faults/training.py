"""Training faults: code-bearing student folders, checkpoints whose teachers changed, --max-steps
changed on resume, and an eval cache prepared with another tokenizer.

Interrupted runs are made with a SIGKILL right after a given number of logged steps, so the last
checkpoint is known: steps are logged before the checkpoint of the same step is written.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

from tools._faults.fixtures import Fixtures, train_args
from tools._faults.ondisk import copy_tree, metrics_records, step_losses
from tools._faults.proc import Ctx, Outcome, Trial, help_has, judge, monitored

__all__ = ["interrupted_train", "training_trials"]

Job = tuple[str, Callable[[], list[Trial]]]
EVERY = 4


def interrupted_train(ctx: Ctx, fx: Fixtures, cache: Path, run: Path, after_steps: int) -> tuple[int, Outcome]:
    """Start the 48-step run and SIGKILL it once `after_steps` steps are logged.

    Returns:
        (the step of the last checkpoint on disk, the killed run's outcome).
    """
    args = train_args(fx, cache, run, steps=48, every=EVERY)
    res = monitored(ctx, "train", args, lambda: len(step_losses(run)) >= after_steps, kill_after=0.0)
    steps = [int(m) for p in (run / "checkpoints").glob("*") for m in re.findall(r"\d+", p.name)[:1]]
    return (max(steps) if steps else 0), res.out


def _evil_student(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    """A student folder with factory.json naming os:system: the marker must not appear; one-line error."""
    student = Path(shutil.copytree(fx.student, folder / "student"))
    marker = folder / "MARKER"
    (student / "factory.json").write_text(json.dumps({"spec": "os:system", "kwargs": {"command": f"touch {marker}"}}))
    args = train_args(fx, fx.main, folder / "run", steps=2)
    args[args.index("--student") + 1] = str(student)
    out = ctx.run("train", args)
    verdict, what = judge(out, correct=False, must_fail=True)
    if marker.exists():
        verdict, what = "silent-wrong", f"{what}; os.system ran: marker file created"
    else:
        what += "; marker not created"
    flag = "trust flag in --help" if help_has(ctx, "train", ["trust"]) else "no trust flag in --help yet"
    return [Trial("code-bearing student folder (factory.json -> os:system)", verdict, f"{what}; {flag}", out.seconds)]


def _pinning(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    """Resume after a teacher was re-run with --overwrite (other model, other k) must be refused."""
    cache = copy_tree(fx.main, folder / "cache")
    run = folder / "run"
    ckpt, _ = interrupted_train(ctx, fx, cache, run, 10)
    rerun = ctx.run("cache", ["run", str(cache), "--teacher", "a", "--model", str(fx.teacher_b), "--top-k", "4",
                              "--features", "-1", "--device", "cpu", "--overwrite"])
    if rerun.rc != 0 or ckpt == 0:
        return [Trial("resume after the teacher changed (checkpoint pinning)", "skipped",
                      f"set-up failed: checkpoint {ckpt}, overwrite {rerun.brief()}")]
    out = ctx.run("train", [*train_args(fx, cache, run, steps=48, every=EVERY), "--resume"])
    verdict, what = judge(out, correct=False, must_fail=True, names=["'a'", "teacher"])
    return [Trial("resume after the teacher changed (checkpoint pinning)", verdict,
                  f"checkpoint at step {ckpt}, teacher a re-run with another model and k=4; resume {what}",
                  out.seconds)]


def _max_steps(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    """--max-steps changed on resume: refuse in one line, or continue the schedule that was running."""
    run = folder / "run"
    ckpt, _ = interrupted_train(ctx, fx, fx.main, run, 14)
    if ckpt < 8:
        return [Trial("resume with another --max-steps", "skipped", f"set-up: last checkpoint at step {ckpt}")]
    args = train_args(fx, fx.main, run, steps=96, every=EVERY)
    out = ctx.run("train", [*args, "--resume"])
    ref = {int(r["step"]): r["lr"] for r in metrics_records(fx.ref_long) if "lr" in r}
    got: dict[int, float] = {}
    for r in metrics_records(run):
        if "lr" in r:
            got[int(r["step"])] = r["lr"]  # the resumed run's records come last
    steps = [s for s in range(ckpt + 1, ckpt + 4) if s in ref]
    jumps = [(s, ref[s], got.get(s)) for s in steps if got.get(s) is None or abs(got[s] - ref[s]) > 1e-9 * ref[s]]
    note = "lr continues the running schedule" if not jumps else \
        "lr jumps: " + ", ".join(f"step {s}: {want:.3g} -> {have if have is None else f'{have:.3g}'}"
                                 for s, want, have in jumps[:2])
    verdict, what = judge(out, correct=not jumps)
    return [Trial("resume with another --max-steps", verdict, f"checkpoint at step {ckpt}, 48 -> 96; {what}; {note}",
                  out.seconds)]


def _eval_tokenizer(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    """--eval-cache with another tokenizer must be refused before step 0."""
    other = folder / "eval_cache"
    prep = ctx.run("cache", ["prepare", str(other), "--data", str(fx.corpus), "--tokenizer", str(fx.other_tokenizer),
                             "--max-length", "16", "--chunk-samples", "8"])
    if prep.rc != 0:
        return [Trial("--eval-cache with another tokenizer", "skipped", f"set-up: prepare {prep.brief()}")]
    run = folder / "run"
    out = ctx.run("train", [*train_args(fx, fx.main, run, steps=6), "--eval-cache", str(other)])
    trained = len(step_losses(run)) + len(list((run / "checkpoints").glob("*"))) if run.exists() else 0
    verdict, what = judge(out, correct=False, must_fail=True, names=["tokenizer"])
    if verdict == "clean" and trained:
        verdict, what = "wrong-outcome", f"{what}; refused only after {len(step_losses(run))} training step(s)"
    return [Trial("--eval-cache with another tokenizer", verdict, what, out.seconds)]


def training_trials(ctx: Ctx, fx: Fixtures) -> list[Job]:
    root = ctx.work / "training"
    return [(key, partial(fn, ctx, fx, root / key)) for key, fn in (
        ("evil-student", _evil_student), ("checkpoint-pinning", _pinning), ("max-steps-resume", _max_steps),
        ("eval-tokenizer", _eval_tokenizer))]
