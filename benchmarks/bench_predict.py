"""predict speed: seconds per image for each stage, the whole pipeline against a naive
sequential baseline in the same run (which must write the same rows: IDs, sizes, masks,
confidences within --tolerance, checked before the ratio is printed), and a projection of the Kaggle test set (559 images,
9-hour budget) from whatever device this runs on.

    .venv/bin/python benchmarks/bench_predict.py [--n 3] [--size 2048] [--backbone efficientnet_b0]
                                                 [--tile 224] [--batch-size 64] [--workers 2]

Synthetic images at `--size` px (generated first) and an untrained EfficientNet from
common.models (speed does not depend on the weights).
- Stages, each timed alone per image: decode (common.images.load_image), segment (default
  backend), tiles (common.preprocess.cell_tiles), score (the batched TTA-less ModelGroup, fed
  all images' tiles together in full batches as the pipeline does, time / image count),
  encode (common.masks.encode_cell from each cell's box crop).
- Whole run: infer_gpu.engine.run_predict (prefetching readers, batches across images, writer),
  against the naive sequential loop of the competition's notebooks, in the same run: per image
  load, segment, then per cell a full-frame boolean mask, the tile cut from it, one model call
  for that one cell, and common.masks.reference_encode of the full-frame mask.
Both are warmed up once (model traced, pycocotools imported) before timing; best of
`--repeats` for both. They differ by design in what the pipeline is for (prefetch threads,
batches across images); the script prints that.
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
from common import quiet  # noqa: E402  (after the path set-up above)

quiet.quiet(verbose="--verbose" in sys.argv[1:])  # before TensorFlow is imported

KAGGLE_IMAGES = 559
BUDGET_HOURS = 9.0
# Test-set sizes (sample_submission.csv): 462 at 2048 px, 68 at 1728, 29 at 3072.
KAGGLE_SIZES = {2048: 462, 1728: 68, 3072: 29}


def naive_run(images: str, sample, model, spec, seg_options, rule) -> tuple[float, list]:
    """The baseline: everything in sequence, one cell per model call, full-frame masks; the
    same combine rule as the pipeline. Returns (seconds, rows `(ID, width, height,
    PredictionString)` in sample order)."""
    import numpy as np

    from common import masks
    from common.images import load_image
    from common.preprocess import cell_tile, to_model_input
    from common.segmentation import segment
    from common.submission import format_prediction_string
    from infer_gpu.combine import combine, detections

    start = time.perf_counter()
    rows = []
    for image_id, width, height in sample:
        image = load_image(images, image_id)
        seg = segment(image, **seg_options)
        info = seg.cell_info()
        probs, cell_masks = [], []
        for c in info:
            full = seg.cells == c.id  # a full HxW frame per cell
            tile = cell_tile(image, full, c.bbox, spec.tile)
            probs.append(np.asarray(model.predict_on_batch(to_model_input(tile[None])))[0])
            cell_masks.append(masks.reference_encode(full))
        triples = []
        if info:
            scores = combine(np.stack(probs), None, [c.touches_border for c in info],
                             [c.has_nucleus for c in info], rule)
            for mask, dets in zip(cell_masks, detections(scores, rule.min_score)):
                triples += [(label, conf, mask) for label, conf in dets]
        rows.append((image_id, width, height, format_prediction_string(triples)))
    return time.perf_counter() - start, rows


def same_rows(naive_rows, csv_path: str, tolerance: float, min_score: float) -> str:
    """Check that the pipeline's CSV holds the naive loop's rows: the same IDs in the same
    order, the same sizes, the same masks per image, every (mask, label) confidence within
    `tolerance` (a detection on one side only must be within `tolerance` of the floor on the
    other). Raises AssertionError naming the first difference; returns a one-line summary."""
    import csv

    from common.submission import parse_prediction_string, read_submission

    csv.field_size_limit(2**31 - 1)  # a 2048 px image's row passes the csv module's default
    piped = read_submission(csv_path)
    assert [r.image_id for r in piped] == [r[0] for r in naive_rows], "different IDs or order"
    worst, n = 0.0, 0
    for got, (image_id, width, height, text) in zip(piped, naive_rows):
        assert (got.width, got.height) == (width, height), f"{image_id}: sizes differ"
        want = {(p.mask, p.label): p.confidence for p in parse_prediction_string(text)}
        have = {(p.mask, p.label): p.confidence for p in got.predictions}
        assert {m for m, _ in want} == {m for m, _ in have}, f"{image_id}: different masks"
        for key in set(want) | set(have):
            if key in want and key in have:
                d = abs(want[key] - have[key])
            else:  # just above the floor on one side, just below it on the other
                d = max(want.get(key, 0.0), have.get(key, 0.0)) - min_score
            assert d <= tolerance, f"{image_id}: label {key[1]} differs by {d:.2e} > {tolerance:g}"
            worst, n = max(worst, d), n + 1
    cells = sum(len({p.mask for p in r.predictions}) for r in piped)
    return (f"same {len(piped)} IDs, sizes and {cells} cell masks; {n} confidences, "
            f"max |pipeline - naive| = {worst:.1e} (tolerance {tolerance:g})")


def stage_times(images: str, sample, group, spec, seg_options) -> dict[str, float]:
    """Seconds per image of each stage, each timed on its own.

    Scoring is timed as the pipeline batches it: the tiles of all images in `sample` are scored
    together in full batches of `group.batch_size` (only the last one padded), and the time is
    divided by the image count. Scoring each image alone would pad its ~20 tiles to a full batch.
    """
    import numpy as np

    from common import masks
    from common.images import load_image
    from common.preprocess import cell_tiles
    from common.segmentation import segment

    total = {k: 0.0 for k in ("decode", "segment", "tiles", "score", "encode")}
    cells = 0
    all_tiles = []
    for image_id, width, height in sample:
        t = time.perf_counter()
        image = load_image(images, image_id)
        total["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        seg = segment(image, **seg_options)
        info = seg.cell_info()
        total["segment"] += time.perf_counter() - t
        t = time.perf_counter()
        tiles = cell_tiles(image, seg.cells, spec.tile, cell_ids=[c.id for c in info])[0]
        total["tiles"] += time.perf_counter() - t
        all_tiles.append(tiles)
        t = time.perf_counter()
        for c in info:
            y0, x0, y1, x1 = c.bbox
            masks.encode_cell(seg.cells[y0:y1, x0:x1] == c.id, c.bbox, (height, width))
        total["encode"] += time.perf_counter() - t
        cells += len(info)
    tiles = np.concatenate(all_tiles)
    t = time.perf_counter()
    group.predict(tiles)
    total["score"] = time.perf_counter() - t
    n = len(sample)
    out = {k: v / n for k, v in total.items()}
    out["cells"] = cells / n
    out["batches"] = -(-len(tiles) // group.batch_size)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3, help="synthetic images")
    p.add_argument("--size", type=int, default=2048, help="image side, px")
    p.add_argument("--backbone", default="efficientnet_b0", help="common.models backbone")
    p.add_argument("--tile", type=int, default=224, help="cell tile side, px")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per model call in the pipeline")
    p.add_argument("--workers", type=int, default=2, help="pipeline reader threads")
    p.add_argument("--repeats", type=int, default=1, help="best of this many timings")
    p.add_argument("--tf-threads", type=int, default=0, help="TensorFlow's intra-op threads on the "
                   "CPU (predict's --tf-threads); 0 = TensorFlow's default, one per core")
    p.add_argument("--device", default="auto", choices=("auto", "gpu", "cpu"), help="where TensorFlow scores")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max |pipeline - naive| confidence (one tile per call against batches of "
                   "64: float32 sums in another order; the CSV's 6 decimals)")
    p.add_argument("--verbose", action="store_true", help=quiet.VERBOSE_HELP)
    args = p.parse_args(argv)

    import numpy as np

    from common import masks, models
    from testkit import synthetic
    from common.preprocess import Preprocess, TileSpec
    from infer_gpu import engine, reading, runs, scorer
    from infer_gpu.config import PredictConfig

    device = scorer.setup_device(args.device)
    # before the model is built: TF's pools are fixed once it starts, and both sides share them
    threads = engine.size_thread_pools(args.workers, device, args.tf_threads)
    spec = Preprocess(TileSpec(size=args.tile))
    opts = PredictConfig(batch_size=args.batch_size, workers=args.workers, progress=False,
                         tf_threads=args.tf_threads)
    seg_options = {"backend": reading.segmentation_used(opts).backend, **reading.segmentation_options(opts)}
    print(f"device: {device}; {args.n} synthetic images of {args.size} px; {args.backbone} at {args.tile} px; "
          f"{os.cpu_count()} CPU cores")
    print(f"threads, the same TensorFlow pools on both sides: intra-op {threads['intra_op']}, inter-op "
          f"{threads['inter_op']} ({threads['how']}; 0 = one per core); pipeline {args.workers} reader "
          "thread(s) + the scorer on the main thread; naive: the main thread only")
    model = models.build_model(args.backbone, size=args.tile)
    run = runs.RunDir(path="bench", spec=spec, model=model, fingerprint="bench")
    group = scorer.model_group(spec, [model], tta=1, batch_size=args.batch_size)

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        data = Path(tmp) / "data"
        synthetic.generate(str(data), n=args.n, size=args.size, seed=0)
        images, sample_csv = str(data / "images"), str(data / "sample_submission.csv")
        sample = reading.read_sample(sample_csv)

        # warm-up: trace the batched function and predict_on_batch, import pycocotools for the
        # reference encoder, touch every file once
        group.predict(np.zeros((1, args.tile, args.tile, 4), "uint8"))
        model.predict_on_batch(np.zeros((1, args.tile, args.tile, 4), "float32"))
        masks.reference_encode(np.zeros((8, 8), bool))
        stage_times(images, sample[:1], group, spec, seg_options)

        stages = stage_times(images, sample, group, spec, seg_options)
        print(f"\nstages, seconds per image ({stages['cells']:.0f} cells per image; score: all "
              f"{args.n} images' tiles in {stages['batches']} batches of {args.batch_size}, as the pipeline "
              f"batches across images, / {args.n}):")
        for k in ("decode", "segment", "tiles", "score", "encode"):
            print(f"  {k:<8} {stages[k]:8.3f} s")
        print(f"  {'sum':<8} {sum(stages[k] for k in ('decode', 'segment', 'tiles', 'score', 'encode')):8.3f} s")

        fast, slow = [], []
        for r in range(args.repeats):
            out = str(Path(tmp) / f"sub{r}.csv")
            summary = engine.run_predict(images, sample_csv, [], out, config=opts, runs=[run])
            fast.append(summary.wall_seconds)
            seconds, naive_rows = naive_run(images, sample, model, spec, seg_options, opts.rule)
            slow.append(seconds)
            # the ratio means something only if both made the same submission
            same = same_rows(naive_rows, out, args.tolerance, opts.rule.min_score)
        fast_s, slow_s = min(fast), min(slow)
        print(f"\nwhole run, {args.n} images, best of {args.repeats} each, both warm (model traced, "
              "pycocotools imported), back to back in one process:")
        print(f"  differs by design: the pipeline prefetches on {args.workers} reader threads and scores "
              f"{args.batch_size} tiles per call; the naive loop runs one image at a time on the main thread, "
              "one tile per call (both decode with load_image's 4 threads, both score with TensorFlow's threads)")
        print(f"  naive sequential (full-frame masks, reference encoder, 1 cell per call): "
              f"{slow_s:7.2f} s = {slow_s / args.n:6.3f} s/image")
        print(f"  pipeline (prefetch x{args.workers}, batches of {args.batch_size} across images):      "
              f"{fast_s:7.2f} s = {fast_s / args.n:6.3f} s/image")
        print(f"  rows: {same}")
        print(f"  ratio naive / pipeline: {slow_s / fast_s:.2f}x")

        per_image = fast_s / args.n
        scale = sum(n * (s / args.size) ** 2 for s, n in KAGGLE_SIZES.items()) / KAGGLE_IMAGES
        hours = per_image * KAGGLE_IMAGES * scale / 3600
        print(f"\nprojection on this device ({device}): {KAGGLE_IMAGES} test images (size mix x{scale:.2f} "
              f"the pixels of {args.size} px) ~ {hours:.2f} h of the {BUDGET_HOURS:.0f} h budget "
              f"({100 * hours / BUDGET_HOURS:.0f}%); naive ~ {slow_s / args.n * KAGGLE_IMAGES * scale / 3600:.2f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
