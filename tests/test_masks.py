"""The mask codec against the competition's reference path (pycocotools + zlib + base64)."""
from __future__ import annotations

import base64
import tracemalloc
import zlib

import numpy as np
import pytest

from common import masks

# The competition's example row: ID 721568e01a744247, ImageWidth 1118, ImageHeight 1600.
EXAMPLE_MASK = "eNqLi8xJM7BOTjS08DT2NfI38DfyM/Q3NMAJgJJ+RkBs7JecF5tnAADw+Q9I"
EXAMPLE_HEIGHT, EXAMPLE_WIDTH = 1600, 1118


def _blob(rng, h, w):
    """A random filled ellipse-ish blob of hxw, with a few holes and ragged edges."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    r = ((yy - cy) / max(h / 2, 0.5)) ** 2 + ((xx - cx) / max(w / 2, 0.5)) ** 2
    blob = r < 1.0 + 0.3 * rng.standard_normal((h, w))
    blob &= rng.random((h, w)) > 0.02
    return blob


def test_competition_example_row_decodes_and_reencodes():
    mask = masks.decode(EXAMPLE_MASK, EXAMPLE_HEIGHT, EXAMPLE_WIDTH)
    assert mask.shape == (EXAMPLE_HEIGHT, EXAMPLE_WIDTH)
    assert int(mask.sum()) == 663
    assert masks.reference_encode(mask) == EXAMPLE_MASK
    assert masks.encode(mask) == EXAMPLE_MASK
    y0, x0, y1, x1 = masks.mask_bbox(mask)
    assert masks.encode_cell(mask[y0:y1, x0:x1], (y0, x0, y1, x1), mask.shape) == EXAMPLE_MASK
    assert masks.area(EXAMPLE_MASK, EXAMPLE_HEIGHT, EXAMPLE_WIDTH) == 663


def test_random_masks_match_reference_and_round_trip():
    """Several hundred random masks: sizes 1..70 (1xN, Nx1, 1x1 included), all densities."""
    rng = np.random.default_rng(1234)
    shapes = [(1, 1), (1, 7), (7, 1), (1, 64), (64, 1), (2, 2)]
    shapes += [tuple(int(v) for v in rng.integers(1, 70, size=2)) for _ in range(400)]
    for i, (h, w) in enumerate(shapes):
        mask = rng.random((h, w)) < rng.choice([0.0, 0.02, 0.3, 0.5, 0.9, 0.99, 1.0])
        ref = masks.reference_encode(mask)
        assert masks.encode(mask) == ref, f"case {i}: shape {(h, w)}"
        back = masks.decode(ref, h, w)
        assert back.dtype == bool and back.shape == (h, w)
        assert np.array_equal(back, mask), f"case {i}: decode is not the inverse"


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (37, 23), (64, 64)])
def test_empty_and_full_masks(shape):
    for mask in (np.zeros(shape, bool), np.ones(shape, bool)):
        ref = masks.reference_encode(mask)
        assert masks.encode(mask) == ref
        assert masks.encode_cell(mask, (0, 0) + shape, shape) == ref
        assert np.array_equal(masks.decode(ref, *shape), mask)
    empty = masks.reference_encode(np.zeros(shape, bool))
    assert masks.encode_cell(np.zeros((0, 0), bool), (0, 0, 0, 0), shape) == empty


def test_masks_touching_each_border_and_wrapping_columns():
    H, W = 31, 17
    cases = {
        "top": (slice(0, 5), slice(3, 9)),
        "bottom": (slice(26, 31), slice(3, 9)),
        "left": (slice(4, 20), slice(0, 4)),
        "right": (slice(4, 20), slice(13, 17)),
        "top-left": (slice(0, 6), slice(0, 6)),
        "bottom-right": (slice(25, 31), slice(11, 17)),
        # Full-height columns: runs continue from the bottom of one column to the top of the
        # next in column-major order, so encode_cell must merge them.
        "full-height": (slice(0, 31), slice(5, 9)),
        "full-width": (slice(10, 14), slice(0, 17)),
    }
    rng = np.random.default_rng(7)
    for name, (ys, xs) in cases.items():
        for ragged in (False, True):
            mask = np.zeros((H, W), bool)
            mask[ys, xs] = True
            if ragged:
                mask &= rng.random((H, W)) > 0.2
                # keep the crop's corners set so the mask still touches its borders
                for y in (ys.start, ys.stop - 1):
                    for x in (xs.start, xs.stop - 1):
                        mask[y, x] = True
            ref = masks.reference_encode(mask)
            assert masks.encode(mask) == ref, name
            y0, x0, y1, x1 = ys.start, xs.start, ys.stop, xs.stop
            crop = mask[y0:y1, x0:x1]
            assert masks.encode_cell(crop, (y0, x0, y1, x1), (H, W)) == ref, name
            assert np.array_equal(masks.decode(ref, H, W), mask), name


def test_encode_cell_random_blobs_in_big_frames():
    rng = np.random.default_rng(99)
    frames = [(512, 700), (700, 512), (257, 1031)]
    for H, W in frames:
        for _ in range(12):
            h = int(rng.integers(1, min(H, 200)))
            w = int(rng.integers(1, min(W, 200)))
            # Bias towards borders so that touching cases come up often.
            y0 = int(rng.choice([0, H - h, rng.integers(0, H - h + 1)]))
            x0 = int(rng.choice([0, W - w, rng.integers(0, W - w + 1)]))
            crop = _blob(rng, h, w)
            frame = np.zeros((H, W), bool)
            frame[y0:y0 + h, x0:x0 + w] = crop
            ref = masks.reference_encode(frame)
            got = masks.encode_cell(crop, (y0, x0, y0 + h, x0 + w), (H, W))
            assert got == ref, (H, W, y0, x0, h, w)


def test_encode_cell_full_height_crop_with_wrapping_runs():
    rng = np.random.default_rng(3)
    H, W = 64, 90
    for _ in range(20):
        w = int(rng.integers(1, 30))
        x0 = int(rng.integers(0, W - w + 1))
        crop = rng.random((H, w)) < 0.7
        crop[0, :] = crop[-1, :] = True  # runs wrap from one column into the next
        frame = np.zeros((H, W), bool)
        frame[:, x0:x0 + w] = crop
        assert masks.encode_cell(crop, (0, x0, H, x0 + w), (H, W)) == masks.reference_encode(frame)


def test_encode_cell_never_allocates_the_frame():
    """A 120x90 cell in a 30000x30000 frame: a frame copy would need 900 MB; we stay tiny."""
    rng = np.random.default_rng(5)
    crop = _blob(rng, 120, 90)
    tracemalloc.start()
    s = masks.encode_cell(crop, (29000, 15000, 29120, 15090), (30000, 30000))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5 * 1024 * 1024, f"peak {peak} bytes"
    counts = masks.decode_counts(s, 30000, 30000)
    assert int(counts.sum()) == 30000 * 30000
    assert int(counts[1::2].sum()) == int(crop.sum())


def test_real_hpa_cells_match_reference(shared_data):
    """Each of the 20 cells of HPA's own 2048 px segmentation of 383_D2_1."""
    from PIL import Image

    labels = np.asarray(Image.open(shared_data / "hpa_masks" / "383_D2_1_cells.png"))
    ids = [int(v) for v in np.unique(labels) if v != 0]
    assert len(ids) == 20
    for cell_id in ids:
        mask = labels == cell_id
        y0, x0, y1, x1 = masks.mask_bbox(mask)
        ref = masks.reference_encode(mask)
        assert masks.encode_cell(mask[y0:y1, x0:x1], (y0, x0, y1, x1), mask.shape) == ref
        assert masks.encode(mask) == ref


def test_counts_text_round_trip_with_large_and_negative_deltas():
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng(11)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        counts = rng.integers(0, rng.choice([3, 40, 5000, 2_000_000]), size=n).astype(np.int64)
        counts[1:] = np.maximum(counts[1:], 1)
        text = masks.counts_to_string(counts)
        assert np.array_equal(masks.counts_from_string(text), counts)
        # Same bytes as pycocotools' own writer for that RLE.
        h = int(counts.sum())
        rle = coco_mask.frPyObjects({"size": [h, 1], "counts": [int(c) for c in counts]}, h, 1)
        assert text == rle["counts"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("not base64 !!", "base64"),
        (base64.b64encode(b"plain text").decode(), "zlib"),
        (base64.b64encode(zlib.compress(b"PPPP4")).decode(), "frame"),  # 2048x2048, not 10x10
        (base64.b64encode(zlib.compress(b"\x01\x02")).decode(), "byte outside"),
        (base64.b64encode(zlib.compress(b"P")).decode(), "middle of a number"),
    ],
)
def test_decode_rejects_bad_strings(bad, message):
    with pytest.raises(masks.MaskCodecError, match=message):
        masks.decode(bad, 10, 10)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="bool"):
        masks.encode(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="2-D"):
        masks.encode(np.zeros((4, 4, 1), bool))
    with pytest.raises(ValueError, match="does not match bbox"):
        masks.encode_cell(np.zeros((3, 3), bool), (0, 0, 4, 3), (10, 10))
    with pytest.raises(ValueError, match="not inside the frame"):
        masks.encode_cell(np.zeros((3, 3), bool), (8, 8, 11, 11), (10, 10))
