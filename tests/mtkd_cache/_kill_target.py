"""`mtkd-cache` with every teacher forward slowed down, so a test can SIGKILL it mid-run.

Usage: ``python _kill_target.py SECONDS run CACHE --teacher ... [mtkd-cache run options]``

The tiny test teachers finish a whole cache in well under a second; sleeping before each forward
pass spreads the chunk commits out so that the kill lands after some chunks are committed and
before the last one. Nothing else differs from the real command line.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import mtkd_cache.precompute.chunk
from mtkd_cache.cli import main


def _slow(forward: Any, delay: float) -> Any:
    def slow_forward(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return forward(*args, **kwargs)

    return slow_forward


def _slowed(delay: float) -> None:
    chunk: Any = mtkd_cache.precompute.chunk
    for name in ("forward_teacher", "forward_body"):  # full logits, or the body of a per-block head
        setattr(chunk, name, _slow(getattr(chunk, name), delay))


if __name__ == "__main__":
    _slowed(float(sys.argv[1]))
    main(args=sys.argv[2:], prog_name="mtkd-cache")
