"""Edges of `mtkd_train.losses` that the mutation run (docs/TESTING.md) showed untested: the
`FeatureDistiller` contract (widths, betas, masks, shapes), `hard_label_loss` with ignored rows
and batched logits, and `combine` at alpha 0.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from mtkd_train.errors import LossConfigError
from mtkd_train.losses import (
    FeatureDistiller,
    combine,
    hard_label_loss,
    kd_loss,
    kd_loss_per_position,
    sparse_divergence,
    weighted_forward_kl,
)
from mtkd_train.losses._divergence import sparse_divergence_from_log_probs
from mtkd_train.targets import SparseTargets, from_dense, retemper, to_dense


def _inputs(p: int = 5, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p, 4, generator=g), [torch.randn(p, 3, generator=g), torch.randn(p, 2, generator=g)]


def _reference(fd: FeatureDistiller, h: torch.Tensor, feats: list[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(())
    for beta, proj, f in zip(fd.betas, fd.projections, feats):
        total = total + beta * ((proj(h[keep]) - f[keep]) ** 2).mean()
    return total


@pytest.mark.parametrize(
    ("student_dim", "dims"), [(4, []), (0, [3]), (4, [3, 0]), (4, [2.0]), (-1, [2])]
)
def test_feature_distiller_refuses_bad_widths(student_dim: int, dims: list) -> None:  # type: ignore[type-arg]
    msg = f"student_dim={student_dim!r} and teacher_dims={dims!r} must be positive ints (at least one teacher)"
    with pytest.raises(LossConfigError, match=f"^{re.escape(msg)}$"):
        FeatureDistiller(student_dim, dims)


def test_feature_distiller_accepts_width_one_and_zero_beta() -> None:
    fd = FeatureDistiller(1, [1, 2], betas=[0.0, 2])
    assert fd.betas == (0.0, 2.0) and fd.teacher_dims == (1, 2)
    assert FeatureDistiller(4, [3, 2]).betas == (1.0, 1.0)
    with pytest.raises(LossConfigError, match="one non-negative weight per teacher"):
        FeatureDistiller(4, [3, 2], betas=[1.0, -0.5])


def test_feature_loss_is_the_beta_weighted_mse_over_kept_rows() -> None:
    torch.manual_seed(0)
    fd = FeatureDistiller(4, [3, 2], betas=[0.5, 2.0])
    h, feats = _inputs()
    keep = torch.tensor([1, 0, 1, 1, 0])  # an integer mask works like a boolean one
    torch.testing.assert_close(fd(h, feats, keep), _reference(fd, h, feats, keep.bool()))
    everything = torch.ones(5, dtype=torch.bool)
    torch.testing.assert_close(fd(h, feats), _reference(fd, h, feats, everything))
    torch.testing.assert_close(fd(h, feats, everything), fd(h, feats))
    assert fd(h, feats, torch.zeros(5, dtype=torch.bool)).item() == 0.0


def test_feature_loss_names_the_teacher_whose_shape_does_not_fit() -> None:
    fd = FeatureDistiller(4, [3, 2])
    h, feats = _inputs()
    with pytest.raises(LossConfigError, match=r"^got features from 1 teachers, built for 2$"):
        fd(h, feats[:1])
    with pytest.raises(LossConfigError, match=re.escape("teacher 1 features have shape (5, 3), expected (5, 2)")):
        fd(h, [feats[0], feats[0]])
    with pytest.raises(LossConfigError, match=re.escape("teacher 0 features have shape (4, 3), expected (5, 3)")):
        fd(h, [feats[0][:4], feats[1]])


def test_hard_label_loss_skips_ignored_rows_of_batched_logits() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 7, generator=g)
    labels = torch.tensor([[1, -100, 6], [-100, -100, 2]])
    keep = labels != -100
    want = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(hard_label_loss(logits, labels), want)
    one = torch.full((2, 3), -100)
    one[1, 0] = 4  # a single labelled row: its own cross-entropy, not half of it
    torch.testing.assert_close(hard_label_loss(logits, one), F.cross_entropy(logits[1, 0][None], torch.tensor([4])))
    assert float(hard_label_loss(logits, torch.full((2, 3), -100))) == 0.0
    custom = torch.where(keep, labels, torch.full_like(labels, 5))
    torch.testing.assert_close(hard_label_loss(logits, custom, ignore_index=5), want)


def test_combine_weights_and_bounds() -> None:
    kd, ce = torch.tensor(2.0), torch.tensor(6.0)
    assert float(combine(kd, ce, 0)) == 6.0
    assert float(combine(kd, ce, 1.0)) == 2.0
    assert float(combine(kd, ce, 0.25)) == pytest.approx(5.0)
    for bad in (-0.1, 1.5):
        with pytest.raises(LossConfigError, match=re.escape(f"alpha must be in [0, 1] (weight of the KD term), got {bad!r}")):
            combine(kd, ce, bad)


def _dense_weighted_kl(z: torch.Tensor, targets: list, w: torch.Tensor, T: float, Tt: float, lam: float,  # type: ignore[type-arg]
                       vocab: int) -> torch.Tensor:  # fmt: skip
    """Per-row reference: T^2 [(1 - lam) sum_i w_i KL(p_i || q) + lam KL(U || q)], dense."""
    logq = torch.log_softmax(z[:, :vocab] / T, dim=-1)  # (P, V)
    out = torch.zeros(z.shape[0])
    for i, t in enumerate(targets):
        p = to_dense(retemper(t, T / Tt, vocab), vocab)  # (P, V)
        kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - logq), 0.0).sum(-1)
        out = out + (1 - lam) * w[:, i] * kl
    uniform = -math.log(vocab) - logq.mean(-1)
    return T**2 * (out + lam * uniform)


@pytest.mark.parametrize(("T", "Tt", "lam"), [(1.0, 1.0, 0.0), (2.0, 0.5, 0.0), (2.0, 1.0, 0.3), (1.5, 1.5, 0.2)])
def test_weighted_forward_kl_matches_a_dense_reference_on_kept_rows(T: float, Tt: float, lam: float) -> None:
    g = torch.Generator().manual_seed(4)
    vocab, rows = 9, 6
    z = torch.randn(rows, vocab + 3, generator=g)  # student head padded past the vocabulary
    targets = [from_dense(torch.softmax(torch.randn(rows, vocab, generator=g) * 2, -1), k) for k in (3, 5)]
    w = torch.softmax(torch.randn(rows, 2, generator=g), -1)
    keep = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    bad = [SparseTargets(t.indices, torch.where(keep[:, None], t.logp, math.nan), t.tail) for t in targets]
    got = weighted_forward_kl(z, bad, w, temperature=T, target_temperature=Tt, smoothing=lam,
                              mask=keep.long(), vocab_size=vocab)  # fmt: skip
    want = _dense_weighted_kl(z[keep], [SparseTargets(t.indices[keep], t.logp[keep], t.tail[keep]) for t in targets],
                              w[keep], T, Tt, lam, vocab).mean()  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lam", [1.0, 1.5, -0.1])
def test_weighted_forward_kl_refuses_smoothing_outside_0_1(lam: float) -> None:
    t = from_dense(torch.softmax(torch.randn(2, 5), -1), 2)
    with pytest.raises(LossConfigError, match=re.escape(f"smoothing must be in [0, 1), got {lam!r}")):
        weighted_forward_kl(torch.randn(2, 5), [t], torch.tensor([1.0]), smoothing=lam)


@pytest.mark.parametrize(("option", "value"), [("temperature", 0.0), ("temperature", math.inf),
                                               ("target_temperature", 0.0), ("target_temperature", "2")])  # fmt: skip
def test_kd_loss_refuses_temperatures_that_are_not_positive_finite_numbers(option: str, value: object) -> None:
    t = from_dense(torch.softmax(torch.randn(2, 5), -1), 2)
    with pytest.raises(LossConfigError, match=f"^{re.escape(f'{option} must be a positive finite number, got {value!r}')}$"):
        kd_loss(torch.randn(2, 5), t, **{option: value})  # type: ignore[arg-type]


def test_skew_zero_is_allowed_and_one_is_refused() -> None:
    t = from_dense(torch.softmax(torch.randn(2, 5), -1), 2)
    assert torch.isfinite(kd_loss(torch.randn(2, 5), t, kind="skew_kl", skew=0.0))
    with pytest.raises(LossConfigError, match=r"^skew must be in \[0, 1\), got 1\.0$"):
        kd_loss(torch.randn(2, 5), t, kind="skew_kl", skew=1.0)


def test_a_vocabulary_of_one_is_allowed() -> None:
    t = SparseTargets(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1), torch.zeros(2))
    assert float(kd_loss(torch.randn(2, 4), t, vocab_size=1)) == pytest.approx(0.0, abs=1e-6)


def _one_target(rows: int = 4, vocab: int = 6, k: int = 2, seed: int = 7) -> tuple[torch.Tensor, SparseTargets]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g), from_dense(torch.softmax(torch.randn(rows, vocab, generator=g), -1), k)


def test_skew_reaches_the_divergence_and_its_default_is_0_1() -> None:
    z, t = _one_target()
    base = kd_loss_per_position(z, t, kind="skew_kl")
    torch.testing.assert_close(base, kd_loss_per_position(z, t, kind="skew_kl", skew=0.1))
    assert not torch.allclose(kd_loss_per_position(z, t, kind="skew_kl", skew=0.4), base)
    for fn, first in ((sparse_divergence, z), (sparse_divergence_from_log_probs, torch.log_softmax(z, -1))):
        default = fn(first, t, kind="skew_kl", tail_mode="bucket")
        torch.testing.assert_close(default, fn(first, t, kind="skew_kl", tail_mode="bucket", skew=0.1))


def test_a_mean_over_one_position_is_that_position() -> None:
    z, t = _one_target()
    one = torch.tensor([False, False, True, False])
    torch.testing.assert_close(kd_loss(z, t, mask=one), kd_loss_per_position(z, t)[2])
    torch.manual_seed(1)
    fd = FeatureDistiller(4, [3])
    h, feats = _inputs()
    keep = torch.tensor([False, True, False, False, False])
    torch.testing.assert_close(fd(h, feats[:1], keep), ((fd.projections[0](h[1]) - feats[0][1]) ** 2).mean())


def test_cosine_feature_loss_without_a_mask() -> None:
    torch.manual_seed(2)
    fd = FeatureDistiller(4, [3], kind="cosine")
    h, feats = _inputs()
    want = (1 - F.cosine_similarity(fd.projections[0](h), feats[0], dim=1)).mean()
    torch.testing.assert_close(fd(h, feats[:1]), want)


def test_targets_and_vocabulary_that_do_not_fit_the_logits_are_named() -> None:
    z, t = _one_target()
    want = "target positions (4,) do not match logits positions (2, 2)"
    with pytest.raises(LossConfigError, match=f"^{re.escape(want)}$"):
        kd_loss(z.reshape(2, 2, 6), t)
    want = ("vocab_size=0 must be a positive int no larger than the logits' last dimension (6); padded "
            "vocabulary columns beyond it are dropped")  # fmt: skip
    with pytest.raises(LossConfigError, match=f"^{re.escape(want)}$"):
        kd_loss(z, t, vocab_size=0)
