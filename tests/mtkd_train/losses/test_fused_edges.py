"""The fused objective at the edges a mutation run of `_fused_math` found unchecked
(docs/TESTING.md), each against the unfused `combine(kd_loss, hard_label_loss)`: one token off the
support, rows whose logits sit hundreds apart in one chunk, a placeholder row (all mass in the
tail), a tail-free target with a student that has no mass off the support, and bf16 logits read
in spread mode at T != 1.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers.kernels import row_kernels  # noqa: F401 - every test runs eager and compiled

from mtkd_train.losses import (
    LossConfigError,
    combine,
    fused_kd_ce_loss,
    fused_linear_kd_ce_loss,
    hard_label_loss,
    kd_loss,
)
from mtkd_train.losses._fused import CHUNK_ELEMENTS, MIN_CHUNK_ROWS, chunk_rows
from mtkd_train.targets import SparseTargets, from_dense, from_samples, to_dense

P, V = 6, 11


def _reference(z: torch.Tensor, t: SparseTargets, labels: torch.Tensor, *, alpha: float, temperature: float,
               mode: str) -> torch.Tensor:
    kd = kd_loss(z, t, kind="forward_kl", temperature=temperature, target_temperature=temperature,
                 tail_mode=mode)  # type: ignore[arg-type]
    return combine(kd, hard_label_loss(z, labels), alpha)


def _fused(z: torch.Tensor, t: SparseTargets, labels: torch.Tensor, *, alpha: float, temperature: float,
           mode: str, chunk: int | None = None) -> torch.Tensor:
    return fused_kd_ce_loss(z, t, labels, alpha=alpha, temperature=temperature, target_temperature=temperature,
                            tail_mode=mode, chunk=chunk).loss  # type: ignore[arg-type]


def _agree(z: torch.Tensor, t: SparseTargets, labels: torch.Tensor, **kw: float | str) -> None:
    z = z.detach().requires_grad_(True)
    got = _fused(z, t, labels, **kw)  # type: ignore[arg-type]
    (g_got,) = torch.autograd.grad(got, z)
    ref = _reference(z, t, labels, **kw)  # type: ignore[arg-type]
    (g_ref,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(got, ref.to(got.dtype), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_got, g_ref.to(g_got.dtype), atol=1e-5, rtol=1e-4)


def _logits(seed: int, rows: int = P, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2


@pytest.mark.parametrize("mode", ["bucket", "spread"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_one_token_off_the_support_gets_the_whole_tail(mode: str, temperature: float) -> None:
    probs = torch.softmax(_logits(1, dtype=torch.float64) / 4, -1)
    t = from_dense(probs, V - 1)  # n_out = 1 in every row
    assert bool((t.tail > 1e-3).all())
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(2))
    _agree(_logits(3), t, labels, alpha=0.7, temperature=temperature, mode=mode)


@pytest.mark.parametrize("mode", ["bucket", "spread"])
def test_rows_hundreds_apart_in_one_chunk_are_shift_invariant(mode: str) -> None:
    """Softmax ignores a constant added to a row; the chunk's statistics must be per row."""
    z = _logits(4)
    t = from_dense(torch.softmax(_logits(5, dtype=torch.float64), -1), 4)
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(6))
    offset = torch.tensor([300.0, -300.0, 0.0, 150.0, -150.0, 0.0]).unsqueeze(1)
    for temperature in (2.0, 0.5):
        plain = _fused(z, t, labels, alpha=0.6, temperature=temperature, mode=mode, chunk=P)
        shifted = _fused(z + offset, t, labels, alpha=0.6, temperature=temperature, mode=mode, chunk=P)
        torch.testing.assert_close(shifted, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_placeholder_row_with_all_mass_in_the_tail_adds_nothing_in_bucket_mode(temperature: float) -> None:
    t = from_dense(torch.softmax(_logits(7, dtype=torch.float64), -1), 3)
    logp, tail = t.logp.clone(), t.tail.clone()
    logp[2] = -math.inf  # no kept token: the bucket is the only outcome, and the student gives it mass 1
    tail[2] = 1.0
    placeholder = SparseTargets(t.indices, logp, tail)
    labels = torch.full((P,), -100)
    z = _logits(8)
    _agree(z, placeholder, labels, alpha=1.0, temperature=temperature, mode="bucket")
    per_row = [_fused(z[r : r + 1], SparseTargets(*(x[r : r + 1] for x in placeholder)), labels[r : r + 1],
                      alpha=1.0, temperature=temperature, mode="bucket") for r in range(P)]
    assert float(per_row[2]) == pytest.approx(0.0, abs=1e-6)
    bf16 = _fused(z.bfloat16(), placeholder, labels, alpha=1.0, temperature=temperature, mode="bucket", chunk=P)
    torch.testing.assert_close(bf16.float(), sum(per_row) / P, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_tail_free_target_and_a_student_without_mass_off_the_support_stay_finite(temperature: float) -> None:
    t = from_samples(torch.tensor([[0, 1]] * P), torch.tensor([[3, 1]] * P))  # tail 0
    z = torch.full((P, V), -200.0)
    z[:, :2] = 200.0  # r = sum of q off the support underflows to 0
    z.requires_grad_(True)
    loss = _fused(z, t, torch.full((P,), -100), alpha=1.0, temperature=temperature, mode="bucket")
    (grad,) = torch.autograd.grad(loss, z)
    assert math.isfinite(float(loss.detach())) and bool(torch.isfinite(grad).all())
    q = torch.softmax(torch.tensor([200.0, 200.0]) / temperature, -1)
    p = torch.tensor([0.75, 0.25])
    want = temperature**2 * float((p * (p.log() - q.log())).sum())
    assert float(loss.detach()) == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_bf16_logits_in_spread_mode_at_t2_equal_their_float32_values(alpha: float) -> None:
    z = (_logits(9, rows=P) * 4 + 30).bfloat16()  # large logits: a bf16 row sum would lose digits
    t = from_dense(torch.softmax(_logits(10, dtype=torch.float64), -1), 3)
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(11))
    got = _fused(z, t, labels, alpha=alpha, temperature=2.0, mode="spread")
    want = _fused(z.float(), t, labels, alpha=alpha, temperature=2.0, mode="spread")
    torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "temperature", "alpha"), [(torch.float32, 1.0, 0.5), (torch.float32, 2.0, 0.5),
                                                            (torch.bfloat16, 2.0, 0.5), (torch.bfloat16, 1.0, 1.0)])
@pytest.mark.parametrize("mode", ["bucket", "spread"])
def test_the_logits_gradient_scales_with_the_upstream_gradient(dtype: torch.dtype, temperature: float,
                                                                alpha: float, mode: str) -> None:
    """A loss scaled before backward (AMP's GradScaler, gradient accumulation) scales the gradient."""
    t = from_dense(torch.softmax(_logits(12, dtype=torch.float64), -1), 4)
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(13))
    z = _logits(14).to(dtype).requires_grad_(True)
    loss = _fused(z, t, labels, alpha=alpha, temperature=temperature, mode=mode)
    (plain,) = torch.autograd.grad(loss, z, retain_graph=True)
    (scaled,) = torch.autograd.grad(loss * 1024.0, z)
    assert float(plain.abs().max()) > 1e-3
    torch.testing.assert_close(scaled.float(), plain.float() * 1024.0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_the_gradient_of_bf16_logits_is_computed_in_float32(alpha: float) -> None:
    """bf16 logits get the float32 gradient of their values, rounded once to bf16."""
    t = from_dense(torch.softmax(_logits(15, dtype=torch.float64), -1), 4)
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(16))
    z16 = _logits(17).bfloat16().requires_grad_(True)
    z32 = z16.detach().float().requires_grad_(True)
    (g16,) = torch.autograd.grad(_fused(z16, t, labels, alpha=alpha, temperature=2.0, mode="spread"), z16)
    (g32,) = torch.autograd.grad(_fused(z32, t, labels, alpha=alpha, temperature=2.0, mode="spread"), z32)
    assert g16.dtype == torch.bfloat16
    torch.testing.assert_close(g16, g32.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("needs", ["logp", "tail", "both"])
def test_gate_gradients_reach_exactly_the_target_parts_that_need_them_and_scale(needs: str) -> None:
    """A learned gate differentiates the merged target; the logits themselves may be frozen."""
    t = from_dense(torch.softmax(_logits(18, dtype=torch.float64), -1), 4)
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(19))
    z = _logits(20)  # no gradient wanted for the logits
    logp = t.logp.clone().requires_grad_(needs in ("logp", "both"))
    tail = t.tail.clone().requires_grad_(needs in ("tail", "both"))
    inputs = [x for x in (logp, tail) if x.requires_grad]

    def grads(loss_fn: str, factor: float) -> tuple[torch.Tensor, ...]:
        target = SparseTargets(t.indices, logp, tail)
        if loss_fn == "fused":
            loss = _fused(z, target, labels, alpha=0.5, temperature=2.0, mode="bucket")
        else:
            loss = _reference(z, target, labels, alpha=0.5, temperature=2.0, mode="bucket")
        return torch.autograd.grad(loss * factor, inputs)

    for got, want, scaled in zip(grads("fused", 1.0), grads("reference", 1.0), grads("fused", 64.0), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(scaled, got * 64.0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, P])
def test_bf16_chunks_of_every_size_give_the_same_gradient_without_warnings(chunk: int) -> None:
    t = from_dense(torch.softmax(_logits(21, dtype=torch.float64), -1), 4)
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(22))
    z = _logits(23).bfloat16().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = _fused(z, t, labels, alpha=0.5, temperature=2.0, mode="spread", chunk=chunk)
        (got,) = torch.autograd.grad(loss, z)
    (want,) = torch.autograd.grad(_fused(z, t, labels, alpha=0.5, temperature=2.0, mode="spread", chunk=P), z)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_batched_logits_equal_their_flattened_rows() -> None:
    t = from_dense(torch.softmax(_logits(24, rows=12, dtype=torch.float64), -1), 3)
    labels = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(25))
    z = _logits(26, rows=12)
    flat = _fused(z, t, labels, alpha=0.5, temperature=2.0, mode="spread")
    batched = _fused(z.reshape(3, 4, V), SparseTargets(*(x.reshape(3, 4, *x.shape[1:]) for x in t)),
                     labels.reshape(3, 4), alpha=0.5, temperature=2.0, mode="spread")
    torch.testing.assert_close(batched, flat)


def test_vocab_size_bounds_and_message() -> None:
    t = from_dense(torch.softmax(_logits(27, dtype=torch.float64)[:, :1], -1), 1)
    labels = torch.zeros(P, dtype=torch.int64)
    z = _logits(28)
    one = fused_kd_ce_loss(z, t, labels, alpha=0.5, vocab_size=1)  # a one-token vocabulary: both terms are 0
    assert float(one.loss) == pytest.approx(0.0, abs=1e-6)
    for bad in (0, -1, V + 1, 3.0):
        with pytest.raises(LossConfigError) as err:
            fused_kd_ce_loss(z, t, labels, alpha=0.5, vocab_size=bad)  # type: ignore[arg-type]
        assert str(err.value) == (f"vocab_size={bad!r} must be a positive int no larger than the {V} logits / head "
                                  "rows; padded vocabulary columns beyond it are dropped")


def test_chunk_rows_aims_at_chunk_elements_per_chunk() -> None:
    rows = chunk_rows(10**6, 2**14, None)
    assert rows == CHUNK_ELEMENTS // 2**14 and type(rows) is int  # a row count for range() and slicing
    assert chunk_rows(10**8, 1, None) == CHUNK_ELEMENTS
    assert chunk_rows(10**6, 10**7, None) == MIN_CHUNK_ROWS
    assert chunk_rows(5, 10, None) == 5 and chunk_rows(0, 10, None) == 1
    assert chunk_rows(100, 10, 1) == 1 and chunk_rows(3, 10, 8) == 3 and chunk_rows(1, 10, 8) == 1
    for bad in (0, -2, 2.0):
        with pytest.raises(LossConfigError, match=rf"^chunk_rows must be a positive int, got {bad!r}$"):
            chunk_rows(10, 10, bad)  # type: ignore[arg-type]


def test_one_labelled_row_gives_its_own_cross_entropy() -> None:
    t = from_dense(torch.softmax(_logits(29, dtype=torch.float64), -1), 3)
    labels = torch.full((P,), -100)
    labels[3] = 4
    z = _logits(30)
    out = fused_kd_ce_loss(z, t, labels, alpha=0.5)
    torch.testing.assert_close(out.ce, torch.nn.functional.cross_entropy(z[3:4], labels[3:4]))


def test_double_precision_targets_do_not_change_the_float32_computation() -> None:
    t = from_dense(torch.softmax(_logits(31, dtype=torch.float64), -1), 3)
    t64 = SparseTargets(t.indices, t.logp.double(), t.tail.double())
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(32))
    z = _logits(33)
    want = fused_kd_ce_loss(z, t, labels, alpha=0.5, temperature=2.0, tail_mode="spread")
    got = fused_kd_ce_loss(z, t64, labels, alpha=0.5, temperature=2.0, tail_mode="spread",
                           target_negentropy=torch.zeros(P, dtype=torch.float64))
    assert got.loss.dtype == torch.float32 and got.kd.dtype == torch.float32
    torch.testing.assert_close(fused_kd_ce_loss(z, t64, labels, alpha=0.5, temperature=2.0,
                                                tail_mode="spread").loss, want.loss)


@pytest.mark.parametrize("pad_id", [0, -1, V + 5])
@pytest.mark.parametrize("mode", ["bucket", "spread"])
def test_rows_without_a_kept_token_may_hold_any_padding_id(pad_id: int, mode: str) -> None:
    t = from_dense(torch.softmax(_logits(34, dtype=torch.float64), -1), 1)  # K = 1
    indices, logp, tail = t.indices.clone(), t.logp.clone(), t.tail.clone()
    indices[1], logp[1], tail[1] = pad_id, -math.inf, 1.0  # a placeholder row: all mass in the tail
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(35))
    for temperature in (1.0, 2.0):
        _agree(_logits(36), SparseTargets(indices, logp, tail), labels, alpha=0.5, temperature=temperature,
               mode=mode)


def test_one_labelled_row_weighs_its_cross_entropy_fully_in_the_loss() -> None:
    t = from_dense(torch.softmax(_logits(37, dtype=torch.float64), -1), 3)
    labels = torch.full((P,), -100)
    labels[5] = 2
    out = fused_kd_ce_loss(_logits(38), t, labels, alpha=0.25)
    torch.testing.assert_close(out.loss, 0.25 * out.kd + 0.75 * out.ce)


def test_float64_logits_match_a_float64_dense_reference_to_1e_12() -> None:
    z = _logits(39, dtype=torch.float64)
    t = from_dense(torch.softmax(_logits(40, dtype=torch.float64), -1), 4)
    t = SparseTargets(t.indices, t.logp.double(), t.tail.double())
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(41))
    labels[0] = -100
    temperature, alpha = 2.0, 0.3
    got = fused_kd_ce_loss(z, t, labels, alpha=alpha, temperature=temperature, target_temperature=temperature,
                           tail_mode="spread")
    p = to_dense(t, V)
    log_q = torch.log_softmax(z / temperature, -1)
    kd = temperature**2 * (p * (p.log() - log_q)).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(z, labels)
    torch.testing.assert_close(got.kd, kd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.ce, ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.loss, alpha * kd + (1 - alpha) * ce, rtol=1e-12, atol=1e-12)


def test_targets_of_other_positions_are_refused_with_both_shapes() -> None:
    t = from_dense(torch.softmax(_logits(42, rows=12, dtype=torch.float64), -1), 3)
    batched = SparseTargets(*(x.reshape(2, 6, *x.shape[1:]) for x in t))
    with pytest.raises(LossConfigError) as err:
        fused_kd_ce_loss(_logits(43, rows=12).reshape(3, 4, V), batched, torch.zeros(3, 4, dtype=torch.int64),
                         alpha=0.5)
    assert str(err.value) == "target positions (2, 6) do not match the positions (3, 4)"


@pytest.mark.parametrize("mode", ["bucket", "spread"])
def test_a_target_captured_at_another_temperature_is_retempered_by_the_ratio(mode: str) -> None:
    t = from_dense(torch.softmax(_logits(44, dtype=torch.float64), -1), 4)
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(45))
    z = _logits(46)
    got = fused_kd_ce_loss(z, t, labels, alpha=0.5, temperature=2.0, target_temperature=4.0,
                           tail_mode=mode).loss  # type: ignore[arg-type]
    kd = kd_loss(z, t, kind="forward_kl", temperature=2.0, target_temperature=4.0, tail_mode=mode)  # type: ignore[arg-type]
    torch.testing.assert_close(got, combine(kd, hard_label_loss(z, labels), 0.5), atol=1e-5, rtol=1e-5)


def test_a_second_backward_through_a_retained_graph_gives_the_same_gradient() -> None:
    probs = torch.softmax(_logits(11, dtype=torch.float64), -1)
    t = from_dense(probs, 4)
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(12))
    z = _logits(13).requires_grad_(True)
    loss = _fused(z, t, labels, alpha=0.6, temperature=1.0, mode="bucket", chunk=4)  # two chunks
    (first,) = torch.autograd.grad(loss, z, retain_graph=True)
    (second,) = torch.autograd.grad(loss, z)  # the saved statistics are not consumed by the first
    torch.testing.assert_close(first, second, atol=1e-7, rtol=1e-6)
    _agree(z, t, labels, alpha=0.6, temperature=1.0, mode="bucket")


@pytest.mark.parametrize("mode", ["bucket", "spread"])
def test_rows_whose_best_support_token_is_improbable_take_the_exact_log_sum_exp(mode: str) -> None:
    # rows 0-2: the student puts ~e-30 on every teacher token (below LSE_COLUMN_FLOOR, so the row's
    # log-sum-exp comes from the max); rows 3-5: ordinary. Both must match the float64 reference.
    z = _logits(21)
    t = from_dense(torch.softmax(_logits(22, dtype=torch.float64), -1), 3)
    far = torch.zeros(P, V, dtype=torch.bool)
    far[:3].scatter_(1, t.indices[:3], True)
    z = torch.where(far, z - 30.0, z)
    labels = t.indices[:, 0].clone()  # the label is on the support too: no other column to read from
    _agree(z, t, labels, alpha=0.5, temperature=1.0, mode=mode)


@pytest.mark.parametrize("lift", [9.0, 25.0])
@pytest.mark.parametrize("mode", ["bucket", "spread"])
def test_confident_rows_in_later_chunks_with_large_padded_columns_match_the_reference(mode: str, lift: float) -> None:
    # rows 5-11 keep > 99% of the student's mass on the support (the exact off-support sum, read from
    # their chunk's log-softmax); padded head columns hold large logits that must count nowhere. At
    # lift 25 the student leaves r ~ 1e-10 off the support: t/r ~ 1e9, where a gradient assembled as
    # A q_j + q_j t/r on the support was off by ~1e3 (it is now written whole).
    rows, pad = 12, 3
    probs = torch.softmax(torch.randn(rows, V, generator=torch.Generator().manual_seed(31), dtype=torch.float64), -1)
    t = from_dense(probs, 3)
    z = torch.randn(rows, V, generator=torch.Generator().manual_seed(32))
    z[5:] = z[5:].scatter_add(1, t.indices[5:], torch.full((rows - 5, 3), lift))
    wide = torch.cat([z, torch.full((rows, pad), 40.0)], dim=1).requires_grad_(True)
    labels = torch.randint(0, V, (rows,), generator=torch.Generator().manual_seed(33))
    got = fused_kd_ce_loss(wide, t, labels, alpha=0.5, tail_mode=mode, vocab_size=V, chunk=4).loss  # type: ignore[arg-type]
    (g_got,) = torch.autograd.grad(got, wide)
    zr = z.double().requires_grad_(True)  # float64: the float32 reference loses r's digits itself
    ref = _reference(zr, t, labels, alpha=0.5, temperature=1.0, mode=mode)
    (g_ref,) = torch.autograd.grad(ref, zr)
    torch.testing.assert_close(got.double(), ref.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_got[:, :V].double(), g_ref.double(), atol=1e-5, rtol=1e-4)
    assert bool((g_got[:, V:] == 0).all())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_head_fused_loss_keeps_a_confident_students_support_gradient_exact(temperature: float) -> None:
    probs = torch.softmax(torch.randn(P, V, generator=torch.Generator().manual_seed(51), dtype=torch.float64), -1)
    t = from_dense(probs, 3)
    z = torch.randn(P, V, generator=torch.Generator().manual_seed(52))
    z = z.scatter_add(1, t.indices, torch.full((P, 3), 25.0 * temperature))  # r ~ 1e-10 at T
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(53))
    h = z.clone().requires_grad_(True)  # logits = h @ I: the head's gradient is the logits' gradient
    got = fused_linear_kd_ce_loss(h, torch.eye(V), t, labels, alpha=0.5, temperature=temperature,
                                  target_temperature=temperature, chunk=2).loss
    (g_got,) = torch.autograd.grad(got, h)
    zr = z.double().requires_grad_(True)
    ref = _reference(zr, t, labels, alpha=0.5, temperature=temperature, mode="bucket")
    (g_ref,) = torch.autograd.grad(ref, zr)
    torch.testing.assert_close(got.double(), ref.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_got.double(), g_ref.double(), atol=1e-5, rtol=1e-4)


def test_an_ignored_label_row_and_transposed_logits_match_the_reference() -> None:
    probs = torch.softmax(_logits(41, dtype=torch.float64), -1)
    t = from_dense(probs, 3)
    labels = torch.randint(0, V, (P,), generator=torch.Generator().manual_seed(42))
    labels[2] = -100
    z = _logits(43)
    z[2, 0] = 50.0  # the ignored row's label is read as column 0: the largest logit of the row
    _agree(z, t, labels, alpha=0.5, temperature=1.0, mode="bucket")
    zt = z.t().contiguous().t()  # the same values, column-major
    assert not zt.is_contiguous()
    _agree(zt, t, labels, alpha=0.5, temperature=1.0, mode="bucket")
