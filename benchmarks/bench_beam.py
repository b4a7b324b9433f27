"""The Beam engine against the local engine on one machine, and a projection for Dataflow.

    .venv/bin/python benchmarks/bench_beam.py [--n 40] [--size 1024] [--mode cell] [--workers 2]

On the same synthetic images (generated first), times one whole build (planning included) of
  (a) the local engine with W worker processes (the baseline), and
  (b) the Beam engine on DirectRunner with W worker processes (multi_processing),
checks that both wrote the same shards, and prints images/s and the ratio (b)/(a), target >= 0.7.
Then times the per-image function (`worker.process`, what one Beam/Dataflow worker core runs per
image) in this process, and projects from it the wall time and vCPU-hours of the full
89,385-image build (21,806 competition + 67,579 public HPA images) on N Dataflow workers,
under the assumptions it prints. Cell mode segments (no masks), as a real build does.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# DirectRunner's worker processes import the project too
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

FULL_BUILD_IMAGES = 21_806 + 67_579


def timed_build(cfg, beam_args=None) -> tuple[float, object]:
    from tfrecords_builder import beam_engine
    from tfrecords_builder import build as buildlib

    start = time.perf_counter()
    if cfg.engine == "beam":
        result = beam_engine.build_beam(cfg, beam_args or [], log=lambda s: None)
    else:
        result = buildlib.build(cfg, progress=False, log=lambda s: None)
    return time.perf_counter() - start, result


def per_image_seconds(cfg, ids: list[str]) -> list[float]:
    """Seconds of `worker.process` per image, in this process (one core), after one warm-up image."""
    from tfrecords_builder import core, worker

    job = core.job(cfg)
    tasks = [worker.Task(i, cfg.images[0], (0,), 0, job) for i in ids]
    worker.process(tasks[0])
    out = []
    for task in tasks:
        start = time.perf_counter()
        result = worker.process(task)
        out.append(time.perf_counter() - start)
        assert not result.error, result.error
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=40, help="synthetic images")
    p.add_argument("--size", type=int, default=1024, help="synthetic image side, px")
    p.add_argument("--mode", choices=("image", "cell"), default="cell")
    p.add_argument("--tile", type=int, default=0, help="tile side, px (default: the mode's default)")
    p.add_argument("--workers", type=int, default=2, help="worker processes of both engines")
    p.add_argument("--sample", type=int, default=8, help="images timed one by one for the per-image time")
    p.add_argument("--vcpus-per-worker", type=int, default=4,
                   help="projection: vCPUs per Dataflow worker, one image at a time on each (assumed)")
    p.add_argument("--startup-min", type=float, default=5.0,
                   help="projection: minutes to start the job and its workers (assumed)")
    p.add_argument("--real-side", type=int, default=2048,
                   help="projection: mean side of the real images, px (competition 1728-3072, public "
                   "HPA 2048); the per-image time is also shown scaled by area to it")
    p.add_argument("--usd-per-vcpu-hour", type=float, default=0.07,
                   help="projection: price of one worker vCPU-hour with its memory (an assumption: check "
                   "the current Dataflow price list for your region)")
    args = p.parse_args(argv)

    from testkit import synthetic
    from common.labels import read_labels_csv
    from tfrecords_builder.config import make_config

    with tempfile.TemporaryDirectory(prefix="bench-beam-") as tmp:
        start = time.perf_counter()
        synthetic.generate(os.path.join(tmp, "data"), n=args.n, size=args.size, seed=0)
        gen_s = time.perf_counter() - start
        images = os.path.join(tmp, "data", "images")
        labels = os.path.join(tmp, "data", "train.csv")
        ids = [i for i, _ in read_labels_csv(labels)]
        kw = dict(images=images, labels=labels, mode=args.mode, size=args.tile or None, folds=5,
                  shard_mb=1 if args.mode == "cell" else 2, workers=args.workers)

        local_s, local = timed_build(make_config(out=os.path.join(tmp, "local"), **kw))
        beam_s, beam = timed_build(make_config(out=os.path.join(tmp, "beam"), engine="beam", **kw),
                                   ["--direct_num_workers", str(args.workers),
                                    "--direct_running_mode", "multi_processing"])
        names = [s["name"] for s in local.manifest["shards"]]
        same = names == [s["name"] for s in beam.manifest["shards"]] and all(
            filecmp.cmp(os.path.join(tmp, "local", n), os.path.join(tmp, "beam", n), shallow=False)
            for n in names)
        cfg = make_config(out=os.path.join(tmp, "unused"), **kw)
        per_image = per_image_seconds(cfg, ids[: args.sample])

    n = len(ids)
    local_ips, beam_ips = n / local_s, n / beam_s
    print(f"{args.mode} mode, {n} synthetic images of {args.size} px, {args.workers} workers each, "
          f"{local.manifest['totals']['examples']} records (generated in {gen_s:.0f} s)")
    print(f"  local engine, {args.workers} processes        {local_ips:7.2f} images/s  ({local_s:.1f} s whole build)")
    print(f"  Beam DirectRunner, {args.workers} processes   {beam_ips:7.2f} images/s  ({beam_s:.1f} s whole build)")
    print(f"  ratio Beam/local                  {beam_ips / local_ips:7.2f}   (target >= 0.70)")
    print(f"  decode-and-write phase only: local {local.images_per_s:.2f}, Beam {beam.images_per_s:.2f} images/s "
          f"(Beam's includes starting its worker processes)")
    print(f"  same shards, byte for byte: {'yes' if same else 'NO'}")
    print("  what differs: Beam decodes the plan's 8 pilot images again (the local engine reuses "
          "them); Beam runs second, so the images are in the OS file cache for it")

    t = statistics.median(per_image)
    scaled = t * (args.real_side / args.size) ** 2
    print(f"  per-image worker time (worker.process, one core, median of {len(per_image)}): {t:.3f} s "
          f"(min {min(per_image):.3f}, max {max(per_image):.3f})")
    print(f"projection for the full build, {FULL_BUILD_IMAGES:,} images, on Dataflow. Assumptions: "
          f"{args.vcpus_per_worker} vCPUs per worker, each as fast as one core here, each busy with one "
          f"image at a time; reading from and writing to GCS in the same region never the bottleneck; "
          f"{args.startup_min:g} min to start; ${args.usd_per_vcpu_hour}/vCPU-hour with memory.")
    for label, sec in ((f"{t:.2f} s/image as measured at {args.size} px", t),
                       (f"{scaled:.2f} s/image scaled by area to {args.real_side} px", scaled)):
        vcpu_h = FULL_BUILD_IMAGES * sec / 3600
        print(f"  at {label}: {vcpu_h:.1f} vCPU-hours of work")
        for workers in (16, 64, 256):
            vcpus = workers * args.vcpus_per_worker
            wall_h = vcpu_h / vcpus + args.startup_min / 60
            cost = wall_h * vcpus * args.usd_per_vcpu_hour
            print(f"    {workers:4d} workers ({vcpus:5d} vCPUs): {wall_h * 60:7.1f} min wall, ~${cost:,.0f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
