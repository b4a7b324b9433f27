#!/usr/bin/env bash
# The one-shot accel-check on a lent GPU machine that has no TensorFlow (jax + CUDA there):
#     bash scripts/accel_check_device.sh [extra accel_check.py flags]
# Installs the wheels carried in .whl/ (keras, namex, optree, pycocotools, ...) into /tmp/site,
# runs scripts/accel_check.py on the jax backend with GPU sizes kept well under 5 minutes
# (JAX compiles B0 twice, 30-90 s each), and tees the log to $OUT/accel_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/accel_out}
mkdir -p "$OUT" /tmp/site
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl \
        || echo "accel_check_device: installing .whl/ failed; trying without" >&2
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" KERAS_BACKEND=${KERAS_BACKEND:-jax} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/nvidia-smi: /' | tee "$OUT/accel_check.log"
# 224 px, batch 64, 3 x 10 training steps; forward batch 64; CPU stages on 4 images of 2048 px.
timeout 280 "$PY" scripts/accel_check.py --device gpu --tile 224 --batch 64 --steps 10 --epochs 3 \
    --train-images 8 --train-image-size 512 --images 4 --image-size 2048 --infer-batch 64 \
    --infer-repeats 20 "$@" 2>&1 | tee -a "$OUT/accel_check.log"
rc=${PIPESTATUS[0]}
echo "accel_check_device: exit status $rc" | tee -a "$OUT/accel_check.log"
exit "$rc"
