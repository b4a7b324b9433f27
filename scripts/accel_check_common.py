"""accel-check's shared parts: the report lines, child processes, the Kaggle projection,
device detection, the sizes and the command line, and `run_checks`, which runs the jobs
(`accel_check_train`, `accel_check_predict`) on the TensorFlow path or the Keras backend path.
The checks themselves are described in scripts/accel_check.py, the entry that runs both.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (ROOT, HERE):  # runnable from a checkout without installing the package
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from common import quiet  # noqa: E402  (after the path set-up above)

quiet.quiet(verbose="--verbose" in sys.argv[1:])  # before TensorFlow is imported

from common.config import positive_int  # noqa: E402

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


def child_env() -> dict:
    """This environment with the checkout on PYTHONPATH, for the child processes."""
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
                                env=env or child_env(), timeout=timeout).returncode
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


# ------------------------------------------------------------------------------ devices
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


# ------------------------------------------------------------------------------ main
def sizes(args, device_hint: str) -> dict:
    base = dict(DEFAULTS["smallest" if args.smallest else device_hint])
    for key in base:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    base["workers"] = args.workers if args.workers is not None else (1 if args.smallest else min(4, os.cpu_count() or 1))
    return base


def build_parser(prog: str = "accel_check", description: str = "") -> argparse.ArgumentParser:
    """The options of every accel-check script (sizes, device, work folder, ...)."""
    p = argparse.ArgumentParser(prog=prog, description=description,
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
    a("--run", help="accel_check_predict.py alone: predict with this trained cell run (default: "
      "train one first, as accel_check_train.py does)")
    a("--verbose", action="store_true", help=quiet.VERBOSE_HELP)
    return p


def run_checks(argv=None, jobs=("train", "predict"), prog: str = "accel_check", description: str = "") -> int:
    """Parse `argv`, run the `jobs` (train, predict) on the TF path (or the backend path
    without TensorFlow), print the verdict and the last line; the exit status."""
    parser = build_parser(prog, description)
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch traces and is not timed)")
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
            tf_checks(report, args, sz, work, jobs)
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
            backend_checks(report, args, sz, work, jobs,
                           tf_present=False if not args.backend_only else _tf_importable())
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


def tf_checks(report: Report, args, sz: dict, work: Path, jobs) -> None:
    """The TF path: environment, then training (its run) and predict on that run."""
    import accel_check_predict
    import accel_check_train

    device, gpus = tf_environment(report, args)
    if device is None:
        return
    run = None
    if "train" in jobs:
        run = accel_check_train.train_checks(report, args, sz, work, device, gpus)
    if "predict" in jobs:
        if "train" not in jobs:
            run = Path(args.run) if args.run else accel_check_train.train_for_predict(report, args, sz, work, device)
        accel_check_predict.predict_checks(report, args, sz, work, device, run)


def backend_checks(report: Report, args, sz: dict, work: Path, jobs, tf_present: bool) -> None:
    """The Keras backend path: train the model in memory (it is what predict scores with),
    then the predict figures from it."""
    import accel_check_predict
    import accel_check_train

    state = accel_check_train.backend_train(report, args, sz, work, tf_present)
    if state is not None and "predict" in jobs:
        accel_check_predict.backend_predict(report, args, sz, work, state)


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
