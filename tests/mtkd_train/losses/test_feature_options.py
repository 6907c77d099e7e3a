"""`FeatureDistiller` options at the edges a mutation run found unchecked (docs/TESTING.md): exact
errors, the `projections` flags, one student layer per teacher, the default tau, and the mean
aggregate's width rule for `cosine`.
"""

from __future__ import annotations

import pytest
import torch

from mtkd_train.losses import FeatureDistiller
from mtkd_train.losses._kd import LossConfigError
from mtkd_train.losses._relational import relational_loss


def _message(**kw: object) -> str:
    with pytest.raises(LossConfigError) as err:
        FeatureDistiller(4, [4, 6], **kw)  # type: ignore[arg-type]
    return str(err.value)


def test_option_errors_are_exact() -> None:
    assert _message(aggregate="max") == "aggregate must be one of ('per_teacher', 'mean'), got 'max'"
    assert _message(projections=[True]) == "projections=[True] must hold one flag per teacher (2)"
    want = ("aggregate 'mean' averages the teachers' features, whose widths [4, 6] differ; use aggregate "
            "'per_teacher' (one projection per teacher) or a relational kind")
    assert _message(aggregate="mean") == want and _message(aggregate="mean", kind="cosine") == want


def test_a_teacher_without_projection_is_compared_to_the_hidden_states_themselves() -> None:
    g = torch.Generator().manual_seed(0)
    h, f0, f1 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, 6, generator=g)
    fd = FeatureDistiller(4, [4, 6], projections=[0, 1])  # type: ignore[list-item]
    assert isinstance(fd.projections[0], torch.nn.Identity) and isinstance(fd.projections[1], torch.nn.Linear)
    want = (h - f0).pow(2).mean() + (fd.projections[1](h) - f1).pow(2).mean()
    torch.testing.assert_close(fd(h, [f0, f1]), want)
    with pytest.raises(LossConfigError, match="teacher 1 has 6-wide features"):
        FeatureDistiller(4, [4, 6], kind="cosine", projections=[True, False])


def test_each_teacher_may_have_its_own_student_layer() -> None:
    g = torch.Generator().manual_seed(1)
    h0, h1, f0, f1 = (torch.randn(5, 4, generator=g) for _ in range(4))
    fd = FeatureDistiller(4, [4, 4], projections=[False, False], betas=[1.0, 2.0])
    torch.testing.assert_close(fd([h0, h1], [f0, f1]), (h0 - f0).pow(2).mean() + 2 * (h1 - f1).pow(2).mean())
    with pytest.raises(LossConfigError) as err:
        fd([h0], [f0, f1])
    assert str(err.value) == "got 1 student hidden states for 2 teachers"


def test_relational_default_tau_is_0_05_and_one_teacher_mean_is_per_teacher() -> None:
    g = torch.Generator().manual_seed(2)
    h, f = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    fd = FeatureDistiller(4, [3], kind="contrastive", projections=[False])
    torch.testing.assert_close(fd(h, [f]), relational_loss(h, f, kind="contrastive", tau=0.05))
    mean = FeatureDistiller(4, [3], kind="contrastive", projections=[False], aggregate="mean")
    torch.testing.assert_close(mean(h, [f]), fd(h, [f]))


def test_an_empty_mask_gives_zero_and_rows_are_averaged() -> None:
    g = torch.Generator().manual_seed(3)
    h, f = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    fd = FeatureDistiller(2, [2], projections=[False])
    assert float(fd(h, [f], mask=torch.zeros(4, dtype=torch.bool)).detach()) == 0.0
    f[0] += 10.0  # one far row: the loss is the mean over rows of the mean over dims
    torch.testing.assert_close(fd(h, [f]), (h - f).pow(2).mean(dim=1).mean())
