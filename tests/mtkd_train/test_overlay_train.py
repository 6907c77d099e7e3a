"""mtkd-train reads teachers from several roots: the shared cache and an overlay over it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtkd_cache import RunConfig, run_teacher
from mtkd_cache.errors import CacheMismatchError
from mtkd_train.cli import main
from tests.helpers.tiny_models import save_tiny_causal_lm
from tests.mtkd_train._train_target import VOCAB, LMCache, read_metrics


def _train(cache: Path, lm: LMCache, out: Path, teachers: str) -> object:
    return CliRunner().invoke(main, [str(cache), "--teachers", teachers, "--student", str(lm.student), "--out",
                                     str(out), "--batch-size", "4", "--max-steps", "2", "--warmup-steps", "0",
                                     "--no-progress", "--num-workers", "0"])


def test_train_from_a_shared_cache_and_an_overlay(lm_cache: LMCache, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shutil.copytree(lm_cache.cache, shared)
    shared.chmod(0o555)  # the shared cache is read-only to us
    overlay = tmp_path / "overlay"
    model = save_tiny_causal_lm(tmp_path / "mine_model", vocab_size=VOCAB, tokenizer_size=VOCAB, seed=9)
    try:
        run_teacher(overlay, RunConfig(teacher="mine", model=str(model), top_k=8, device="cpu"), progress=False,
                    inputs=str(shared))
        res = _train(overlay, lm_cache, tmp_path / "run", "a,mine")
        assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
        assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
        rec = json.loads((overlay / "overlay.json").read_text())
        (overlay / "overlay.json").write_text(json.dumps({**rec, "dataset_fingerprint": "0" * 32}))
        res = _train(overlay, lm_cache, tmp_path / "run2", "a,mine")
        assert res.exit_code != 0 and "fingerprint" in res.output  # type: ignore[attr-defined]
        assert not (tmp_path / "run2" / "metrics.jsonl").exists()  # refused before step 0
    finally:
        shared.chmod(0o755)
    with pytest.raises(CacheMismatchError):
        from mtkd_cache import open_cache

        open_cache(overlay)
