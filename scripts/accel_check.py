"""accel-check: prove and measure the accelerator paths in one command (`make accel-check`).

Runs both jobs: scripts/accel_check_train.py (training) and scripts/accel_check_predict.py
(inference), each also runnable alone; their shared parts are in accel_check_common.py.

    python3 scripts/accel_check.py [--device auto|gpu|cpu] [--smallest] [--backend-only] [...]

Detects the hardware, then prints one result per line, `[ OK ]`, `[FAIL]`, `[SKIP]`, `[WARN]`
or `[INFO]` followed by the check's name:

With TensorFlow (the project's real paths):
 1. environment: TF and Keras versions, the devices TF lists; on a GPU the CUDA/cuDNN versions
    TF was built with and each GPU's memory;
 2. training: synthetic images -> cell shards (tfrecords_builder) -> `python -m train_tpu`
    EfficientNet-B0 for --epochs x --steps (GPU: 224 px, --strategy gpu, mixed float16; CPU:
    a small tile, said so); the loss must be finite and fall; training examples/s (epochs
    after the first, which traces), the input pipeline alone (train_tpu.data.train_dataset)
    and their ratio;
 3. inference: `python -m infer_gpu predict` on --images synthetic images of --image-size px,
    then `python -m infer_gpu validate`; on a GPU the same command on the CPU too, whose CSV
    must hold the same IDs and masks and confidences within --tolerance; per-stage seconds per
    image, peak GPU memory, and the projection for Kaggle's 559 test images (their size mix,
    scaled by pixel count) against the 9-hour limit;
 4. several GPUs: the scaling of MirroredStrategy over all of them against one.

Without TensorFlow (or with --backend-only) the TF checks are reported as not run and a
backend section runs instead on whatever Keras 3 backend is there (jax when TF is absent):
EfficientNet-B0 with the 4-channel stem from common.models, trained on in-memory synthetic
cell tiles (mixed float16 on a GPU), forward-only inference tiles/s, peak device memory, and
the TF-free CPU stages of predict (decode, segment, tiles, encode: infer_gpu.reading's own
prepare_image) so that a 559-image projection can still be printed, labelled as such.

Exit status: 0 when every check that ran passed, 1 when one failed (TF checks that could not
run count as failures only with --require-tensorflow), 2 for bad arguments. The last line is
always `accel-check: DEVICE, train X ex/s, predict Y s/image, 559 images ~ Z h`.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accel_check_common import run_checks  # noqa: E402


def main(argv=None) -> int:
    return run_checks(argv, jobs=("train", "predict"), prog="accel_check", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
