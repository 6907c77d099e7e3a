"""The fused objectives against a dense float64 reference: loss and every gradient.

`fused_kd_ce_loss` (logits) and `fused_linear_kd_ce_loss` (hidden states + LM head) must equal
`alpha * T^2 * mean KL(p || q) + (1 - alpha) * mean CE` written densely, for random targets, every
aggregation operator's merged target, both tail modes, T != 1, padding entries, padded vocabulary
columns, masked (garbage) rows and ignored labels, across chunk boundaries.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers.kernels import row_kernels  # noqa: F401 - every test runs eager and compiled

from mtkd_train.aggregate import AggregationContext, build_aggregator, linear_pool
from mtkd_train.losses import (
    LossConfigError,
    fused_kd_ce_loss,
    fused_linear_kd_ce_loss,
    mixture_negentropy,
    weighted_forward_kl,
)
from mtkd_train.targets import SparseTargets, from_dense, retemper, to_dense

P, V, H, N = 9, 17, 6, 3
WIDTH = V + 3  # padded head columns
F64 = torch.float64
OPERATORS = ("mean", "loglinear", "entropy", "confidence", "label_aware", "gate", "routing", "mtbkd")


def _teacher(seed: int, k: int) -> SparseTargets:
    """Top-k of a random distribution, with one padding entry that points at a real token."""
    g = torch.Generator().manual_seed(seed)
    t = from_dense(torch.softmax(torch.randn(P, V, generator=g, dtype=F64) * 2, -1), k)
    logp, tail = t.logp.double(), t.tail.double()
    tail[1] += logp[1, -1].exp()
    logp[1, -1] = -math.inf
    return SparseTargets(t.indices, logp, tail)


def _labels(seed: int = 5) -> torch.Tensor:
    y = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(seed))
    y[[0, 4]] = -100
    return y


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p * (p.clamp(min=1e-300).log() - q.clamp(min=1e-300).log()), 0.0).sum(-1)


def _dense(z: torch.Tensor, t: SparseTargets, labels: torch.Tensor, *, alpha: float, temperature: float,
           mode: str, rows: torch.Tensor | None = None) -> torch.Tensor:
    """alpha T^2 mean KL + (1 - alpha) mean CE, densely in float64 (target already at T)."""
    z = z[:, :V]
    q = torch.softmax(z / temperature, -1)
    if mode == "spread":
        kl = _kl(to_dense(t, V, "spread"), q)
    else:
        p = to_dense(t, V, "bucket")
        kept = p[:, :V] > 0
        kl = _kl(p, torch.cat([torch.where(kept, q, 0.0), (q * ~kept).sum(-1, keepdim=True)], -1))
    rows = torch.ones(P, dtype=torch.bool) if rows is None else rows
    kd = temperature**2 * kl[rows].mean()
    keep = labels != -100
    ce = -torch.log_softmax(z, -1)[keep].gather(1, labels[keep].unsqueeze(1)).mean()
    return alpha * kd + (1 - alpha) * ce


def _check(got: torch.Tensor, ref: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    got_grads = torch.autograd.grad(got, inputs, retain_graph=True)  # got and ref may share a gate
    for g, r in zip(got_grads, torch.autograd.grad(ref, inputs), strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["bucket", "spread"])
@pytest.mark.parametrize(("alpha", "temperature"), [(0.0, 1.0), (0.4, 1.0), (1.0, 1.0), (0.4, 2.5), (1.0, 0.7)])
def test_logits_and_head_paths_match_dense_reference(mode: str, alpha: float, temperature: float) -> None:
    t, labels = _teacher(0, 5), _labels()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(P, H, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(WIDTH, H, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(WIDTH, generator=g, dtype=F64, requires_grad=True)
    kw: dict[str, Any] = dict(alpha=alpha, temperature=temperature, target_temperature=temperature,
                              tail_mode=mode, vocab_size=V, chunk=4)
    ref = _dense(h @ w.T + b, t, labels, alpha=alpha, temperature=temperature, mode=mode)
    _check(fused_linear_kd_ce_loss(h, w, t, labels, bias=b, **kw).loss, ref, (h, w, b))
    z = (h @ w.T + b).detach().requires_grad_(True)
    ref_z = _dense(z, t, labels, alpha=alpha, temperature=temperature, mode=mode)
    _check(fused_kd_ce_loss(z, t, labels, **kw).loss, ref_z, (z,))


@pytest.mark.parametrize("mode", ["bucket", "spread"])
def test_target_temperature_retempers_like_the_reference(mode: str) -> None:
    t, labels = _teacher(2, 4), _labels()
    z = torch.randn(P, V, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    got = fused_kd_ce_loss(z, t, labels, alpha=0.5, temperature=2.0, tail_mode=mode).loss
    ref = _dense(z, retemper(t, 2.0, V), labels, alpha=0.5, temperature=2.0, mode=mode)
    _check(got, ref, (z,))


@pytest.mark.parametrize("mode", ["bucket", "spread"])
@pytest.mark.parametrize("operator", OPERATORS)
def test_every_operator_merged_target_and_gate_gradient(operator: str, mode: str) -> None:
    teachers = [_teacher(10 + i, 3 + 2 * i) for i in range(N)]
    labels = _labels()
    gate_logits = torch.randn(P, N, dtype=F64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    ctx = AggregationContext(labels=labels, domains=torch.arange(P) % 2, gate_logits=gate_logits)
    kwargs: dict[str, Any] = {"domain_to_teacher": {0: 0, 1: 2}} if operator == "routing" else {}
    if operator == "mtbkd":
        kwargs["prior_strength"] = 0.2
    agg = build_aggregator(operator, num_teachers=N, **kwargs)
    merged = agg(teachers, ctx, vocab_size=V, tail_mode=mode)
    z = torch.randn(P, WIDTH, dtype=F64, generator=torch.Generator().manual_seed(8)).requires_grad_(True)
    rows = torch.ones(P, dtype=torch.bool)
    rows[6] = False
    got = fused_kd_ce_loss(z, merged, labels, alpha=0.6, temperature=1.5, target_temperature=1.5, tail_mode=mode,
                           vocab_size=V, mask=rows, chunk=2).loss
    ref = _dense(z, merged, labels, alpha=0.6, temperature=1.5, mode=mode, rows=rows)
    _check(got, ref, (z, gate_logits) if operator == "gate" else (z,))


@pytest.mark.parametrize("mode", ["bucket", "spread"])
def test_full_vocabulary_target_equals_plain_dense_formula(mode: str) -> None:
    probs = torch.softmax(torch.randn(P, V, dtype=F64, generator=torch.Generator().manual_seed(4)), -1)
    t = from_dense(probs, V)  # K == V: no tail, no bucket
    z = torch.randn(P, V, dtype=F64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    labels = _labels()
    got = fused_kd_ce_loss(z, t, labels, alpha=0.7, tail_mode=mode).loss
    keep = labels != -100
    ce = -torch.log_softmax(z, -1)[keep].gather(1, labels[keep].unsqueeze(1)).mean()
    ref = 0.7 * _kl(probs, torch.softmax(z, -1)).mean() + 0.3 * ce
    _check(got, ref, (z,))


def test_masked_rows_may_hold_garbage_and_kd_ce_values_are_the_means() -> None:
    t, labels = _teacher(0, 4), _labels()
    bad = SparseTargets(t.indices, t.logp.clone(), t.tail.clone())
    bad.logp[3] = float("nan")
    bad.tail[3] = float("nan")
    rows = torch.ones(P, dtype=torch.bool)
    rows[3] = False
    z = torch.randn(P, V, dtype=F64, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    out = fused_kd_ce_loss(z, bad, labels, alpha=0.5, tail_mode="bucket", mask=rows)
    _check(out.loss, _dense(z, t, labels, alpha=0.5, temperature=1.0, mode="bucket", rows=rows), (z,))
    kd_only = _dense(z, t, labels, alpha=1.0, temperature=1.0, mode="bucket", rows=rows)
    torch.testing.assert_close(out.kd, kd_only.detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(out.ce, _dense(z, t, labels, alpha=0.0, temperature=1.0, mode="bucket").detach(),
                               atol=1e-10, rtol=0)


def test_spread_mixture_negentropy_equals_weighted_forward_kl() -> None:
    teachers = [_teacher(20 + i, 4) for i in range(N)]
    logits = torch.randn(N, dtype=torch.float32, requires_grad=True)
    weights = torch.softmax(logits, 0).unsqueeze(0).expand(P, N)
    teachers32 = [SparseTargets(t.indices, t.logp.float(), t.tail.float()) for t in teachers]
    merged = linear_pool(teachers32, weights, vocab_size=V, tail_mode="spread", smoothing=0.1)
    z = torch.randn(P, V, generator=torch.Generator().manual_seed(9)).requires_grad_(True)
    neg = mixture_negentropy(teachers32, weights, V, smoothing=0.1)
    got = fused_kd_ce_loss(z, merged, torch.full((P,), -100), alpha=1.0, tail_mode="spread",
                           target_negentropy=neg).loss
    ref = weighted_forward_kl(z, teachers32, weights, tail_mode="spread", smoothing=0.1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    got_grads = torch.autograd.grad(got, (z, logits), retain_graph=True)
    for a, b in zip(got_grads, torch.autograd.grad(ref, (z, logits)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["bucket", "spread"])
def test_student_with_almost_no_mass_off_the_support_is_exact(mode: str) -> None:
    """r = 1 - sum_S q would cancel here (r ~ 1e-9); those rows take the exact masked sum."""
    t, labels = _teacher(0, 5), _labels()
    z = torch.randn(P, V, dtype=F64, generator=torch.Generator().manual_seed(3))
    z.scatter_add_(1, t.indices[:, :3], torch.full((P, 3), 25.0, dtype=F64))  # q off the support ~ 1e-10
    z.requires_grad_(True)
    got = fused_kd_ce_loss(z, t, labels, alpha=0.8, tail_mode=mode).loss
    _check(got, _dense(z, t, labels, alpha=0.8, temperature=1.0, mode=mode), (z,))
    z32 = z.detach().float().requires_grad_(True)  # float32: r is far below float32's epsilon
    got32 = fused_kd_ce_loss(z32, SparseTargets(t.indices, t.logp.float(), t.tail.float()), labels, alpha=0.8,
                             tail_mode=mode).loss
    torch.testing.assert_close(got32.double(), got.detach(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bf16_logits_stay_bf16_and_agree_with_float32(temperature: float) -> None:
    t, labels = _teacher(0, 5), _labels()
    t32 = SparseTargets(t.indices, t.logp.float(), t.tail.float())
    z = torch.randn(P, V, generator=torch.Generator().manual_seed(2)).bfloat16().requires_grad_(True)
    got = fused_kd_ce_loss(z, t32, labels, alpha=0.5, temperature=temperature)
    (g,) = torch.autograd.grad(got.loss, z)
    assert g.dtype == torch.bfloat16
    z32 = z.detach().float().requires_grad_(True)
    ref = fused_kd_ce_loss(z32, t32, labels, alpha=0.5, temperature=temperature)
    (g32,) = torch.autograd.grad(ref.loss, z32)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(g.float(), g32, atol=2e-4, rtol=1e-2)


def test_bad_inputs_name_the_option() -> None:
    t, labels = _teacher(0, 3), _labels()
    z = torch.randn(P, V)
    t32 = SparseTargets(t.indices, t.logp.float(), t.tail.float())
    with pytest.raises(LossConfigError, match="alpha"):
        fused_kd_ce_loss(z, t32, labels, alpha=1.5)
    with pytest.raises(LossConfigError, match="labels"):
        fused_kd_ce_loss(z, t32, labels[:3], alpha=0.5)
    with pytest.raises(LossConfigError, match="vocab_size"):
        fused_kd_ce_loss(z, t32, labels, alpha=0.5, vocab_size=V + 1)
    with pytest.raises(LossConfigError, match="disagree on H"):
        fused_linear_kd_ce_loss(torch.randn(P, H), torch.randn(V, H + 1), t32, labels, alpha=0.5)
    with pytest.raises(LossConfigError, match="chunk"):
        fused_kd_ce_loss(z, t32, labels, alpha=0.5, chunk=0)
    with pytest.raises(LossConfigError, match="temprature"):
        fused_kd_ce_loss(z, t32, labels, alpha=0.5, temprature=2.0)  # type: ignore[call-arg]
    with pytest.raises(LossConfigError, match="positions"):
        fused_kd_ce_loss(z[:3], t32, labels[:3], alpha=0.5)


@pytest.mark.parametrize("head", [False, True])
def test_float32_gradient_where_the_student_keeps_less_off_support_mass_than_the_tail(head: bool) -> None:
    """t / r > W + t: the coefficient of q in the gradient is negative on those rows (the T = 1 fast path's sign)."""
    t, labels = _teacher(2, 4), _labels()
    tail = t.tail.clone()
    tail[:5] = 0.4  # a heavy tail on some rows ...
    logp = t.logp + torch.log((1 - tail) / t.logp.exp().sum(-1)).unsqueeze(1)  # ... the kept mass rescaled to match
    t = SparseTargets(t.indices, logp, tail)
    g = torch.Generator().manual_seed(7)
    h = torch.randn(P, H, generator=g, dtype=F64)
    w = torch.randn(WIDTH, H, generator=g, dtype=F64)
    z = h @ w.T
    z.scatter_add_(1, t.indices, torch.full(t.indices.shape, 4.0, dtype=F64))  # little student mass off the support
    if head:  # the same logits through the head-fused path: z = h' @ w'^T with the boost folded into h', w'
        h, w = torch.cat([h, torch.eye(P, dtype=F64)], 1), torch.cat([w, (z - h @ w.T).T], 1)
    q = torch.softmax(z[:, :V], -1)
    r = 1 - q.gather(1, t.indices).masked_fill(t.logp == -math.inf, 0).sum(-1)
    assert ((t.tail / r) > 1 + 1e-3).sum() >= 3  # the negative-coefficient case really occurs
    kw: dict[str, Any] = dict(alpha=0.6, tail_mode="bucket", vocab_size=V, chunk=4)
    t32 = SparseTargets(t.indices, t.logp.float(), t.tail.float())
    if head:
        h32, w32 = h.float().requires_grad_(True), w.float().requires_grad_(True)
        got = fused_linear_kd_ce_loss(h32, w32, t32, labels, **kw).loss
        grads = torch.autograd.grad(got, (h32, w32))
        h64, w64 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ref = _dense(h64 @ w64.T, t, labels, alpha=0.6, temperature=1.0, mode="bucket")
        want = torch.autograd.grad(ref, (h64, w64))
    else:
        z32 = z.float().requires_grad_(True)
        got = fused_kd_ce_loss(z32, t32, labels, **kw).loss
        grads = torch.autograd.grad(got, (z32,))
        z64 = z.clone().requires_grad_(True)
        ref = _dense(z64, t, labels, alpha=0.6, temperature=1.0, mode="bucket")
        want = torch.autograd.grad(ref, (z64,))
    torch.testing.assert_close(got.double(), ref.detach(), atol=1e-5, rtol=0)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=0)
