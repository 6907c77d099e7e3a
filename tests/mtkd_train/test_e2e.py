"""End to end on CPU: cached teachers -> `mtkd-train` -> interrupted -> resumed -> same losses.

Two runs are interrupted in real subprocesses (slowed down by `_train_target.py` so a signal lands
after the step-10 checkpoint and long before step 30): one is SIGKILLed, one gets SIGTERM the way
torchrun sends it (to the whole process group, DataLoader workers included, with SIGKILL once its
30 s grace period is over). Each is resumed with `--resume`, and its per-step losses must equal, bit for bit, those of a run that was
never interrupted. The teachers' model folders were deleted after caching (see conftest), so every
run here also shows that training and evaluation never load a teacher.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import mtkd_cache.precompute.run
from mtkd_train.checkpoint import latest_checkpoint
from mtkd_train.cli import main
from tests.mtkd_train._train_target import LMCache, read_metrics, step_losses

REPO = Path(__file__).resolve().parents[2]
STEPS = 30
GRACE = 30.0  # torchrun's default --shutdown-timeout (TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
DELAY = 0.4  # seconds per training batch in the interrupted runs: 12 s from start to end


def _args(lm: LMCache, out: Path) -> list[str]:
    return [
        str(lm.cache),
        "--teachers", "a,b",
        "--student", str(lm.student),
        "--out", str(out),
        "--aggregate", "entropy",
        "--loss", "forward_kl",
        "--alpha", "0.7",
        "--temperature", "2",
        "--batch-size", "4",
        "--max-steps", str(STEPS),
        "--checkpoint-every", "10",
        "--lr", "3e-3",
        "--warmup-steps", "5",
        "--shuffle-chunks", "2",
    ]  # fmt: skip


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _start_slowed(args: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.mtkd_train._train_target", str(DELAY), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as under torchrun
    )


def _signal_after_first_checkpoint(
    procs: dict[int, tuple[subprocess.Popen[bytes], Path]], timeout: float = 180.0
) -> None:
    """Send each process its signal once its step-10 checkpoint exists."""
    waiting = dict(procs)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for sig, (proc, out) in list(waiting.items()):
            if (out / "checkpoints" / "step_00000010.pt").exists():
                assert proc.poll() is None, "the run finished before it could be interrupted"
                os.killpg(proc.pid, sig)  # torchrun signals the group: the DataLoader workers too
                del waiting[sig]
            elif proc.poll() is not None:
                pytest.fail(f"run exited early ({proc.returncode}): {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        time.sleep(0.02)
    if waiting:
        for proc, _ in waiting.values():
            proc.kill()
        pytest.fail("no step-10 checkpoint within the timeout")


@pytest.fixture(scope="module")
def runs(lm_cache: LMCache, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """An uninterrupted run, and two slowed subprocess runs stopped by SIGKILL and SIGTERM."""
    root = tmp_path_factory.mktemp("e2e")
    outs = {"full": root / "full", "kill": root / "kill", "term": root / "term"}
    kill = _start_slowed(_args(lm_cache, outs["kill"]))
    term = _start_slowed(_args(lm_cache, outs["term"]))
    try:
        _invoke(_args(lm_cache, outs["full"]))  # while the others start up
        _signal_after_first_checkpoint(
            {signal.SIGKILL: (kill, outs["kill"]), signal.SIGTERM: (term, outs["term"])}
        )
        kill.wait(timeout=60)
        try:
            term.wait(timeout=GRACE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {GRACE:.0f} s after SIGTERM: torchrun would SIGKILL it before it saved")
        yield {"outs": outs, "kill": kill, "term": term}
    finally:
        for proc in (kill, term):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_uninterrupted_run_trains_and_saves(runs: dict, lm_cache: LMCache) -> None:
    full = runs["outs"]["full"]
    losses = step_losses(full)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(v == v and v < 1e3 for v in losses.values())  # finite
    first, last = sum(list(losses.values())[:5]), sum(list(losses.values())[-5:])
    assert last < first, losses
    assert [p.name for p in sorted((full / "checkpoints").iterdir())] == [
        "step_00000010.pt",
        "step_00000020.pt",
        "step_00000030.pt",
    ]
    assert (full / "student" / "config.json").is_file()
    assert json.loads((full / "config.json").read_text())["teachers"] == ["a", "b"]
    assert not any(p.exists() for p in lm_cache.deleted_teachers)


def test_sigkill_then_resume_gives_the_same_losses(runs: dict, lm_cache: LMCache) -> None:
    out = runs["outs"]["kill"]
    assert runs["kill"].returncode == -signal.SIGKILL
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None
    resumed_from = int(ckpt.stem.split("_")[1])
    assert 10 <= resumed_from < STEPS
    logged_before = [r["step"] for r in read_metrics(out)]
    assert resumed_from <= len(logged_before) < STEPS

    _invoke([*_args(lm_cache, out), "--resume"])

    # restarted at the checkpoint, not at 0; the steps logged after it were cut, so none is logged twice
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    assert step_losses(out) == step_losses(runs["outs"]["full"])


def test_sigterm_checkpoints_the_current_step_exits_0_and_resumes(
    runs: dict, lm_cache: LMCache
) -> None:
    out, proc = runs["outs"]["term"], runs["term"]
    assert proc.returncode == 0, proc.stderr.read().decode()
    stopped_at = max(step_losses(out))
    assert 10 <= stopped_at < STEPS
    assert f"stopped by SIGTERM after step {stopped_at}" in proc.stdout.read().decode()
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step_{stopped_at:08d}.pt"
    assert not (out / "student").exists()  # nothing slow (student, evaluation) after the checkpoint

    _invoke([*_args(lm_cache, out), "--resume"])

    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # nothing re-run
    assert step_losses(out) == step_losses(runs["outs"]["full"])


def test_resume_without_a_checkpoint_and_restart_over_one_are_refused(
    runs: dict, lm_cache: LMCache, tmp_path: Path
) -> None:
    fresh = CliRunner().invoke(main, [*_args(lm_cache, tmp_path / "new"), "--resume"])
    assert fresh.exit_code == 1 and "no checkpoint" in fresh.output
    again = CliRunner().invoke(main, _args(lm_cache, runs["outs"]["full"]))
    assert again.exit_code == 1 and "--resume" in again.output


def test_training_and_evaluation_never_load_a_teacher(
    lm_cache: LMCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not any(p.exists() for p in lm_cache.deleted_teachers)

    def no_teacher(*args: object, **kwargs: object) -> None:
        raise AssertionError("a teacher was loaded")

    monkeypatch.setattr(mtkd_cache.precompute.run, "load_teacher", no_teacher)
    out = tmp_path / "run"
    args = [*_args(lm_cache, out), "--max-steps", "3", "--eval-cache", str(lm_cache.cache)]
    _invoke(args)
    res = json.loads((out / "eval.json").read_text())
    assert set(res["teachers"]) == {"a", "b"}
    for scores in (res["student"], *res["teachers"].values()):
        assert 0 <= scores["accuracy"] <= 1 and 0 <= scores["ece"] <= 1
        assert 1 < scores["perplexity"] < 1e4
