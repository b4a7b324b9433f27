#!/usr/bin/env bash
# The project's main job on its embedded default (synthetic data it generates itself):
# synthetic data -> TFRecord shards -> short CPU training (cell tiles, then the dual-head MIL
# model started from them) -> predict -> validate -> evaluate -> overlays.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${1:-demo_out}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "1/7 synthetic data: training images and a held-out test set"
# 190 images: every class is the main one of 10 images; 19 test images: of one image each
$PY -m testkit.synthetic --out "$OUT/train_data" --n 190 --size 256 --seed 0
$PY -m testkit.synthetic --out "$OUT/test_data" --n 19 --size 256 --seed 1

step "2/7 TFRecord shards (cell tiles, and bags of each image's cells; 3 folds)"
$PY -m tfrecords_builder --images "$OUT/train_data/images" --labels "$OUT/train_data/train.csv" \
    --out "$OUT/shards" --mode cell --masks "$OUT/train_data/masks" --size 48 --folds 3 --workers 2
$PY -m tfrecords_builder --images "$OUT/train_data/images" --labels "$OUT/train_data/train.csv" \
    --out "$OUT/bag_shards" --mode bag --max-cells 16 --masks "$OUT/train_data/masks" --size 48 \
    --folds 3 --workers 2

step "3/7 short CPU training on cell tiles (preset demo)"
$PY -m train_tpu --data "$OUT/shards" --mode cell --out "$OUT/run" --preset demo --strategy cpu --deterministic --resume

step "4/7 the dual-head MIL model, started from it (preset demo_mil_ft: bags of cells, cell and image heads)"
$PY -m train_tpu --data "$OUT/bag_shards" --mode bag --out "$OUT/run_mil" --preset demo_mil_ft \
    --weights "$OUT/run" --strategy cpu --deterministic --resume

step "5/7 predict the test set (the MIL run: cell head x image head)"
$PY -m infer_gpu predict --images "$OUT/test_data/images" \
    --sample-submission "$OUT/test_data/sample_submission.csv" --model "$OUT/run_mil" \
    --out "$OUT/submission.csv" --overlays "$OUT/overlays" --resume

step "6/7 validate the submission"
$PY -m infer_gpu validate --submission "$OUT/submission.csv" \
    --sample-submission "$OUT/test_data/sample_submission.csv"

step "7/7 evaluate against the cell-level truth"
strict=$($PY -m infer_gpu evaluate --truth "$OUT/test_data/truth.csv" --submission "$OUT/submission.csv" \
    --all-labels-verified | tail -n 1)
$PY -m infer_gpu evaluate --truth "$OUT/test_data/truth.csv" --submission "$OUT/submission.csv"
echo "strict (every class verified on every image, detections of absent classes are false positives): $strict"
echo "overlays: $OUT/overlays   training history: $OUT/run/history.png, $OUT/run_mil/history.png"
echo "competition metric (Open Images rule, as the reference evaluator):"
$PY -m infer_gpu evaluate --truth "$OUT/test_data/truth.csv" --submission "$OUT/submission.csv" | tail -n 1
