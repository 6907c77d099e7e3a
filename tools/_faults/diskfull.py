"""Disk full: `prepare`, `run` and a training checkpoint writing onto a tiny tmpfs that is almost full.

Each trial mounts a 2 MiB tmpfs (we are root; skipped with the reason when mount fails), fills it
with a filler file so that about half of what the command needs is free, runs the command, then
deletes the filler and runs the command a user would run next. Success: the first command fails
with a one-line error about space (no traceback), and the second gives data equal to the
reference: the fault lost nothing and left nothing stuck.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from tools._faults.fixtures import Fixtures, train_args
from tools._faults.kill import teacher_ok, train_same
from tools._faults.ondisk import copy_tree, inputs_equal
from tools._faults.proc import Ctx, Outcome, Trial, judge

__all__ = ["disk_full_trials"]

Job = tuple[str, Callable[[], list[Trial]]]
SIZE = 2 * 1024 * 1024
SPACE_WORDS = ["space", "ENOSPC", "full", "Errno 28"]


@contextlib.contextmanager
def tmpfs(mount: Path) -> Iterator[str]:
    """Mount a 2 MiB tmpfs at `mount`; yields '' on success, else the reason it could not."""
    mount.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        yield f"mount -t tmpfs failed: {res.stderr.strip() or res.returncode}"
        return
    try:
        yield ""
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(mount: Path, leave: int) -> Path:
    """Write a filler file so that about `leave` bytes stay free."""
    st = os.statvfs(mount)
    free = st.f_bavail * st.f_frsize
    filler = mount / "filler.bin"
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _judge_pair(case: str, first: Outcome, second: Outcome, check: Callable[[], tuple[bool, str]]) -> Trial:
    verdict, what = judge(first, correct=False, must_fail=True, names=SPACE_WORDS)
    v2, what2 = judge(second, correct=check, may_fail=False)
    if verdict == "clean" and v2 != "clean":
        verdict = v2
    text = f"disk full: {what}; after freeing space: {what2}"
    return Trial(case, verdict, text, first.seconds + second.seconds)


def _prepare_full(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    case = "disk full during prepare"
    with tmpfs(folder / "mnt") as why:
        if why:
            return [Trial(case, "skipped", why)]
        filler = _fill(folder / "mnt", _size(fx.big_ref) // 2)
        cache = folder / "mnt" / "cache"
        args = fx.prepare_args(cache, fx.big_corpus, 64)
        first = ctx.run("cache", args)
        filler.unlink()
        second = ctx.run("cache", args)
        return [_judge_pair(case, first, second, lambda: inputs_equal(cache, fx.big_ref))]


def _run_full(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    case = "disk full during run"
    with tmpfs(folder / "mnt") as why:
        if why:
            return [Trial(case, "skipped", why)]
        cache = copy_tree(fx.kill_inputs, folder / "mnt" / "cache")
        filler = _fill(folder / "mnt", _size(fx.kill_ref / "teachers" / "f") // 2)
        first = ctx.run("cache", fx.kill_run_args(cache))
        filler.unlink()
        second = ctx.run("cache", fx.kill_run_args(cache))
        return [_judge_pair(case, first, second, lambda: teacher_ok(cache, fx.kill_ref, "f"))]


def _checkpoint_full(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    case = "disk full while writing a checkpoint"
    with tmpfs(folder / "mnt") as why:
        if why:
            return [Trial(case, "skipped", why)]
        run = folder / "mnt" / "run"
        checkpoint = min((fx.ref_long / "checkpoints").iterdir()).stat().st_size
        filler = _fill(folder / "mnt", checkpoint // 2)
        args = train_args(fx, fx.main, run, steps=48, every=4)
        first = ctx.run("train", args)
        filler.unlink()
        has_ckpt = (run / "checkpoints").is_dir() and any(p.suffix == ".pt" for p in (run / "checkpoints").iterdir())
        second = ctx.run("train", [*args, "--resume"] if has_ckpt else args)
        trial = _judge_pair(case, first, second, lambda: train_same(run, fx.ref_long))
        shutil.rmtree(run, ignore_errors=True)
        return [trial]


def disk_full_trials(ctx: Ctx, fx: Fixtures) -> list[Job]:
    root = ctx.work / "diskfull"
    return [(key, partial(fn, ctx, fx, root / key)) for key, fn in (
        ("disk-full-prepare", _prepare_full), ("disk-full-run", _run_full), ("disk-full-checkpoint", _checkpoint_full))]
