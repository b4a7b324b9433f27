"""Mask encoding speed per cell: the competition's reference path vs `encode_cell`.

The reference (`common.masks.reference_encode`, the competition's example code) encodes each
cell from a full HxW frame; `encode_cell` works from the cell's bounding-box crop. Both are
timed in this run on the same realistic cells (blobs 100-300 px across in a 2048x2048 frame),
their strings checked equal, and the ratio printed.

    .venv/bin/python benchmarks/bench_codec.py            # quick: 12 reference cells
    .venv/bin/python benchmarks/bench_codec.py --cells 60 --size 3072
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import masks  # noqa: E402


def make_cells(n: int, size: int, seed: int) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """n irregular cell-like blobs (100-300 px across) at random places in a size^2 frame."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(100, 301, size=2))
        y0 = int(rng.integers(0, size - h + 1))
        x0 = int(rng.integers(0, size - w + 1))
        yy, xx = np.mgrid[0:h, 0:w]
        angle = np.arctan2(yy - h / 2, xx - w / 2)
        wobble = 1.0 + 0.12 * np.sin(3 * angle + rng.uniform(0, 6.3)) + 0.06 * np.sin(7 * angle)
        r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
        crop = r < 0.97 * wobble / 1.18
        cells.append((crop, (y0, x0, y0 + h, x0 + w)))
    return cells


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=12, help="cells timed with the slow reference path")
    parser.add_argument("--repeat", type=int, default=50, help="passes over the cells for encode_cell")
    parser.add_argument("--size", type=int, default=2048, help="frame side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cells = make_cells(args.cells, args.size, args.seed)
    frame_shape = (args.size, args.size)

    # Reference: the full frame is built and encoded for every cell, as the example code does.
    ref_strings, t_ref = [], 0.0
    for crop, (y0, x0, y1, x1) in cells:
        frame = np.zeros(frame_shape, bool)
        frame[y0:y1, x0:x1] = crop
        t0 = time.perf_counter()
        ref_strings.append(masks.reference_encode(frame))
        t_ref += time.perf_counter() - t0
    ms_ref = 1e3 * t_ref / len(cells)

    for crop, bbox in cells:  # warm-up
        masks.encode_cell(crop, bbox, frame_shape)
    t0 = time.perf_counter()
    for _ in range(args.repeat):
        fast_strings = [masks.encode_cell(crop, bbox, frame_shape) for crop, bbox in cells]
    ms_fast = 1e3 * (time.perf_counter() - t0) / (args.repeat * len(cells))

    if fast_strings != ref_strings:
        bad = sum(a != b for a, b in zip(fast_strings, ref_strings))
        print(f"FAIL: {bad} of {len(cells)} strings differ from the reference")
        return 1
    mean_px = np.mean([c.sum() for c, _ in cells])
    print(f"frame {args.size}x{args.size}, {len(cells)} cells (mean {mean_px:.0f} px), strings identical")
    print(f"reference_encode (full frame): {ms_ref:8.3f} ms per cell")
    print(f"encode_cell (crop only):       {ms_fast:8.3f} ms per cell")
    print(f"speed-up: {ms_ref / ms_fast:.0f}x (target >= 100x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
