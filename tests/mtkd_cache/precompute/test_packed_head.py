"""`packed_head.linear`: the LM head through MKL's packed weight gives F.linear's bits, and falls back to the
plain head wherever it cannot (no MKL, bf16, too few rows, a packing that differs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtkd_cache.precompute import packed_head

needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch built without MKL")


def _head(vocab: int = 3_000, width: int = 64, bias: bool = False) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(width, vocab, bias=bias).requires_grad_(False)
    head.weight.normal_(0, 0.3)
    return head


@needs_mkl
@pytest.mark.parametrize("rows", [16, 37, 85])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_equals_f_linear_bit_for_bit(rows: int, bias: bool) -> None:
    head = _head(bias=bias)
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        got = packed_head.linear(head, x)
        again = packed_head.linear(head, torch.randn(rows, 64))  # the packed weight is reused
    assert packed_head._PACKED[head][rows] is not None  # the packed path ran
    assert torch.equal(got, F.linear(x, head.weight, head.bias))
    assert again.shape == (rows, 3_000)


@needs_mkl
def test_one_packing_per_row_count() -> None:
    head = _head()
    with torch.inference_mode():
        for rows in (20, 20, 24):
            packed_head.linear(head, torch.randn(rows, 64))
    assert sorted(packed_head._PACKED[head]) == [20, 24]
    with torch.inference_mode():
        packed_head.linear(head, torch.randn(24, 64))
        packed_head.linear(head, torch.randn(30, 64))  # a third row count: 20, the least recently used, goes
    assert list(packed_head._PACKED[head]) == [24, 30]


@pytest.mark.parametrize("case", ["few rows", "bf16", "strided", "too big"])
def test_ineligible_inputs_run_the_plain_head(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    head = _head()
    x = torch.randn(32, 64)
    if case == "few rows":
        x = x[: packed_head.MIN_ROWS - 1]
    elif case == "bf16":
        head, x = head.to(torch.bfloat16), x.to(torch.bfloat16)
    elif case == "strided":
        x = torch.randn(64, 32).t()
    else:
        monkeypatch.setattr(packed_head, "MAX_BYTES", head.weight.numel() * 4 - 1)
    with torch.inference_mode():
        got = packed_head.linear(head, x)
    assert head not in packed_head._PACKED  # nothing was packed
    assert torch.equal(got, head(x))


@needs_mkl
def test_a_packing_that_differs_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.ops.mkl._mkl_linear
    calls: list[int] = []

    class Ops:  # an MKL whose packed GEMM is off in the last bit
        _mkl_reorder_linear_weight = torch.ops.mkl._mkl_reorder_linear_weight

        @staticmethod
        def _mkl_linear(*args: object) -> torch.Tensor:
            calls.append(1)
            return torch.nextafter(real(*args), torch.tensor(float("inf")))

    monkeypatch.setattr(torch.ops, "mkl", Ops)
    head = _head()
    x = torch.randn(40, 64)
    with torch.inference_mode():
        first = packed_head.linear(head, x)
        second = packed_head.linear(head, x)
    assert packed_head._PACKED[head][40] is None and len(calls) == 1  # checked once, then never used
    assert torch.equal(first, F.linear(x, head.weight)) and torch.equal(second, first)


@needs_mkl
def test_a_changed_weight_is_packed_again() -> None:
    head = _head()
    x = torch.randn(32, 64)
    with torch.inference_mode():
        packed_head.linear(head, x)
    with torch.no_grad():
        head.weight.mul_(2.0)  # in place: same storage, new version
    with torch.inference_mode():
        got = packed_head.linear(head, x)
    assert torch.equal(got, F.linear(x, head.weight))  # not the product with the old packed weight
    for _ in range(3):  # replaced, the old one freed first: often at its address, and with version 0 again
        head.weight = None  # type: ignore[assignment]
        head.weight = torch.nn.Parameter(torch.randn(3_000, 64), requires_grad=False)
        with torch.inference_mode():
            assert torch.equal(packed_head.linear(head, x), F.linear(x, head.weight))


def test_an_inference_mode_weight_runs_plain() -> None:
    with torch.inference_mode():
        head = _head()  # its weight is an inference tensor: no version counter to watch
        x = torch.randn(32, 64)
        assert torch.equal(packed_head.linear(head, x), F.linear(x, head.weight))
    assert head not in packed_head._PACKED


def test_a_head_under_autograd_runs_plain() -> None:
    head = _head().requires_grad_(True)
    x = torch.randn(32, 64)
    out = packed_head.linear(head, x)
    out.sum().backward()  # the plain head: it has a backward
    assert head not in packed_head._PACKED and head.weight.grad is not None
