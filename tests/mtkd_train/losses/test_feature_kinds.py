"""FeatureDistiller: relational kinds, optional projections, and several teachers' mean target."""

from __future__ import annotations

import pytest
import torch

from mtkd_train.losses import FeatureDistiller, LossConfigError, relational_loss, similarity_matrix


def _data(m: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(m, 8, generator=g), torch.randn(m, 8, generator=g), torch.randn(m, 12, generator=g)


def test_identity_projection_matches_directly_and_needs_equal_widths() -> None:
    h, f, _ = _data()
    loss = FeatureDistiller(8, [8], kind="mse", projections=[False])
    torch.testing.assert_close(loss(h, [f]), (h - f).pow(2).mean())
    cos = FeatureDistiller(8, [8], kind="cosine", projections=[False])
    torch.testing.assert_close(cos(h, [f]), (1 - torch.nn.functional.cosine_similarity(h, f, dim=1)).mean())
    with pytest.raises(LossConfigError, match="12-wide features and the student 8-wide .* no projection"):
        FeatureDistiller(8, [12], kind="mse", projections=[False])


def test_relational_kinds_need_no_projection_and_equal_the_relational_loss() -> None:
    h, _, f12 = _data()
    for kind in ("similarity", "contrastive"):
        loss = FeatureDistiller(8, [12], kind=kind, projections=[False], tau=0.1)
        torch.testing.assert_close(loss(h, [f12]), relational_loss(h, f12, kind=kind, tau=0.1))  # type: ignore[arg-type]


def test_mean_aggregate_matches_the_weighted_mean_target() -> None:
    h, f1, f2 = _data()
    f2 = f2[:, :8]
    mean = FeatureDistiller(8, [8, 8], kind="mse", betas=[1.0, 3.0], projections=[False, False], aggregate="mean")
    torch.testing.assert_close(mean(h, [f1, f2]), (h - (0.25 * f1 + 0.75 * f2)).pow(2).mean())
    per = FeatureDistiller(8, [8, 8], kind="mse", betas=[1.0, 3.0], projections=[False, False])
    torch.testing.assert_close(per(h, [f1, f2]), (h - f1).pow(2).mean() + 3 * (h - f2).pow(2).mean())
    rel = FeatureDistiller(8, [8, 12], kind="similarity", projections=[False, False], aggregate="mean")
    _, _, f12 = _data()
    target = 0.5 * similarity_matrix(f1) + 0.5 * similarity_matrix(f12)
    off = ~torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(rel(h, [f1, f12]), (similarity_matrix(h) - target)[off].pow(2).mean())
    with pytest.raises(LossConfigError, match="widths \\[8, 12\\] differ"):
        FeatureDistiller(8, [8, 12], kind="mse", aggregate="mean")
