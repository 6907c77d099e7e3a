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


def _slowed(delay: float) -> None:
    forward = mtkd_cache.precompute.chunk.forward_teacher

    def slow_forward(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return forward(*args, **kwargs)

    mtkd_cache.precompute.chunk.forward_teacher = slow_forward  # type: ignore[assignment]


if __name__ == "__main__":
    _slowed(float(sys.argv[1]))
    main(args=sys.argv[2:], prog_name="mtkd-cache")
