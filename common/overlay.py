"""Outlines and text over the RGB composite, to look at a segmentation or a prediction.

Pictures made from HPA images must credit "Human Protein Atlas, www.proteinatlas.org"
(CC BY-SA 3.0); `draw_overlay(..., credit=True)` writes that line in the corner.
"""
from __future__ import annotations

import cv2
import numpy as np

from common import storage

CREDIT = "Human Protein Atlas, www.proteinatlas.org (CC BY-SA 3.0)"


def outlines(label_map: np.ndarray, thickness: int = 1) -> np.ndarray:
    """`HxW bool`: pixels on the edge of a label (next to another label or background)."""
    lab = np.asarray(label_map)
    edge = np.zeros(lab.shape, bool)
    # A pixel is an edge pixel when a 4-neighbour differs; only labelled pixels are marked.
    d = lab[1:, :] != lab[:-1, :]
    edge[1:, :] |= d
    edge[:-1, :] |= d
    d = lab[:, 1:] != lab[:, :-1]
    edge[:, 1:] |= d
    edge[:, :-1] |= d
    edge &= lab > 0
    if thickness > 1:
        kernel = np.ones((thickness, thickness), np.uint8)
        edge = cv2.dilate(edge.astype(np.uint8), kernel).astype(bool) & (lab > 0)
    return edge


def _text_positions(label_map: np.ndarray) -> dict[int, tuple[int, int]]:
    """`{id: (x, y)}`: the label's pixel farthest inside it (within its box), where text fits."""
    from scipy import ndimage

    pos = {}
    for i, sl in enumerate(ndimage.find_objects(label_map), start=1):
        if sl is None:
            continue
        own = label_map[sl] == i
        # Distances on a 4x-shrunk crop are plenty to place a label and keep this fast.
        step = max(1, min(own.shape) // 64)
        d = ndimage.distance_transform_edt(np.pad(own[::step, ::step], 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(d)), d.shape)
        pos[i] = (sl[1].start + x * step, sl[0].start + y * step)
    return pos


def draw_overlay(image: np.ndarray, label_map: np.ndarray, texts: dict[int, str] | None = None,
                 color=(255, 255, 255), text_color=(255, 255, 255), credit: bool = True,
                 nuclei: np.ndarray | None = None, min_side: int = 0) -> np.ndarray:
    """Outlines of `label_map` and a text per label over `composite_rgb(image)`.

    image: `HxWx4 uint8` (R, G, B, Y). label_map: `HxW` ints, 0 = background.
    texts: `{id: text}` to write at each label; None = write the ids; {} = no text.
    nuclei: optional second label map, outlined in cyan.
    min_side: a smaller image is first enlarged by an integer factor (nearest neighbour) so
      that labels stay legible; the result is then `kH x kW x 3`.
    Returns `HxWx3 uint8` RGB. Line width and font scale grow with the image size.
    """
    from common.images import composite_rgb

    image = np.asarray(image)
    label_map = np.asarray(label_map)
    if label_map.shape != image.shape[:2]:
        raise ValueError(f"label map {label_map.shape} does not match image {image.shape[:2]}")
    factor = -(-min_side // max(label_map.shape)) if max(label_map.shape) < min_side else 1
    if factor > 1:
        def grow(a):
            return np.repeat(np.repeat(a, factor, axis=0), factor, axis=1)

        image, label_map = grow(image), grow(label_map)
        nuclei = None if nuclei is None else grow(np.asarray(nuclei))
    rgb = np.ascontiguousarray(composite_rgb(image))
    side = max(label_map.shape)
    thick = max(1, int(round(side / 700)))
    if nuclei is not None:
        rgb[outlines(nuclei, thick)] = (0, 255, 255)
    rgb[outlines(label_map, thick)] = color
    pos = _text_positions(label_map) if texts is None or texts else {}
    if texts is None:
        texts = {i: str(i) for i in pos}
    if texts:
        scale = side / 1000
        for i, text in texts.items():
            if int(i) not in pos:
                continue
            _put_text(rgb, str(text), pos[int(i)], scale, text_color, centre=True)
    if credit:
        _put_text(rgb, CREDIT, (int(side * 0.01), label_map.shape[0] - int(side * 0.012)),
                  side / 2000, (255, 255, 255), centre=False)
    return rgb


def _put_text(rgb, text, xy, scale, color, centre):
    font = cv2.FONT_HERSHEY_SIMPLEX
    thick = max(1, int(round(2 * scale)))
    lines = text.split("\n")
    sizes = [cv2.getTextSize(t, font, scale, thick)[0] for t in lines]
    line_h = int(max(s[1] for s in sizes) * 1.5)
    x, y = xy
    if centre:
        y -= line_h * (len(lines) - 1) // 2
    for t, (tw, th) in zip(lines, sizes):
        org = (int(x - tw // 2) if centre else int(x), int(y + th // 2) if centre else int(y))
        # A dark outline first keeps the text legible over bright cells.
        cv2.putText(rgb, t, org, font, scale, (0, 0, 0), thick + 2 * max(1, thick // 2), cv2.LINE_AA)
        cv2.putText(rgb, t, org, font, scale, color, thick, cv2.LINE_AA)
        y += line_h


def save_png(path: str, rgb: np.ndarray) -> None:
    """Write an `HxWx3 uint8` RGB array (or `HxW`) as PNG to a local path or `gs://` URL (atomic)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim not in (2, 3) or (rgb.ndim == 3 and rgb.shape[2] != 3):
        raise ValueError(f"save_png expects HxWx3 or HxW uint8, got {rgb.shape} {rgb.dtype}")
    bgr = rgb[..., ::-1] if rgb.ndim == 3 else rgb
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise ValueError(f"could not encode PNG for {path}")
    storage.write_bytes(path, buf.tobytes())
