"""The two dense row kernels of the fused objectives at ``T = 1``, compiled once with ``torch.compile``.

At ``T = 1`` the whole ``O(P V)`` cost of :mod:`._fused` and :mod:`._fused_head` is two loops over the logits:

* :func:`row_stats`: each row's log-sum-exp (and, for the spread tail, its sum) in the compute dtype,
  read-only;
* :func:`scaled_exp_`: ``out := coef * exp(x - lse) - shift``, one read of ``x`` and one write of ``out``.

PyTorch's eager CPU kernels have neither as one loop: the eager path (:mod:`._fused_math`) writes a
``(c, V)`` log-softmax in the forward and runs a softmax, then a row scale, in the backward. Compiled by
Inductor (C++ with vector intrinsics on the CPU, Triton on CUDA) each is a single fused loop, and bf16/fp16
logits are read and upcast inside it instead of through a float32 copy.

``kernels`` (the fused losses' option, ``TrainConfig.kernels``, ``--kernels``) chooses:

* ``"eager"``: PyTorch's kernels, nothing compiled;
* ``"compiled"``: the compiled kernels; if ``torch.compile`` does not work on the device at all (a probe on a
  tiny float32 input, once per process and device type), that is an error that says how to fall back;
* ``"native"`` (CPU): float32 logits take the package's own C++ kernel (:mod:`._native`), which also does the
  support's gathers and scatters in the same row loops; other dtypes take the compiled kernels. An error
  where the kernel cannot be built (the reason, and how to fall back);
* ``"auto"`` (default; the environment variable ``MTKD_KERNELS`` overrides it): on the CPU ``"native"`` where
  the C++ kernel builds and passes its check (``MTKD_NATIVE=0`` turns it off), else compiled where
  ``torch.compile`` works on the logits' device, else eager after one warning. The first call of a
  process compiles (seconds to a minute; Inductor caches the code on disk for the next process).

In every mode, a kernel variant (dtypes, aliasing) that fails to compile after the probe passed, e.g. bf16 on
a GPU whose Triton lacks it, runs the same code eagerly after one warning.

Both paths compute the same quantities in the same dtype; they differ in summation order only (tested
against a float64 reference in ``tests/mtkd_train/losses/test_kernels.py``).
"""

from __future__ import annotations

import logging
import os
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

from mtkd_train.losses import _native

__all__ = ["KERNELS", "kernels_choice", "resolve_kernels", "row_stats", "scaled_exp_"]

KERNELS = ("auto", "native", "compiled", "eager")
ENV = "MTKD_KERNELS"
log = logging.getLogger(__name__)


def _stats(x: torch.Tensor, cd: torch.dtype, want_sum: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    s = x.to(cd)
    m = s.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row: lse = -inf, not NaN
    lse = m.squeeze(1) + (s - m).exp().sum(dim=1).log()
    return lse, (s.sum(dim=1) if want_sum else None)


def _scaled_exp(out: torch.Tensor, x: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                shift: torch.Tensor) -> None:
    cd = lse.dtype
    out.copy_(coef.to(cd) * (x.to(cd) - lse.unsqueeze(1)).exp() - shift.to(cd))


_COMPILED: dict[tuple[Any, ...], Callable[..., Any]] = {}
_FAILED: dict[Any, str | None] = {}
"""Per device type (the probe) and per kernel key: None when it compiled, else why it did not."""
_WARNED: set[Any] = set()
_EAGER: dict[str, Callable[..., Any]] = {"stats": _stats, "scaled_exp": _scaled_exp}


def _run(name: str, key: tuple[Any, ...], *args: Any) -> Any:
    """Kernel ``name`` compiled for ``key`` (dtypes, flags, aliasing), or its eager code where that key failed.

    Each key compiles its own copy of the function, so Dynamo's per-function recompile limit counts the shapes
    and strides of one setting only (past that limit Dynamo runs the copy eagerly). A key that fails to compile
    after the device's probe passed (e.g. bf16 on a GPU without bf16 support in Triton) runs the same code
    eagerly, after one warning: a compile error is raised before the kernel writes anything.
    """
    full = (name, *key)
    if _FAILED.get(full) is None:
        if full not in _COMPILED:
            fn = _EAGER[name]
            fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                       fn.__closure__)
            _COMPILED[full] = torch.compile(fresh, dynamic=True)
        try:
            return _COMPILED[full](*args)
        except Exception as err:  # noqa: BLE001 - any compiler/toolchain failure means: fall back
            _FAILED[full] = _first_line(err)
    if full not in _WARNED:
        _WARNED.add(full)
        warnings.warn(f"torch.compile fails for the fused loss's {name} kernel on {key} ({_FAILED[full]}); that "
                      f"kernel runs eagerly", RuntimeWarning, stacklevel=3)
    return _EAGER[name](*args)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _probe(device: torch.device) -> None:
    """Compile and run both kernels on a tiny input of ``device`` (raises what torch.compile raises)."""
    x = torch.linspace(-3.0, 3.0, 24, device=device).reshape(3, 8)
    fns = {n: torch.compile(f, dynamic=True) for n, f in _EAGER.items()}  # not the cached copies: no key used up
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        lse, _ = fns["stats"](x, torch.float32, False)
        out = torch.empty_like(x)
        fns["scaled_exp"](out, x, lse, torch.ones(3, 1, device=device), torch.zeros(3, 1, device=device))
    if not torch.allclose(out.sum(dim=1), torch.ones(3, device=device), atol=1e-5):
        raise RuntimeError("the compiled softmax does not sum to 1")


def kernels_choice(kernels: str | None) -> str:
    """``kernels`` with ``$MTKD_KERNELS`` applied to ``None`` / ``"auto"``, checked (no compiling here).

    Raises:
        ValueError: a value that is not one of :data:`KERNELS`, naming where it came from.
    """
    from_env = kernels in (None, "auto") and ENV in os.environ
    choice = os.environ[ENV] if from_env else (kernels or "auto")
    if choice not in KERNELS:
        where = f"the environment variable {ENV}={choice!r}" if from_env else f"kernels={choice!r}"
        raise ValueError(f"{where} is not one of {', '.join(KERNELS)}")
    return choice


def resolve_kernels(kernels: str | None, device: torch.device) -> str:
    """Which kernels run for logits on ``device``: ``"native"``, ``"compiled"`` or ``"eager"`` (``kernels`` as
    in the module doc).

    Raises:
        ValueError: an unknown ``kernels``, ``"native"`` off the CPU or where the C++ kernel is unusable, or
            ``"compiled"`` where ``torch.compile`` fails.
    """
    choice = kernels_choice(kernels)
    if choice == "eager":
        return "eager"
    if choice in ("native", "auto") and device.type == "cpu" and _native.available():
        return "native"
    if choice == "native":
        why = "it runs on the CPU only" if device.type != "cpu" else _native.unavailable_reason()
        raise ValueError(f"kernels='native' but the C++ KD kernel is not usable for {device.type} logits ({why}); "
                         f"use kernels='auto' or 'compiled'")
    key = device.type
    if key not in _FAILED:
        log.info("compiling the fused loss's row kernels for %s (once per process; kernels='eager' skips it)", key)
        try:
            _probe(device)
            _FAILED[key] = None
        except Exception as err:  # noqa: BLE001 - any compiler/toolchain failure means: fall back
            _FAILED[key] = _first_line(err)
    reason = _FAILED[key]
    if reason is None:
        return "compiled"
    if choice == "compiled":
        raise ValueError(f"kernels='compiled' but torch.compile fails on {key}: {reason}; install a C++ compiler "
                         f"(CPU) or Triton (CUDA), or use kernels='eager' ({ENV}=eager)")
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"torch.compile fails on {key} ({reason}); the fused loss runs PyTorch's eager kernels "
                      f"(set kernels='eager' or {ENV}=eager to skip the attempt)", RuntimeWarning, stacklevel=4)
    return "eager"


def row_stats(x: torch.Tensor, cd: torch.dtype, want_sum: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(lse, row sum or None)`` of the ``(c, V)`` rows of ``x``, in ``cd``, by the compiled kernel."""
    return _run("stats", (x.device.type, x.dtype, cd, want_sum), x, cd, want_sum)  # type: ignore[no-any-return]


def scaled_exp_(out: torch.Tensor, x: torch.Tensor, lse: torch.Tensor, coef: torch.Tensor,
                shift: torch.Tensor | None) -> None:
    """``out := coef * exp(x - lse) - shift`` by the compiled kernel (``out`` may be ``x``).

    Args:
        out: ``(c, V)`` destination, any float dtype (cast on store).
        x: ``(c, V)`` logits.
        lse: ``(c,)`` their log-sum-exps in the compute dtype.
        coef: ``(c, 1)`` row scale.
        shift: ``(c, 1)`` subtracted from every element, or None.
    """
    shift = torch.zeros_like(coef) if shift is None else shift  # always (c, 1): no size-1 specialisation
    key = (x.device.type, x.dtype, out.dtype, lse.dtype, coef.dtype, shift.dtype, out.data_ptr() == x.data_ptr())
    _run("scaled_exp", key, out, x, lse, coef, shift)
