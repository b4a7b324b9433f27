"""Segmentation speed: the default backend per 2048 px image, and the labelling step at its
reduced working resolution against the same labelling at full resolution, in the same run.

    .venv/bin/python benchmarks/bench_segmentation.py [--images N] [--repeats R] [--work-size 512]

Inputs: N synthetic 2048x2048 images (testkit.synthetic, with their true cell masks) and, when
../shared/data is present, the real HPA image 57_F11_1 resized from 1728 to 2048 px.
Both labelling runs get the SAME probability maps (computed once at full resolution), so the
timing isolates the labelling step; the reduced run includes shrinking the maps and upscaling
its label maps back to 2048 px. Both labelling runs are timed the same number of times
(`--repeats`, interleaved, best kept), in one process on the same threads.

Quality: the two label maps are compared cell by cell (IoU matrix, a cell matched at
IoU >= 0.6): matched fraction and mean matched IoU of reduced vs full resolution, and, on the
synthetic images, of each against the true masks.
Prints seconds per image, the speed-up ratio (target >= 10x) and the quality numbers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

SIDE = 2048


def _best_time(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def load_inputs(n: int):
    """[(name, HxWx4 uint8 image at 2048 px, true cell map or None)]."""
    from common import images
    from testkit import synthetic

    out = []
    for i in range(n):
        r = synthetic.render_image(0, i, SIDE, SIDE)
        img = np.stack([r["channels"][c] for c in images.CHANNELS], axis=-1)
        out.append((f"synthetic {i}", img, r["cells"]))
    real = ROOT.parent / "shared" / "data" / "hpa_images"
    if (real / "57_F11_1_blue.png").exists():
        img = images.load_image(str(real), "57_F11_1")
        img = cv2.resize(img, (SIDE, SIDE), interpolation=cv2.INTER_LINEAR)
        out.append(("real 57_F11_1 (1728->2048)", img, None))
    else:
        print(f"(real HPA image not found under {real}: synthetic only)")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2, help="synthetic 2048 px images")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timing repeats, the same for both labelling runs (best is kept)")
    parser.add_argument("--work-size", type=int, default=512, help="working resolution, px")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from common import segmentation as seg
    from common.segmentation import classical, labelling
    from testkit import segmentation_compare as compare

    inputs = load_inputs(args.images)
    reduced = labelling.LabelParams(work_size=args.work_size)
    full = reduced.replace(work_size=None)
    rows = []
    for name, img, truth in inputs:
        t_seg, s = _best_time(lambda: seg.segment(img, work_size=args.work_size), args.repeats)
        # Maps at full resolution, shared by both labelling runs.
        nuc, cell = classical.probability_maps(img, work_size=None)
        # Same repeats for both, interleaved so a busy machine slows both alike; best of each kept.
        t_red = t_full = float("inf")
        for _ in range(args.repeats):
            t, (cells_red, _) = _best_time(lambda: labelling.label(nuc, cell, img.shape[:2], reduced), 1)
            t_red = min(t_red, t)
            t, (cells_full, _) = _best_time(lambda: labelling.label(nuc, cell, img.shape[:2], full), 1)
            t_full = min(t_full, t)
        agree = compare.match(cells_full, cells_red)
        row = dict(name=name, t_seg=t_seg, t_red=t_red, t_full=t_full, cells_red=int(cells_red.max()),
                   cells_full=int(cells_full.max()), agree=agree, cells_seg=s.num_cells)
        if truth is not None:
            row["truth_red"] = compare.match(truth, cells_red)
            row["truth_full"] = compare.match(truth, cells_full)
        rows.append(row)
        print(f"{name}: segment() {t_seg:.2f} s ({s.num_cells} cells); labelling {t_red:.3f} s at "
              f"{args.work_size} px vs {t_full:.2f} s at {SIDE} px -> {t_full / t_red:.1f}x; "
              f"cells {row['cells_red']} vs {row['cells_full']}, matched {agree['matched']}/{agree['true']} "
              f"mean IoU {agree['mean_iou']:.3f}")
        for key in ("truth_red", "truth_full"):
            if key in row:
                m = row[key]
                print(f"    vs truth ({'reduced' if key == 'truth_red' else 'full'}): matched "
                      f"{m['matched']}/{m['true']} at IoU>=0.6, mean IoU {m['mean_iou']:.3f}")
    t_seg = np.mean([r["t_seg"] for r in rows])
    t_red = np.mean([r["t_red"] for r in rows])
    t_full = np.mean([r["t_full"] for r in rows])
    frac = np.mean([r["agree"]["matched_fraction"] for r in rows])
    miou = np.nanmean([r["agree"]["mean_iou"] for r in rows])
    print(f"\ndefault backend, segment(): {t_seg:.2f} s per {SIDE} px image (probability maps + labelling)")
    print(f"labelling step: {t_red:.3f} s at {args.work_size} px vs {t_full:.2f} s at full resolution "
          f"per {SIDE} px image")
    print(f"quality, reduced vs full-resolution labelling: {frac:.1%} of cells matched at IoU>=0.6, "
          f"mean matched IoU {miou:.3f}")
    truth_rows = [r for r in rows if "truth_red" in r]
    if truth_rows:
        for key, label in (("truth_red", "reduced"), ("truth_full", "full-res")):
            f = np.mean([r[key]["matched_fraction"] for r in truth_rows])
            mi = np.nanmean([r[key]["mean_iou"] for r in truth_rows])
            print(f"quality vs synthetic truth, {label}: {f:.1%} matched, mean IoU {mi:.3f}")
    print(f"RATIO labelling full-res / reduced: {t_full / t_red:.1f}x (target >= 10x; best of {args.repeats} "
          "for both)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
