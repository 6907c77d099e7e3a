"""The fused loss's C++ kernel (`losses/_native.py`, `csrc/kd_rows.cpp`) against float64 torch, its edges, and
how `kernels` chooses it. The fused losses run every test with it too (tests/helpers/kernels.py, "native")."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pytest
import torch

from mtkd_cache.precompute import native as builder
from mtkd_train.losses import LossConfigError, _native, fused_kd_ce_loss
from mtkd_train.losses._fused_math import RISKY_REST as RISKY
from mtkd_train.losses._fused_math import native_stats
from mtkd_train.losses._kernels import resolve_kernels
from mtkd_train.targets import SparseTargets, from_dense

pytestmark = pytest.mark.skipif(builder._compiler() is None, reason="no C++ compiler to build the kernel")
CPU = torch.device("cpu")


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A process state with no kernel loaded yet, building into a private folder."""
    monkeypatch.setattr(_native, "_STATE", {})
    monkeypatch.setenv("MTKD_KERNEL_DIR", str(tmp_path_factory.mktemp("kernels")))
    monkeypatch.delenv("MTKD_NATIVE", raising=False)
    monkeypatch.delenv("MTKD_KERNELS", raising=False)  # the suite's default (eager) would decide `auto`
    yield


def _rows(rows: int, vocab: int, width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 3
    idx = torch.stack([torch.randperm(vocab, generator=g)[:width] for _ in range(rows)])
    kept = torch.rand(rows, width, generator=g) < 0.8
    kept[:, 0] = True
    idx = torch.where(kept, idx, idx[:, :1])  # padding points at a kept id, as RowTargets has it
    labels = torch.randint(0, vocab, (rows,), generator=g)
    return x, idx, kept, labels


def _off_support_lse(x: torch.Tensor, idx: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    ref = x.double().scatter(1, idx, -torch.inf)
    return torch.where(kept.any(dim=1), torch.logsumexp(ref, dim=1), torch.logsumexp(x.double(), dim=1))


@pytest.mark.parametrize("vocab", [5, 16, 1000, 8200])
def test_statistics_equal_float64_in_both_tail_modes(fresh: None, vocab: int) -> None:
    x, idx, kept, labels = _rows(40, vocab, min(4, vocab))
    x[7, idx[7, 0]] = 60.0  # a confident row: r ~ e^-60, only the exact off-support sum keeps its digits
    kept[9], idx[9] = False, 0  # a row with no kept id
    lse, x_kept, z_label, aux = _native.kd_stats(x, idx, kept, labels, "bucket", RISKY)
    torch.testing.assert_close(lse.double(), torch.logsumexp(x.double(), dim=1), rtol=1e-6, atol=1e-5)
    assert torch.equal(x_kept, x.gather(1, idx)) and torch.equal(z_label, x[torch.arange(40), labels])
    want = _off_support_lse(x, idx, kept)
    torch.testing.assert_close(aux.double(), want, rtol=1e-6, atol=1e-4)
    assert bool(torch.isfinite(aux).all())  # 1 - sum_S q would have rounded row 7's mass to 0: log 0 = -inf
    assert float(aux[7]) < float(lse[7]) - 40  # r < e^-40
    *_, total = _native.kd_stats(x, idx, kept, labels, "spread", RISKY)
    torch.testing.assert_close(total.double(), x.double().sum(dim=1), rtol=1e-6, atol=1e-3)


def test_strided_rows_int32_ids_and_threads_give_the_same_bits(fresh: None) -> None:
    x, idx, kept, labels = _rows(64, 300, 6)
    wide = torch.cat([x, torch.full((64, 20), 1e4)], dim=1)  # padded vocabulary columns: never read
    one = _native.kd_stats(x, idx, kept, labels, "bucket", RISKY)
    strided = _native.kd_stats(wide[:, :300], idx.int(), kept, labels.int(), "bucket", RISKY)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        threaded = _native.kd_stats(x, idx, kept, labels, "bucket", RISKY)
    finally:
        torch.set_num_threads(before)
    for a, b, c in zip(one, strided, threaded, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    lse = one[0]
    coef, support, label = torch.rand(64), torch.randn(64, 6), -torch.rand(64)
    grads = []
    for threads in (1, 2):
        out = torch.empty_like(x)
        try:
            torch.set_num_threads(threads)
            _native.kd_grad(x, out, lse, coef, None, idx, kept, support, labels, label)
        finally:
            torch.set_num_threads(before)
        grads.append(out)
    assert torch.equal(grads[0], grads[1])


def test_non_finite_rows_follow_the_compiled_kernel(fresh: None) -> None:
    x, idx, kept, labels = _rows(4, 40, 3)
    x[0, 5] = float("nan")
    x[1, 6] = float("inf")
    x[2] = -torch.inf
    x[3, 7] = -torch.inf  # an ordinary row with one impossible token
    lse, *_ = _native.kd_stats(x, idx, kept, labels, "bucket", RISKY)
    assert torch.isnan(lse[0]) and lse[1] == torch.inf and lse[2] == -torch.inf
    torch.testing.assert_close(lse[3].double(), torch.logsumexp(x[3].double(), dim=0), rtol=1e-6, atol=1e-6)


def test_the_gradient_pass_writes_the_dense_part_then_the_kept_support_then_the_label(fresh: None) -> None:
    x, idx, kept, labels = _rows(30, 700, 8)
    labels[3] = idx[3, 0]  # a label on the support: the correction is added after the support is written
    lse = torch.logsumexp(x, dim=1)
    g = torch.Generator().manual_seed(5)
    coef, shift = torch.rand(30, 1, generator=g) + 0.5, torch.rand(30, 1, generator=g) * 1e-3
    support = torch.where(kept, torch.randn(30, 8, generator=g), 1e3)  # padding values are never written
    label = -torch.rand(30, 1, generator=g)
    wide = torch.full((30, 710), 7.0)
    _native.kd_grad(x, wide[:, :700], lse, coef, shift, idx, kept, support, labels, label)

    def want(shift: torch.Tensor) -> torch.Tensor:
        out = coef.double() * (x.double() - lse.double().unsqueeze(1)).exp() - shift.double()
        for r in range(30):
            out[r, idx[r][kept[r]]] = support[r][kept[r]].double()
            out[r, labels[r]] += float(label[r])
        return out

    torch.testing.assert_close(wide[:, :700].double(), want(shift), rtol=1e-5, atol=1e-6)
    assert bool((wide[:, 700:] == 7.0).all())
    same = x.clone()  # in place, as the head-fused path does
    _native.kd_grad(same, same, lse, coef, None, idx, kept, support, labels, label)
    torch.testing.assert_close(same.double(), want(torch.zeros(30, 1)), rtol=1e-5, atol=1e-6)


def test_ids_outside_the_vocabulary_never_reach_the_kernel(fresh: None) -> None:
    from mtkd_train.losses._fused_math import RowTargets

    x, idx, kept, labels = _rows(4, 50, 3)
    z = torch.zeros(4)
    rt = RowTargets(idx, z.expand(3, 4).t().contiguous(), kept, z, labels, z.bool(), z, z, z)
    assert native_stats(x, rt, "bucket") is not None
    assert native_stats(x[:, :40], rt._replace(labels=torch.full((4,), 45)), "bucket") is None
    negative = idx.clone()
    negative[2, 1] = -1
    assert native_stats(x, rt._replace(idx=negative), "bucket") is None
    assert native_stats(x.double(), rt, "bucket") is None  # and dtypes it does not take
    assert not _native.ids_in_range(10, torch.tensor([10])) and _native.ids_in_range(10, torch.empty(0))


def test_bad_inputs_are_refused_before_the_kernel_reads_them(fresh: None) -> None:
    x, idx, kept, labels = _rows(6, 50, 3)
    with pytest.raises(ValueError, match=r"^labels \(6 for 6 rows\) and ids must lie in \[0, 50\)$"):
        _native.kd_stats(x, idx + 50, kept, labels, "bucket", RISKY)
    with pytest.raises(ValueError, match=r"^idx \(1, 3\) and kept \(1, 3\) torch.bool must both be \(6, C\)"):
        _native.kd_stats(x, idx[:1], kept[:1], labels, "bucket", RISKY)
    with pytest.raises(ValueError, match=r"^labels \(2 for 6 rows\)"):
        _native.kd_stats(x, idx, kept, labels[:2], "bucket", RISKY)
    with pytest.raises(ValueError, match=r"^the KD kernel takes 2-D float32 CPU rows"):
        _native.kd_stats(x.t(), idx, kept, labels, "bucket", RISKY)
    lse = torch.zeros(6)
    with pytest.raises(ValueError, match=r"^support \(6, 2\) must have idx's shape \(6, 3\)$"):
        _native.kd_grad(x, x.clone(), lse, lse, None, idx, kept, torch.zeros(6, 2), labels, lse)
    with pytest.raises(ValueError, match=r"^coef has 5 values for 6 rows$"):
        _native.kd_grad(x, x.clone(), lse, lse[:5], None, idx, kept, torch.zeros(6, 3), labels, lse)
    with pytest.raises(ValueError, match=r"^out must be float32 CPU rows of x's shape \(6, 50\)"):
        _native.kd_grad(x, x[:3].clone(), lse, lse, None, idx, kept, torch.zeros(6, 3), labels, lse)


def _confident_case(gap: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logits gradient where the student gives every off-support token a logit `gap` below the
    support: off-support probabilities of e^-gap, below float32's normal range from gap ~87 on."""
    rows, vocab = 4, 1001
    z = torch.full((rows, vocab), -gap, dtype=torch.float64)
    z[:, 0] = 0.0
    z = z.to(dtype).requires_grad_(True)
    t = SparseTargets(torch.zeros(rows, 1, dtype=torch.int64), torch.full((rows, 1), math.log(0.9)),
                      torch.full((rows,), 0.1))
    loss = fused_kd_ce_loss(z, t, torch.zeros(rows, dtype=torch.int64), alpha=1.0,
                            kernels="native" if dtype == torch.float32 else "eager").loss
    return loss.detach().double(), torch.autograd.grad(loss, z)[0].double()


@pytest.mark.parametrize("gap", [40.0, 90.0, 95.0])
def test_a_very_confident_student_gets_the_float64_loss_and_gradient(fresh: None, gap: float) -> None:
    """The bucket term t log r with r ~ 1000 e^-gap, and its gradient -(t / r) q_v off the support."""
    loss, grad = _confident_case(gap, torch.float32)
    want_loss, want_grad = _confident_case(gap, torch.float64)
    assert bool(torch.isfinite(grad).all())
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-9)
    assert float(grad[0, 5]) < 0.0  # the bucket's pull on an off-support token is not flushed to 0


def test_zero_rows_and_labels_beyond_the_vocabulary_behave_as_on_the_torch_path(fresh: None) -> None:
    z = torch.zeros(0, 50, requires_grad=True)
    t = from_dense(torch.softmax(torch.randn(3, 50), dim=1), 4)
    empty = SparseTargets(t.indices[:0], t.logp[:0], t.tail[:0])
    for kernels in ("native", "eager"):
        out = fused_kd_ce_loss(z, empty, torch.zeros(0, dtype=torch.int64), alpha=0.5, kernels=kernels)
        assert float(out.loss.detach()) == 0.0 and torch.autograd.grad(out.loss, z)[0].shape == (0, 50)
    wide = torch.randn(3, 60, requires_grad=True)
    labels = torch.tensor([1, 55, 2])  # 55 is a padded column: never handed to the kernel
    errors = []
    for kernels in ("native", "eager"):
        with pytest.raises(RuntimeError) as err:
            out = fused_kd_ce_loss(wide, t, labels, alpha=0.5, vocab_size=50, kernels=kernels)
            torch.autograd.grad(out.loss, wide)
        errors.append(type(err.value))
    assert errors[0] is errors[1]


def _loss(kernels: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(12, 50, generator=g) * 4).requires_grad_(True)
    t = from_dense(torch.softmax(torch.randn(12, 50, generator=g), dim=1), 8)
    loss = fused_kd_ce_loss(z, t, torch.arange(12) % 50, alpha=0.5, kernels=kernels).loss
    return loss.detach(), torch.autograd.grad(loss, z)[0]


def test_auto_takes_the_kernel_on_the_cpu_and_it_agrees_with_eager(fresh: None) -> None:
    assert resolve_kernels("auto", CPU) == "native" and resolve_kernels("native", CPU) == "native"
    (l_n, g_n), (l_e, g_e) = _loss("native"), _loss("eager")
    torch.testing.assert_close(l_n, l_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_n, g_e, rtol=1e-5, atol=1e-7)


def test_mtkd_native_0_leaves_auto_to_torch_compile_and_makes_native_an_error(
        fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTKD_NATIVE", "0")
    assert resolve_kernels("auto", CPU) != "native"
    with pytest.raises(LossConfigError, match=r"^kernels='native' but the C\+\+ KD kernel is not usable for cpu "
                                              r"logits \(MTKD_NATIVE=0\); use kernels='auto' or 'compiled'$"):
        _loss("native")


def test_a_kernel_that_gets_wrong_answers_is_refused_with_one_warning(
        fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    real = _native._stats_call

    def off(*args: object) -> tuple[torch.Tensor, ...]:
        lse, x_kept, z_label, aux = real(*args)  # type: ignore[arg-type]
        return lse + 1e-3, x_kept, z_label, aux

    monkeypatch.setattr(_native, "_stats_call", off)
    with pytest.warns(UserWarning, match=r"the compiled KD loss kernel is not used \(the compiled KD kernel "
                                         r"disagrees with torch on its self-check \(long rows\)\)"):
        assert not _native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert resolve_kernels("auto", CPU) != "native"
    monkeypatch.setattr(_native, "_STATE", {})
    monkeypatch.setenv("MTKD_NATIVE", "1")
    with pytest.raises(RuntimeError, match=r"^MTKD_NATIVE=1 but the KD loss kernel is unusable: "):
        _native.available()
