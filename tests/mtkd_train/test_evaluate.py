"""Evaluation: the student's and the cached teachers' scores, checked against direct computations,
and the classification path end to end (image cache -> factory student -> accuracy, ECE, MC dropout).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mtkd_cache import open_cache
from mtkd_train.cli import main
from mtkd_train.evaluate import eval_batches, evaluate_student, evaluate_teachers
from mtkd_train.student import load_student
from tests.mtkd_train._train_target import IMAGE_CLASSES, IMAGE_STUDENT, VOCAB, ImageCache, LMCache


def _direct_lm_scores(lm: LMCache, max_samples: int | None = None) -> tuple[float, float, int]:
    """NLL and accuracy of the student's next-token predictions, one sample at a time."""
    reader = open_cache(lm.cache)
    student = load_student(str(lm.student), seed=0)
    student.module.eval()
    nll, correct, count, seen = 0.0, 0, 0, 0
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c)
        for o, n in zip(data.offsets, data.lengths):
            if max_samples is not None and seen == max_samples:
                return nll / count, correct / count, count
            seen += 1
            ids = torch.from_numpy(data.inputs["token_ids"][o : o + n]).long()[None]
            with torch.no_grad():
                logits = student.module(input_ids=ids).logits[0, :-1, :VOCAB]
            logp = torch.log_softmax(logits.float(), -1)
            nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
            correct += int((logits.argmax(-1) == ids[0, 1:]).sum())
            count += int(n) - 1
    return nll / count, correct / count, count


@pytest.mark.parametrize("max_samples", [None, 5])
def test_student_perplexity_matches_a_direct_computation(
    lm_cache: LMCache, max_samples: int | None
) -> None:
    student = load_student(str(lm_cache.student), seed=0)
    res = evaluate_student(student, open_cache(lm_cache.cache), batch_size=3,
                           max_samples=max_samples, vocab_size=VOCAB)  # fmt: skip
    nll, acc, count = _direct_lm_scores(lm_cache, max_samples)
    assert res["positions"] == count
    assert res["nll"] == pytest.approx(nll, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert res["accuracy"] == pytest.approx(acc)
    assert 0 <= res["ece"] <= 1


def test_eval_batches_cover_every_sample_once_in_order(lm_cache: LMCache) -> None:
    reader = open_cache(lm_cache.cache)
    ids = torch.cat([b["sample_ids"] for b in eval_batches(reader, batch_size=3)])
    assert ids.tolist() == list(range(reader.inputs.num_samples))
    capped = torch.cat([b["sample_ids"] for b in eval_batches(reader, 3, max_samples=7)])
    assert capped.tolist() == list(range(7))


def _direct_teacher_accuracy(cache: Path, name: str, max_samples: int | None = None) -> float:
    """Top-1 of the cached targets against the true next token / label (labelled rows only)."""
    reader = open_cache(cache)
    hits: list[bool] = []
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c, teachers=[name])
        block = data.targets[name]
        top = block.indices[np.arange(len(block.indices)), block.logp.argmax(-1)]  # (R,)
        first = int(data.sample_ids[0])
        if reader.teacher(name).meta.grid == "token":
            for i, (o, n) in enumerate(zip(data.offsets, data.lengths)):
                if max_samples is None or first + i < max_samples:
                    toks = data.inputs["token_ids"][o : o + n]
                    hits.extend((top[o : o + n - 1] == toks[1:]).tolist())
        else:
            assert data.labels is not None
            keep = (data.labels >= 0) & (max_samples is None or data.sample_ids < max_samples)
            hits.extend((top[keep] == data.labels[keep]).tolist())
    return float(np.mean(hits))


@pytest.mark.parametrize("max_samples", [None, 5])
def test_teacher_scores_come_from_the_cached_targets(
    lm_cache: LMCache, max_samples: int | None
) -> None:
    res = evaluate_teachers(open_cache(lm_cache.cache), ["a", "b"], max_samples=max_samples)
    for name in ("a", "b"):
        want = _direct_teacher_accuracy(lm_cache.cache, name, max_samples)
        assert res[name]["accuracy"] == pytest.approx(want)
        assert res[name]["perplexity"] == pytest.approx(math.exp(res[name]["nll"]))
        # a random tiny LM is close to uniform over the 32 tokens
        assert 0.5 * VOCAB < res[name]["perplexity"] < 2 * VOCAB


@pytest.fixture(scope="module")
def image_eval(image_cache: ImageCache, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("image_run")
    args = [
        str(image_cache.cache), "--teachers", "v1,v2", "--student", IMAGE_STUDENT,
        "--student-kwargs", json.dumps({"num_labels": IMAGE_CLASSES}), "--out", str(out),
        "--aggregate", "mtbkd", "--batch-size", "6", "--max-steps", "4",
        "--eval-cache", str(image_cache.cache), "--mc-samples", "8",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"out": out, "res": json.loads((out / "eval.json").read_text())}


def test_classifier_student_reports_accuracy_and_ece(
    image_eval: dict, image_cache: ImageCache
) -> None:
    student = image_eval["res"]["student"]
    labelled = sum(1 for i in range(24) if i % 5 != 0)
    assert student["samples"] == labelled  # unlabelled images are not scored
    assert 0 <= student["accuracy"] <= 1 and 0 <= student["ece"] <= 1
    assert "perplexity" not in student
    # the saved factory student reproduces the reported accuracy
    saved = load_student(str(image_eval["out"] / "student"), trust_factory=True)
    again = evaluate_student(saved, open_cache(image_cache.cache), batch_size=5)
    assert again["accuracy"] == student["accuracy"] and again["nll"] == pytest.approx(
        student["nll"]
    )


def test_mc_dropout_reports_predictive_entropy_and_mutual_information(image_eval: dict) -> None:
    mc = image_eval["res"]["student"]["mc"]
    assert mc["samples"] == 8
    assert 0 < mc["predictive_entropy"] <= math.log(IMAGE_CLASSES) + 1e-6
    assert 0 < mc["mutual_information"] <= mc["predictive_entropy"]  # dropout makes passes differ
    assert 0 <= mc["accuracy"] <= 1 and 0 <= mc["ece"] <= 1


def test_classifier_teachers_are_scored_on_labelled_samples(
    image_eval: dict, image_cache: ImageCache
) -> None:
    teachers = image_eval["res"]["teachers"]
    assert set(teachers) == {"v1", "v2"}
    for name, scores in teachers.items():
        assert scores["accuracy"] == pytest.approx(
            _direct_teacher_accuracy(image_cache.cache, name)
        )
        assert math.isfinite(scores["nll"]) and "perplexity" not in scores


def test_eval_batches_split_across_ranks_cover_every_batch_once(lm_cache: LMCache) -> None:
    reader = open_cache(lm_cache.cache)
    alone = [b["sample_ids"].tolist() for b in eval_batches(reader, 3, max_samples=29)]
    shares = [[b["sample_ids"].tolist() for b in eval_batches(reader, 3, max_samples=29, rank=r, world=3)]
              for r in range(3)]  # fmt: skip
    assert [shares[j % 3][j // 3] for j in range(len(alone))] == alone
    assert sum(len(s) for s in shares) == len(alone)
    # a rank decodes only the chunks that hold its batches (chunks of 8 samples, batches of 8)
    read: list[int] = []
    original = reader.read_chunk
    reader.read_chunk = lambda c, *a, **k: read.append(c) or original(c, *a, **k)  # type: ignore[method-assign]
    assert [b["sample_ids"].tolist()[0] for b in eval_batches(reader, 8, rank=1, world=2)] == [8, 24]
    assert read == [1, 3]
