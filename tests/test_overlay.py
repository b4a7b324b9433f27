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


def _crowded(side=1024, seed=0):
    """A Voronoi-like label map of ~60 irregular cells of very different sizes, filling the frame."""
    rng = np.random.default_rng(seed)
    n = 60
    centres = rng.random((n, 2)) * side
    weights = rng.uniform(0.3, 1.0, n)  # weighted distances: cells from slivers to large
    yy, xx = np.mgrid[0:side:4, 0:side:4]
    d = ((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2) * weights
    small = (np.argmin(d, axis=-1) + 1).astype(np.int32)
    labels = np.repeat(np.repeat(small, 4, axis=0), 4, axis=1)
    texts = {i: [(int(rng.integers(19)), float(rng.random())), (int(rng.integers(19)), float(rng.random()))]
             for i in range(1, n + 1)}
    return labels, texts


def _disjoint(a, b):
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


@pytest.mark.parametrize("side", [512, 2048])
def test_label_texts_never_overlap_on_a_crowded_image(side):
    labels, texts = _crowded(side)
    reserved = [(0, side - 40, side // 2, side)]
    placed = overlay.layout_labels(labels, texts, reserved=reserved)
    boxes = [v[0] for v in placed.values()]
    for k, a in enumerate(boxes + reserved):
        assert 0 <= a[0] < a[2] <= side and 0 <= a[1] < a[3] <= side
        for b in (boxes + reserved)[k + 1:]:
            assert _disjoint(a, b), (a, b)
    # most cells keep a text, and the text grows with the cell
    assert len(placed) >= 0.8 * len(texts), len(placed)
    area = {i: int((labels == i).sum()) for i in placed}
    big, small = max(area, key=area.get), min(area, key=area.get)
    assert placed[big][2] > placed[small][2]
    # each text is at least `side/120` px high (readable when the picture is shown whole)
    for box, lines, scale in placed.values():
        assert (box[3] - box[1]) / len(lines) >= 1.4 * max(9, side / 120) - 1
        assert lines[0].split(":")[0].isdigit()  # the class code comes first


def test_predictions_tint_cells_in_their_class_colour_and_get_a_legend():
    image, labels = _image_and_labels()
    plain = overlay.draw_overlay(image, labels, texts={}, credit=False)
    texts = {1: [(16, 0.81), (0, 0.4)], 2: [(3, 0.5)], 5: [(16, 0.3)]}
    rgb = overlay.draw_overlay(image, labels, texts=texts, credit=False)
    assert rgb.shape[0] == 300 and rgb.shape[1] > 400 + 100  # the legend panel on the right
    cell, legend = rgb[:, :400], rgb[:, 400:]
    for i, c in ((1, 16), (2, 3), (5, 16)):
        ys, xs = np.nonzero(labels == i)
        y, x = ys.min() + 3, xs.min() + 3  # inside, clear of the outline and the text
        want = (plain[y, x].astype(int) * 7 + np.array(overlay.CLASS_COLORS[c]) * 3) // 10
        assert (cell[y, x] == want).all(), (i, cell[y, x], want)
    for c in (16, 3, 0):  # one swatch per class shown
        assert (legend == overlay.CLASS_COLORS[c]).all(-1).sum() > 20, c
    assert not (legend == overlay.CLASS_COLORS[7]).all(-1).any()  # and none for the others
    assert overlay.draw_overlay(image, labels, texts=texts, credit=False, legend=False).shape == (300, 400, 3)
