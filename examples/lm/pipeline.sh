#!/bin/bash
# The whole language-model experiment of issue 13, one heavy job at a time; every step resumes or
# skips what is done, so rerun this script after any interruption.
#   MTKD_LM_WORK=/work/lm nohup nice -n 5 examples/lm/pipeline.sh > /work/lm/logs/pipeline.log 2>&1 &
# Steps (each with its own STEP name, run only those given as arguments, default all):
#   caches    the transfer/eval/curve caches (`mtkd-cache prepare`, SmolLM2's tokenizer)
#   teachers  `mtkd-cache run` of smollm2, smollm2-shakespeare, gemma3 on transfer then eval
#   scores    `mtkd-score` of the operators on the eval cache -> benchmarks/results/lm_scores.json
#   bpb       teachers' held-out bits per byte -> benchmarks/results/lm_teachers.json
#   calibrate no-KD and SmolLM2-KD students, seed 0, long, to choose the matrix's steps from the curve
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W=${MTKD_LM_WORK:?set MTKD_LM_WORK}
PY=${PYTHON:-python}
STEPS=${*:-caches teachers scores bpb calibrate}
step() { echo "=== $(date -u +%T) $*"; }
for s in $STEPS; do case $s in
  caches)
    [ -f "$W/caches/transfer/manifest.json" ] && [ -f "$W/caches/eval/manifest.json" ] && [ -f "$W/caches/curve/manifest.json" ] \
      || { step caches; $PY -m examples.lm caches; } ;;
  teachers)
    $PY -c "from pathlib import Path; from examples.lm.models import model_dir; model_dir(Path('$W'), 'gemma3')"
    for cache in transfer eval; do for t in smollm2 smollm2-shakespeare gemma3; do
      step run $cache $t
      $PY -m mtkd_cache.cli run "$W/caches/$cache" --teacher $t --model "$W/models/$t" --top-k 64 || echo "FAILED $cache $t"
    done; done ;;
  scores) step scores; $PY -m examples.lm scores || echo "FAILED scores" ;;
  bpb) step bpb; $PY -m examples.lm teachers --teacher smollm2 --teacher smollm2-shakespeare --teacher gemma3 || echo "FAILED bpb" ;;
  calibrate)
    step calibrate
    $PY -m examples.lm students --phase base --seeds 0 --only nokd --only smollm2 --steps 400 --eval-every 20 \
      || echo "FAILED calibrate" ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
step done
