"""`inspect_cache`: sizes, fidelity statistics and top-1 agreement describe what is stored."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_models import save_tiny_causal_lm

from mtkd_cache import RunConfig, inspect_cache, open_cache, run_teacher
from mtkd_cache.ops.inspect import format_report
from tests.mtkd_cache.conftest import LM_VOCAB, TOKENIZER_SIZE


@pytest.fixture(scope="module")
def three_teachers(tmp_path_factory: pytest.TempPathFactory, lm_template: Path) -> Path:
    """``lm`` (template), ``twin`` (same model and settings), ``other`` (another seed), ``sampled``."""
    root = tmp_path_factory.mktemp("inspect")
    other = save_tiny_causal_lm(
        root / "other", vocab_size=LM_VOCAB, tokenizer_size=TOKENIZER_SIZE, seed=1
    )
    cache = Path(shutil.copytree(lm_template, root / "cache"))
    lm_model = open_cache(cache).teacher("lm").meta.model
    run_teacher(cache, RunConfig(teacher="twin", model=lm_model, top_k=8), progress=False)
    run_teacher(cache, RunConfig(teacher="other", model=str(other), top_k=8), progress=False)
    run_teacher(
        cache, RunConfig(teacher="sampled", model=lm_model, top_k=None, samples=4), progress=False
    )
    return cache


def test_report_describes_inputs_and_teachers(
    three_teachers: Path, lm_logp: Callable[[np.ndarray], torch.Tensor]
) -> None:
    reader = open_cache(three_teachers)
    report = inspect_cache(three_teachers)
    inputs = reader.inputs
    assert (report["samples"], report["positions"], report["chunks"], report["input_kind"]) == (
        inputs.num_samples,
        inputs.num_positions,
        inputs.grid.num_chunks,
        "tokens",
    )
    assert (
        report["dataset_fingerprint"] == inputs.dataset_fingerprint
        and report["format_version"] == 3
    )
    assert report["incomplete_teachers"] == []
    assert sorted(report["teachers"]) == ["lm", "other", "sampled", "twin"]

    lm = report["teachers"]["lm"]
    assert (lm["task"], lm["kind"], lm["k"], lm["vocab_size"], lm["index_dtype"]) == (
        "causal_lm",
        "topk",
        8,
        TOKENIZER_SIZE,
        "uint16",
    )
    on_disk = sum(
        p.stat().st_size for p in (three_teachers / "teachers/lm").rglob("*") if p.is_file()
    )
    assert 0 < lm["bytes"] <= on_disk
    assert lm["bytes_per_position"] == pytest.approx(lm["bytes"] / inputs.num_positions)

    # Statistics over every position: tail from the stored tails, entropy and top-1 probability
    # exact over the full real vocabulary.
    tails, entropy, top1 = [], [], []
    for sid in range(inputs.num_samples):
        s = reader.sample(sid, teachers=["lm"])
        tails.append(s["targets"]["lm"].tail)
        logp = lm_logp(s["token_ids"])
        entropy.append(-(logp.exp() * logp).sum(-1).numpy())
        top1.append(logp.exp().max(-1).values.numpy())
    assert lm["mean_tail_mass"] == pytest.approx(np.concatenate(tails).mean(), abs=1e-3)
    assert lm["fidelity_kept_mass"] == pytest.approx(1 - lm["mean_tail_mass"])
    assert lm["mean_entropy"] == pytest.approx(np.concatenate(entropy).mean(), abs=1e-5)
    assert lm["mean_top1_prob"] == pytest.approx(np.concatenate(top1).mean(), abs=1e-6)
    assert (
        report["teachers"]["sampled"]["kind"] == "sample"
        and report["teachers"]["sampled"]["draws"] == 4
    )
    assert report["teachers"]["sampled"]["mean_tail_mass"] is None


def test_top1_agreement_matrix(three_teachers: Path) -> None:
    reader = open_cache(three_teachers)
    report = inspect_cache(three_teachers, max_chunks=reader.num_chunks)
    ag = report["agreement"]
    assert ag["teachers"] == ["lm", "other", "sampled", "twin"]
    assert ag["chunks_sampled"] == reader.num_chunks
    m = np.array(ag["top1"])
    assert m.shape == (4, 4) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    i = ag["teachers"].index
    assert m[i("lm"), i("twin")] == 1.0

    def top1(name: str) -> np.ndarray:
        out = []
        for c in range(reader.num_chunks):
            block = reader.read_chunk(c, teachers=[name]).targets[name]
            score = block.logp if hasattr(block, "logp") else block.counts
            out.append(block.indices[np.arange(len(block.indices)), score.argmax(-1)])
        return np.concatenate(out)

    expected = float((top1("lm") == top1("other")).mean())
    assert m[i("lm"), i("other")] == pytest.approx(expected, abs=1e-4)
    assert m[i("lm"), i("other")] < 0.5, "an unrelated random teacher rarely agrees"

    assert inspect_cache(three_teachers, max_chunks=2)["agreement"]["chunks_sampled"] == 2


def test_incomplete_teacher_is_listed(copy_cache: Callable[..., Path], lm_template: Path) -> None:
    cache = copy_cache(lm_template)
    shutil.copytree(cache / "teachers/lm", cache / "teachers/half")
    (cache / "teachers/half/teacher.json").unlink()
    report = inspect_cache(cache)
    assert report["incomplete_teachers"] == ["half"] and list(report["teachers"]) == ["lm"]
    text = format_report(report)
    assert "INCOMPLETE teachers: half" in text and "teacher lm: causal_lm top-8" in text
