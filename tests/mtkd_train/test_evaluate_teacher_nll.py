"""`evaluate_teachers` scores a cached teacher exactly as its cached rows say.

The reference below is written from docs/FORMAT.md and the `evaluate_teachers` docstring, one
position at a time: the kept probabilities renormalised to `1 - tail`, and a true token outside
the top-k valued at `tail / (V - K)` (the tail spread over the unkept tokens only).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtkd_cache import open_cache
from mtkd_train.evaluate import evaluate_teachers
from tests.mtkd_train._train_target import LMCache


def _exact(reader, teacher: str, max_samples: int | None = None) -> tuple[float, float, int]:  # noqa: ANN001
    """(mean NLL, accuracy, positions outside the top-k) over next-token positions."""
    vocab = reader.teacher(teacher).meta.vocab_size
    nlls, hits, outside, seen = [], [], 0, 0
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c, teachers=[teacher])
        block, toks = data.targets[teacher], data.inputs["token_ids"]
        for o, n in zip(data.offsets.tolist(), data.lengths.tolist()):
            if max_samples is not None and seen == max_samples:
                break
            seen += 1
            for j in range(n - 1):
                r, y = o + j, int(toks[o + j + 1])
                kept = np.exp(block.logp[r].astype(np.float64))
                tail = float(block.tail[r])
                kept = kept * (1 - tail) / kept.sum()
                ids = block.indices[r].tolist()
                if y in ids:
                    p = kept[ids.index(y)]
                else:
                    p = tail / (vocab - len(ids))
                    outside += 1
                nlls.append(-math.log(p))
                hits.append(ids[int(kept.argmax())] == y)
    return float(np.mean(nlls)), float(np.mean(hits)), outside


@pytest.mark.parametrize("max_samples", [None, 11])
def test_teacher_nll_equals_the_exact_nll_of_the_cached_rows(
    lm_cache: LMCache, max_samples: int | None
) -> None:
    reader = open_cache(lm_cache.cache)
    got = evaluate_teachers(reader, ["a", "b"], max_samples=max_samples)
    for name in ("a", "b"):
        nll, accuracy, outside = _exact(reader, name, max_samples)
        assert outside > 10, "the check needs true tokens outside the top-k"
        assert got[name]["nll"] == pytest.approx(nll, rel=1e-5)
        assert got[name]["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
        assert got[name]["accuracy"] == pytest.approx(accuracy)
