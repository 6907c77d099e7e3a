"""The fused objective's two dense passes at ``T = 1`` as a compiled CPU kernel (``csrc/kd_rows.cpp``).

On float32 CPU logits the kernel replaces the Inductor row loops of :mod:`._kernels` and the gathers and
scatters around them: one call reads each row for its log-sum-exp, the logits at the support's ids and the
label, and the off-support mass; one call writes each row's gradient with the support's values and the
label's correction while the row is in cache. At V = 8,192 (the whole ``(P, V)`` logits in L3) those
gathers and scatters cost as much as the loops (``benchmarks/README.md``, session 16).

It is built and loaded by the precompute kernel's builder (:mod:`mtkd_cache.precompute.native`: the system
C++ compiler, a private kernel folder, a library name made of the source, the compiler and the CPU), and
checked against the torch path on random rows before first use; a library that disagrees is not used.
``MTKD_NATIVE`` governs both kernels: ``auto`` (use when it builds and passes), ``1`` (required), ``0``
(never built). The fused loss's ``kernels`` option picks it (``"native"``, or ``"auto"`` on the CPU).
"""

from __future__ import annotations

import ctypes
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from mtkd_cache.precompute import native as builder

__all__ = ["applies", "available", "ids_in_range", "kd_grad", "kd_stats", "unavailable_reason"]

SOURCE = Path(__file__).with_name("csrc") / "kd_rows.cpp"
ABI_VERSION = 2
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _load(path: Path) -> ctypes.CDLL:
    builder._check_owned(path)
    lib = ctypes.CDLL(str(path))
    if lib.mtkd_kd_rows_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has kernel version {lib.mtkd_kd_rows_version()}, expected {ABI_VERSION}; "
                           f"delete it and it is rebuilt")
    p, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    lib.mtkd_kd_stats.argtypes = [p, i64, i64, i64, p, p, i64, p, i64, f64, p, p, p, p, i64]
    lib.mtkd_kd_stats.restype = ctypes.c_int
    lib.mtkd_kd_grad.argtypes = [p, i64, p, i64, i64, i64, p, p, p, p, p, i64, p, p, p, i64]
    lib.mtkd_kd_grad.restype = ctypes.c_int
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(x: torch.Tensor, idx: torch.Tensor, kept: torch.Tensor, labels: torch.Tensor, per_row: dict[str, torch.Tensor],
           per_entry: dict[str, torch.Tensor], ids_checked: bool) -> None:
    """The kernel reads and writes raw pointers: refuse any input it would read out of bounds."""
    if not applies(x):
        raise ValueError(f"the KD kernel takes 2-D float32 CPU rows with unit column stride, got {tuple(x.shape)} "
                         f"{x.dtype} on {x.device} with strides {x.stride()}")
    rows, vocab = x.shape
    if idx.ndim != 2 or idx.shape[0] != rows or tuple(kept.shape) != tuple(idx.shape) or kept.dtype != torch.bool:
        raise ValueError(f"idx {tuple(idx.shape)} and kept {tuple(kept.shape)} {kept.dtype} must both be "
                         f"({rows}, C), kept bool")
    for name, t in per_row.items():
        if t.numel() != rows:
            raise ValueError(f"{name} has {t.numel()} values for {rows} rows")
    for name, t in per_entry.items():
        if tuple(t.shape) != tuple(idx.shape):
            raise ValueError(f"{name} {tuple(t.shape)} must have idx's shape {tuple(idx.shape)}")
    if labels.numel() != rows or not (ids_checked or ids_in_range(vocab, idx, labels)):
        raise ValueError(f"labels ({labels.numel()} for {rows} rows) and ids must lie in [0, {vocab})")


def _run(fn: object, *args: object) -> None:
    if fn(*args) != 0:  # type: ignore[operator]
        raise RuntimeError("the compiled KD kernel failed (out of memory?); MTKD_NATIVE=0 runs the torch kernels")


def _stats_call(lib: ctypes.CDLL, x: torch.Tensor, idx: torch.Tensor, kept: torch.Tensor, labels: torch.Tensor,
                mode: str, risky: float) -> tuple[torch.Tensor, ...]:
    rows, vocab = x.shape
    width = idx.shape[1]
    idx, labels = idx.to(torch.int64).contiguous(), labels.to(torch.int64).contiguous()
    kept8 = kept.contiguous().view(torch.uint8)
    lse, z_label, aux = (torch.empty(rows, dtype=torch.float32) for _ in range(3))
    x_kept = torch.empty(rows, width, dtype=torch.float32)
    if rows:
        _run(lib.mtkd_kd_stats, x.data_ptr(), rows, vocab, x.stride(0), idx.data_ptr(), kept8.data_ptr(), width,
             labels.data_ptr(), 0 if mode == "bucket" else 1, risky, lse.data_ptr(), x_kept.data_ptr(),
             z_label.data_ptr(), aux.data_ptr(), torch.get_num_threads())
    return lse, x_kept, z_label, aux


def _grad_call(lib: ctypes.CDLL, x: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
               shift: torch.Tensor | None, idx: torch.Tensor, kept: torch.Tensor, support: torch.Tensor,
               labels: torch.Tensor, label_value: torch.Tensor) -> None:
    rows, vocab = x.shape
    if not rows:
        return
    f32 = [t.to(torch.float32).contiguous() for t in (lse, coef, support, label_value)]
    shift32 = None if shift is None else shift.to(torch.float32).contiguous()
    kept8 = kept.contiguous().view(torch.uint8)
    idx, labels = idx.to(torch.int64).contiguous(), labels.to(torch.int64).contiguous()
    _run(lib.mtkd_kd_grad, x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), rows, vocab, f32[0].data_ptr(),
         f32[1].data_ptr(), _ptr(shift32), idx.data_ptr(), kept8.data_ptr(), idx.shape[1], f32[2].data_ptr(),
         labels.data_ptr(), f32[3].data_ptr(), torch.get_num_threads())


def _self_check(lib: ctypes.CDLL) -> None:
    """Compare the library with float64 torch on random rows (both tail modes, a confident row whose
    off-support mass needs the exact sum, one whose off-support probabilities are all below float32's
    normal range, a row with no kept id, an odd vocabulary, and long rows whose sums span many 256-logit
    blocks); raise on disagreement."""
    gen = torch.Generator().manual_seed(0)
    long = torch.randn(3, 20_011, generator=gen) * 3
    ids = torch.stack([torch.randperm(20_011, generator=gen)[:64] for _ in range(3)])
    long[1, ids[1]] += 30.0  # confident: the exact off-support pass over a long row
    yes = torch.ones(3, 64, dtype=torch.bool)
    lse, _, _, aux = _stats_call(lib, long, ids, yes, ids[:, 0], "bucket", 1e-2)
    want = torch.logsumexp(long.double().scatter(1, ids, -torch.inf), dim=1)
    if not (torch.allclose(lse.double(), torch.logsumexp(long.double(), dim=1), atol=1e-5)
            and torch.allclose(aux.double(), want, atol=1e-4, rtol=1e-5)):
        raise RuntimeError("the compiled KD kernel disagrees with torch on its self-check (long rows)")
    rows, vocab, width = 24, 1003, 9
    x = torch.randn(rows, vocab, generator=gen) * 3
    idx = torch.stack([torch.randperm(vocab, generator=gen)[:width] for _ in range(rows)])
    kept = torch.ones(rows, width, dtype=torch.bool)
    kept[3, 5:] = False
    idx[3, 5:] = idx[3, 0]  # padding points at a kept id
    kept[4] = False
    idx[4] = 0
    x[5, idx[5, 0]] = 40.0  # confident: r ~ 1e-16, the exact off-support sum
    x[6] = -95.0  # very confident: every off-support q below float32's smallest normal (e^-87.3)
    x[6, idx[6]] = 0.0
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    ref = x.double()
    lse_ref = torch.logsumexp(ref, dim=1)
    for mode in ("bucket", "spread"):
        lse, x_kept, z_label, aux = _stats_call(lib, x, idx, kept, labels, mode, 1e-2)  # _fused_math's threshold
        ok = torch.allclose(lse.double(), lse_ref, atol=1e-5) and torch.equal(x_kept, x.gather(1, idx))
        ok = ok and torch.equal(z_label, x.gather(1, labels.unsqueeze(1)).squeeze(1))
        if mode == "bucket":
            off = ref.scatter(1, idx, -torch.inf)
            want = torch.where(kept.any(dim=1), torch.logsumexp(off, dim=1), lse_ref)
        else:
            want = ref.sum(dim=1)
        ok = ok and torch.allclose(aux.double(), want, atol=1e-4, rtol=1e-5)
        if not ok:
            raise RuntimeError(f"the compiled KD kernel disagrees with torch on its self-check ({mode} statistics)")
    coef = torch.rand(rows, generator=gen) + 0.5
    coef[6] = -1e38  # a huge t / r meets a tiny q: neither may become 0 or inf first
    shift = torch.rand(rows, generator=gen) * 1e-3
    support = torch.randn(rows, width, generator=gen)
    support[~kept] = 1e3  # padding values are never written
    label_value = -torch.rand(rows, generator=gen)
    out = torch.empty_like(x)
    _grad_call(lib, x, out, lse_ref.float(), coef, shift, idx, kept, support, labels, label_value)
    want = coef.double().unsqueeze(1) * (ref - lse_ref.unsqueeze(1)).exp() - shift.double().unsqueeze(1)
    for r in range(rows):
        want[r, idx[r][kept[r]]] = support[r][kept[r]].double()
    want[torch.arange(rows), labels] += label_value.double()
    off = torch.ones(vocab, dtype=torch.bool)
    off[idx[6]] = False
    off[labels[6]] = False
    if not (torch.allclose(out.double(), want, atol=1e-6, rtol=1e-5)
            and torch.allclose(out[6, off].double(), want[6, off], atol=0, rtol=1e-4)):
        raise RuntimeError("the compiled KD kernel disagrees with torch on its self-check (gradient)")


def _library() -> ctypes.CDLL | None:
    """The checked library, or None; built, checked and warned about once per process."""
    with _LOCK:
        if "lib" in _STATE:
            return _STATE["lib"]  # type: ignore[return-value]
        mode = builder._mode()
        lib: ctypes.CDLL | None = None
        reason = "MTKD_NATIVE=0"
        if mode != "0":
            try:
                compiler = builder._compiler()
                if compiler is None:
                    raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
                lib = _load(builder._build(compiler, SOURCE))
                _self_check(lib)
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as err:
                if mode == "1":
                    raise RuntimeError(f"MTKD_NATIVE=1 but the KD loss kernel is unusable: {err}") from err
                reason = str(err)
                lib = None
        _STATE["lib"] = lib  # before any warning: warnings-as-errors must not leave it unset (a rebuild per call)
        _STATE["reason"] = None if lib is not None else reason
        if lib is None and mode != "0":
            warnings.warn(f"mtkd: the compiled KD loss kernel is not used ({reason}); the fused loss runs the torch "
                          f"kernels on the CPU (compiled where torch.compile works). Set MTKD_NATIVE=0 to silence "
                          f"this.", stacklevel=3)
        return lib


def available() -> bool:
    """Whether the kernel is in use in this process (building and checking it on first call)."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (after it was called), else None."""
    _library()
    return _STATE.get("reason")  # type: ignore[return-value]


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can take these ``(rows, V)`` tensors: float32, on the CPU, unit column stride."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.ndim == 2 and t.stride(1) == 1
               for t in tensors)


def ids_in_range(vocab: int, *ids: torch.Tensor) -> bool:
    """Whether every id lies in ``[0, vocab)``: the kernel indexes rows with them unchecked, so the callers
    leave anything else to the torch path (which raises, or reads the padded columns, as it always did)."""
    for t in ids:
        if t.numel():
            lo, hi = torch.aminmax(t)
            if int(lo) < 0 or int(hi) >= vocab:
                return False
    return True


def kd_stats(x: torch.Tensor, idx: torch.Tensor, kept: torch.Tensor, labels: torch.Tensor, mode: str,
             risky: float, *, ids_checked: bool = False) -> tuple[torch.Tensor, ...]:
    """``(lse, x_kept, z_label, aux)`` of float32 CPU rows ``x`` (see ``csrc/kd_rows.cpp``).

    ``idx`` / ``kept``: ``(rows, C)`` support ids in ``[0, V)`` and bool flags; ``labels``: ``(rows,)`` ids in
    ``[0, V)``; ``aux``: the log off-support mass (bucket; summed exactly where ``1 - sum_S q < risky``) or the
    row sum (spread). ``ids_checked``: the caller has seen :func:`ids_in_range` hold for these ids.

    Raises:
        ValueError: inputs the kernel would read out of bounds (shapes, dtypes, ids outside ``[0, V)``).
        RuntimeError: the kernel is not available, or failed.
    """
    _check(x, idx, kept, labels, {}, {}, ids_checked)
    return _stats_call(_checked_library(), x, idx, kept, labels, mode, risky)


def kd_grad(x: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor, shift: torch.Tensor | None,
            idx: torch.Tensor, kept: torch.Tensor, support: torch.Tensor, labels: torch.Tensor,
            label_value: torch.Tensor, *, ids_checked: bool = False) -> None:
    """``out := coef * exp(x - lse) - shift``, the support's values written at the ``kept`` entries of ``idx``,
    ``label_value`` added at ``labels``; float32 CPU rows, ``out`` may be ``x``; ``ids_checked`` as for
    :func:`kd_stats`.

    Raises:
        ValueError: inputs the kernel would read or write out of bounds.
        RuntimeError: the kernel is not available, or failed.
    """
    per_row = {"lse": lse, "coef": coef, "label_value": label_value, **({} if shift is None else {"shift": shift})}
    _check(x, idx, kept, labels, per_row, {"support": support}, ids_checked)
    if not applies(out) or out.shape != x.shape:
        raise ValueError(f"out must be float32 CPU rows of x's shape {tuple(x.shape)}, got {tuple(out.shape)} "
                         f"{out.dtype} with strides {out.stride()}")
    _grad_call(_checked_library(), x, out, lse, coef, shift, idx, kept, support, labels, label_value)


def _checked_library() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the compiled KD kernel is not available ({unavailable_reason()})")
    return lib
