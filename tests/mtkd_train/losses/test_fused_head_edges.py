"""The head-fused objective equals the logits-level one on the same logits, to the rounding of
the dtype (docs/TESTING.md: written from the survivors of a mutation run of `_fused_head`): in
float64 to 1e-12, including the gradients a learned gate takes through the target, and for bf16
hidden states and head.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers.kernels import row_kernels  # noqa: F401 - every test runs eager and compiled

from mtkd_train.losses import fused_kd_ce_loss, fused_linear_kd_ce_loss
from mtkd_train.targets import SparseTargets, from_dense

P, H, V = 7, 5, 13


def _case(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SparseTargets,
                                                       torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(P, H, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    t = from_dense(torch.softmax(torch.randn(P, V, generator=g, dtype=torch.float64), -1), 4)
    labels = torch.randint(0, V, (P,), generator=g)
    labels[2] = -100
    return h, w, b, t, labels


@pytest.mark.parametrize("mode", ["bucket", "spread"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_float64_head_fused_equals_the_logits_path_with_the_gate_gradients(mode: str, temperature: float) -> None:
    h, w, b, t, labels = _case(torch.float64)
    kw = dict(alpha=0.6, temperature=temperature, target_temperature=temperature, tail_mode=mode, chunk=3)
    results = []
    for fused_head in (True, False):
        hh, ww, bb = (x.clone().requires_grad_(True) for x in (h, w, b))
        logp = t.logp.double().clone().requires_grad_(True)
        tail = t.tail.double().clone().requires_grad_(True)
        target = SparseTargets(t.indices, logp, tail)
        if fused_head:
            loss = fused_linear_kd_ce_loss(hh, ww, target, labels, bias=bb, **kw).loss  # type: ignore[arg-type]
        else:
            loss = fused_kd_ce_loss(hh @ ww.T + bb, target, labels, **kw).loss  # type: ignore[arg-type]
        assert loss.dtype == torch.float64
        results.append((loss, *torch.autograd.grad(loss, (hh, ww, bb, logp, tail))))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 3.0])  # z / 3 is not exact in bf16: it must be taken in float32
def test_bf16_head_fused_equals_the_logits_path_on_the_same_bf16_logits(temperature: float) -> None:
    h, w, b, t, labels = _case(torch.bfloat16, seed=1)
    kw = dict(alpha=0.5, temperature=temperature, target_temperature=temperature, tail_mode="bucket")
    got = fused_linear_kd_ce_loss(h, w, t, labels, bias=b, **kw).loss  # type: ignore[arg-type]
    logits = torch.mm(h, w.t()) + b  # the bf16 logits the head computes (matmul, then the bias)
    want = fused_kd_ce_loss(logits, t, labels, **kw).loss  # type: ignore[arg-type]
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunks_of_every_size_give_the_same_loss_without_warnings(chunk: int) -> None:
    """Every chunk, the last partial one included, writes into its own slice of the buffers."""
    h, w, b, t, labels = _case(torch.float32, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fused_linear_kd_ce_loss(h.requires_grad_(True), w, t, labels, bias=b, alpha=0.5, chunk=chunk)
    ref = fused_kd_ce_loss(h @ w.T + b, t, labels, alpha=0.5)
    torch.testing.assert_close(out.loss, ref.loss)


def test_the_logged_kd_and_ce_are_detached_on_both_paths() -> None:
    h, w, b, t, labels = _case(torch.float32, seed=3)
    h.requires_grad_(True)
    for out in (fused_linear_kd_ce_loss(h, w, t, labels, bias=b, alpha=0.5),
                fused_kd_ce_loss(h @ w.T + b, t, labels, alpha=0.5)):
        assert out.loss.requires_grad
        assert not out.kd.requires_grad and not out.ce.requires_grad


@pytest.mark.parametrize("scale", [2.0, 1024.0])
@pytest.mark.parametrize("frozen_hidden", [False, True])
def test_every_gradient_scales_with_the_upstream_gradient(scale: float, frozen_hidden: bool) -> None:
    """A loss scaled before backward (AMP's GradScaler) scales every gradient, the gate's included;
    inputs that need no gradient (a frozen trunk, no bias) get none."""
    h, w, _, t, labels = _case(torch.float32, seed=4)
    h.requires_grad_(not frozen_hidden)
    w.requires_grad_(True)
    logp, tail = t.logp.clone().requires_grad_(True), t.tail.clone().requires_grad_(True)
    inputs = [x for x in (h, w, logp, tail) if x.requires_grad]

    def grads(factor: float) -> tuple[torch.Tensor, ...]:
        loss = fused_linear_kd_ce_loss(h, w, SparseTargets(t.indices, logp, tail), labels, alpha=0.5,
                                       temperature=2.0, target_temperature=2.0).loss
        return torch.autograd.grad(loss * factor, inputs)

    for plain, scaled in zip(grads(1.0), grads(scale), strict=True):
        assert float(plain.abs().max()) > 1e-4
        torch.testing.assert_close(scaled, plain * scale, rtol=1e-5, atol=1e-6)


def test_batched_hidden_states_are_read_on_their_last_axis() -> None:
    h, w, b, t, labels = _case(torch.float32, seed=5)
    hb = torch.cat([h, h[:5]]).reshape(3, 4, H)  # (B, T, H) with T != H
    tb = SparseTargets(*(torch.cat([x, x[:5]]).reshape(3, 4, *x.shape[1:]) for x in t))
    lb = torch.cat([labels, labels[:5]]).reshape(3, 4)
    got = fused_linear_kd_ce_loss(hb, w, tb, lb, bias=b, alpha=0.5).loss
    want = fused_kd_ce_loss(hb @ w.T + b, tb, lb, alpha=0.5).loss
    torch.testing.assert_close(got, want)


def test_a_float32_head_runs_in_the_dtype_of_bf16_hidden_states() -> None:
    """As nn.Linear under autocast: weight and bias are cast to bf16 first (the bias is not added in float32)."""
    h, _, _, t, labels = _case(torch.bfloat16, seed=6)
    _, w32, b32, _, _ = _case(torch.float32, seed=7)
    want = fused_linear_kd_ce_loss(h, w32.bfloat16(), t, labels, bias=(b32 * 10).bfloat16(), alpha=0.5).loss
    got = fused_linear_kd_ce_loss(h, w32, t, labels, bias=b32 * 10, alpha=0.5).loss
    torch.testing.assert_close(got, want)


def test_an_outer_autocast_does_not_change_the_head_fused_loss() -> None:
    """The head runs in the hidden states' dtype, as chosen outside; autocast must not recast it."""
    h, w, b, t, labels = _case(torch.float32, seed=8)
    want = fused_linear_kd_ce_loss(h, w, t, labels, bias=b, alpha=0.5).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_kd_ce_loss(h, w, t, labels, bias=b, alpha=0.5).loss
    torch.testing.assert_close(got, want)


def test_the_default_head_chunk_is_four_rows_per_hidden_unit_up_to_its_element_budget() -> None:
    from mtkd_train.losses._fused import CHUNK_ELEMENTS, chunk_rows
    from mtkd_train.losses._fused_head import HEAD_CHUNK_ELEMENTS, head_chunk_rows

    assert head_chunk_rows(512, 49152, 64, None) == 256  # 4 H: the head's traffic a quarter of the logits'
    assert head_chunk_rows(4096, 49152, 576, None) == HEAD_CHUNK_ELEMENTS // 49152  # the 64 MiB budget binds
    assert head_chunk_rows(4096, 262144, 64, None) == HEAD_CHUNK_ELEMENTS // 262144
    assert head_chunk_rows(10**6, 64, 4, None) == CHUNK_ELEMENTS // 64  # never smaller than the logits path's
    assert head_chunk_rows(10**6, 10**8, 4, None) == chunk_rows(10**6, 10**8, None)
    assert head_chunk_rows(100, 49152, 64, None) == 100 and head_chunk_rows(0, 10, 4, None) == 1
    assert head_chunk_rows(512, 49152, 64, 3) == 3  # an explicit chunk wins, checked as on the logits path
    with pytest.raises(Exception, match=r"^chunk_rows must be a positive int, got 0$"):
        head_chunk_rows(512, 49152, 64, 0)
