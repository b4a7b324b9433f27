"""Bag (MIL) training throughput on the CPU: the bag input pipeline against the bag model's steps,
and cells per second in bag mode against cell mode.

    .venv/bin/python benchmarks/bench_bag.py [--size 48] [--bag 8] [--batch 4]
                                             [--backbone efficientnetv2_b0] [--repeats 2]

Defaults: `demo_mil`'s 48 px cells, 32 cells per step and EfficientNetV2-B0 (demo_mil draws 8 bags
of 4 cells; here 4 bags of 8, so that 4 synthetic images fill a step).
Bag shards are built by the real builder (`--mode bag --max-cells N`, one worker) from
testkit.synthetic images of real size (2048 px by default) and their cell masks. Then, in one
process that lets TensorFlow use every core, each side warmed (one untimed pass / fit) and timed
best of `--repeats` passes:
  (a) pipeline: `train_tpu.data.train_dataset(..., bag=N)` iterated alone (parse, N PNG decodes
      per bag, per-cell augmentation, batch, prefetch), in bags/s;
      model: `train_tpu.model.build_bag_model` compiled as the trainer does
      (`compile_model(..., bag=N)`: image loss + masked cell loss) trained on one in-memory
      batch, in bags/s; prints RATIO pipeline/model, which must be >= 5x so that a faster
      accelerator is not starved (exit status 1 when not met);
  (b) cells/s of training steps at the same tile size and cells per step: B bags of N cells vs
      a cell model on B*N tiles (same backbone, preset, precision, steps, repeats);
      prints RATIO bag/cell. A bag step also runs the masked pooling and the second (image)
      head and its loss.
Both shared measurement functions live in `bench_train.py` (cell tiles), this script calls them.

On a GPU/TPU host, time red.ai's B0 MIL step (bags of 16 cells at 224 px, as `b0_mil_224`):

    .venv/bin/python benchmarks/bench_bag.py --size 224 --bag 16 --backbone efficientnet_b0 \\
        --batch 32 --preset b0_mil_224 --precision mixed_float16   # GPU (mixed_bfloat16 on a TPU VM)

TensorFlow places the model on the first GPU it sees (the pipeline stays on the host's CPU, as in
training). On a CPU, lower --batch (e.g. 4: 64 cells of 224 px per step take ~10-20 s there).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # bench_train: the shared measurement functions
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import bench_train  # noqa: E402

REQUIRED_RATIO = bench_train.REQUIRED_RATIO


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=48, help="cell tile side, px (demo_mil: 48; red.ai: 224)")
    p.add_argument("--bag", type=int, default=8, help="cells per bag (demo_mil: 4, in 8 bags per step; red.ai: 16)")
    p.add_argument("--batch", type=int, default=4, help="bags per step; the cell model gets batch*bag tiles")
    p.add_argument("--backbone", default="efficientnetv2_b0", help="both models' backbone")
    p.add_argument("--preset", default="demo_mil", help="train_tpu preset for the loss, augmentation, "
                   "dropout and BatchNorm settings of both sides")
    p.add_argument("--precision", default="float32", choices=("float32", "mixed_float16", "mixed_bfloat16"),
                   help="both models' dtype policy (the trainer: float32 on a CPU, mixed_float16 on a GPU)")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per pass")
    p.add_argument("--batches", type=int, default=20, help="timed pipeline batches per pass")
    p.add_argument("--repeats", type=int, default=2, help="timed passes, each side (best is kept)")
    p.add_argument("--n", type=int, default=4, help="synthetic images (one bag each) to build")
    p.add_argument("--image-size", type=int, default=2048, help="synthetic image side, px (real: 1728-3072)")
    p.add_argument("--no-cell", action="store_true", help="skip (b), the cell model")
    args = p.parse_args(argv)
    b, n, size = args.batch, args.bag, args.size

    from testkit import synthetic

    with tempfile.TemporaryDirectory(prefix="bench-bag-") as tmp:
        src = os.path.join(tmp, "data")
        synthetic.generate(src, n=args.n, size=args.image_size, seed=0)
        files, totals = bench_train.build_shards(src, os.path.join(tmp, "shards"), size, bag=n)
        pipe = bench_train.pipeline_examples_per_s(files, size, b, args.batches, args.repeats,
                                                   bag=n, preset=args.preset)
    bag_model = bench_train.model_examples_per_s(size, b, args.steps, args.repeats, args.backbone,
                                                 bag=n, preset=args.preset, precision=args.precision)
    cell_model = None if args.no_cell else bench_train.model_examples_per_s(
        size, b * n, args.steps, args.repeats, args.backbone, preset=args.preset, precision=args.precision)

    ratio = pipe / bag_model
    ok = ratio >= REQUIRED_RATIO
    print(f"{args.backbone} bag training ({os.cpu_count()} CPU cores), {args.precision}, preset {args.preset}: "
          f"{b} bags of {n} cells at {size} px per step; bag shards from {args.n} synthetic "
          f"{args.image_size} px images ({totals['examples']} bags, {totals['bytes'] / totals['examples'] / 1e3:.1f} "
          f"kB/bag); best of {args.repeats} passes each side, both warm")
    print(f"(a) input pipeline alone:     {pipe:9.2f} bags/s  ({args.batches} batches/pass)")
    print(f"    bag model training steps: {bag_model:9.2f} bags/s  ({args.steps} steps/pass, in-memory batch)")
    print(f"    RATIO pipeline/model: {ratio:.1f}x; required >= {REQUIRED_RATIO:.0f}x: "
          f"{'OK, met' if ok else 'NOT MET'}")
    if cell_model is not None:
        print(f"(b) training cells/s at {size} px, {b * n} cells per step, same backbone, steps and repeats:")
        print(f"    bag model ({b} bags x {n} cells): {bag_model * n:9.1f} cells/s")
        print(f"    cell model ({b * n} tiles):       {cell_model:9.1f} cells/s")
        print(f"    RATIO bag/cell: {bag_model * n / cell_model:.2f}x (the bag step also runs the masked "
              "pooling, the image head and its loss)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
