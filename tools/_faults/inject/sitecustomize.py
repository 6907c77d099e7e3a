"""Injected delays for the fault matrix's concurrency trials (imported at interpreter start-up).

`FAULTS_IO_DELAY="manifest.json:0.5"` sleeps 0.5 s after every open() of a file whose name ends
with `manifest.json` and before every rename onto such a file, so that two writers that start
together both read before either writes: the read-modify-write race becomes the common case.
This sits outside mtkd (it wraps the interpreter's open and os.replace), so it needs no hook in
the code under test.
"""

from __future__ import annotations

import builtins
import io
import os
import time
from typing import Any

_SPEC = os.environ.get("FAULTS_IO_DELAY", "")


def _install(suffix: str, delay: float) -> None:
    real_open, real_replace, real_rename = builtins.open, os.replace, os.rename

    def slow_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and os.fspath(file).endswith(suffix):
            time.sleep(delay)
        return handle

    def slow_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(dst).endswith(suffix):
            time.sleep(delay)
        real_replace(src, dst, *args, **kwargs)

    def slow_rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(dst).endswith(suffix):
            time.sleep(delay)
        real_rename(src, dst, *args, **kwargs)

    builtins.open = slow_open
    io.open = slow_open  # type: ignore[assignment]
    os.replace = slow_replace
    os.rename = slow_rename


if _SPEC:
    _suffix, _, _seconds = _SPEC.rpartition(":")
    _install(_suffix, float(_seconds))
