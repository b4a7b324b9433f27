"""Training throughput on the CPU: the model's training steps against the input pipeline alone.

    .venv/bin/python benchmarks/bench_train.py [--sizes 32,224] [--batch 16] [--steps 2] [--n 3]
                                               [--image-size 2048]

For each tile size, builds cell-mode shards from synthetic data with the TFRecord builder, then
times in one run, in examples per second,
  model:    EfficientNet-B0 training steps (`model.fit`, the trainer's optimizer and loss) on one
            batch held in memory, so no input work is counted; after a warm-up (tracing) fit;
  pipeline: the trainer's own `train_tpu.data.train_dataset` (interleave, parse + PNG decode,
            augment, batch at the global batch size, prefetch) iterated alone;
and prints pipeline/model. Both sides are warmed (one untimed pass) and timed best of
`--repeats` passes, back to back in one process that both let use every core (TensorFlow's own
thread pools). The tiles are cut from synthetic images of real size (2048 px by default,
testkit.synthetic; HPA images are 1728-3072 px), so a 224 px tile is a cell shrunk to fit, as in
real training, and its PNG is as costly to decode as a real one (mean bytes per example printed).
The pipeline must deliver at least 5x what the model consumes, so a
faster accelerator is not starved (on a TPU the model side is ~100x faster; the host's input
workers then matter, which this ratio tracks).
`bench_bag.py` calls the same measurement functions for bags of cells (the MIL model).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REQUIRED_RATIO = 5.0


def model_examples_per_s(size: int, batch: int, steps: int, repeats: int, backbone: str = "efficientnet_b0",
                         bag: int = 0, preset: str = "smoke", precision: str = "float32") -> float:
    """Training examples per second (bags when `bag` > 0) on one in-memory batch (input cost
    excluded): the model built and compiled as `train_tpu.train` does for `preset` (cell model, or
    `train_tpu.model.build(..., bag=N)` + `compile_model(..., bag=N)`), best of `repeats` passes of `steps` steps
    after a warm-up fit (tracing). `precision`: a Keras dtype policy, e.g. "mixed_float16" as the
    trainer picks on a GPU; float32 is the trainer's on a CPU."""
    import numpy as np
    import tensorflow as tf

    from common import mil
    from train_tpu import model as modellib
    from train_tpu import train as trainlib
    from train_tpu.config import make_config

    cfg = make_config(preset, backbone=backbone, size=size, batch_size=batch, epochs=1)
    kwargs = dict(weights="none", dropout=cfg.dropout, drop_connect_rate=cfg.drop_connect_rate,
                  bn_momentum=cfg.bn_momentum or None,
                  dtype_policy=None if precision == "float32" else precision)
    rng = np.random.default_rng(0)
    model = modellib.build(cfg.backbone, size, bag=bag, pooling=cfg.pooling, **kwargs)
    if bag:
        x = {mil.CELLS: rng.uniform(0, 255, (batch, bag, size, size, 4)).astype("float32"),
             mil.MASK: np.ones((batch, bag), "float32")}
        labels = (rng.uniform(size=(batch, 19)) < 0.2).astype("float32")
        y = {mil.IMAGE: labels, mil.CELL: np.repeat(labels[:, None], bag, axis=1)}
    else:
        x = rng.uniform(0, 255, (batch, size, size, 4)).astype("float32")
        y = (rng.uniform(size=(batch, 19)) < 0.2).astype("float32")
    trainlib.compile_model(model, cfg, trainlib.make_optimizer(cfg, steps), bag=bag)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)  # warm-up: tracing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
        best = min(best, time.perf_counter() - start)
    return steps * batch / best


def pipeline_examples_per_s(files: list[str], size: int, batch: int, batches: int, repeats: int,
                            bag: int = 0, preset: str = "smoke") -> float:
    """The trainer's input pipeline alone (`train_tpu.data.train_dataset`, `preset`'s
    augmentation): examples (bags when `bag` > 0) per second, best of `repeats` after a warm-up."""
    import tensorflow as tf

    from train_tpu import data
    from train_tpu.config import make_config

    cfg = make_config(preset, size=size, batch_size=batch, shuffle_buffer=256)
    best = float("inf")
    for i in range(repeats + 1):
        ds = data.train_dataset(files, cfg, size, size, batch, bag=bag).take(batches)
        start = time.perf_counter()
        n = int(ds.reduce(tf.constant(0), lambda c, b: c + tf.shape(tf.nest.flatten(b[1])[0])[0]))
        if i:  # the first pass warms up (tracing, page cache)
            best = min(best, time.perf_counter() - start)
    assert n == batches * batch, n
    return n / best


def build_shards(src: str, out: str, size: int, bag: int = 0) -> tuple[list[str], dict]:
    """Shards of the synthetic data in `src` by the real builder, one worker: cell tiles, or bags
    of up to `bag` cells (`--mode bag --max-cells bag`). Returns (shard paths, manifest totals)."""
    from common import shard_folder
    from tfrecords_builder import build as buildlib
    from tfrecords_builder.config import make_config as builder_config

    extra = dict(mode="bag", max_cells=bag) if bag else dict(mode="cell")
    cfg = builder_config(images=os.path.join(src, "images"), labels=os.path.join(src, "train.csv"),
                         masks=os.path.join(src, "masks"), out=out, size=size, folds=2, shard_mb=0.5,
                         workers=1, **extra)
    totals = buildlib.build(cfg, progress=False, log=lambda s: None).manifest["totals"]
    return sorted(glob.glob(os.path.join(out, shard_folder.SHARD_GLOB))), totals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="32,224", help="tile sides to measure, px (smoke, realistic)")
    p.add_argument("--batch", type=int, default=16, help="global batch size")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per pass and size")
    p.add_argument("--batches", type=int, default=40, help="timed pipeline batches per pass")
    p.add_argument("--repeats", type=int, default=2, help="timed passes, each side (best is kept)")
    p.add_argument("--n", type=int, default=3, help="synthetic images to cut cells from")
    p.add_argument("--image-size", type=int, default=2048, help="synthetic image side, px (real: 1728-3072)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    from testkit import synthetic

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        src = os.path.join(tmp, "data")
        synthetic.generate(src, n=args.n, size=args.image_size, seed=0)
        for size in sizes:
            files, totals = build_shards(src, os.path.join(tmp, f"shards{size}"), size)
            pipe = pipeline_examples_per_s(files, size, args.batch, args.batches, args.repeats)
            model = model_examples_per_s(size, args.batch, args.steps, args.repeats)
            rows.append((size, model, pipe, totals["examples"], totals["bytes"] / totals["examples"]))

    print(f"EfficientNet-B0 training on the CPU ({os.cpu_count()} cores), global batch {args.batch}; cell tiles "
          f"cut from {args.n} synthetic {args.image_size} px images; best of {args.repeats} passes each side, "
          "both warm")
    print(f"{'tile px':>8} {'examples':>9} {'kB/example':>11} {'model ex/s':>12} {'pipeline ex/s':>14} "
          f"{'pipeline/model':>15}")
    ok = True
    for size, model, pipe, examples, nbytes in rows:
        ratio = pipe / model
        ok &= ratio >= REQUIRED_RATIO
        print(f"{size:>8} {examples:>9} {nbytes / 1e3:>11.1f} {model:>12.1f} {pipe:>14.1f} {ratio:>14.1f}x")
    print(f"required pipeline/model >= {REQUIRED_RATIO:.0f}x: {'OK' if ok else 'NOT MET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
