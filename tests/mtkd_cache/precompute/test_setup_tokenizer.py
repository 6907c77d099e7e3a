"""A teacher run reads its tokenizer files once: `load_teacher` keeps the tokenizer it sized the vocabulary with."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mtkd_cache import RunConfig, run_teacher
from mtkd_cache.format.fingerprint import tokenizer_fingerprint
from mtkd_cache.precompute import prepare as prepare_mod
from mtkd_cache.precompute.models import load_teacher


def test_the_run_reuses_the_tokenizer_load_teacher_read(
    copy_cache: Callable[..., Path], inputs_template: Path, lm_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    teacher = load_teacher(str(lm_dir), device=torch.device("cpu"), dtype=torch.float32)
    assert teacher.tokenizer is not None and len(teacher.tokenizer) == teacher.vocab_size
    loads: list[str] = []
    real = prepare_mod.load_tokenizer

    def counting(path: str, trust_remote_code: bool = False) -> object:
        loads.append(str(path))
        return real(path, trust_remote_code)

    monkeypatch.setattr(prepare_mod, "load_tokenizer", counting)
    cache = copy_cache(inputs_template)
    run_teacher(cache, RunConfig(teacher="t", model=str(lm_dir), top_k=4), progress=False)
    assert loads == []  # the fingerprint check and the grid choice used the loaded one
    assert tokenizer_fingerprint(teacher.tokenizer) == tokenizer_fingerprint(real(lm_dir))


def test_a_teacher_of_another_tokenizer_is_still_refused_where_it_cannot_run(
    copy_cache: Callable[..., Path], inputs_template: Path, tmp_path: Path,
) -> None:
    from mtkd_cache.errors import CacheMismatchError
    from tests.helpers.tiny_models import save_tiny_causal_lm

    other = save_tiny_causal_lm(tmp_path / "other", vocab_size=48, tokenizer_size=40, seed=3)  # another vocabulary
    cache = copy_cache(inputs_template)
    with pytest.raises(CacheMismatchError, match="fingerprint|tokeniz"):
        run_teacher(cache, RunConfig(teacher="o", model=str(other), top_k=4), own_tokenization=False, progress=False)
