"""Builder speed: image mode, one worker, against the pure PNG decode of the same images.

    .venv/bin/python benchmarks/bench_builder.py [--n 40] [--size 1024] [--tile 256] [--workers 1]

Prints images/s of (a) decoding the 4 channel PNGs of every image with OpenCV and nothing else
(the baseline), (b) the builder's decode-and-write phase (load, resize, PNG-encode the tile,
serialize, frame, write shards) and (c) the whole build including planning (pilot decode of 8
images, worker start); then the ratio (b)/(a), target >= 0.8. Also times planning the real
train.csv (21,806 rows) when ../shared/data is present. Synthetic data, generated first.
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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def decode_only(folder: str, ids: list[str]) -> float:
    """Seconds to read and decode every channel PNG of `ids` with OpenCV, nothing else (the baseline).

    Bytes + `cv2.imdecode` rather than `cv2.imread`: on this machine it is the faster of the two,
    so the baseline is not flattering the builder.
    """
    import cv2
    import numpy as np

    from common.images import CHANNELS

    start = time.perf_counter()
    for image_id in ids:
        for channel in CHANNELS:
            with open(os.path.join(folder, f"{image_id}_{channel}.png"), "rb") as fh:
                arr = cv2.imdecode(np.frombuffer(fh.read(), np.uint8), cv2.IMREAD_UNCHANGED)
            assert arr is not None
    return time.perf_counter() - start


def per_image_costs(folder: str, ids: list[str], tile: int) -> dict[str, float]:
    """Milliseconds per image of each step a worker takes in image mode."""
    from common import features, images, preprocess

    spec = preprocess.TileSpec(size=tile, mode="image")
    loaded = [images.load_image(folder, i) for i in ids]
    tiles = [preprocess.image_tile(im, spec) for im in loaded]
    steps = {
        "PNG decode x4 (baseline)": lambda: decode_only(folder, ids),
        "common.images.load_image": lambda: [images.load_image(folder, i) for i in ids],
        "common.preprocess.image_tile": lambda: [preprocess.image_tile(im, spec) for im in loaded],
        "common.features.encode_tile": lambda: [features.encode_tile(t) for t in tiles],
        "features.serialize (encode incl.)": lambda: [
            features.serialize(t, image_id=i, labels=[0], source_size=im.shape[:2])
            for t, i, im in zip(tiles, ids, loaded)],
    }
    out = {}
    for name, fn in steps.items():
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        out[name] = 1000 * best / len(ids)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=40, help="synthetic images")
    p.add_argument("--size", type=int, default=1024, help="synthetic image side, px")
    p.add_argument("--tile", type=int, default=256, help="image-mode tile side, px")
    p.add_argument("--workers", type=int, default=1, help="builder worker processes")
    p.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    args = p.parse_args(argv)

    from common import synthetic
    from common.labels import read_labels_csv
    from tfrecords_builder import build as buildlib
    from tfrecords_builder.config import make_config

    with tempfile.TemporaryDirectory(prefix="bench-builder-") as tmp:
        synthetic.generate(os.path.join(tmp, "data"), n=args.n, size=args.size, seed=0)
        images = os.path.join(tmp, "data", "images")
        labels = os.path.join(tmp, "data", "train.csv")
        ids = [i for i, _ in read_labels_csv(labels)]
        decode_only(images, ids)  # warm the page cache for both contenders

        decode_s, write_s, total_s = [], [], []
        for r in range(args.repeats):
            decode_s.append(decode_only(images, ids))
            cfg = make_config(images=images, labels=labels, out=os.path.join(tmp, f"out{r}"), mode="image",
                              size=args.tile, folds=5, shard_mb=5, workers=args.workers)
            start = time.perf_counter()
            result = buildlib.build(cfg, progress=False, log=lambda s: None)
            total_s.append(time.perf_counter() - start)
            write_s.append(result.write_s)
            assert result.manifest["totals"]["examples"] == len(ids)

        breakdown = per_image_costs(images, ids[:8], args.tile)

    n = len(ids)
    base, ours, whole = n / min(decode_s), n / min(write_s), n / min(total_s)
    print(f"image mode, {n} images of {args.size} px -> {args.tile} px tiles, workers={args.workers}")
    print(f"  PNG decode only (baseline)        {base:8.1f} images/s")
    print(f"  builder decode+write phase        {ours:8.1f} images/s")
    print(f"  builder whole run (incl. planning){whole:8.1f} images/s")
    print(f"  ratio builder/decode              {ours / base:8.2f}   (target >= 0.80)")
    print(f"  ratio whole run/decode            {whole / base:8.2f}")
    print("  where a worker's time goes, ms per image (in-process, best of 3):\n    "
          + ", ".join(f"{k} {v:.1f}" for k, v in breakdown.items()))

    train = ROOT.parent / "shared" / "data" / "kaggle2021" / "train.csv"
    if train.exists():
        from tfrecords_builder import plan as planlib

        start = time.perf_counter()
        cfg = make_config(images="unused", labels=str(train), out="unused", folds=5)
        entries, _ = planlib.read_entries(cfg)
        planlib.assign_folds(entries, 5, seed=0)
        planlib.assign_shards(entries, 5, bytes_per_image=400e3, shard_bytes=100e6, seed=0)
        print(f"  planning train.csv ({len(entries)} images, 5 folds): {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
