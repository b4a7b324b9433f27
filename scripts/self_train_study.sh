#!/usr/bin/env bash
# Does a self-training round lift the held-out mAP? Fresh synthetic data per seed and label
# sharing, every run --deterministic:
#   scripts/self_train_study.sh OUT SHARE SEED [SEED ...]      e.g. OUT 0.3 0 1
# Per seed S: N_TRAIN training images (data seed S, cells show each image class with
# probability SHARE), N_TEST held out (S+100); cell shards cut by the default segmenter (what
# predict cuts again), 3 folds; a `demo` base of BASE_EPOCHS x 40 steps; then
# scripts/self_train.sh for 2 rounds (SCORING=oof, the default, or in-sample; extra options
# in SELF_TRAIN_ARGS). The control: the base trained for as many more steps as a round's run,
# on the image labels, so a round's lift is not just more training. The base, the control and
# each round's run predict the held-out images; appends to OUT/results.tsv: share, seed,
# scoring, run, strict mAP, Open Images mAP, seconds.
set -euo pipefail
out=$1; share=$2; shift 2
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=$PWD
n_train=${N_TRAIN:-57} n_test=${N_TEST:-19} base_epochs=${BASE_EPOCHS:-5} scoring=${SCORING:-oof}
mkdir -p "$out"
score() {  # run folder -> "strict oi"
  local sub=$2
  $py -m infer_gpu predict --images "$d/test/images" --sample-submission "$d/test/sample_submission.csv" \
    --model "$1" --out "$sub" --no-progress --resume >/dev/null 2>&1
  local strict oi
  strict=$($py -m infer_gpu evaluate --truth "$d/test/truth.csv" --submission "$sub" --all-labels-verified | tail -n 1 | cut -d' ' -f2)
  oi=$($py -m infer_gpu evaluate --truth "$d/test/truth.csv" --submission "$sub" | tail -n 1 | cut -d' ' -f2)
  echo "$strict $oi"
}
for seed in "$@"; do
  d=$out/share${share}_seed$seed
  mkdir -p "$d"
  [ -f "$d/train/train.csv" ] || $py -m testkit.synthetic --out "$d/train" --n "$n_train" --size 256 \
    --seed "$seed" --share "$share" >/dev/null 2>&1
  [ -f "$d/test/truth.csv" ] || $py -m testkit.synthetic --out "$d/test" --n "$n_test" --size 256 \
    --seed $((seed + 100)) --share "$share" >/dev/null 2>&1
  [ -f "$d/shards/manifest.json" ] || $py -m tfrecords_builder --images "$d/train/images" \
    --labels "$d/train/train.csv" --out "$d/shards" --mode cell --size 48 --folds 3 --workers 2 \
    --no-progress >/dev/null 2>&1
  t0=$(date +%s)
  [ -f "$d/base/model.keras" ] || $py -m train_tpu --data "$d/shards" --mode cell --out "$d/base" \
    --preset demo --epochs "$base_epochs" --strategy cpu --deterministic >"$d/base.log" 2>&1
  t1=$(date +%s)
  read -r strict oi <<<"$(score "$d/base" "$d/base.csv")"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$share" "$seed" "$scoring" base "$strict" "$oi" $((t1 - t0)) | tee -a "$out/results.tsv"
  t0=$(date +%s)
  [ -f "$d/control/model.keras" ] || $py -m train_tpu --data "$d/shards" --mode cell --out "$d/control" \
    --preset demo --epochs "$base_epochs" --weights "$d/base" --strategy cpu --deterministic >"$d/control.log" 2>&1
  t1=$(date +%s)
  if ! grep -q "^$share	$seed	[^	]*	control	" "$out/results.tsv"; then
    read -r strict oi <<<"$(score "$d/control" "$d/control.csv")"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$share" "$seed" "-" control "$strict" "$oi" $((t1 - t0)) | tee -a "$out/results.tsv"
  fi
  extra=(); [ "$scoring" = oof ] || extra=(--in-sample)
  st=$d/self_$scoring
  for r in 1 2; do
    t0=$(date +%s)
    bash scripts/self_train.sh --images "$d/train/images" --labels "$d/train/train.csv" --base "$d/base" \
      --out "$st" --rounds $r "${extra[@]}" ${SELF_TRAIN_ARGS:-} >"$st.r$r.log" 2>&1
    t1=$(date +%s)
    read -r strict oi <<<"$(score "$st/round$r/run" "$st/round$r.csv")"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$share" "$seed" "$scoring" "round$r" "$strict" "$oi" $((t1 - t0)) | tee -a "$out/results.tsv"
  done
done
