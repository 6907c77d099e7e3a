"""Cross-tokenizer distillation from one cache: prepare -> run (own tokenization) -> mtkd-train.

Two BPE tokenizers of different vocabularies trained in the test (byte-level for the student,
SentencePiece-style with byte fallback for one teacher). The identical-tokenizer case is forced
through the whole cross-tokenizer path and must give exactly the same batches and losses.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mtkd_cache import RunConfig, inspect_cache, open_cache, prepare, run_teacher, verify_cache
from mtkd_cache.errors import CacheMismatchError
from mtkd_cache.format.fingerprint import tokenizer_fingerprint
from mtkd_cache.format.tokenization import TokenizationReader
from mtkd_train.cli import main
from mtkd_train.data import CachedDistillDataset
from tests.helpers.bpe_tokenizers import CORPUS, byte_level_bpe, sentencepiece_bpe
from tests.helpers.tiny_models import save_tiny_causal_lm
from tests.mtkd_train._train_target import step_losses


@dataclass(frozen=True)
class CrossCache:
    cache: Path
    student: Path
    student_tok: Path
    teacher_tok: Path
    data: Path


def _lm_with(path: Path, tok: object, seed: int) -> Path:
    save_tiny_causal_lm(path, vocab_size=len(tok), with_tokenizer=False, seed=seed)  # type: ignore[arg-type]
    tok.save_pretrained(path)  # type: ignore[attr-defined]
    return path


def prepared_pair(root: Path, repeats: int) -> tuple[Path, Path, Path, Path]:
    """`root/cache` prepared with the byte-level student tokenizer from `repeats` x 5 texts; returns
    (data, student LM, teacher with the student's tokenizer, teacher with the SentencePiece one)."""
    tok_s, tok_t = byte_level_bpe(300), sentencepiece_bpe(500)
    data = root / "data.jsonl"
    with data.open("w") as f:
        for i, text in enumerate(CORPUS[:5] * repeats):
            f.write(json.dumps({"text": f"{text} {i}"}) + "\n")
    student_dir = _lm_with(root / "student_lm", tok_s, seed=1)
    prepare(root / "cache", data, tokenizer=student_dir, max_length=12, chunk_samples=4, progress=False)
    return data, student_dir, _lm_with(root / "same", tok_s, seed=2), _lm_with(root / "other", tok_t, seed=3)


@pytest.fixture(scope="module")
def cross(tmp_path_factory: pytest.TempPathFactory) -> CrossCache:
    root = tmp_path_factory.mktemp("cross")
    data, student_dir, same, other = prepared_pair(root, 3)
    run_teacher(root / "cache", RunConfig(teacher="same", model=str(same), top_k=6), progress=False)
    run_teacher(root / "cache", RunConfig(teacher="same_own", model=str(same), top_k=6), progress=False,
                own_tokenization=True)
    run_teacher(root / "cache", RunConfig(teacher="other", model=str(other), top_k=6), progress=False)
    student = root / "student"
    shutil.copytree(student_dir, student)
    for w in student.glob("*.safetensors"):
        w.unlink()  # config-only: initialised from its config
    return CrossCache(root / "cache", student, student_dir, other, data)


def _batches(cache: Path, teachers: list[str]) -> list[dict]:
    ds = CachedDistillDataset(cache, teachers, batch_size=4, shuffle=False, epochs=1, prefetch=0)
    return list(ds)


def test_identical_tokenizer_through_the_cross_path_gives_the_same_targets(cross: CrossCache) -> None:
    reader = open_cache(cross.cache)
    own = reader.teacher("same_own").meta
    assert own.tokenization is not None and reader.teacher("same").meta.tokenization is None
    for plain, aligned in zip(_batches(cross.cache, ["same"]), _batches(cross.cache, ["same_own"]), strict=True):
        a, b = plain["targets"]["same"], aligned["targets"]["same_own"]
        assert bool(b["present"][plain["position_mask"]].all())
        for key in ("indices", "logp", "tail"):
            assert torch.equal(a[key], b[key]), key


def _train(cross: CrossCache, out: Path, teachers: str, *extra: str) -> str:
    args = [str(cross.cache), "--teachers", teachers, "--student", str(cross.student), "--out", str(out),
            "--aggregate", "entropy", "--alpha", "0.7", "--batch-size", "4", "--max-steps", "4", "--lr", "1e-3",
            "--no-progress", *extra]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_identical_tokenizer_trains_exactly_like_the_same_tokenizer_path(cross: CrossCache, tmp_path: Path) -> None:
    _train(cross, tmp_path / "plain", "same")
    _train(cross, tmp_path / "own", "same_own")
    plain, own = step_losses(tmp_path / "plain"), step_losses(tmp_path / "own")
    assert len(plain) == 4 and plain == own


def test_provenance_of_the_own_tokenization(cross: CrossCache) -> None:
    reader = open_cache(cross.cache)
    meta = reader.teacher("other").meta
    tok = TokenizationReader(reader, meta.tokenization or "")
    teacher_fp = tokenizer_fingerprint(sentencepiece_bpe(500))
    assert meta.tokenizer_fingerprint == teacher_fp == tok.meta.tokenizer.fingerprint
    assert meta.tokenization == teacher_fp[:16]
    assert tok.meta.text_fingerprint == reader.inputs.text["fingerprint"]  # type: ignore[index]
    assert tok.meta.vocab_map["student_tokenizer"] == reader.inputs.tokenizer.fingerprint  # type: ignore[union-attr]
    assert tok.meta.vocab_map["teacher_tokenizer"] == teacher_fp
    vmap = tok.vocab_map()
    assert vmap.shape == (len(sentencepiece_bpe(500)),) and vmap.max() < len(byte_level_bpe(300))
    assert 0.3 < tok.meta.alignment_rate < 1.0, tok.meta.alignment_rate
    assert reader.teacher("same_own").meta.tokenization == tokenizer_fingerprint(byte_level_bpe(300))[:16]
    assert sorted(p.name for p in (cross.cache / "tokenizations").iterdir() if p.is_dir()) == sorted(
        {meta.tokenization, reader.teacher("same_own").meta.tokenization})


def test_verify_and_inspect_handle_teachers_on_their_own_tokenization(cross: CrossCache) -> None:
    assert verify_cache(cross.cache, progress=False).ok
    report = inspect_cache(cross.cache)
    assert report["teachers"]["other"]["tokenization"] == open_cache(cross.cache).teacher("other").meta.tokenization
    assert report["teachers"]["same"]["tokenization"] is None and "other" not in report["agreement"]["teachers"]


def test_other_tokenizer_targets_are_aligned_and_projected(cross: CrossCache) -> None:
    batches = _batches(cross.cache, ["other"])
    present = torch.cat([b["targets"]["other"]["present"][b["position_mask"]] for b in batches])
    assert 0.3 < float(present.float().mean()) < 1.0  # some rows aligned, some not
    for b in batches:
        t = b["targets"]["other"]
        gone = ~t["present"]
        assert bool(torch.isinf(t["logp"][gone]).all()) and bool((t["tail"][gone] == 1).all())
        kept = torch.isfinite(t["logp"])
        assert int(t["indices"][kept].max()) < len(byte_level_bpe(300))
        mass = torch.where(kept, t["logp"].exp(), torch.zeros_like(t["logp"])).sum(-1) + t["tail"]
        assert torch.allclose(mass[t["present"]], torch.ones_like(mass[t["present"]]), atol=2e-2)


def test_two_tokenizers_train_together(cross: CrossCache, tmp_path: Path) -> None:
    _train(cross, tmp_path / "both", "same,other", "--min-alignment", "0.3")  # these tiny BPEs align at ~42%
    losses = step_losses(tmp_path / "both")
    assert len(losses) == 4 and all(np.isfinite(v) for v in losses.values())
    _train(cross, tmp_path / "fused", "same,other", "--aggregate", "mean", "--loss", "forward_kl",
           "--min-alignment", "0.3")
    assert all(np.isfinite(v) for v in step_losses(tmp_path / "fused").values())


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])  # fused (KD row mask) and unfused (row subset)
def test_rows_without_any_teacher_get_no_kd(cross: CrossCache, tmp_path: Path, loss: str) -> None:
    """With only the other-tokenizer teacher, unaligned rows have no teacher: KD covers the others alone."""
    from mtkd_train.objective import Objective

    ds = CachedDistillDataset(cross.cache, ["other"], batch_size=4, shuffle=False, epochs=1, prefetch=0)
    batch = next(iter(ds))
    mask = batch["position_mask"]
    present = batch["targets"]["other"]["present"]
    assert bool((mask & ~present).any())
    obj = Objective(teachers=["other"], capture_temperatures=[1.0], vocab_size=300, aggregate="mean",
                    aggregate_kwargs={}, loss=loss, tail_mode="spread", alpha=1.0, temperature=1.0)
    logits = torch.randn(*mask.shape, 300, generator=torch.Generator().manual_seed(0))
    kd = obj(batch, logits, None, "causal_lm")["kd"]
    # the same KD over a batch whose unaligned rows are dropped from the position mask
    only = {**batch, "position_mask": mask & present}
    ref = obj(only, logits, None, "causal_lm")["kd"]
    torch.testing.assert_close(kd, ref)
    _train(cross, tmp_path / loss, "other", "--loss", loss, "--min-alignment", "0.3")
    assert all(np.isfinite(v) for v in step_losses(tmp_path / loss).values())


def test_teacher_below_the_alignment_threshold_is_refused(cross: CrossCache, tmp_path: Path) -> None:
    args = [str(cross.cache), "--teachers", "same,other", "--student", str(cross.student), "--out",
            str(tmp_path / "x"), "--max-steps", "1", "--min-alignment", "0.99"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    line = result.output.strip().splitlines()[-1]
    assert "teacher 'other'" in line and "% of the student's positions, below the minimum 99%" in line


def test_a_cache_without_text_refuses_another_tokenizer(cross: CrossCache, tmp_path: Path) -> None:
    packed = tmp_path / "packed"
    prepare(packed, cross.data, tokenizer=cross.student_tok, max_length=12, pack=True, progress=False)
    assert open_cache(packed).inputs.text is None
    with pytest.raises(CacheMismatchError, match="stores no source text"):
        run_teacher(packed, RunConfig(teacher="other", model=str(cross.teacher_tok), top_k=6), progress=False)
    assert not (packed / "tokenizations").exists() and not (packed / "teachers" / "other" / "teacher.json").exists()
