"""predict on Beam against the local engine on one machine, and a projection for Dataflow GPUs.

    .venv/bin/python benchmarks/bench_predict_beam.py [--n 96] [--size 512] [--workers 2] [--repeats 1]

On the same synthetic images (generated first) and the same run folder (an untrained
EfficientNet from common.models at --tile px: speed does not depend on the weights), times
  (a) the local engine, `predict --workers W` (W reader threads ahead of one scorer, in one process),
  (b) the Beam engine on W worker threads, `predict --engine beam --workers W
      --direct_running_mode multi_threading` (DirectRunner in one process: each thread reads
      inline and scores its own batches with the runs the process loaded), and
  (c) the Beam engine on W worker processes, `predict --engine beam --workers W` (DirectRunner's
      default here, multi_processing: each process imports TensorFlow and loads the run),
all with TensorFlow's default thread pools, best of --repeats after one warm-up run of each
(they take turns, so a change in the machine's load reaches all);
checks that all wrote the same rows (IDs, sizes, masks; confidences within 1e-5) and prints
images/s and the ratio (b)/(a), target >= 0.7: the equal-terms one (one process, W threads,
both warm). (c)/(a) is printed too, with what differs: every Beam run with processes starts
them inside the timed run (TensorFlow import, run loaded, scorer traced: 7-15 s here), which
a warm process has done already; so that ratio rises with the collection.

Then a projection for scoring the 83,762 public HPA images on N Dataflow GPU workers from the
per-image seconds measured here (CPU stages scaled by area to --real-side) and the GPU seconds
per image of `make accel-check` where given (--gpu-seconds), under the assumptions it prints.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import quiet  # noqa: E402

quiet.quiet(verbose="--verbose" in sys.argv[1:])
# DirectRunner's worker processes import the project too
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

PUBLIC_IMAGES = 83_762
CPU_STAGES = ("decode", "segment", "tiles", "encode")


def same_rows(a: str, b: str, tol: float = 1e-5) -> bool:
    import numpy as np

    from common import submission

    ra, rb = submission.read_submission(a), submission.read_submission(b)
    if [(r.image_id, r.width, r.height) for r in ra] != [(r.image_id, r.width, r.height) for r in rb]:
        return False
    for x, y in zip(ra, rb):
        if [(p.label, p.mask) for p in x.predictions] != [(p.label, p.mask) for p in y.predictions]:
            return False
        if not np.allclose([p.confidence for p in x.predictions], [p.confidence for p in y.predictions],
                           atol=tol, rtol=0):
            return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=96,
                   help="synthetic images (enough that the Beam workers' start-up, 10-15 s here, is not most of it)")
    p.add_argument("--size", type=int, default=512, help="synthetic image side, px")
    p.add_argument("--tile", type=int, default=64, help="cell tile side, px")
    p.add_argument("--backbone", default="efficientnet_b0")
    p.add_argument("--workers", type=int, default=2, help="reader threads (local) / worker threads and processes (Beam)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each engine (best is kept)")
    p.add_argument("--real-side", type=int, default=2048, help="projection: side of the real images, px")
    p.add_argument("--vcpus-per-worker", type=int, default=8, help="projection: vCPUs per GPU worker (n1-standard-8)")
    p.add_argument("--gpu-seconds", type=float, default=0.0,
                   help="projection: GPU seconds per 2048 px image (make accel-check's predict figure); "
                   "0 = not measured yet: then 0.05 s is assumed (a T4 scoring ~20 cells of an image "
                   "at 224 px with EfficientNet-B0)")
    p.add_argument("--usd-per-worker-hour", type=float, default=0.90,
                   help="projection: n1-standard-8 + one T4 on Dataflow, per hour (an assumption: check "
                   "the current price list for your region)")
    p.add_argument("--startup-min", type=float, default=8.0, help="projection: minutes to start GPU workers")
    args = p.parse_args(argv)

    from common import models as modellib
    from common.preprocess import Preprocess, TileSpec
    from infer_gpu import engine
    from infer_gpu.config import PredictConfig
    from testkit import synthetic

    with tempfile.TemporaryDirectory(prefix="bench-predict-beam-") as tmp:
        synthetic.generate(os.path.join(tmp, "data"), n=args.n, size=args.size, seed=0)
        run = Path(tmp, "run")
        run.mkdir()
        modellib.save_model(modellib.build_model(args.backbone, args.tile), str(run / "model.keras"))
        Preprocess(TileSpec(size=args.tile)).save(str(run / "preprocess.json"))
        (run / "config.json").write_text('{"note": "untrained, for speed"}')
        base = PredictConfig(images=os.path.join(tmp, "data", "images"),
                             sample_submission=os.path.join(tmp, "data", "sample_submission.csv"),
                             models=(str(run),), out=os.path.join(tmp, "x.csv"), progress=False,
                             workers=args.workers, batch_size=args.batch_size)
        import dataclasses

        engines = (("local", {}),
                   ("threads", {"engine": "beam", "beam_args": ("--direct_running_mode", "multi_threading")}),
                   ("processes", {"engine": "beam"}))
        times, summaries = {}, {}
        for k in range(1 + args.repeats):  # round 0 warms each up; then they take turns
            for name, extra in engines:
                out = os.path.join(tmp, f"{name}{k}.csv")
                start = time.perf_counter()
                summary = engine.predict(dataclasses.replace(base, out=out, **extra))
                took = time.perf_counter() - start
                if k and took < times.get(name, float("inf")):
                    times[name], summaries[name] = took, summary
        same = {name: same_rows(os.path.join(tmp, "local1.csv"), os.path.join(tmp, f"{name}1.csv"))
                for name in ("threads", "processes")}

    n, w = args.n, args.workers
    ips = {name: n / t for name, t in times.items()}
    print(f"{n} synthetic images of {args.size} px, {args.backbone} at {args.tile} px, batch {args.batch_size}, "
          f"{os.cpu_count()} cores, TensorFlow's default threads everywhere; best of {args.repeats} after a "
          "warm-up each")
    print(f"  (a) local engine, {w} reader threads          {ips['local']:7.2f} images/s  ({times['local']:.1f} s)")
    print(f"  (b) Beam DirectRunner, {w} worker threads     {ips['threads']:7.2f} images/s  ({times['threads']:.1f} s)"
          f"  same rows: {'yes' if same['threads'] else 'NO'}")
    print(f"  (c) Beam DirectRunner, {w} worker processes   {ips['processes']:7.2f} images/s  "
          f"({times['processes']:.1f} s)  same rows: {'yes' if same['processes'] else 'NO'}")
    print(f"  RATIO Beam/local (b)/(a)                 {ips['threads'] / ips['local']:7.2f}   (target >= 0.70: one "
          f"process, {w} threads, both warm)")
    print(f"  ratio (c)/(a)                            {ips['processes'] / ips['local']:7.2f}   what differs: each run "
          "starts its worker processes (TensorFlow import, run loaded, scorer traced) inside the timed run")

    s = summaries["local"]
    cpu = sum(s.seconds.get(k, 0.0) for k in CPU_STAGES) / max(s.processed, 1)
    cpu_real = cpu * (args.real_side / args.size) ** 2
    gpu = args.gpu_seconds or 0.05
    gpu_note = "measured, --gpu-seconds" if args.gpu_seconds else "assumed: no accel-check figure yet"
    print(f"projection: {PUBLIC_IMAGES:,} public HPA images on Dataflow GPU workers. Assumptions: "
          f"{args.vcpus_per_worker} vCPUs per worker, each as fast as one core here and busy with one image "
          f"at a time; GPU {gpu:.3f} s/image ({gpu_note}); GCS never the bottleneck; "
          f"{args.startup_min:g} min to start; ${args.usd_per_worker_hour}/worker-hour")
    for label, sec in ((f"CPU stages {cpu:.3f} s/image as measured at {args.size} px", cpu),
                       (f"{cpu_real:.2f} s/image scaled by area to {args.real_side} px (a high guess: "
                        "segmentation works at 512 px)", cpu_real)):
        per_worker = min(args.vcpus_per_worker / sec, 1.0 / gpu)  # images/s of one worker
        bound = "CPU (decode, segment, tiles, masks)" if args.vcpus_per_worker / sec < 1.0 / gpu else "GPU"
        print(f"  at {label}: one worker {per_worker:.2f} images/s, bound by the {bound}")
        for workers in (8, 32, 128):
            wall_h = PUBLIC_IMAGES / (per_worker * workers) / 3600 + args.startup_min / 60
            cost = wall_h * workers * args.usd_per_worker_hour
            print(f"    {workers:4d} GPU workers: {wall_h * 60:7.1f} min wall, ~${cost:,.0f}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
