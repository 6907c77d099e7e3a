"""`mtkd-cache` whose chunk computation raises for the chunks named in MTKD_TEST_FAIL_CHUNKS.

Usage (also under torchrun): ``python _fail_target.py run CACHE --teacher ...`` with
``MTKD_TEST_FAIL_CHUNKS=5,9``. The rank that reaches such a chunk fails like a crashed GPU
would, leaving the chunks committed so far; nothing else differs from the real command line.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import mtkd_cache.precompute.run
from mtkd_cache.cli import main


def _failing(chunks: set[int]) -> None:
    real = mtkd_cache.precompute.run.run_chunk

    def run_chunk(*args: Any, **kwargs: Any) -> Any:
        if args[3] in chunks:  # (data, teacher, meta, chunk, ...)
            raise RuntimeError(f"simulated crash in chunk {args[3]}")
        return real(*args, **kwargs)

    mtkd_cache.precompute.run.run_chunk = run_chunk  # type: ignore[assignment]


if __name__ == "__main__":
    _failing({int(c) for c in os.environ.get("MTKD_TEST_FAIL_CHUNKS", "").split(",") if c})
    main(args=sys.argv[1:], prog_name="mtkd-cache")
