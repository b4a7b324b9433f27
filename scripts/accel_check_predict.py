"""accel-check, predict: `python -m infer_gpu predict` + validate on synthetic images (TF path,
GPU against CPU on a GPU), or the backend's forward speed and predict's CPU stages; see
scripts/accel_check.py.

    python3 scripts/accel_check_predict.py [--run RUN_DIR] [--device auto|gpu|cpu] [--smallest] [...]
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accel_check_common import (STAGES, Report, kaggle_mix, project, run_checks,  # noqa: E402
                                run_logged, tail)


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


def predict_checks(report: Report, args, sz: dict, work: Path, device: str, run: Path | None) -> None:
    """`python -m infer_gpu predict` on synthetic images with `run`, then validate; on a GPU
    the same on the CPU, compared; per-stage seconds and the 559-image projection."""
    gpu = device == "gpu"
    timeout = args.timeout
    if run is None:
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
def backend_predict(report: Report, args, sz: dict, work: Path, state: dict) -> None:
    """The Keras backend section's predict figures: forward-only tiles/s of the trained model
    (its float32 export on a GPU), peak memory, the TF-free CPU stages of predict and the
    projection."""
    import numpy as np

    model, models, modellib = state["model"], state["models"], state["modellib"]
    gpu, backend, peak_fn, x, rng = state["gpu"], state["backend"], state["peak_fn"], state["x"], state["rng"]

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
    from common.preprocess import Preprocess, TileSpec
    from infer_gpu import reading
    from infer_gpu.config import PredictConfig

    data = work / "predict_data"
    synthetic.generate(str(data), n=sz["images"], size=sz["image_size"], seed=1)
    opts = PredictConfig()
    used = reading.segmentation_used(opts)  # predict's default segmentation (no run to follow here)
    seg = reading.segmentation_options(opts, used)
    spec = Preprocess(TileSpec(size=sz["tile"]))
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


def main(argv=None) -> int:
    return run_checks(argv, jobs=("predict",), prog="accel_check_predict", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
