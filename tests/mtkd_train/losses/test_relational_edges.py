"""Relational losses at the edges a mutation run checks (docs/TESTING.md): a teacher given as a
similarity matrix, the exact errors, tau bounds, one or two items, zero vectors and dtypes.
"""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.losses._kd import LossConfigError
from mtkd_train.losses._relational import relational_loss, similarity_matrix


def _pair(seed: int, m: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, 3, generator=g), torch.randn(m, 7, generator=g)


@pytest.mark.parametrize("kind", ["similarity", "contrastive"])
def test_a_similarity_matrix_target_equals_the_embeddings_it_came_from(kind: str) -> None:
    s, t = _pair(0)
    want = relational_loss(s, t, kind=kind, tau=0.3)  # type: ignore[arg-type]
    got = relational_loss(s, similarity_matrix(t).double(), kind=kind, tau=0.3,  # type: ignore[arg-type]
                          target_is_similarity=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    assert float(want) > 1e-3


def test_a_similarity_target_must_be_square() -> None:
    s, t = _pair(1)
    with pytest.raises(LossConfigError) as err:
        relational_loss(s, t, target_is_similarity=True)
    assert str(err.value) == "student (5, 3) and teacher (5, 7) must be (M, D_s) and (M, D_t) over the same M items"


@pytest.mark.parametrize(("student", "teacher"), [((5, 3), (4, 3)), ((5, 3, 1), (5, 3)), ((5, 3), (5,)),
                                                  ((5,), (5, 2))])
def test_shapes_are_refused_with_the_exact_message(student: tuple[int, ...], teacher: tuple[int, ...]) -> None:
    with pytest.raises(LossConfigError) as err:
        relational_loss(torch.zeros(student), torch.zeros(teacher))
    assert str(err.value) == (f"student {student} and teacher {teacher} must be (M, D_s) and (M, D_t) over "
                              "the same M items")


@pytest.mark.parametrize("tau", [0.0, -0.1, math.nan])
def test_tau_must_be_positive(tau: float) -> None:
    s, t = _pair(2)
    with pytest.raises(LossConfigError) as err:
        relational_loss(s, t, kind="contrastive", tau=tau)
    assert str(err.value) == f"tau must be > 0, got {tau!r}"


def test_a_tiny_tau_is_allowed_and_an_unknown_kind_is_named() -> None:
    s, t = _pair(3)
    assert math.isfinite(float(relational_loss(s, t, kind="contrastive", tau=1e-3)))
    with pytest.raises(LossConfigError) as err:
        relational_loss(s, t, kind="angle")  # type: ignore[arg-type]
    assert str(err.value) == "relational kind must be one of ('similarity', 'contrastive'), got 'angle'"


@pytest.mark.parametrize("kind", ["similarity", "contrastive"])
def test_one_item_gives_zero_with_a_gradient_of_zero(kind: str) -> None:
    s = torch.randn(1, 4, requires_grad=True)
    loss = relational_loss(s, torch.randn(1, 2), kind=kind)  # type: ignore[arg-type]
    assert loss.shape == () and float(loss.detach()) == 0.0
    loss.backward()
    assert s.grad is not None and torch.equal(s.grad, torch.zeros(1, 4))


def test_two_items_compare_their_one_pair() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cosine 0
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # cosine 1/sqrt(2)
    assert float(relational_loss(s, t)) == pytest.approx(0.5, rel=1e-6)
    assert float(relational_loss(s, t, kind="contrastive")) == pytest.approx(0.0, abs=1e-7)  # one other item


def test_similarity_matrix_is_float32_cosines_and_zero_for_a_zero_vector() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-4.0, 3.0]], dtype=torch.float64)
    s = similarity_matrix(x)
    assert s.dtype == torch.float32 and s.shape == (3, 3)
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    assert similarity_matrix(x.bfloat16()).dtype == torch.float32


def test_the_teacher_gets_no_gradient_and_the_student_does() -> None:
    s, t = _pair(4)
    s.requires_grad_(True)
    t.requires_grad_(True)
    for kwargs in ({}, {"kind": "contrastive"}):
        relational_loss(s, t, **kwargs).backward()  # type: ignore[arg-type]
    sim = similarity_matrix(t.detach()).requires_grad_(True)
    relational_loss(s, sim, target_is_similarity=True).backward()
    assert t.grad is None and sim.grad is None
    assert s.grad is not None and float(s.grad.abs().sum()) > 0


def test_contrastive_defaults_to_tau_0_05() -> None:
    s, t = _pair(5)
    default = relational_loss(s, t, kind="contrastive")
    torch.testing.assert_close(default, relational_loss(s, t, kind="contrastive", tau=0.05))
    assert not torch.allclose(default, relational_loss(s, t, kind="contrastive", tau=1.0))


def test_an_embedding_of_negligible_norm_has_almost_no_direction() -> None:
    """Below a norm of 1e-8 a vector counts as (nearly) zero: it is not blown up to a unit vector."""
    x = torch.tensor([[1e-10, 0.0], [1.0, 0.0], [0.0, 2.0]])
    s = similarity_matrix(x)
    assert abs(float(s[0, 1])) <= 0.011 and abs(float(s[0, 0])) <= 1e-3
    torch.testing.assert_close(s[1:, 1:], torch.eye(2))
