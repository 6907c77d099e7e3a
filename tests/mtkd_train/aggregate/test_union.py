"""Tests for mtkd_train.aggregate._union: the vectorised per-position union of supports."""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.aggregate import build_union
from mtkd_train.targets import SparseTargets, from_dense

INF = math.inf


def _handmade() -> list[SparseTargets]:
    """Two positions, V = 6. Teacher 0 keeps {4, 1} / {2}; teacher 1 keeps {1, 5, 0} / {2, 3}."""
    lg = math.log
    t0 = SparseTargets(
        torch.tensor([[4, 1], [2, 2]]),  # row 1 has a padding entry repeating index 2
        torch.tensor([[lg(0.5), lg(0.3)], [lg(0.9), -INF]]),
        torch.tensor([0.2, 0.1]),
    )
    t1 = SparseTargets(
        torch.tensor([[1, 5, 0], [3, 2, 0]]),
        torch.tensor([[lg(0.4), lg(0.2), lg(0.1)], [lg(0.5), lg(0.2), -INF]]),
        torch.tensor([0.3, 0.3]),
    )
    return [t0, t1]


def test_union_layout_on_handmade_example_spread() -> None:
    u = build_union(_handmade(), vocab_size=6, tail_mode="spread")
    assert u.size.tolist() == [4, 2]
    assert u.indices[0].tolist() == [0, 1, 4, 5]
    assert u.indices[1, :2].tolist() == [2, 3] and u.valid[1].tolist() == [True, True, False, False]
    probs = u.logp.exp()
    # teacher 0 row 0: spread value .2 / (6 - 2) = .05 on tokens 0 and 5
    torch.testing.assert_close(probs[0, 0], torch.tensor([0.05, 0.3, 0.5, 0.05]))
    # teacher 1 row 0: spread value .3 / 3 = .1 on token 4
    torch.testing.assert_close(probs[0, 1], torch.tensor([0.1, 0.4, 0.1, 0.2]))
    # row 1: teacher 0 keeps only 2 (spread .1/5 = .02 on 3); padding slots are 0
    torch.testing.assert_close(probs[1, 0], torch.tensor([0.9, 0.02, 0.0, 0.0]))
    # mass outside the union: t_i (V - U) / (V - K_i)
    torch.testing.assert_close(u.tail_out, torch.tensor([[0.1, 0.2], [0.08, 0.3]]))


def test_union_bucket_values_unkept_tokens_at_zero() -> None:
    u = build_union(_handmade(), vocab_size=6, tail_mode="bucket")
    probs = u.logp.exp()
    torch.testing.assert_close(probs[0, 0], torch.tensor([0.0, 0.3, 0.5, 0.0]))
    torch.testing.assert_close(u.tail_out, torch.tensor([[0.2, 0.3], [0.1, 0.3]]))


def _naive_union(targets: list[SparseTargets], v: int) -> list[dict[int, list[float]]]:
    """Per-row python reference: token -> [teacher values] under the spread reading."""
    rows = []
    for p in range(targets[0].logp.shape[0]):
        kept = [
            {
                int(i): math.exp(float(lp))
                for i, lp in zip(t.indices[p], t.logp[p], strict=True)
                if lp > -INF
            }
            for t in targets
        ]
        spread = [
            float(t.tail[p]) / (v - len(k)) if v > len(k) else 0.0
            for t, k in zip(targets, kept, strict=True)
        ]
        tokens = sorted(set().union(*kept))
        rows.append(
            {tok: [k.get(tok, s) for k, s in zip(kept, spread, strict=True)] for tok in tokens}
        )
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_union_matches_naive_reference_with_mixed_k_and_padding(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    v, p = 12, 7
    targets = []
    for k in (2, 5, 3):
        probs = torch.softmax(torch.randn(p, v, generator=g) * 2, dim=-1)
        t = from_dense(probs, k)
        pad = torch.rand(p, k, generator=g) < 0.3
        perm = torch.argsort(torch.rand(p, k, generator=g), dim=1)  # padding not only at the end
        logp = torch.where(pad, -INF, t.logp).gather(1, perm)
        targets.append(SparseTargets(t.indices.gather(1, perm), logp, t.tail))
    u = build_union(targets, vocab_size=v, tail_mode="spread")
    for row, expected in enumerate(_naive_union(targets, v)):
        n = int(u.size[row])
        assert u.indices[row, :n].tolist() == list(expected)
        got = u.logp[row, :, :n].exp().T.tolist()
        for values, ref in zip(got, expected.values(), strict=True):
            assert values == pytest.approx(ref, abs=1e-6)
        assert bool((u.logp[row, :, n:] == -INF).all())
