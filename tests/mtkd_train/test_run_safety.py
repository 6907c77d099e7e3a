"""What a run must refuse or survive (issue 7, trainer side), through the real CLI.

* a resume after a teacher was re-cached with other settings is refused, naming the teacher;
* a resume with another --max-steps continues the schedule that was running (no LR jump);
* metrics.jsonl holds each step once after a resume;
* an --eval-cache with another tokenizer / input kind is refused before step 0;
* a --student folder with a factory.json never runs code without --trust-factory;
* a full disk during a checkpoint write is one line naming the file, and leaves the last complete
  checkpoint as the latest (no temporary file left);
* the CLI turns only mtkd's own errors into one line: a bug keeps its traceback;
* a fresh run into a folder that holds checkpoints, and a --resume with none, are refused before anything is
  written there (not even `--aggregate auto`'s choice).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mtkd_cache.errors
import mtkd_train.checkpoint
import mtkd_train.errors
from mtkd_cache import RunConfig, prepare, run_teacher
from mtkd_train.checkpoint import latest_checkpoint
from mtkd_train.cli import main
from mtkd_train.metrics import truncate_metrics
from tests.helpers.tiny_models import save_tiny_causal_lm
from tests.mtkd_train._train_target import VOCAB, ImageCache, LMCache, read_metrics


def _args(cache: Path, lm: LMCache, out: Path, *extra: str) -> list[str]:
    return [
        str(cache), "--teachers", "a,b", "--student", str(lm.student), "--out", str(out),
        "--batch-size", "4", "--max-steps", "2", "--checkpoint-every", "1", "--lr", "1e-2",
        "--warmup-steps", "0", "--no-progress", *extra,
    ]  # fmt: skip


def _ok(args: list[str]) -> None:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _one_error_line(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_resume_after_a_teacher_was_recached_is_refused(lm_cache: LMCache, tmp_path: Path) -> None:
    cache = Path(shutil.copytree(lm_cache.cache, tmp_path / "cache"))
    out = tmp_path / "run"
    _ok(_args(cache, lm_cache, out))
    checkpoints = sorted((out / "checkpoints").iterdir())
    model = save_tiny_causal_lm(tmp_path / "other", vocab_size=VOCAB, tokenizer_size=VOCAB, seed=9)
    cfg = RunConfig(teacher="b", model=str(model), top_k=4, overwrite=True)
    run_teacher(cache, cfg, progress=False)  # another model, another k

    line = _one_error_line([*_args(cache, lm_cache, out, "--max-steps", "3"), "--resume"])
    assert "teacher 'b'" in line and "re-cached" in line and "k" in line, line
    assert sorted((out / "checkpoints").iterdir()) == checkpoints


def test_a_run_folder_is_checked_for_checkpoints_before_anything_is_written(lm_cache: LMCache, tmp_path: Path) -> None:
    out = tmp_path / "run"
    line = _one_error_line([*_args(lm_cache.cache, lm_cache, out), "--resume"])
    assert "--resume: no checkpoint under" in line and "drop --resume" in line, line
    assert not out.exists() or list(out.iterdir()) == []
    _ok(_args(lm_cache.cache, lm_cache, out))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    line = _one_error_line([*_args(lm_cache.cache, lm_cache, out), "--aggregate", "auto"])
    assert "already holds checkpoints" in line and "--resume" in line, line
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert not (out / "auto_aggregate.json").exists()


def test_resume_with_more_steps_continues_the_running_schedule(lm_cache: LMCache, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _ok(_args(lm_cache.cache, lm_cache, out, "--max-steps", "4", "--min-lr-ratio", "0.1"))
    before = [r["lr"] for r in read_metrics(out)]
    _ok([*_args(lm_cache.cache, lm_cache, out, "--max-steps", "6", "--min-lr-ratio", "0.1"), "--resume"])
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    lrs = [r["lr"] for r in records]
    assert lrs[:4] == before
    # the 4-step cosine ended at 0.1 * lr; it stays there (a new 6-step curve would jump back up)
    assert lrs[4:] == pytest.approx([1e-3, 1e-3])


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "eval": {}}, {"step": 3, "loss": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')  # torn last line
    assert truncate_metrics(path, 2) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert truncate_metrics(path, 2) == 0


def test_eval_cache_with_another_tokenizer_is_refused_before_step_0(
    lm_cache: LMCache, image_cache: ImageCache, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"w{i} w{i + 1}"}) + "\n" for i in range(6)))
    tok = save_tiny_causal_lm(tmp_path / "tok", vocab_size=64, tokenizer_size=48)
    other = tmp_path / "other_cache"
    prepare(other, corpus, tokenizer=tok, max_length=8, chunk_samples=4, progress=False)
    for eval_cache in (other, image_cache.cache):
        out = tmp_path / f"run_{eval_cache.name}"
        line = _one_error_line(_args(lm_cache.cache, lm_cache, out, "--eval-cache", str(eval_cache)))
        assert "eval_cache" in line and "tokenizer" in line, line
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_student_folder_never_runs_its_factory_without_the_flag(lm_cache: LMCache, tmp_path: Path) -> None:
    folder = tmp_path / "downloaded"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "factory.json").write_text(json.dumps({"spec": "os:system", "kwargs": {"command": f"touch {marker}"}}))
    out = tmp_path / "run"
    line = _one_error_line(_args(lm_cache.cache, lm_cache, out, "--student", str(folder)))
    assert "--trust-factory" in line and "'os:system'" in line, line
    assert not marker.exists()


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_checkpoint(
    lm_cache: LMCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    _ok(_args(lm_cache.cache, lm_cache, out))
    monkeypatch.setattr(mtkd_train.checkpoint, "_open_for_write", lambda path: open("/dev/full", "wb"))  # noqa: SIM115
    line = _one_error_line([*_args(lm_cache.cache, lm_cache, out, "--max-steps", "3"), "--resume"])
    assert "step_00000003.pt" in line and "free space" in line and "step_00000002.pt" in line, line
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step_00000002.pt"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001.pt", "step_00000002.pt"]
    torch.load(out / "checkpoints" / "step_00000002.pt", weights_only=True)  # still complete


def test_cli_keeps_the_traceback_of_a_bug(lm_cache: LMCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(self: object, resume: bool = False) -> None:
        raise ValueError("an internal bug")

    monkeypatch.setattr("mtkd_train.recipe.DistillRecipe.setup", bug)
    result = CliRunner().invoke(main, _args(lm_cache.cache, lm_cache, tmp_path / "run"))
    assert isinstance(result.exception, ValueError) and str(result.exception) == "an internal bug"


def test_user_errors_hold_every_public_error() -> None:
    for module in (mtkd_train.errors, mtkd_cache.errors):
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type) and issubclass(value, Exception):
                assert value in mtkd_train.errors.USER_ERRORS, name
    assert ValueError not in mtkd_train.errors.USER_ERRORS


def test_every_error_class_of_mtkd_train_is_in_errors_py() -> None:
    import importlib
    import inspect
    import pkgutil

    import mtkd_train

    defined = set()
    for info in pkgutil.walk_packages(mtkd_train.__path__, "mtkd_train."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == info.name:
                defined.add(name)
    assert defined and defined <= set(mtkd_train.errors.__all__), defined - set(mtkd_train.errors.__all__)


def test_full_disk_while_logging_or_saving_the_student_is_one_line(
    lm_cache: LMCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mtkd_train.metrics import MetricLogger, RunWriteError

    logger = MetricLogger(tmp_path / "log")
    logger._file = open("/dev/full", "w")  # noqa: SIM115 - a real ENOSPC on flush
    with pytest.raises(RunWriteError, match=r"metrics.jsonl could not be written .*No space left"):
        logger.log(1, {"loss": 1.0})

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("mtkd_train.recipe.save_student", full)
    line = _one_error_line(_args(lm_cache.cache, lm_cache, tmp_path / "run"))
    assert "student could not be written" in line and "free space" in line, line
