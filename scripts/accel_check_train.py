"""accel-check, training: synthetic images -> cell shards (tfrecords_builder) -> `python -m
train_tpu` (TF path), or in-memory training on the Keras backend; see scripts/accel_check.py.

    python3 scripts/accel_check_train.py [--device auto|gpu|cpu] [--smallest] [...]
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accel_check_common import (Report, child_env, keras_backend_setup, backend_device,  # noqa: E402
                                run_checks, run_logged, tail)


def build_shards(work: Path, sz: dict) -> Path:
    from testkit import synthetic
    from tfrecords_builder import build as buildlib
    from tfrecords_builder.config import make_config as builder_config

    src = work / "train_data"
    synthetic.generate(str(src), n=sz["train_images"], size=sz["train_image_size"], seed=0)
    out = work / f"shards{sz['tile']}"
    cfg = builder_config(images=str(src / "images"), labels=str(src / "train.csv"),
                         masks=str(src / "masks"), out=str(out), mode="cell", size=sz["tile"],
                         folds=2, shard_mb=1.0, workers=min(4, os.cpu_count() or 1))
    buildlib.build(cfg, progress=False, log=lambda s: None)
    return out


def train_run(work: Path, shards: Path, name: str, sz: dict, device: str, batch: int,
              epochs: int, timeout: float, env: dict | None = None):
    """`python -m train_tpu` for `epochs` x sz['steps']; returns (rc, history rows, log text)."""
    from train_tpu import history

    out = work / name
    cmd = [sys.executable, "-m", "train_tpu", "--data", str(shards), "--mode", "cell",
           "--out", str(out), "--preset", "smoke", "--backbone", "efficientnet_b0",
           "--size", str(sz["tile"]), "--epochs", str(epochs), "--steps-per-epoch", str(sz["steps"]),
           "--batch-size", str(batch), "--val-steps", "1", "--strategy", device,
           "--precision", "mixed_float16" if device == "gpu" else "float32",
           # a zero head bias starts the loss at ln 2, so a working optimizer shows at once
           "--set", "prior_bias=false"]
    rc, _, text = run_logged(cmd, work / f"{name}.log", timeout, env)
    rows = history.read_history(str(out / history.HISTORY_CSV)) if rc == 0 else []
    return rc, rows, text, out


def examples_per_s(rows: list[dict], steps: int, batch: int) -> float:
    """Training examples/s over the epochs after the first (the first one traces/compiles);
    each epoch's time includes one validation batch."""
    times = [r["time_s"] for r in rows[1:]] or [r["time_s"] for r in rows]
    return steps * batch / statistics.median(times)


def pipeline_examples_per_s(shards: Path, sz: dict) -> float:
    """The trainer's input pipeline alone, examples/s, best of 3 passes after a warm-up pass."""
    import tensorflow as tf

    from common import shard_folder
    from train_tpu import data
    from train_tpu.config import make_config

    files = sorted(str(p) for p in shards.glob(shard_folder.SHARD_GLOB))
    cfg = make_config("smoke", size=sz["tile"], batch_size=sz["batch"], shuffle_buffer=256)
    best, n = float("inf"), 0
    for i in range(4):
        ds = data.train_dataset(files, cfg, sz["tile"], sz["tile"], sz["batch"]).take(sz["pipeline_batches"])
        start = time.perf_counter()
        n = int(ds.reduce(tf.constant(0), lambda c, b: c + tf.shape(b[0])[0]))
        if i:
            best = min(best, time.perf_counter() - start)
    return n / best


def train_checks(report: Report, args, sz: dict, work: Path, device: str, gpus: list) -> Path | None:
    """Shards, `python -m train_tpu` (loss finite and falling, examples/s against the input
    pipeline alone), and on several GPUs the scaling. Returns the trained run (None if it failed)."""
    gpu = device == "gpu"
    timeout = args.timeout

    # 2. training
    t = time.perf_counter()
    shards = build_shards(work, sz)
    report.line("INFO", "shards", f"{sz['train_images']} synthetic images of {sz['train_image_size']} px "
                f"-> {sz['tile']} px cell shards in {time.perf_counter() - t:.1f} s")
    what = (f"EfficientNet-B0, {sz['tile']} px tiles, global batch {sz['batch']}, "
            + ("--strategy gpu, mixed_float16" if gpu else
               f"--strategy cpu, float32 (CPU: small {sz['tile']} px tiles, not the GPU's 224)"))
    rc, rows, text, run = train_run(work, shards, "run", sz, device, sz["batch"], sz["epochs"], timeout)
    train_ok = rc == 0 and len(rows) == sz["epochs"]
    if not train_ok:
        report.line("FAIL", "training", f"python -m train_tpu exited {rc} ({what})\n{tail(text)}")
    else:
        losses = [r.get("loss", math.nan) for r in rows]
        finite = all(math.isfinite(v) for v in losses)
        falls = finite and losses[-1] < losses[0]
        report.ok(finite and falls, "training loss",
                  f"{what}; {sz['epochs']} epochs x {sz['steps']} steps; loss per epoch "
                  + " -> ".join(f"{v:.4f}" for v in losses)
                  + ("" if finite else " (NOT FINITE)") + ("" if falls or not finite else " (does not fall)"))
        report.train = examples_per_s(rows, sz["steps"], sz["batch"])
        pipe = pipeline_examples_per_s(shards, sz)
        ratio = pipe / report.train
        report.line("INFO", "training speed",
                    f"train {report.train:.1f} ex/s (epochs 2.., incl. 1 validation batch each), "
                    f"input pipeline alone {pipe:.1f} ex/s, pipeline/train {ratio:.2f}x")
        if ratio < 1.2:
            report.line("WARN", "input pipeline", f"only {ratio:.2f}x what training consumes: "
                        "training is input-bound on this machine")

    # 4. several GPUs
    if gpu and len(gpus) >= 2 and train_ok:
        per = max(1, sz["batch"] // len(gpus))
        env = child_env()
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        rc1, rows1, text1, _ = train_run(work, shards, "run_1gpu", sz, device, per, 2, timeout, env)
        if rc1 != 0 or not rows1:
            report.line("FAIL", "multi-gpu", f"1-GPU reference run exited {rc1}\n{tail(text1)}")
        else:
            one = examples_per_s(rows1, sz["steps"], per)
            scale = report.train / one
            report.line("INFO", "multi-gpu",
                        f"MirroredStrategy over {len(gpus)} GPUs {report.train:.1f} ex/s (global batch "
                        f"{sz['batch']}) vs 1 GPU {one:.1f} ex/s (batch {per}): scaling {scale:.2f}x, "
                        f"efficiency {100 * scale / len(gpus):.0f}%")
    elif gpu:
        report.line("SKIP", "multi-gpu", f"{len(gpus)} GPU: MirroredStrategy scaling needs two or more")
    return run if train_ok else None


def train_for_predict(report: Report, args, sz: dict, work: Path, device: str) -> Path | None:
    """accel_check_predict.py alone: a run to predict with (the training check's, unreported)."""
    shards = build_shards(work, sz)
    rc, rows, text, run = train_run(work, shards, "run", sz, device, sz["batch"], sz["epochs"], args.timeout)
    report.line("INFO" if rc == 0 else "FAIL", "run for predict",
                f"python -m train_tpu exited {rc}" + ("" if rc == 0 else "\n" + tail(text)))
    return run if rc == 0 else None


# ------------------------------------------------------------------------------ backend path
def synthetic_tiles(sz: dict, seed: int = 0):
    """In-memory cell tiles `uint8 [K, t, t, 4]` and their cells' multi-hot labels `[K, 19]`,
    cut by the project's own functions from testkit.synthetic images (TF-free)."""
    import numpy as np

    from common.labels import NUM_CLASSES
    from common.preprocess import TileSpec, cell_tiles
    from testkit.synthetic import CHANNEL_NAMES, render_image

    spec = TileSpec(size=sz["tile"])
    xs, ys = [], []
    for i in range(sz["train_images"]):
        img = render_image(seed, i, sz["train_image_size"], sz["train_image_size"])
        image = np.stack([img["channels"][c] for c in CHANNEL_NAMES], axis=-1)
        ids = list(range(1, len(img["cell_labels"]) + 1))
        tiles = cell_tiles(image, img["cells"], spec, cell_ids=ids)[0]
        for tile, labels in zip(tiles, img["cell_labels"]):
            y = np.zeros(NUM_CLASSES, np.float32)
            y[list(labels)] = 1.0
            xs.append(tile)
            ys.append(y)
    return np.stack(xs), np.stack(ys)


def backend_train(report: Report, args, sz: dict, work: Path, tf_present: bool) -> dict | None:
    """The Keras backend section's training: EfficientNet-B0 (the project's 4-channel stem)
    trained on in-memory synthetic cell tiles. Returns what the predict half needs (None when
    no backend could run)."""
    import numpy as np

    backend = keras_backend_setup(report, tf_present)
    if backend is None:
        report.line("FAIL", "keras backend", "no TensorFlow, jax or torch to run Keras 3 on")
        return
    try:
        import keras
    except Exception as err:  # noqa: BLE001 - any import failure is this check's result
        report.line("FAIL", "keras backend", f"import keras with KERAS_BACKEND={backend}: {err}")
        return
    kind, desc, peak_fn, gpu_name = backend_device(keras.backend.backend(), args.device)
    report.line("INFO", "backend environment", f"Keras {keras.__version__} on {keras.backend.backend()} "
                f"({desc}), Python {platform.python_version()}, {os.cpu_count()} CPU cores")
    if args.device == "gpu" and kind != "gpu":
        report.line("FAIL", "device", f"--device gpu, but the {backend} backend lists no GPU")
        return
    gpu = kind == "gpu"
    report.device = (f"GPU {gpu_name} via {backend}" if gpu else f"CPU ({os.cpu_count()} cores) via {backend}")
    report.device = report.device.replace(",", " ")
    policy = "mixed_float16" if gpu else "float32"

    # model: the project's own factory, or keras.applications when it cannot be imported
    t = time.perf_counter()
    try:
        from common import models
        from train_tpu import model as modellib

        model = models.build_model("efficientnet_b0", sz["tile"], dropout=0.0, drop_connect_rate=0.0,
                                   dtype_policy=policy)
        how = "common.models.build_model (4-channel stem)"
    except ImportError as err:
        models = None
        keras.config.set_dtype_policy(policy)
        base = keras.applications.EfficientNetB0(include_top=False, weights=None, pooling="avg",
                                                 input_shape=(sz["tile"], sz["tile"], 4))
        out = keras.layers.Dense(19, activation="sigmoid", dtype="float32")(base.output)
        model = keras.Model(base.input, out)
        keras.config.set_dtype_policy("float32")
        how = f"keras.applications.EfficientNetB0 directly (common.models failed to import: {err})"
    report.line("INFO", "backend model", f"EfficientNet-B0 {sz['tile']} px, {policy}, from {how}, "
                f"built in {time.perf_counter() - t:.1f} s")
    try:
        from train_tpu.config import make_config
        from train_tpu.train import make_loss, make_optimizer

        cfg = make_config("smoke", size=sz["tile"], batch_size=sz["batch"], epochs=1)
        model.compile(optimizer=make_optimizer(cfg, sz["steps"] * sz["epochs"]), loss=make_loss(cfg))
        opt_how = "the trainer's AdamW + BCE"
    except ImportError:
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="binary_crossentropy")
        opt_how = "keras AdamW + BCE (train_tpu not importable)"

    x, y = synthetic_tiles(sz)
    rng = np.random.default_rng(0)
    batch, steps = sz["batch"], sz["steps"] * sz["epochs"]
    batches = [rng.choice(len(x), batch, replace=len(x) < batch) for _ in range(steps)]
    t = time.perf_counter()
    losses = [float(model.train_on_batch(x[batches[0]].astype("float32"), y[batches[0]]))]
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for idx in batches[1:]:
        losses.append(float(model.train_on_batch(x[idx].astype("float32"), y[idx])))
    timed = time.perf_counter() - t
    finite = all(math.isfinite(v) for v in losses)
    falls = finite and losses[-1] < losses[0]
    report.ok(finite and falls, "backend training loss",
              f"{steps} steps of batch {batch} on {len(x)} synthetic cell tiles ({opt_how}, {policy}); "
              f"loss {' -> '.join(f'{v:.4f}' for v in losses)}"
              + ("" if finite else " (NOT FINITE)") + ("" if falls or not finite else " (does not fall)"))
    if steps > 1:
        report.train = (steps - 1) * batch / timed
    report.line("INFO", "backend training speed",
                f"{report.train or float('nan'):.1f} ex/s over steps 2..{steps}; first step (compile) "
                f"{compile_s:.1f} s")
    return dict(model=model, models=models, modellib=modellib if models is not None else None,
                gpu=gpu, backend=backend, peak_fn=peak_fn, x=x, rng=rng)


def main(argv=None) -> int:
    return run_checks(argv, jobs=("train",), prog="accel_check_train", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
