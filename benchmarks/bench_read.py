"""Reading the builder's shards back through tf.data, against reading the raw records.

    .venv/bin/python benchmarks/bench_read.py [--n 24] [--size 512] [--tile 128] [--repeat 8]

Builds cell-mode shards from synthetic data first (precomputed masks, so no segmentation), then
times, in one run, examples per second of
  raw:  files -> parallel interleave of TFRecordDataset -> batch -> prefetch (bytes only), and
  full: the same files -> parallel interleave -> common.features.parse (PNG decode) -> batch -> prefetch,
both counted in the same unit (examples, summed one batch of --batch at a time inside
TensorFlow), and prints their ratio (full / raw). Each pipeline is warmed up once, then timed best of 3.
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
from common import quiet  # noqa: E402  (after the path set-up above)

quiet.quiet(verbose="--verbose" in sys.argv[1:])  # before TensorFlow is imported


def records(files: list[str], repeat: int, cycle: int):
    """The trainer's own file listing and interleaved reads (`train_tpu.data`), nothing else."""
    from train_tpu import data

    return data.interleave_records(data.list_files(files, False, 0).repeat(repeat), cycle, deterministic=False)


def raw_pipeline(files: list[str], repeat: int, cycle: int, batch: int):
    """The records, batched and prefetched as the full pipeline is (the serialized bytes)."""
    import tensorflow as tf

    return records(files, repeat, cycle).batch(batch).prefetch(tf.data.AUTOTUNE)


def full_pipeline(files: list[str], repeat: int, cycle: int, tile: int, batch: int):
    import tensorflow as tf

    from common import features

    def parse(serialized):
        return features.parse(serialized, tile_size=tile)

    ds = records(files, repeat, cycle)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def count_examples(ds, key=None) -> int:
    """Examples in a batched dataset, counted inside TensorFlow (Dataset.reduce) one batch at a
    time: the same per-batch cost on both sides, and no Python loop capping either."""
    import tensorflow as tf

    return int(ds.reduce(tf.constant(0), lambda c, b: c + tf.shape(b if key is None else b[key])[0]))


def time_examples(make_ds, count_fn) -> tuple[float, int]:
    """Best-of-3 seconds and the example count of iterating a fresh dataset to the end."""
    count_fn(make_ds())  # warm-up: page cache, graph tracing
    best, n = float("inf"), 0
    for _ in range(3):
        start = time.perf_counter()
        n = count_fn(make_ds())
        best = min(best, time.perf_counter() - start)
    return best, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=24, help="synthetic images")
    p.add_argument("--size", type=int, default=512, help="synthetic image side, px")
    p.add_argument("--tile", type=int, default=128, help="cell tile side, px")
    p.add_argument("--repeat", type=int, default=8, help="passes over the shards per timing")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--verbose", action="store_true", help=quiet.VERBOSE_HELP)
    args = p.parse_args(argv)

    from common import shard_folder
    from testkit import synthetic
    from tfrecords_builder import build as buildlib
    from tfrecords_builder.config import make_config

    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        data = os.path.join(tmp, "data")
        synthetic.generate(data, n=args.n, size=args.size, seed=0)
        cfg = make_config(images=os.path.join(data, "images"), labels=os.path.join(data, "train.csv"),
                          masks=os.path.join(data, "masks"), out=os.path.join(tmp, "shards"), mode="cell",
                          size=args.tile, folds=4, shard_mb=0.5, workers=2)
        result = buildlib.build(cfg, progress=False, log=lambda s: None)
        files = sorted(glob.glob(os.path.join(cfg.out, shard_folder.SHARD_GLOB)))
        cycle = min(len(files), 8)
        mb = sum(os.path.getsize(f) for f in files) / 1e6

        # Both sides in the same unit: batches of --batch examples, counted per batch.
        raw_s, raw_n = time_examples(lambda: raw_pipeline(files, args.repeat, cycle, args.batch),
                                     count_examples)
        full_s, full_n = time_examples(
            lambda: full_pipeline(files, args.repeat, cycle, args.tile, args.batch),
            lambda ds: count_examples(ds, "image"))
    assert raw_n == full_n == result.manifest["totals"]["examples"] * args.repeat, (raw_n, full_n)
    raw_eps, full_eps = raw_n / raw_s, full_n / full_s
    print(f"read back {result.manifest['totals']['examples']} cell examples ({args.tile} px) x {args.repeat} passes "
          f"from {len(files)} shards ({mb:.1f} MB), interleave cycle {cycle}")
    print(f"  raw records (TFRecordDataset+batch)    {raw_eps:10.0f} examples/s")
    print(f"  tf.data interleave+parse+decode+batch  {full_eps:10.0f} examples/s")
    print(f"  ratio full/raw                         {full_eps / raw_eps:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
