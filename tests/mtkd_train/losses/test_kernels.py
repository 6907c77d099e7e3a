"""The fused loss's row kernels: compiled against float64, the choice and its fallback.

The fused losses themselves run every test eager and compiled (tests/helpers/kernels.py).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from mtkd_train.config import ConfigError, TrainConfig
from mtkd_train.losses import LossConfigError, _native, fused_kd_ce_loss
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
    monkeypatch.setattr(_native, "_STATE", {})  # and no C++ kernel either, so auto has only these two
    monkeypatch.setenv("MTKD_NATIVE", "0")


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
    with pytest.raises(LossConfigError, match=r"kernels='fast' is not one of auto, native, compiled, eager"):
        _loss("fast")
    monkeypatch.setenv("MTKD_KERNELS", "triton")
    with pytest.raises(LossConfigError, match=r"environment variable MTKD_KERNELS='triton' is not one of"):
        _loss(None)
    with pytest.raises(ConfigError, match=r"kernels.*'fast'; expected auto, native, compiled or eager"):
        TrainConfig(cache="c", teachers=("t",), student="s", out="o", kernels="fast")


def test_compiled_and_eager_agree_and_the_choice_is_not_part_of_the_run_fingerprint() -> None:
    (l_c, g_c), (l_e, g_e) = _loss("compiled"), _loss("eager")
    torch.testing.assert_close(l_c, l_e, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-7)
    base = dict(cache="c", teachers=("t",), student="s", out="o")
    assert TrainConfig(**base, kernels="eager").fingerprint() == TrainConfig(**base).fingerprint()  # type: ignore[arg-type]


def test_a_variant_that_fails_to_compile_after_the_probe_runs_eagerly_after_one_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real_compile = torch.compile

    def picky_compile(fn, **kw):  # type: ignore[no-untyped-def]  # "Triton without bf16": bf16 inputs fail
        compiled = real_compile(fn, **kw)

        def run(*args):  # type: ignore[no-untyped-def]
            if any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
                raise RuntimeError("triton: bf16 is not supported on this GPU")
            return compiled(*args)
        return run

    monkeypatch.setattr(kernels.torch, "compile", picky_compile)
    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "_FAILED", {"cpu": None})  # the device's probe passed
    monkeypatch.setattr(kernels, "_WARNED", set())
    z = _logits(12, 50).to(torch.bfloat16).requires_grad_(True)
    t = from_dense(torch.softmax(_logits(12, 50) / 2, dim=1), 8)
    labels = torch.arange(12) % 50
    with pytest.warns(RuntimeWarning, match=r"fails for the fused loss's stats kernel .*bf16 is not supported"):
        loss = fused_kd_ce_loss(z, t, labels, alpha=0.5, kernels="compiled").loss
        grad = torch.autograd.grad(loss, z)[0]
    want = fused_kd_ce_loss(z, t, labels, alpha=0.5, kernels="eager").loss
    torch.testing.assert_close(loss, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad, torch.autograd.grad(want, z)[0], rtol=1e-2, atol=1e-3)
    assert ("stats", "cpu", torch.bfloat16, torch.float32, False) in kernels._FAILED
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per kernel variant
        fused_kd_ce_loss(z, t, labels, alpha=0.5, kernels="compiled")


def test_a_bad_choice_is_refused_at_any_temperature() -> None:
    z, t = _logits(4, 10), from_dense(torch.softmax(_logits(4, 10), dim=1), 3)
    with pytest.raises(LossConfigError, match="kernels='fast'"):
        fused_kd_ce_loss(z, t, torch.zeros(4, dtype=torch.long), alpha=0.5, temperature=2.0, kernels="fast")


_PEAK = '''
import sys, torch
from mtkd_train.losses import fused_kd_ce_loss
from mtkd_train.targets import SparseTargets
torch.set_num_threads(1)
p, v, k = 2048, 16000, 64
z = torch.randn(p, v).mul_(0.5)
z[:, :k] += 25.0  # the student keeps ~all its mass on the target's support: every row is "risky"
z = z.to(torch.bfloat16).requires_grad_(True)
idx = torch.arange(k).expand(p, k).contiguous()
t = SparseTargets(idx, torch.log_softmax(torch.randn(p, k), dim=1) + torch.log(torch.tensor(0.95)),
                  torch.full((p,), 0.05))
labels = torch.zeros(p, dtype=torch.long)
def step():
    return torch.autograd.grad(fused_kd_ce_loss(z, t, labels, alpha=0.5, kernels=sys.argv[1]).loss, z)
step()  # compiles (compiling is not measured) and leaves the heap warm
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
step()
print(status("VmHWM") - base)
'''


@pytest.mark.parametrize("choice", ["eager", "compiled"])
def test_a_confident_bf16_student_costs_no_float32_copy_of_its_logits(choice: str, tmp_path: Path) -> None:
    """Every row risky (exact off-support sums) and a bf16 gradient (scatters): memory stays chunk-sized."""
    import subprocess
    import sys

    script = tmp_path / "peak.py"
    script.write_text(_PEAK)
    out = subprocess.run([sys.executable, str(script), choice], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak = int(out.stdout.strip().splitlines()[-1])
    logits = 2048 * 16000 * 2  # bytes of the bf16 logits; their gradient is as large, a float32 copy twice that
    # measured here: ~80-110 MiB on the final code (the gradient + chunk-sized temporaries), 375 MiB before it
    assert peak < 2.5 * logits, f"peak {peak / 2**20:.0f} MiB for {logits / 2**20:.0f} MiB of bf16 logits"
