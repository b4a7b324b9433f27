#!/usr/bin/env bash
# The MIL fine-tune against the same steps of cell tiles, on fresh synthetic data per seed
# (tests/test_learning_mil.py's recipe and scale, every run --deterministic):
#   scripts/mil_vs_cells.sh OUT SEED [SEED ...]
# Per seed S: 57 training images (data seed S), 19 held out (S+1); a `demo` base of 200 steps;
# then 120 steps from it as cell tiles (learning rate 3e-4) and as `demo_mil_ft`; both predict
# the held-out images with the default rule and with --image-from-cells. Prints one line per
# run and rule, and appends it to OUT/results.tsv: seed, run, rule, strict mAP, Open Images mAP.
set -euo pipefail
out=$1; shift
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=$PWD
mkdir -p "$out"
for seed in "$@"; do
  d=$out/seed$seed
  mkdir -p "$d"
  $py -m testkit.synthetic --out "$d/train" --n 57 --size 256 --seed "$seed" >/dev/null 2>&1
  $py -m testkit.synthetic --out "$d/test" --n 19 --size 256 --seed $((seed + 1)) >/dev/null 2>&1
  for mode in cell bag; do
    [ -f "$d/$mode/manifest.json" ] || $py -m tfrecords_builder --images "$d/train/images" \
      --labels "$d/train/train.csv" --out "$d/$mode" --mode $mode --masks "$d/train/masks" \
      --size 48 --folds 3 --workers 2 --no-progress >/dev/null 2>&1
  done
  train() { [ -f "$d/$1/model.keras" ] || $py -m train_tpu --out "$d/$1" --strategy cpu \
      --deterministic "${@:2}" >"$d/$1.log" 2>&1; }
  train base --data "$d/cell" --mode cell --preset demo --epochs 5
  train cell --data "$d/cell" --mode cell --preset demo --epochs 3 --learning-rate 3e-4 --weights "$d/base"
  train mil --data "$d/bag" --mode bag --preset demo_mil_ft --weights "$d/base"
  for run in cell mil; do
    for rule in default image-from-cells; do
      extra=(); [ $rule = default ] || extra=(--image-from-cells)
      sub=$d/${run}_$rule.csv
      $py -m infer_gpu predict --images "$d/test/images" --sample-submission "$d/test/sample_submission.csv" \
        --model "$d/$run" --out "$sub" --no-progress "${extra[@]}" >/dev/null 2>&1
      strict=$($py -m infer_gpu evaluate --truth "$d/test/truth.csv" --submission "$sub" --all-labels-verified | tail -n 1 | cut -d' ' -f2)
      oi=$($py -m infer_gpu evaluate --truth "$d/test/truth.csv" --submission "$sub" | tail -n 1 | cut -d' ' -f2)
      printf '%s\t%s\t%s\t%s\t%s\n' "$seed" "$run" "$rule" "$strict" "$oi" | tee -a "$out/results.tsv"
    done
  done
done
