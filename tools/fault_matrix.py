"""The fault matrix of issue 7: every way a cache or a training run can be damaged, tried for real.

    python -m tools.fault_matrix [--quick] [--out DIR] [--cases REGEX] [--jobs N] [--title T]

It builds tiny real fixtures (tiny Llama teachers saved with save_pretrained, a word tokenizer, a
jsonl corpus), then runs each trial through mtkd's command lines in subprocesses (PYTHONPATH = the
checkout holding this file) and judges it from exit codes, stderr and the data left on disk (see
`tools/_faults/proc.py` for the verdicts). It writes `RELIABILITY.md` and `reliability.json` to
`--out` (default `docs/`), replacing only the section titled `--title`. Exit status: 0 when every
counted trial is clean, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools._faults.bad_teachers import bad_teacher_trials
from tools._faults.corrupt import corruption_trials
from tools._faults.diskfull import disk_full_trials
from tools._faults.fixtures import FACTORY_DIR, build_fixtures
from tools._faults.kill import kill_trials
from tools._faults.proc import Ctx, Trial
from tools._faults.report import summarize, write_json, write_markdown
from tools._faults.training import training_trials
from tools._faults.writers import writer_trials

REPO = Path(__file__).resolve().parents[1]
Job = tuple[str, Callable[[], list[Trial]]]

INTRO = """# Reliability: the fault matrix

`python -m tools.fault_matrix --title "After fixes"` (26.6 min measured with `--jobs 3` on 2 cores
shared with five other jobs, load average 10–14; `--quick`, 77 trials, took 10.8 min at load ~5;
`--cases REGEX` to pick trials by name, `--jobs N` trials at a time; a new `--title` adds a
section and keeps the others) builds tiny real fixtures and damages them in
every way issue 7 lists: SIGKILLs at random moments of `prepare`, `run` and `train` followed by the
resume a user would run; flipped bytes in every array kind and every Parquet/JSON file; deleted and
truncated shards; edited metadata; concurrent writers (with a delay injected around `manifest.json`
reads and renames, and without); a full disk on a 2 MiB tmpfs; non-finite and mis-sized teachers;
path-like teacher names; folders that carry code; `prepare` into folders that are not caches;
checkpoints whose teachers changed; `--max-steps` changed on resume; an eval cache with another
tokenizer. mtkd is driven only through `python -m mtkd_cache.cli` / `python -m mtkd_train.cli`;
outcomes are judged from exit codes, stderr and the bytes left on disk.

**Verdicts.** `clean`: the right outcome — correct data, or a one-line `Error:` naming the problem
with exit != 0 and nothing lost. `silent-wrong`: exit 0 with wrong data or results (or exit 0 on
input that had to be refused, or code from a data folder ran). `data-loss`: a user file was
deleted or changed. `traceback`: a Python traceback was printed. `hang`: the command timed out.
`wrong-outcome`: a valid input was refused, a crash without a message, an error that does not
name the file at fault, or a required feature that does not exist yet. `skipped`: the machine
cannot provide the set-up (reason given); not counted.

**How cases are judged.** Kills: the resumed command must exit 0 with arrays / Parquet tables /
metadata equal to an uninterrupted run's (bit for bit), or for training identical per-step losses
and final weights; each kill records whether it landed mid-work. Damage: the reference training
run (every chunk of every array read twice) must either fail with a one-line error naming the
damaged array or file, or produce losses and weights equal to the undamaged run; each trial proves
the bytes changed and records whether the array still decodes. Concurrency: every teacher whose
process exited 0 must be seen by a reader. Disk full: a one-line error about space, then after
freeing space the next command gives reference data. Each trial family's module docstring in
`tools/_faults/` states its criteria in full.
"""


def _all_jobs(ctx: Ctx, fx: object, quick: bool, seed: int) -> list[Job]:
    kills = 3 if quick else 10
    return [*kill_trials(ctx, fx, kills, seed),  # type: ignore[arg-type]
            *corruption_trials(ctx, fx, 1 if quick else 2, seed),  # type: ignore[arg-type]
            *writer_trials(ctx, fx, 2 if quick else 6),  # type: ignore[arg-type]
            *bad_teacher_trials(ctx, fx),  # type: ignore[arg-type]
            *training_trials(ctx, fx),  # type: ignore[arg-type]
            *disk_full_trials(ctx, fx)]  # type: ignore[arg-type]


def _safe(name: str, job: Callable[[], list[Trial]]) -> list[Trial]:
    t0 = time.monotonic()
    try:
        trials = job()
    except Exception as e:  # a harness bug must show up in the report, not end the matrix
        trials = [Trial(f"harness error in {name}", "skipped", f"{type(e).__name__}: {e}")]
    status = ", ".join(f"{t.verdict}" for t in trials)
    print(f"[{time.monotonic() - t0:6.1f}s] {name}: {status}", flush=True)
    return trials


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.fault_matrix", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 kills per command, 1 flip per array kind, 2 races")
    p.add_argument("--out", type=Path, default=REPO / "docs", help="folder for RELIABILITY.md and reliability.json")
    p.add_argument("--cases", default=None, help="regex on trial names (kill-run-3, flip-2-0, race-1, ...)")
    p.add_argument("--jobs", type=int, default=2, help="trials run at a time")
    p.add_argument("--seed", type=int, default=0, help="seed of kill moments and flipped bytes")
    p.add_argument("--title", default="Results", help="section of RELIABILITY.md this run writes")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="mtkd-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    for old in work.iterdir():  # a reused --work keeps its finished fixtures, never old trial folders
        if old.name != "fixtures":
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    ctx = Ctx(repo=REPO, work=work, extra_paths=[FACTORY_DIR])
    t0 = time.monotonic()
    try:
        print(f"building fixtures in {work} ...", flush=True)
        fx = build_fixtures(ctx, work / "fixtures")
        print(f"fixtures ready in {time.monotonic() - t0:.0f} s; work seconds {fx.work_seconds}", flush=True)
        jobs = [j for j in _all_jobs(ctx, fx, a.quick, a.seed) if not a.cases or re.search(a.cases, j[0])]
        with ThreadPoolExecutor(max(1, a.jobs)) as pool:
            trials = [t for ts in pool.map(lambda j: _safe(*j), jobs) for t in ts]
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta = {"command": shlex.join(["python", "-m", "tools.fault_matrix", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": _commit(),
            "seconds": time.monotonic() - t0, "jobs": a.jobs, "seed": a.seed, "quick": a.quick}
    a.out.mkdir(parents=True, exist_ok=True)
    write_markdown(a.out / "RELIABILITY.md", INTRO, a.title, trials, meta)
    write_json(a.out / "reliability.json", a.title, trials, meta)
    s = summarize(trials)
    print(f"{s['trials']} trials: {s['verdicts']}; report in {a.out / 'RELIABILITY.md'}")
    return 0 if s["trials"] and s["verdicts"]["clean"] == s["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
