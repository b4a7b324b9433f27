"""accel-check: prove and measure the accelerator paths in one command (`make accel-check`).

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

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common.config import positive_int  # noqa: E402  (after the path set-up above)

KAGGLE_IMAGES = 559
BUDGET_HOURS = 9.0
KAGGLE_SAMPLE = ROOT.parent / "shared" / "data" / "kaggle2021" / "sample_submission.csv"
# Used when that file is absent: the test set's (width, height) -> count, as counted in the
# competition's sample_submission.csv (462 at 2048 px, 68 at 1728 px, 29 at 3072 px).
BUILTIN_MIX = {(2048, 2048): 462, (1728, 1728): 68, (3072, 3072): 29}
# GPU vs CPU confidence tolerance, absolute on probabilities. The exported model is float32
# on both, but TensorFlow runs float32 convolutions and matmuls on Ampere+ GPUs in TF32 by
# default: inputs rounded to a 10-bit mantissa (relative error 2^-11 ~ 5e-4 per op). Over
# EfficientNet-B0's ~80 convolutions (BatchNorm keeps activations O(1)) that gives logit
# differences of order 1e-2; the sigmoid's slope is at most 0.25, and the combine rule only
# multiplies by factors <= 1, so confidences differ by well under 0.02. Segmentation and mask
# encoding run on the CPU in both runs, so IDs and masks must match exactly.
TOLERANCE = 0.02
GPU_PLATFORMS = ("gpu", "cuda", "rocm")  # jax reports CUDA devices as "gpu"; accept the plugin names
STAGES = ("decode", "segment", "tiles", "score", "encode")

# Sizes per (device, smallest): the GPU ones fit the 10-minute limit with TF start-up.
DEFAULTS = {
    "gpu": dict(tile=224, batch=64, steps=10, epochs=3, train_images=24, train_image_size=512,
                images=20, image_size=2048, pipeline_batches=20, infer_batch=64, infer_repeats=10),
    "cpu": dict(tile=64, batch=16, steps=5, epochs=3, train_images=8, train_image_size=256,
                images=20, image_size=2048, pipeline_batches=10, infer_batch=64, infer_repeats=3),
    "smallest": dict(tile=32, batch=8, steps=3, epochs=2, train_images=4, train_image_size=256,
                     images=2, image_size=256, pipeline_batches=4, infer_batch=8, infer_repeats=2),
}


# ------------------------------------------------------------------------------ report
class Report:
    """The printed result lines, the failures, and the figures for the last line."""

    def __init__(self):
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.device = "CPU"
        self.train = None  # examples/s
        self.predict = None  # s/image
        self.hours = None

    def line(self, status: str, name: str, text: str) -> None:
        if status == "FAIL":
            self.failures.append(name)
        print(f"[{status:^4}] {name}: {text}", flush=True)

    def ok(self, cond: bool, name: str, text: str) -> bool:
        self.line("OK" if cond else "FAIL", name, text)
        return cond

    def last_line(self) -> str:
        def fmt(v, spec):
            return "n/a" if v is None or not math.isfinite(v) else format(v, spec)

        return (f"accel-check: {self.device}, train {fmt(self.train, '.1f')} ex/s, "
                f"predict {fmt(self.predict, '.3f')} s/image, "
                f"{KAGGLE_IMAGES} images ~ {fmt(self.hours, '.2f')} h")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None):
    """Run `cmd` from the repo root, stdout+stderr to `log`; returns (returncode, seconds, text)."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env=env or _env(), timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - start, log.read_text(errors="replace")


def tail(text: str, n: int = 8) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()][-n:]
    return "\n".join("         | " + ln for ln in lines)


def kaggle_mix(path: str) -> tuple[dict, str]:
    """`{(width, height): count}` of the Kaggle test set and where it came from."""
    p = Path(path)
    if p.is_file():
        mix: dict = {}
        with open(p, newline="") as fh:
            for row in csv.DictReader(fh):
                key = (int(row["ImageWidth"]), int(row["ImageHeight"]))
                mix[key] = mix.get(key, 0) + 1
        return mix, str(p)
    return dict(BUILTIN_MIX), "built-in mix (file absent)"


def project(report: Report, per_image_s: float, image_size: int, mix: dict, source: str,
            gpu: bool, label: str) -> None:
    """Scale the per-image cost of `image_size`^2 px images by pixel count to the Kaggle mix."""
    equivalents = sum(w * h * n for (w, h), n in mix.items()) / float(image_size * image_size)
    hours = per_image_s * equivalents / 3600.0
    report.hours = hours
    n_images = sum(mix.values())
    sizes = ", ".join(f"{n} x {w}x{h}" for (w, h), n in sorted(mix.items(), key=lambda kv: -kv[1]))
    text = (f"{n_images} images ({sizes}; from {source}) = {equivalents:.0f} images of "
            f"{image_size} px; {label}: {per_image_s:.3f} s/image -> {hours:.2f} h of the "
            f"{BUDGET_HOURS:.0f} h limit ({100 * hours / BUDGET_HOURS:.0f}%)")
    if gpu:
        report.ok(hours < BUDGET_HOURS, "projection", text)
    else:
        report.line("INFO", "projection", text + " (CPU figures; Kaggle runs on a GPU)")


# ------------------------------------------------------------------------------ TF path
def tf_environment(report: Report, args) -> tuple[str | None, list]:
    """Versions and devices; hides the GPUs from THIS process (the children use them).
    Returns (device "gpu"/"cpu" or None when the asked-for device is missing, GPU list)."""
    import tensorflow as tf
    import keras

    gpus = tf.config.list_physical_devices("GPU")
    report.line("INFO", "environment",
                f"TensorFlow {tf.__version__}, Keras {keras.__version__} (backend "
                f"{keras.backend.backend()}), Python {platform.python_version()}, "
                f"{os.cpu_count()} CPU cores")
    devices = tf.config.list_physical_devices()
    report.line("INFO", "devices", ", ".join(f"{d.device_type}:{d.name.rsplit(':', 1)[-1]}"
                                             for d in devices) or "none")
    if gpus:
        info = tf.sysconfig.get_build_info()
        report.line("INFO", "gpu build", f"CUDA {info.get('cuda_version', '?')}, cuDNN "
                    f"{info.get('cudnn_version', '?')} (the versions TensorFlow was built with)")
        mem = nvidia_smi_memory()
        for i, g in enumerate(gpus):
            details = tf.config.experimental.get_device_details(g)
            name = details.get("device_name", g.name)
            cc = details.get("compute_capability")
            report.line("INFO", f"gpu {i}", f"{name}, compute capability {cc}, memory "
                        f"{mem[i] if i < len(mem) else 'unknown (no nvidia-smi)'}")
    # This process only times the input pipeline: keep it off the GPUs, whose memory TF would
    # otherwise claim here and take from the training and predict processes.
    tf.config.set_visible_devices([], "GPU")
    if args.device == "gpu" and not gpus:
        report.line("FAIL", "device", "--device gpu, but TensorFlow lists no GPU")
        return None, gpus
    if args.device == "cpu" or not gpus:
        report.device = f"CPU ({os.cpu_count()} cores)"
        return "cpu", gpus
    report.device = f"{len(gpus)} GPU" + ("s" if len(gpus) > 1 else "")
    return "gpu", gpus


def nvidia_smi_memory() -> list[str]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [ln.split(",", 1)[-1].strip() for ln in out.strip().splitlines()]


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


PREDICT_WRAPPER = """
import json, sys
from infer_gpu.cli import main
rc = main(sys.argv[1:])
peaks = []
try:
    import tensorflow as tf
    for i, _ in enumerate(tf.config.list_logical_devices("GPU")):
        peaks.append(int(tf.config.experimental.get_memory_info(f"GPU:{i}")["peak"]))
except Exception as err:  # report, never hide, why no figure came back
    print("accel-check-peak-error:", err)
print("accel-check-peak-bytes:", json.dumps(peaks))
sys.exit(rc)
"""


def predict_run(work: Path, data: Path, run: Path, device: str, sz: dict, timeout: float):
    """`python -m infer_gpu predict` (through its own main, in a child that then reads TF's
    peak GPU memory); returns (rc, report dict or None, peaks, csv path, log)."""
    out = work / f"submission_{device}.csv"
    cmd = [sys.executable, "-c", PREDICT_WRAPPER, "predict", "--images", str(data / "images"),
           "--sample-submission", str(data / "sample_submission.csv"), "--model", str(run),
           "--out", str(out), "--device", device, "--no-progress",
           "--workers", str(sz["workers"]), "--batch-size", str(sz["infer_batch"])]
    rc, _, text = run_logged(cmd, work / f"predict_{device}.log", timeout)
    report_path = Path(str(out) + ".report.json")
    summary = json.loads(report_path.read_text()) if report_path.exists() else None
    peaks = []
    for ln in text.splitlines():
        if ln.startswith("accel-check-peak-bytes:"):
            peaks = json.loads(ln.split(":", 1)[1])
    return rc, summary, peaks, out, text


def compare_submissions(a: Path, b: Path, tolerance: float, min_score: float = 0.01):
    """IDs and per-image mask sets must be equal; confidences of each (mask, label) within
    `tolerance` (a detection on one side only is allowed when the other side's confidence is
    below min_score + tolerance). Returns (ok, message)."""
    from common.submission import read_submission

    # A 2048 px image's row (~20 cells x 19 labels x ~300-char masks) passes the csv module's
    # default 128 KiB field limit, which common.submission does not raise (reported); here,
    # in this process, lift it so the comparison can read what predict wrote.
    csv.field_size_limit(2**31 - 1)
    ra, rb = read_submission(str(a)), read_submission(str(b))
    ids_a, ids_b = [r.image_id for r in ra], [r.image_id for r in rb]
    if ids_a != ids_b:
        return False, f"different IDs: {sorted(set(ids_a) ^ set(ids_b))[:5]}"
    worst, n, problems = 0.0, 0, []
    for x, y in zip(ra, rb):
        da = {(p.mask, p.label): p.confidence for p in x.predictions}
        db = {(p.mask, p.label): p.confidence for p in y.predictions}
        if {m for m, _ in da} != {m for m, _ in db}:
            problems.append(f"{x.image_id}: different masks")
            continue
        for key in set(da) | set(db):
            d = abs(da.get(key, 0.0) - db.get(key, 0.0))
            if key not in da or key not in db:
                d = max(0.0, max(da.get(key, 0.0), db.get(key, 0.0)) - min_score)
            worst, n = max(worst, d), n + 1
    if problems:
        return False, "; ".join(problems[:3])
    ok = worst <= tolerance
    return ok, (f"same {len(ids_a)} IDs and masks; {n} confidences, max |GPU - CPU| = "
                f"{worst:.2e} ({'<=' if ok else '>'} tolerance {tolerance:g}: TF32 on the GPU)")


def tf_checks(report: Report, args, sz: dict, work: Path) -> None:
    device, gpus = tf_environment(report, args)
    if device is None:
        return
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
        env = _env()
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

    # 3. inference
    if not train_ok:
        report.line("SKIP", "predict", "no trained run (training failed)")
        return
    from testkit import synthetic

    data = work / "predict_data"
    t = time.perf_counter()
    synthetic.generate(str(data), n=sz["images"], size=sz["image_size"], seed=1)
    report.line("INFO", "predict data", f"{sz['images']} synthetic images of {sz['image_size']} px "
                f"in {time.perf_counter() - t:.1f} s")
    rc, summary, peaks, csv_path, text = predict_run(work, data, run, device, sz, timeout)
    if rc != 0 or not summary or not summary.get("complete"):
        report.line("FAIL", "predict", f"python -m infer_gpu predict --device {device} exited {rc}\n{tail(text)}")
        return
    n = max(1, int(summary["processed"]))
    errors = summary.get("errors") or []
    report.ok(not errors, "predict", f"--device {device}: {n} images, {summary['cells']} cells, "
              f"{summary['detections']} detections on {summary['device']}"
              + (f"; {len(errors)} image errors: {errors[:2]}" if errors else ""))
    rcv, _, vtext = run_logged([sys.executable, "-m", "infer_gpu", "validate", "--submission", str(csv_path),
                                "--sample-submission", str(data / "sample_submission.csv")],
                               work / "validate.log", timeout)
    report.ok(rcv == 0, "validate", f"python -m infer_gpu validate exited {rcv}"
              + ("" if rcv == 0 else "\n" + tail(vtext)))
    secs = summary["seconds"]
    report.predict = summary["wall_seconds"] / n
    report.line("INFO", "predict stages",
                "s/image: " + ", ".join(f"{s} {secs.get(s, 0.0) / n:.3f}" for s in STAGES)
                + f" (CPU stages summed over {sz['workers']} reader threads); wall "
                f"{report.predict:.3f} s/image incl. start-up and model tracing")
    if gpu:
        peak = ", ".join(f"GPU {i} {b / 2**30:.2f} GiB" for i, b in enumerate(peaks)) or "not reported"
        report.line("INFO", "gpu memory", f"peak during predict (tf.config.experimental.get_memory_info): {peak}")
        rcc, sc, _, csv_cpu, ctext = predict_run(work, data, run, "cpu", sz, timeout)
        if rcc != 0 or not sc or not sc.get("complete"):
            report.line("FAIL", "gpu vs cpu", f"predict --device cpu exited {rcc}\n{tail(ctext)}")
        else:
            ok, msg = compare_submissions(csv_path, csv_cpu, args.tolerance)
            report.ok(ok, "gpu vs cpu", msg + f"; CPU wall {sc['wall_seconds'] / n:.3f} s/image")
    mix, source = kaggle_mix(args.kaggle_sample)
    project(report, report.predict, sz["image_size"], mix, source, gpu,
            f"predict wall on {'the GPU' if gpu else 'the CPU'}")


# ------------------------------------------------------------------------------ backend path
def keras_backend_setup(report: Report, tf_present: bool) -> str | None:
    """Choose the Keras backend before keras is imported: KERAS_BACKEND when set; without
    TensorFlow, jax (then torch) when importable. Returns the backend name or None."""
    import importlib.util

    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    if tf_present:
        return "tensorflow"
    for name in ("jax", "torch"):
        if importlib.util.find_spec(name) is not None:
            os.environ["KERAS_BACKEND"] = name
            return name
    return None


def backend_device(backend: str, want: str):
    """(kind "gpu"/"cpu", description, peak-bytes function or None) for the Keras backend."""
    if backend == "jax":
        import jax

        devs = jax.devices()
        gpus = [d for d in devs if d.platform in GPU_PLATFORMS]
        desc = f"jax {jax.__version__}: " + ", ".join(f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip() for d in devs)
        if gpus and want != "cpu":
            def peak():
                stats = gpus[0].memory_stats() or {}
                return stats.get("peak_bytes_in_use")
            return "gpu", desc, peak, gpus[0].device_kind
        return "cpu", desc, None, None
    if backend == "torch":
        import torch

        if torch.cuda.is_available() and want != "cpu":
            return ("gpu", f"torch {torch.__version__}: cuda {torch.cuda.get_device_name(0)}",
                    lambda: torch.cuda.max_memory_allocated(0), torch.cuda.get_device_name(0))
        return "cpu", f"torch {torch.__version__}: cpu", None, None
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    desc = f"tensorflow {tf.__version__}: " + ", ".join(d.name for d in tf.config.list_physical_devices())
    if gpus and want != "cpu":
        return "gpu", desc, lambda: tf.config.experimental.get_memory_info("GPU:0")["peak"], "GPU"
    if gpus:
        tf.config.set_visible_devices([], "GPU")
    return "cpu", desc, None, None


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


def backend_checks(report: Report, args, sz: dict, work: Path, tf_present: bool) -> None:
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

    # inference: the float32 model predict uses (train_tpu.model.export_float32 on a GPU)
    infer_model, note = model, "the trained float32 model"
    if gpu and models is not None:
        t = time.perf_counter()
        infer_model = modellib.export_float32(model, "efficientnet_b0", sz["tile"], dropout=0.0)
        note = f"train_tpu.model.export_float32 copy (as predict loads), built in {time.perf_counter() - t:.1f} s"
    ib = sz["infer_batch"]
    xb = x[rng.choice(len(x), ib, replace=len(x) < ib)].astype("float32")
    t = time.perf_counter()
    probs = np.asarray(infer_model.predict_on_batch(xb))
    first_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(sz["infer_repeats"]):
        probs = np.asarray(infer_model.predict_on_batch(xb))
    tiles_per_s = sz["infer_repeats"] * ib / (time.perf_counter() - t)
    sane = probs.shape == (ib, 19) and bool(np.all(np.isfinite(probs))) and bool(np.all((probs >= 0) & (probs <= 1)))
    report.ok(sane, "backend inference", f"forward-only batch {ib}, {note}: {tiles_per_s:.1f} tiles/s "
              f"(first call {first_s:.1f} s); output {probs.shape}, finite in [0, 1]: {sane}")
    if gpu:
        peak = peak_fn() if peak_fn else None
        report.line("INFO", "gpu memory", f"peak {peak / 2**30:.2f} GiB ({backend} memory stats)"
                    if peak else f"not reported by {backend}")

    # the TF-free CPU stages of predict, on synthetic images of --image-size px
    from testkit import synthetic
    from common.preprocess import TileSpec
    from infer_gpu import reading
    from infer_gpu.config import PredictConfig

    data = work / "predict_data"
    synthetic.generate(str(data), n=sz["images"], size=sz["image_size"], seed=1)
    opts = PredictConfig()
    used = reading.segmentation_used(opts)  # predict's default segmentation (no run to follow here)
    seg = reading.segmentation_options(opts, used)
    spec = TileSpec(size=sz["tile"])
    total = {s: 0.0 for s in STAGES}
    cells = 0
    for task in reading.read_sample(str(data / "sample_submission.csv")):
        p = reading.prepare_image(task, str(data / "images"), (spec,), backend=used.backend, seg_options=seg)
        if p.error:
            report.line("FAIL", "cpu stages", f"{task[0]}: {p.error}")
            return
        for s, v in p.seconds.items():
            total[s] += v
        cells += p.n_cells
    n = sz["images"]
    per = {s: total[s] / n for s in STAGES}
    per["score"] = (cells / n) / tiles_per_s
    report.predict = sum(per.values())
    report.line("INFO", "predict stages",
                f"s/image at {sz['image_size']} px ({cells / n:.0f} cells/image): "
                + ", ".join(f"{s} {per[s]:.3f}" for s in STAGES)
                + f"; sum {report.predict:.3f} (CPU stages from infer_gpu.reading.prepare_image on one "
                f"thread + score = cells / {backend} tiles/s; sequential, so conservative)")
    mix, source = kaggle_mix(args.kaggle_sample)
    project(report, report.predict, sz["image_size"], mix, source, gpu,
            f"model time from the {backend} backend + CPU stages")


# ------------------------------------------------------------------------------ main
def sizes(args, device_hint: str) -> dict:
    base = dict(DEFAULTS["smallest" if args.smallest else device_hint])
    for key in base:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    base["workers"] = args.workers if args.workers is not None else (1 if args.smallest else min(4, os.cpu_count() or 1))
    return base


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accel_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--device", default="auto", choices=("auto", "gpu", "cpu"),
      help="auto: a GPU when one is listed, else the CPU; gpu: fail without one")
    a("--smallest", action="store_true", help="the tiniest sizes (CPU tests and CI): "
      + ", ".join(f"{k}={v}" for k, v in DEFAULTS["smallest"].items()))
    a("--backend-only", action="store_true",
      help="skip the TensorFlow checks (as when TF is not installed) and run the Keras backend "
      "section on KERAS_BACKEND (default: tensorflow when installed, else jax, else torch)")
    a("--require-tensorflow", action="store_true",
      help="count TF checks that cannot run (TF missing, or --backend-only) as failures")
    a("--tile", type=positive_int, help="training/model tile side, px (GPU 224, CPU 64)")
    a("--batch", type=positive_int, help="global training batch (GPU 64, CPU 16)")
    a("--steps", type=positive_int, help="training steps per epoch (GPU 10, CPU 5)")
    a("--epochs", type=positive_int, help="training epochs, >= 2 so the first (tracing) one is "
      "not timed (GPU 3, CPU 3)")
    a("--train-images", type=positive_int, help="synthetic training images (GPU 24, CPU 8)")
    a("--train-image-size", type=positive_int, help="their side, px (GPU 512, CPU 256)")
    a("--images", type=positive_int, help="synthetic images to predict (20)")
    a("--image-size", type=positive_int, help="their side, px (2048)")
    a("--pipeline-batches", type=positive_int, help="batches per timed input-pipeline pass")
    a("--infer-batch", type=positive_int, help="tiles per model call in predict / the backend "
      "section's forward-only timing (64)")
    a("--infer-repeats", type=positive_int, help="timed forward calls in the backend section")
    a("--workers", type=int, help="predict reader threads (default min(4, cores); 1 with --smallest)")
    a("--tolerance", type=float, default=TOLERANCE, help="max |GPU - CPU| confidence (see TOLERANCE "
      "in this file for why)")
    a("--kaggle-sample", default=str(KAGGLE_SAMPLE), help="Kaggle's sample_submission.csv, for the "
      "test set's size mix (a built-in mix when absent)")
    a("--work-dir", help="keep the work files (shards, runs, CSVs, logs) here; default: a "
      "temporary folder, deleted at the end")
    a("--timeout", type=float, default=540.0, help="seconds allowed for each child process")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.epochs is not None and args.epochs < 2:
        build_parser().error("--epochs must be >= 2 (the first epoch traces and is not timed)")
    report = Report()
    started = time.perf_counter()
    tf_present = False
    if not args.backend_only:
        try:
            import tensorflow  # noqa: F401

            tf_present = True
        except ImportError as err:
            why = f"TensorFlow is not installed ({err})"
    else:
        why = "--backend-only"
    work_ctx = (tempfile.TemporaryDirectory(prefix="accel-check-") if not args.work_dir else None)
    work = Path(work_ctx.name if work_ctx else args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        if tf_present:
            import tensorflow as tf

            hint = "gpu" if (tf.config.list_physical_devices("GPU") and args.device != "cpu") else "cpu"
            sz = sizes(args, hint)
            tf_checks(report, args, sz, work)
        else:
            status = "FAIL" if args.require_tensorflow else "SKIP"
            for name in ("tf environment", "tf training", "tf predict"):
                report.line(status, name, f"not run: {why}")
            report.notes.append(f"TensorFlow checks not run ({why}); figures from the Keras backend "
                                "section")
            if args.device == "cpu":
                os.environ["JAX_PLATFORMS"] = "cpu"  # before jax is imported: keep it off the GPU
            hint = "gpu" if args.device == "gpu" or _backend_gpu_guess() else "cpu"
            sz = sizes(args, hint)
            backend_checks(report, args, sz, work, tf_present=False if not args.backend_only else _tf_importable())
    except Exception as err:  # noqa: BLE001 - an unexpected error is a failed check, reported
        import traceback

        report.line("FAIL", "accel-check", f"{type(err).__name__}: {err}\n{tail(traceback.format_exc(), 12)}")
    finally:
        if work_ctx:
            work_ctx.cleanup()
    for note in report.notes:
        print(f"note: {note}")
    verdict = "all checks passed" if not report.failures else "FAILED: " + ", ".join(report.failures)
    print(f"accel-check: {verdict} in {time.perf_counter() - started:.0f} s")
    print(report.last_line(), flush=True)
    return 1 if report.failures else 0


def _tf_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # an import hook refuses it, or sys.modules holds None
        return False


def _backend_gpu_guess() -> bool:
    """Whether the GPU sizes apply, before keras is imported: jax lists a GPU, or torch sees CUDA."""
    backend = os.environ.get("KERAS_BACKEND", "")
    try:
        if backend in ("", "jax"):
            import jax

            return any(d.platform in GPU_PLATFORMS for d in jax.devices())
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no backend: the CPU sizes
        return False
    return False


if __name__ == "__main__":
    sys.exit(main())
