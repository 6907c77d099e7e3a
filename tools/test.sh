#!/usr/bin/env bash
# Install what the tests need into .venv (CPU PyTorch) and run the default test suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m slow` or `bash tools/test.sh -k verify`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch 2.13.0 lies on this machine's disk; an unpinned torch could pull CUDA.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ $# -eq 0 ]; then  # the full check: lint and types, then the tests
  .venv/bin/ruff check mtkd_cache mtkd_train tests tools examples
  .venv/bin/mypy mtkd_cache mtkd_train
fi
exec .venv/bin/python -m pytest -q "$@"
