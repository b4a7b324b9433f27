"""common.overlay: outlines and texts over the composite, PNG writing."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from common import images, overlay


def _image_and_labels():
    image = np.zeros((300, 400, 4), np.uint8)
    image[..., 2] = 60  # dim blue everywhere
    labels = np.zeros((300, 400), np.int32)
    labels[50:150, 50:200] = 1
    labels[50:150, 200:350] = 2  # touches 1
    labels[180:290, 100:250] = 5
    return image, labels


def test_outlines_mark_label_edges_only():
    _, labels = _image_and_labels()
    edge = overlay.outlines(labels)
    assert edge[50, 100] and edge[149, 100] and edge[100, 50]  # outer edge
    assert edge[100, 199] and edge[100, 200]  # between two touching labels
    assert not edge[100, 120] and not edge[10, 10]  # inside a label / background
    assert overlay.outlines(labels, thickness=3).sum() > edge.sum()


def test_draw_overlay_draws_outlines_and_texts_over_the_composite():
    image, labels = _image_and_labels()
    base = images.composite_rgb(image)
    plain = overlay.draw_overlay(image, labels, texts={}, credit=False)
    assert plain.shape == (300, 400, 3) and plain.dtype == np.uint8
    edge = overlay.outlines(labels)
    assert (plain[edge] == 255).all()
    assert np.array_equal(plain[~edge], base[~edge])  # nothing else touched
    texts = overlay.draw_overlay(image, labels, texts={5: "Nucleoli 0.93"}, credit=False)
    changed = (texts != plain).any(-1)
    ys, xs = np.nonzero(changed)
    # The text sits inside cell 5 only.
    assert changed.sum() > 50
    assert ys.min() >= 180 and ys.max() < 290 and xs.min() >= 100 and xs.max() < 250
    ids = overlay.draw_overlay(image, labels, credit=False)  # default: the ids
    for box in ((slice(50, 150), slice(50, 200)), (slice(50, 150), slice(200, 350))):
        assert (ids[box] != plain[box]).any()


def test_credit_line_is_written():
    image, labels = _image_and_labels()
    with_credit = overlay.draw_overlay(image, labels, texts={})
    without = overlay.draw_overlay(image, labels, texts={}, credit=False)
    assert (with_credit[280:, :200] != without[280:, :200]).any()


def test_draw_overlay_rejects_mismatched_label_map():
    image, labels = _image_and_labels()
    with pytest.raises(ValueError, match="does not match"):
        overlay.draw_overlay(image, labels[:100])


def test_save_png_round_trip(tmp_path):
    image, labels = _image_and_labels()
    rgb = overlay.draw_overlay(image, labels, nuclei=labels * 0)
    path = str(tmp_path / "sub" / "x_overlay.png")
    overlay.save_png(path, rgb)
    back = cv2.imread(path, cv2.IMREAD_COLOR)[..., ::-1]
    assert np.array_equal(back, rgb)
    with pytest.raises(ValueError, match="uint8"):
        overlay.save_png(path, rgb.astype(np.float32))


def test_small_images_are_enlarged_for_legible_labels():
    image, labels = _image_and_labels()
    big = overlay.draw_overlay(image, labels, texts={}, credit=False, min_side=1000)
    assert big.shape == (900, 1200, 3)  # factor ceil(1000 / 400) = 3
    plain = overlay.draw_overlay(image, labels, texts={}, credit=False)
    # away from outlines, each source pixel becomes a 3x3 block of the same colour
    assert np.array_equal(big[::3, ::3][~overlay.outlines(labels, 2)], plain[~overlay.outlines(labels, 2)])
