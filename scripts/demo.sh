#!/usr/bin/env bash
# The project's main job on its embedded default (synthetic data it generates itself):
# synthetic data -> TFRecord shards -> short CPU training -> predict -> validate -> evaluate -> overlays.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${1:-demo_out}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "1/6 synthetic data: training images and a held-out test set"
# 190 images: every class is the main one of 10 images; 19 test images: of one image each
$PY -m testkit.synthetic --out "$OUT/train_data" --n 190 --size 256 --seed 0
$PY -m testkit.synthetic --out "$OUT/test_data" --n 19 --size 256 --seed 1

step "2/6 TFRecord shards (cell tiles, 3 folds)"
$PY -m tfrecords_builder --images "$OUT/train_data/images" --labels "$OUT/train_data/train.csv" \
    --out "$OUT/shards" --mode cell --masks "$OUT/train_data/masks" --size 48 --folds 3 --workers 2

step "3/6 short CPU training (preset demo)"
$PY -m train_tpu --data "$OUT/shards" --mode cell --out "$OUT/run" --preset demo --strategy cpu --resume

step "4/6 predict the test set"
$PY -m infer_gpu predict --images "$OUT/test_data/images" \
    --sample-submission "$OUT/test_data/sample_submission.csv" --model "$OUT/run" \
    --out "$OUT/submission.csv" --overlays "$OUT/overlays" --resume

step "5/6 validate the submission"
$PY -m infer_gpu validate --submission "$OUT/submission.csv" \
    --sample-submission "$OUT/test_data/sample_submission.csv"

step "6/6 evaluate against the cell-level truth"
strict=$($PY -m infer_gpu evaluate --truth "$OUT/test_data/truth.csv" --submission "$OUT/submission.csv" \
    --all-labels-verified | tail -n 1)
$PY -m infer_gpu evaluate --truth "$OUT/test_data/truth.csv" --submission "$OUT/submission.csv"
echo "strict (every class verified on every image, detections of absent classes are false positives): $strict"
echo "overlays: $OUT/overlays   training history: $OUT/run/history.png"
echo "competition metric (Open Images rule, as the reference evaluator):"
$PY -m infer_gpu evaluate --truth "$OUT/test_data/truth.csv" --submission "$OUT/submission.csv" | tail -n 1
