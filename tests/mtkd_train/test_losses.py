"""Tests for mtkd_train.losses: every divergence against a dense reference, both tail modes."""

from __future__ import annotations

import math

import pytest
import torch

from mtkd_train.aggregate import AggregationContext, MeanAggregator, MTBKDAggregator, linear_pool
from mtkd_train.losses import (
    LOSS_KINDS,
    FeatureDistiller,
    LossConfigError,
    combine,
    hard_label_loss,
    kd_loss,
    kd_loss_per_position,
    weighted_forward_kl,
)
from mtkd_train.targets import SparseTargets, from_dense, from_samples, retemper, to_dense

P, V = 5, 11
SKEW = 0.1


def _target(k: int, seed: int = 0, pad: bool = True) -> SparseTargets:
    g = torch.Generator().manual_seed(seed)
    t = from_dense(torch.softmax(torch.randn(P, V, generator=g) * 2, -1), k)
    if pad and k > 1:  # a padding entry pointing at a real token: must be ignored
        logp = t.logp.clone()
        logp[0, -1] = -math.inf
        tail = t.tail.clone()
        tail[0] += t.logp[0, -1].exp()
        t = SparseTargets(t.indices, logp, tail)
    return t


def _logits(seed: int = 1, width: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(P, width, generator=g) * 1.5).requires_grad_(True)


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(a > 0, a * (a.clamp(min=1e-300).log() - b.clamp(min=1e-300).log()), 0.0).sum(
        -1
    )


def _dense_divergence(kind: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Textbook formulas on dense float64 distributions (rows)."""
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "js":
        m = (p + q) / 2
        return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew_kl":
        return _kl(p, SKEW * p + (1 - SKEW) * q)
    return _kl(q, SKEW * q + (1 - SKEW) * p)


def _dense_reference(kind: str, logits: torch.Tensor, t: SparseTargets, mode: str) -> torch.Tensor:
    q = torch.softmax(logits.double(), -1)
    if mode == "spread":
        return _dense_divergence(kind, to_dense(t, V, "spread").double(), q)
    p = to_dense(t, V, "bucket").double()  # (P, V + 1)
    kept = p[:, :V] > 0
    q_coarse = torch.cat([torch.where(kept, q, 0.0), (q * ~kept).sum(-1, keepdim=True)], -1)
    return _dense_divergence(kind, p, q_coarse)


@pytest.mark.parametrize("mode", ["spread", "bucket"])
@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("k", [1, 4])
def test_sparse_loss_and_gradient_match_dense_reference(kind: str, mode: str, k: int) -> None:
    t, z = _target(k), _logits()
    got = kd_loss_per_position(z, t, kind=kind, tail_mode=mode, skew=SKEW)
    z_ref = z.detach().double().requires_grad_(True)
    ref = _dense_reference(kind, z_ref, t, mode)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(got.sum(), z)
    (g_ref,) = torch.autograd.grad(ref.sum(), z_ref)
    torch.testing.assert_close(g.double(), g_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["spread", "bucket"])
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_full_vocabulary_target_equals_plain_dense_formula(kind: str, mode: str) -> None:
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(P, V, generator=g), -1)
    t = from_dense(probs, V)  # K == V: no tail, both modes are the same distribution
    z = _logits()
    got = kd_loss_per_position(z, t, kind=kind, tail_mode=mode, skew=SKEW)
    ref = _dense_divergence(kind, probs.double(), torch.softmax(z.double(), -1))
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    (grad,) = torch.autograd.grad(got.sum(), z)
    assert bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_temperature_divides_logits_retempers_target_and_scales_by_t_squared(
    kind: str, temperature: float
) -> None:
    t, z = _target(3, pad=False), _logits()
    got = kd_loss(z, t, kind=kind, temperature=temperature, tail_mode="spread", skew=SKEW)
    dense_t = to_dense(t, V).double().pow(1 / temperature)
    dense_t = dense_t / dense_t.sum(-1, keepdim=True)
    q = torch.softmax(z.detach().double() / temperature, -1)
    expected = temperature**2 * _dense_divergence(kind, dense_t, q).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_target_temperature_retempers_by_the_ratio() -> None:
    t, z = _target(3), _logits()
    got = kd_loss(z, t, temperature=4.0, target_temperature=2.0, tail_mode="spread")
    expected = 16.0 * kd_loss(z / 4.0, retemper(t, 2.0, V), tail_mode="spread")
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mask_skips_garbage_positions_and_empty_mask_gives_zero() -> None:
    t, z = _target(3), _logits()
    garbage = SparseTargets(t.indices, t.logp.clone(), t.tail.clone())
    garbage.logp[2] = float("nan")
    mask = torch.tensor([True, True, False, True, True])
    got = kd_loss(z, garbage, mask=mask)
    expected = kd_loss_per_position(z, t)[mask].mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    zero = kd_loss(z, t, mask=torch.zeros(P, dtype=torch.bool))
    assert zero.item() == 0.0
    zero.backward()  # still differentiable


def test_padded_vocabulary_columns_are_dropped() -> None:
    t = _target(3)
    z = _logits(width=V + 5)
    got = kd_loss_per_position(z, t, vocab_size=V)
    torch.testing.assert_close(got, kd_loss_per_position(z[:, :V], t))
    with pytest.raises(LossConfigError, match="vocab_size"):
        kd_loss(z, t, vocab_size=V + 6)


def test_leading_dims_are_kept_by_the_per_position_loss() -> None:
    t, z = _target(3), _logits()
    t3 = SparseTargets(t.indices.view(1, P, -1), t.logp.view(1, P, -1), t.tail.view(1, P))
    got = kd_loss_per_position(z.view(1, P, V), t3)
    assert got.shape == (1, P)
    torch.testing.assert_close(got[0], kd_loss_per_position(z, t))


def test_reverse_kl_against_sampled_target_is_infinite_but_forward_is_finite() -> None:
    t = from_samples(torch.randint(0, V, (P, 1)), torch.ones(P, 1))
    z = _logits()
    assert math.isinf(kd_loss(z, t, kind="reverse_kl", tail_mode="spread").item())
    assert math.isinf(kd_loss(z, t, kind="reverse_kl", tail_mode="bucket").item())
    fkl = kd_loss(z, t, kind="forward_kl", tail_mode="bucket")
    assert math.isfinite(fkl.item())
    expected = -torch.log_softmax(z.detach(), -1).gather(1, t.indices).mean()
    assert fkl.item() == pytest.approx(expected.item(), rel=1e-6)  # = CE on the sample


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "kl"}, "kind must be one of"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"skew": 1.0}, "skew must be in"),
        ({"tail_mode": "uniform"}, "tail_mode"),
    ],
)
def test_kd_loss_rejects_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kd_loss(_logits(), _target(2), **kwargs)


def _teachers() -> list[SparseTargets]:
    return [_target(2, seed=4), _target(5, seed=5, pad=False), _target(3, seed=6)]


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_weighted_forward_kl_has_the_union_path_gradient(temperature: float) -> None:
    targets = _teachers()
    w = torch.softmax(torch.randn(P, 3, generator=torch.Generator().manual_seed(7)), -1)
    z = _logits()
    fast = weighted_forward_kl(z, targets, w, temperature=temperature, tail_mode="spread")
    (g_fast,) = torch.autograd.grad(fast, z)
    # union path: aggregate the re-tempered teachers, then plain KL at the same temperature
    hot = [retemper(t, temperature, V) for t in targets]
    merged = linear_pool(hot, w, vocab_size=V, tail_mode="spread")  # per-position weights
    slow = temperature**2 * kd_loss(z / temperature, merged, tail_mode="spread")
    (g_slow,) = torch.autograd.grad(slow, z)
    torch.testing.assert_close(g_fast, g_slow, atol=1e-6, rtol=1e-4)
    # the losses differ by the q-independent constant T^2 * (H(m) - sum_i w_i H(p_i))
    dense = torch.stack([to_dense(t, V).double() for t in hot], 1)
    m = torch.einsum("pn,pnv->pv", w.double(), dense)
    ent = lambda x: -(x * x.log()).sum(-1)  # noqa: E731
    gap = temperature**2 * (ent(m) - (w.double() * ent(dense)).sum(-1)).mean()
    assert (fast - slow).item() == pytest.approx(gap.item(), rel=1e-4, abs=1e-6)


def test_weighted_forward_kl_with_smoothing_matches_mtbkd_gradient() -> None:
    targets, z = _teachers(), _logits()
    agg = MTBKDAggregator(3, prior_strength=0.2, vocab_size=V)
    w = agg.weights(targets, AggregationContext())
    fast = weighted_forward_kl(z, targets, w, smoothing=agg.prior_strength)
    merged = agg(targets, AggregationContext(), vocab_size=V, tail_mode="spread")
    slow = kd_loss(z, merged, tail_mode="spread")
    (g_fast,) = torch.autograd.grad(fast, z)
    (g_slow,) = torch.autograd.grad(slow, z)
    torch.testing.assert_close(g_fast, g_slow, atol=1e-6, rtol=1e-4)


def test_weighted_forward_kl_bucket_matches_union_when_supports_agree() -> None:
    base = _target(4, seed=8, pad=False)
    other = from_dense(to_dense(_target(V, seed=9, pad=False), V), V)
    # teacher 2 keeps the same tokens as teacher 1, with its own values and tail
    vals = other.logp.exp().gather(1, base.indices)
    second = SparseTargets(base.indices, vals.log(), 1 - vals.sum(-1))
    w = torch.tensor([0.3, 0.7])
    z = _logits()
    fast = weighted_forward_kl(z, [base, second], w, tail_mode="bucket")
    merged = MeanAggregator(2, weights=[0.3, 0.7])(
        [base, second], AggregationContext(), vocab_size=V, tail_mode="bucket"
    )
    slow = kd_loss(z, merged, tail_mode="bucket")
    torch.testing.assert_close(
        torch.autograd.grad(fast, z)[0], torch.autograd.grad(slow, z)[0], atol=1e-6, rtol=1e-4
    )


def test_weighted_forward_kl_rejects_bad_weight_shape() -> None:
    with pytest.raises(LossConfigError, match=r"weights must be \(5, 3\) or \(3,\)"):
        weighted_forward_kl(_logits(), _teachers(), torch.ones(P, 2))


def test_hard_label_loss_ignores_minus_100() -> None:
    z = _logits()
    labels = torch.tensor([1, -100, 3, -100, 0])
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(z[keep], labels[keep])
    assert hard_label_loss(z, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert hard_label_loss(z, torch.full((P,), -100)).item() == 0.0


def test_combine_mixes_and_validates_alpha() -> None:
    kd, ce = torch.tensor(2.0), torch.tensor(10.0)
    assert combine(kd, ce, 0.25).item() == pytest.approx(8.0)
    assert combine(kd, ce, 1.0).item() == 2.0
    for bad in (-0.1, 1.5):
        with pytest.raises(LossConfigError, match=r"alpha must be in \[0, 1\]"):
            combine(kd, ce, bad)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_distiller_matches_manual_loss_and_trains_projection(kind: str) -> None:
    torch.manual_seed(0)
    fd = FeatureDistiller(4, [3, 5], kind=kind, betas=[1.0, 0.5])
    h = torch.randn(6, 4)
    feats = [torch.randn(6, 3), torch.randn(6, 5)]
    mask = torch.tensor([True, True, True, False, True, False])
    loss = fd(h, feats, mask)
    parts = []
    for proj, f in zip(fd.projections, feats, strict=True):
        pred, tgt = proj(h[mask]), f[mask]
        if kind == "mse":
            parts.append(((pred - tgt) ** 2).mean())
        else:
            parts.append((1 - torch.nn.functional.cosine_similarity(pred, tgt, dim=1)).mean())
    assert loss.item() == pytest.approx((parts[0] + 0.5 * parts[1]).item(), rel=1e-5)
    loss.backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in fd.parameters())


def test_feature_distiller_validates_inputs() -> None:
    with pytest.raises(LossConfigError, match="betas"):
        FeatureDistiller(4, [3, 5], betas=[1.0])
    with pytest.raises(LossConfigError, match="kind"):
        FeatureDistiller(4, [3], kind="l1")
    fd = FeatureDistiller(4, [3])
    with pytest.raises(LossConfigError, match=r"expected \(6, 3\)"):
        fd(torch.randn(6, 4), [torch.randn(6, 2)])
