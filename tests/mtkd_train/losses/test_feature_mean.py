"""`FeatureDistiller(aggregate="mean")` against its definition: one projection matched to the
beta-weighted mean of the teachers' features (mse, cosine) or of their similarity matrices
(relational kinds), with a few rows (written from the survivors of a mutation run, docs/TESTING.md).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtkd_train.losses import FeatureDistiller
from mtkd_train.losses._relational import relational_loss, similarity_matrix

M, DS, DT = 5, 4, 6


def _inputs(seed: int, m: int = M) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, DS, generator=g), [torch.randn(m, DT, generator=g) for _ in range(2)]


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_mean_target_is_the_beta_weighted_mean_of_the_features(kind: str) -> None:
    h, fs = _inputs(0)
    fd = FeatureDistiller(DS, [DT, DT], kind=kind, betas=[1.0, 3.0], aggregate="mean")
    target = 0.25 * fs[0] + 0.75 * fs[1]
    pred = fd.projections[0](h)
    want = (pred - target).pow(2).mean() if kind == "mse" else (1 - F.cosine_similarity(pred, target, dim=1)).mean()
    torch.testing.assert_close(fd(h, fs), want)


@pytest.mark.parametrize("kind", ["similarity", "contrastive"])
@pytest.mark.parametrize("m", [2, 3, M])
def test_relational_mean_target_is_the_weighted_mean_similarity(kind: str, m: int) -> None:
    h, fs = _inputs(1, m)
    fd = FeatureDistiller(DS, [DT, 3], kind=kind, betas=[2.0, 1.0], aggregate="mean", tau=0.3)
    fs = [fs[0], fs[1][:, :3]]
    pred = fd.projections[0](h)
    target = (2 / 3) * similarity_matrix(fs[0]) + (1 / 3) * similarity_matrix(fs[1])
    want = relational_loss(pred, target, kind=kind, tau=0.3, target_is_similarity=True)  # type: ignore[arg-type]
    assert float(want.detach()) > 0 or (kind == "contrastive" and m == 2)  # one other item: 0
    torch.testing.assert_close(fd(h, fs), want)


def test_relational_mean_with_one_row_is_zero() -> None:
    h, fs = _inputs(2, 1)
    fd = FeatureDistiller(DS, [DT, DT], kind="similarity", aggregate="mean")
    out = fd(h, fs)
    assert float(out.detach()) == 0.0 and torch.isfinite(out)


def test_mean_betas_are_normalised_even_when_they_sum_below_one_in_float64() -> None:
    g = torch.Generator().manual_seed(3)
    h = torch.randn(M, DS, generator=g, dtype=torch.float64)
    fs = [torch.randn(M, DT, generator=g, dtype=torch.float64) for _ in range(2)]
    fd = FeatureDistiller(DS, [DT, DT], betas=[0.1, 0.2], aggregate="mean").double()
    want = (fd.projections[0](h) - (fs[0] / 3 + 2 * fs[1] / 3)).pow(2).mean()
    torch.testing.assert_close(fd(h, fs), want, rtol=1e-13, atol=1e-13)


def test_mean_uses_the_first_student_layer_and_casts_features_to_its_dtype() -> None:
    h, fs = _inputs(4)
    fd = FeatureDistiller(DS, [DT, DT], aggregate="mean")
    other = torch.randn(M, DS, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(fd([h, other], fs), fd(h, fs))
    out = fd(h, [f.double() for f in fs])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fd(h, fs))


def test_relational_mean_of_one_wide_features_is_not_skipped() -> None:
    h, fs = _inputs(6)
    fs = [f[:, :1] for f in fs]
    fd = FeatureDistiller(DS, [1, 1], kind="similarity", aggregate="mean")
    want = relational_loss(fd.projections[0](h), 0.5 * similarity_matrix(fs[0]) + 0.5 * similarity_matrix(fs[1]),
                           target_is_similarity=True)
    assert float(want.detach()) > 0
    torch.testing.assert_close(fd(h, fs), want)
