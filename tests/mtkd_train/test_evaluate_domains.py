"""Evaluation per domain: on a cache with a domain column, each domain's perplexity equals a direct
computation over that domain's samples alone, and the domains add up to the whole."""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_cache import open_cache
from mtkd_train.evaluate import evaluate_student
from mtkd_train.student import load_student
from tests.mtkd_train._train_target import VOCAB, LMCache


def _direct(lm: LMCache, domain: str) -> tuple[float, int, int]:
    """Summed NLL, correct predictions and scored rows of one domain's samples, one sample at a time."""
    reader = open_cache(lm.cache)
    student = load_student(str(lm.student), seed=0)
    student.module.eval()
    names = reader.samples.column("domain").to_pylist()
    nll, correct, count = 0.0, 0, 0
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c)
        for sid, o, n in zip(data.sample_ids, data.offsets, data.lengths):
            if names[int(sid)] != domain:
                continue
            ids = torch.from_numpy(data.inputs["token_ids"][o : o + n]).long()[None]
            with torch.no_grad():
                logits = student.module(input_ids=ids).logits[0, :-1, :VOCAB]
            nll -= float(torch.log_softmax(logits.float(), -1).gather(1, ids[0, 1:, None]).sum())
            correct += int((logits.argmax(-1) == ids[0, 1:]).sum())
            count += int(n) - 1
    return nll, correct, count


def test_each_domain_scores_its_own_samples(lm_cache: LMCache) -> None:
    student = load_student(str(lm_cache.student), seed=0)
    res = evaluate_student(student, open_cache(lm_cache.cache), batch_size=3, vocab_size=VOCAB)
    assert sorted(res["domains"]) == ["x", "y"]
    for name, got in res["domains"].items():
        nll, correct, count = _direct(lm_cache, name)
        assert got["positions"] == count > 0
        assert got["nll"] == pytest.approx(nll / count, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
        assert got["accuracy"] == pytest.approx(correct / count)
    parts = res["domains"].values()
    assert sum(d["positions"] for d in parts) == res["positions"]
    assert sum(d["nll"] * d["positions"] for d in parts) / res["positions"] == pytest.approx(res["nll"], rel=1e-6)
