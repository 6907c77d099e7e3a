"""Errors from DataLoader workers reach the user as one line: the original error and its message."""

from __future__ import annotations

import pytest
import torch

from mtkd_cache.errors import CacheCorruptError
from mtkd_train.errors import USER_ERRORS, one_line


class _Broken(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    def __iter__(self):  # noqa: ANN204
        raise CacheCorruptError("teacher 'a' array 'values' chunk 3: checksum mismatch; run `mtkd-cache verify --repair`")


def test_a_worker_error_is_reported_as_its_own_last_line() -> None:
    loader = torch.utils.data.DataLoader(_Broken(), batch_size=None, num_workers=1)
    with pytest.raises(USER_ERRORS) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)  # what torch gives
    line = one_line(info.value)
    assert line == ("CacheCorruptError: teacher 'a' array 'values' chunk 3: checksum mismatch; "
                    "run `mtkd-cache verify --repair`")
    assert "\n" not in line


def test_a_plain_error_keeps_its_name_and_message() -> None:
    assert one_line(CacheCorruptError("x broke")) == "CacheCorruptError: x broke"
