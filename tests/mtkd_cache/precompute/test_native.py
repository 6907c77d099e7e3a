"""The compiled top-k kernel (`mtkd_cache.precompute.native`): its results, its build, its fallbacks."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

from mtkd_cache.precompute import extract, native

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler to build the kernel")


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A process state with no kernel loaded yet, building into a private folder."""
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("MTKD_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.delenv("MTKD_NATIVE", raising=False)
    return tmp_path / "kernels"


def _reference(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log-softmax of (n, V) rows and their k-th largest values (n, 1)."""
    return torch.log_softmax(x.double(), dim=-1), torch.topk(x, k, dim=-1).values[:, -1:]


@pytest.mark.parametrize(("vocab", "k"), [(1, 1), (7, 7), (100, 5), (5003, 64), (49_152, 1), (49_152, 64),
                                          (49_152, 200), (16 * 64 * 3 + 5, 64)])
def test_the_kernel_matches_a_float64_softmax(vocab: int, k: int) -> None:
    gen = torch.Generator().manual_seed(vocab + k)
    x = torch.randn(5, vocab, generator=gen) * 4
    x[:, : min(vocab, 30)] += 6  # a peaked head, as language models have
    out = native.topk_rows(x, k)
    assert out is not None
    idx, logp, tail, entropy, top1, finite = out
    ref, kth = _reference(x, k)
    assert finite.all()
    assert idx.shape == (5, k) and bool((idx[:, 1:] > idx[:, :-1]).all())  # sorted ascending, unique
    assert bool((x.gather(1, idx) >= kth).all())  # a top-k (up to ties)
    torch.testing.assert_close(logp.double(), ref.gather(1, idx), rtol=0, atol=2e-5)
    p = ref.exp()
    kept = torch.zeros_like(x, dtype=torch.bool).scatter_(1, idx, True)
    rest = torch.where(kept, 0.0, p).sum(-1)  # summed from the non-kept entries, as the kernel does
    torch.testing.assert_close(tail.double(), rest, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(entropy.double(), -(p * ref).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(top1.double(), p.amax(-1), rtol=1e-6, atol=0)


def test_a_tiny_tail_keeps_its_relative_precision() -> None:
    x = torch.full((2, 49_152), -30.0)
    x[:, 100:164] = 0.0  # the kept 64 hold all but ~49,088 e^-30 ≈ 4.6e-9 of the mass
    idx, _, tail, *_ = native.topk_rows(x, 64) or ()
    assert torch.equal(idx[0], torch.arange(100, 164))
    want = 49_088 * torch.tensor(-30.0).double().exp() / (64 + 49_088 * torch.tensor(-30.0).double().exp())
    torch.testing.assert_close(tail.double(), want.expand(2), rtol=1e-5, atol=0)


def test_ties_keep_k_distinct_columns_of_the_tied_value() -> None:
    x = torch.zeros(3, 49_152)
    x[1, 7] = 1.0
    idx, logp, tail, entropy, top1, finite = native.topk_rows(x, 64) or ()
    assert finite.all() and all(r.unique().numel() == 64 for r in idx)
    assert 7 in idx[1].tolist()
    torch.testing.assert_close(tail[0], torch.tensor(1 - 64 / 49_152), rtol=1e-6, atol=0)
    torch.testing.assert_close(entropy[0], torch.tensor(49_152.0).log(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(("vocab", "value", "where"), itertools.product(
    [100, 49_152, 16 * 64 * 3 + 5], [float("nan"), float("inf"), float("-inf")], ["first", "middle", "last"]))
def test_non_finite_rows_are_flagged_exactly(vocab: int, value: float, where: str) -> None:
    x = torch.randn(3, vocab)
    x[1, {"first": 0, "middle": vocab // 2, "last": vocab - 1}[where]] = value
    *_, finite = native.topk_rows(x, 8) or ()
    assert finite.tolist() == [True, False, True]


def test_half_precision_and_temperature_go_through_float32_blocks(topk_kernel: str) -> None:
    x = (torch.randn(2, 3, 49_152) * 3).to(torch.bfloat16)
    bad, (idx, logp, tail, entropy, top1) = extract.topk_targets_checked(x, 64, temperature=0.7)
    assert not bad.any()
    ref, kth = _reference(x.float().reshape(6, -1) / 0.7, 64)
    flat_idx = idx.reshape(6, 64)
    assert bool(((x.float().reshape(6, -1) / 0.7).gather(1, flat_idx) >= kth).all())
    torch.testing.assert_close(logp.reshape(6, 64).double(), ref.gather(1, flat_idx), rtol=0, atol=2e-5)


def test_strided_rows_are_read_in_place() -> None:
    wide = torch.randn(4, 6000)
    view = wide[:, :5003]  # a padded head: rows 6000 apart
    assert native.topk_rows(view, 16) is not None
    torch.testing.assert_close(native.topk_rows(view, 16)[1], native.topk_rows(view.contiguous(), 16)[1])


def test_the_library_is_built_once_and_reused(fresh: Path) -> None:
    assert native.available()
    built = list(fresh.glob("topk_rows-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native._STATE.clear()
    assert native.available()
    assert [p.stat().st_mtime_ns for p in fresh.glob("topk_rows-*.so")] == [stamp]
    assert not list(fresh.glob(native.BUILD_PREFIX + "*"))  # the build folder is gone


def test_a_killed_builds_folder_is_swept_and_nothing_else(fresh: Path) -> None:
    """SIGKILL during a build leaves its folder; the next build deletes it once it is stale, and only folders it
    names itself (MTKD_KERNEL_DIR may be shared)."""
    fresh.mkdir(parents=True)
    stale, live = fresh / (native.BUILD_PREFIX + "old"), fresh / (native.BUILD_PREFIX + "live")
    foreign = fresh / "tmpabc"  # someone else's folder, however old
    for folder in (stale, live, foreign):
        folder.mkdir()
        (folder / "topk_rows-x.so").write_bytes(b"half a library")
    old = native.time.time() - native.STALE_BUILD_SECONDS - 60
    for folder in (stale, foreign):
        os.utime(folder, (old, old))
    assert native.available()
    assert not stale.exists() and live.is_dir() and (foreign / "topk_rows-x.so").exists()


def test_mtkd_native_0_never_builds(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTKD_NATIVE", "0")
    assert not native.available()
    assert native.topk_rows(torch.randn(2, 100), 4) is None
    assert not fresh.exists()


def test_a_broken_compiler_falls_back_with_a_warning(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "/bin/false")
    with pytest.warns(UserWarning, match="the compiled top-k kernel is not used .*MTKD_NATIVE=0"):
        assert not native.available()
    x = torch.randn(1, 2, 5000)  # the torch path answers instead
    assert extract.topk_targets(x, 4)[0].shape == (1, 2, 4)


def test_a_broken_compiler_is_an_error_when_the_kernel_is_required(fresh: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "/bin/false")
    monkeypatch.setenv("MTKD_NATIVE", "1")
    with pytest.raises(RuntimeError, match="MTKD_NATIVE=1 but the top-k kernel is unusable: /bin/false could not"):
        native.available()


def test_an_unknown_mode_names_the_choices(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTKD_NATIVE", "yes")
    with pytest.raises(ValueError, match=r"^MTKD_NATIVE='yes' is not a choice; set it to auto, 1 .* or 0"):
        native.available()


def test_a_library_that_gets_wrong_answers_is_refused(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_call = native._call

    def off_by_a_little(lib: object, x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        out = list(real_call(lib, x, k))  # type: ignore[arg-type]
        out[2] = out[2] + 1e-3  # the tail
        return tuple(out)

    monkeypatch.setattr(native, "_call", off_by_a_little)
    with pytest.warns(UserWarning, match="disagrees with torch on its self-check"):
        assert not native.available()


def test_a_library_wrong_only_on_long_rows_is_refused(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_call = native._call

    def off_on_long_rows(lib: object, x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        out = list(real_call(lib, x, k))  # type: ignore[arg-type]
        if x.shape[1] > 10_000:  # the pruned path real vocabularies take
            out[1] = out[1] + 1e-3  # the log-probabilities
        return tuple(out)

    monkeypatch.setattr(native, "_call", off_on_long_rows)
    with pytest.warns(UserWarning, match="disagrees with torch on its self-check"):
        assert not native.available()


def test_a_foreign_library_at_the_kernels_name_falls_back(fresh: Path, tmp_path: Path) -> None:
    import subprocess

    compiler = native._compiler()
    assert compiler is not None
    built = native._build(compiler)  # the kernel's name, built but not loaded (a loaded path stays cached)
    src = tmp_path / "other.cpp"
    src.write_text('extern "C" int other() { return 1; }\n')
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(built), str(src)], check=True)
    with pytest.warns(UserWarning, match="the compiled top-k kernel is not used .*mtkd_topk_rows_version"):
        assert not native.available()


@pytest.mark.parametrize("which", ["folder", "library"])
def test_a_kernel_others_can_write_is_not_loaded(fresh: Path, which: str) -> None:
    assert native.available()
    (built,) = fresh.glob("topk_rows-*.so")
    (fresh if which == "folder" else built).chmod(0o777)
    native._STATE.clear()
    with pytest.warns(UserWarning, match="writable by others, so the kernel there is not loaded; point MTKD_KERNEL_DIR"):
        assert not native.available()


def test_k_outside_1_to_v_is_refused() -> None:
    with pytest.raises(ValueError, match="top-k of 0 from rows of 50: k must be in 1..V"):
        native.topk_rows(torch.randn(2, 50), 0)
    with pytest.raises(ValueError, match="k must be in 1..V"):
        native.topk_rows(torch.randn(2, 50), 51)


@pytest.mark.parametrize(("dtype", "temperature"), [(torch.bfloat16, 1.0), (torch.float32, 0.5)])
def test_no_rows_give_empty_targets(topk_kernel: str, dtype: torch.dtype, temperature: float) -> None:
    idx, logp, tail = extract.topk_targets(torch.empty(2, 0, 100, dtype=dtype), 4, temperature)
    assert idx.shape == logp.shape == (2, 0, 4) and tail.shape == (2, 0)


def test_cxx_may_carry_a_wrapper(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    compiler = native._compiler()
    env = shutil.which("env")
    if env is None or compiler is None:
        pytest.skip("no env(1) to wrap the compiler with")
    monkeypatch.setenv("CXX", f"{env} LC_ALL=C {compiler}")  # a command with arguments, as "ccache g++"
    assert native.available()
