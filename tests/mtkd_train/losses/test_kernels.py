"""The fused loss's row kernels: compiled against float64, the choice and its fallback.

The fused losses themselves run every test eager and compiled (tests/helpers/kernels.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mtkd_train.config import ConfigError, TrainConfig
from mtkd_train.losses import LossConfigError, fused_kd_ce_loss
from mtkd_train.losses import _kernels as kernels
from mtkd_train.targets import from_dense


def _logits(rows: int, vocab: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(rows, vocab, generator=g) * 4).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_row_stats_equal_float64_log_sum_exp_and_sum(dtype: torch.dtype) -> None:
    x = _logits(37, 1000, dtype)
    x[3] = -torch.inf  # a row with no mass: lse -inf, not NaN
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    lse, total = kernels.row_stats(x, cd, True)
    assert lse.dtype == cd and total is not None and total.dtype == cd
    ref = torch.logsumexp(x.double(), dim=1)
    assert lse[3] == -torch.inf
    keep = torch.arange(37) != 3
    torch.testing.assert_close(lse[keep].double(), ref[keep], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(total[keep].double(), x.double()[keep].sum(dim=1), rtol=1e-5, atol=1e-3)
    assert kernels.row_stats(x, cd, False)[1] is None


def test_scaled_exp_writes_in_place_into_strided_views_and_casts_on_store() -> None:
    x = _logits(20, 300)
    lse = torch.logsumexp(x, dim=1)
    coef, shift = torch.linspace(-2, 3, 20).unsqueeze(1), torch.full((20, 1), 1e-3)
    ref = coef.double() * torch.softmax(x.double(), dim=1) - shift.double()
    wide = torch.full((20, 310), 7.0)  # a padded gradient: columns >= 300 must stay untouched
    kernels.scaled_exp_(wide[:, :300], x, lse, coef, shift)
    torch.testing.assert_close(wide[:, :300].double(), ref, rtol=1e-5, atol=1e-7)
    assert bool((wide[:, 300:] == 7.0).all())
    same = x.clone()  # out is x (the head-fused path overwrites its logits chunk)
    kernels.scaled_exp_(same, same, lse, coef, None)
    torch.testing.assert_close(same.double(), ref + shift.double(), rtol=1e-5, atol=1e-7)
    half = torch.empty(20, 300, dtype=torch.bfloat16)
    kernels.scaled_exp_(half, x, lse, coef, shift)
    torch.testing.assert_close(half.double(), ref, rtol=1e-2, atol=1e-4)


def _loss(kernels_choice: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    z = _logits(12, 50).requires_grad_(True)
    t = from_dense(torch.softmax(_logits(12, 50) / 2, dim=1), 8)
    labels = torch.arange(12) % 50
    opts = {} if kernels_choice is None else {"kernels": kernels_choice}
    loss = fused_kd_ce_loss(z, t, labels, alpha=0.5, **opts).loss
    return loss.detach(), torch.autograd.grad(loss, z)[0]


@pytest.fixture
def broken_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile "fails" on this device for the rest of the test (the real probe is bypassed)."""
    def fail(device: torch.device) -> None:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nsecond line")
    monkeypatch.setattr(kernels, "_probe", fail)
    monkeypatch.setattr(kernels, "_FAILED", {})
    monkeypatch.setattr(kernels, "_WARNED", set())


def test_auto_falls_back_to_eager_with_one_warning_when_compiling_fails(broken_compiler: None,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MTKD_KERNELS", raising=False)
    want = _loss("eager")
    with pytest.warns(RuntimeWarning, match=r"torch.compile fails on cpu \(InvalidCxxCompiler.*MTKD_KERNELS=eager"):
        got = _loss(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process and device, not per call
        again = _loss("auto")
    for a, b in ((got, want), (again, want)):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_compiled_where_compiling_fails_is_an_error_that_names_the_fallback(broken_compiler: None) -> None:
    with pytest.raises(LossConfigError, match=r"kernels='compiled' but torch.compile fails on cpu: "
                                              r"InvalidCxxCompiler.*found; .*kernels='eager'"):
        _loss("compiled")


def test_unknown_choices_are_refused_naming_where_they_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LossConfigError, match=r"kernels='fast' is not one of auto, compiled, eager"):
        _loss("fast")
    monkeypatch.setenv("MTKD_KERNELS", "triton")
    with pytest.raises(LossConfigError, match=r"environment variable MTKD_KERNELS='triton' is not one of"):
        _loss(None)
    with pytest.raises(ConfigError, match=r"kernels.*'fast'; expected auto, compiled or eager"):
        TrainConfig(cache="c", teachers=("t",), student="s", out="o", kernels="fast")


def test_compiled_and_eager_agree_and_the_choice_is_not_part_of_the_run_fingerprint() -> None:
    (l_c, g_c), (l_e, g_e) = _loss("compiled"), _loss("eager")
    torch.testing.assert_close(l_c, l_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-7)
    base = dict(cache="c", teachers=("t",), student="s", out="o")
    assert TrainConfig(**base, kernels="eager").fingerprint() == TrainConfig(**base).fingerprint()  # type: ignore[arg-type]
