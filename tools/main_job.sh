#!/usr/bin/env bash
# The main job, end to end on the embedded default: set up, train two real teachers on
# Fashion-MNIST, precompute their cache, distil a student from it, evaluate, print a report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m examples.fmnist.main_job "$@"
