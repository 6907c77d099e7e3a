"""Running mtkd's command lines in subprocesses and turning what happened into a verdict.

A trial's verdict is one of `VERDICTS`. The judging rules, in order: a timeout is a `hang`; a
user file that disappeared or changed is `data-loss`; a Python traceback on stderr/stdout is
`traceback`; exit 0 with wrong data (or exit 0 where the command had to refuse) is
`silent-wrong`; a refusal where success was required, a crash without a message, or a feature
that does not exist yet is `wrong-outcome`; everything else is `clean`. A trial whose set-up the
machine cannot provide (e.g. no tmpfs) is `skipped`, with the reason, and is not counted.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["VERDICTS", "Ctx", "Monitored", "Outcome", "Trial", "any_file", "error_line", "has_traceback", "judge",
           "monitored"]

VERDICTS = ("clean", "silent-wrong", "data-loss", "traceback", "hang", "wrong-outcome", "skipped")
TRACEBACK = "Traceback (most recent call last)"
DEFAULT_TIMEOUT = 240.0
PROGRESS = re.compile(r"\d+%\||\[\d+:\d\d[<,]|/s\]$")
"""A tqdm progress-bar line (mtkd shows them on stderr)."""
EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning)\b")


@dataclass
class Outcome:
    """One finished (or killed, or timed-out) subprocess."""

    args: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    def brief(self) -> str:
        """rc and the first error line (or the last stderr line), for the table."""
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s"
        line = error_line(self) or (exception_line(self.stderr) if has_traceback(self) else "")
        line = line or _last_line(self.stderr) or _last_line(self.stdout)
        return f"exit {self.rc}" + (f": {line[:220]}" if line else "")


@dataclass
class Trial:
    """The verdict of one trial and what happened, in one line."""

    case: str
    verdict: str
    what: str
    seconds: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


def lines_of(text: str) -> list[str]:
    """Non-empty lines, with progress-bar redraws (carriage returns) split off and dropped."""
    out = []
    text = re.sub(r"\](?=(Error|PROBLEM): )", "]\n", text)  # a message printed right after a bar
    for line in text.replace("\r", "\n").splitlines():
        line = line.strip()
        if line and not PROGRESS.search(line):
            out.append(line)
    return out


def _last_line(text: str) -> str:
    lines = lines_of(text)
    return lines[-1] if lines else ""


def exception_line(text: str) -> str:
    """The last `SomeError: message` line of a traceback."""
    found = [ln for ln in lines_of(text) if EXCEPTION.match(ln)]
    return found[-1] if found else _last_line(text)


def has_traceback(out: Outcome) -> bool:
    return TRACEBACK in out.stderr or TRACEBACK in out.stdout


def error_line(out: Outcome) -> str:
    """The one-line error message of a refused command ('Error: ...'), or '' if there is none."""
    for line in lines_of(out.stderr):
        if line.startswith(("Error:", "PROBLEM:")):  # click's refusal; `verify`'s report lines
            return line
    return ""


def judge(out: Outcome, *, correct: Callable[[], bool | tuple[bool, str]] | bool, must_fail: bool = False,
          may_fail: bool = True, lost: Sequence[str] = (), note: str = "",
          names: Sequence[str] = ()) -> tuple[str, str]:
    """(verdict, what happened) for one command under the module's rules.

    Args:
        out: the command's outcome.
        correct: whether the data it left is right (called only when the exit code is 0); a
            callable may return (ok, reason) to say what differs.
        must_fail: the input is bad: exit 0 is `silent-wrong` whatever the data.
        may_fail: a one-line refusal is an acceptable outcome (else `wrong-outcome`).
        lost: user files that were deleted or changed (non-empty: `data-loss`).
        note: appended to the description.
        names: a refusal must mention at least one of these (the file, array or teacher at fault).
    """
    what = out.brief() + (f"; {note}" if note else "")
    if out.timed_out:
        return "hang", what
    if lost:
        return "data-loss", f"{what}; lost {len(lost)} user file(s): {', '.join(sorted(lost)[:4])}"
    if has_traceback(out):
        return "traceback", what
    if out.rc == 0:
        if must_fail:
            return "silent-wrong", f"{what}; exit 0 on bad input"
        res = correct() if callable(correct) else correct
        ok, reason = res if isinstance(res, tuple) else (res, "")
        return ("clean", what) if ok else ("silent-wrong", f"{what}; data differs from the reference"
                                           + (f" ({reason})" if reason else ""))
    if not error_line(out):
        return "wrong-outcome", f"{what}; no one-line error message"
    if not may_fail and not must_fail:
        return "wrong-outcome", f"{what}; a valid input was refused"
    if names and not any(n in out.stderr for n in names):
        return "wrong-outcome", f"{what}; the error does not name {names[0]!r}"
    return "clean", what


@dataclass
class Ctx:
    """Where the matrix runs: the repo under test, a work folder, the child environment."""

    repo: Path
    work: Path
    python: str = sys.executable
    extra_paths: list[Path] = field(default_factory=list)
    timeout: float = DEFAULT_TIMEOUT

    def env(self, extra: dict[str, str] | None = None, first_paths: Sequence[Path] = ()) -> dict[str, str]:
        env = dict(os.environ)
        paths = [*first_paths, self.repo, *self.extra_paths]
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", PYTHONHASHSEED="0")
        env.update(extra or {})
        return env

    def command(self, tool: str, args: Sequence[str]) -> list[str]:
        module = {"cache": "mtkd_cache.cli", "train": "mtkd_train.cli"}[tool]
        return [self.python, "-m", module, *[str(a) for a in args]]

    def spawn(self, tool: str, args: Sequence[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(tool, args), env=env or self.env(), cwd=cwd or self.work,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def run(self, tool: str, args: Sequence[str], *, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float | None = None) -> Outcome:
        t0 = time.monotonic()
        proc = self.spawn(tool, args, env=env, cwd=cwd)
        return finish(proc, t0, timeout or self.timeout)


def finish(proc: subprocess.Popen[str], t0: float, timeout: float) -> Outcome:
    """Wait for `proc` (killing its whole session on timeout) and collect its output."""
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc)
        stdout, stderr = proc.communicate()
    args = [str(a) for a in proc.args] if isinstance(proc.args, list) else [str(proc.args)]
    return Outcome(args, proc.returncode, stdout, stderr, time.monotonic() - t0, timed_out)


def kill_group(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    """Signal the process group `proc` leads (it was started in its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def help_has(ctx: Ctx, tool: str, words: Sequence[str]) -> bool:
    """Whether `<tool> [subcommand] --help` succeeds and mentions `words[-1]`."""
    out = ctx.run(tool, [*words[:-1], "--help"], timeout=120)
    return out.rc == 0 and words[-1] in out.stdout


@dataclass
class Monitored:
    out: Outcome
    work_start: float | None
    """Seconds from spawn to the first sign of work (None: never seen)."""
    work_seconds: float | None
    """Seconds from the first sign of work to exit (None when killed)."""
    killed: bool


def monitored(ctx: Ctx, tool: str, args: list[str], started: Callable[[], bool], *,
              kill_after: float | None = None, env: dict[str, str] | None = None) -> Monitored:
    """Run a command, note when `started()` first holds, and SIGKILL it `kill_after` s later."""
    t0 = time.monotonic()
    proc = ctx.spawn(tool, args, env=env)
    seen: float | None = None
    killed = False
    while proc.poll() is None and time.monotonic() - t0 < ctx.timeout:
        now = time.monotonic()
        if seen is None and started():
            seen = now
        if seen is not None and kill_after is not None and now - seen >= kill_after:
            kill_group(proc, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    out = finish(proc, t0, ctx.timeout)
    end = time.monotonic()
    if seen is None and started():
        seen = end
    work = None if killed or seen is None else end - seen
    return Monitored(out, None if seen is None else seen - t0, work, killed and out.rc == -signal.SIGKILL)


def any_file(root: Path) -> Callable[[], bool]:
    """A `started` test: some file exists under `root`."""
    return lambda: root.is_dir() and any(p.is_file() for p in root.rglob("*"))
