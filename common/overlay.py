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


# One colour per class (Trubetskoy's 20 distinct colours, the darkest lightened to show on a
# dark composite); Negative is grey.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 160, 160), (220, 190, 255), (170, 110, 40), (255, 250, 200), (200, 60, 60),
    (170, 255, 195), (160, 160, 0), (255, 215, 180), (200, 200, 200),
)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_PX = cv2.getTextSize("0", _FONT, 1.0, 2)[0][1]  # digit height at scale 1, px


def _text_positions(label_map: np.ndarray) -> dict[int, tuple[int, int, float]]:
    """`{id: (x, y, r)}`: the label's pixel farthest inside it and that distance `r` (px), the
    radius of the largest disc that fits in the label, where its text goes."""
    from scipy import ndimage

    pos = {}
    for i, sl in enumerate(ndimage.find_objects(label_map), start=1):
        if sl is None:
            continue
        own = label_map[sl] == i
        # Distances on a shrunk crop (about 64 px) are plenty to place a label and keep this fast.
        step = max(1, min(own.shape) // 64)
        d = ndimage.distance_transform_edt(np.pad(own[::step, ::step], 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(d)), d.shape)
        pos[i] = (sl[1].start + x * step, sl[0].start + y * step, float(d[y, x]) * step)
    return pos


def _label_lines(text) -> list[str]:
    """A text (str, lines split on newlines) or `[(class, score), ...]` -> lines, best first."""
    if isinstance(text, str):
        return text.split("\n")
    return [f"{int(c)}: {round(100 * float(s))}%" for c, s in text]


def _box(lines: list[str], xy, height: float) -> tuple[tuple[int, int, int, int], float]:
    """(x0, y0, x1, y1) of `lines` centred on xy at digit height `height` px, and the scale."""
    scale = height / _FONT_PX
    thick = max(1, int(round(2 * scale)))
    sizes = [cv2.getTextSize(t, _FONT, scale, thick)[0] for t in lines]
    w = max(s[0] for s in sizes) + 2 * thick
    h = int(round(height * 1.5 * len(lines))) + 2 * thick
    x, y = xy
    return (int(x - w / 2), int(y - h / 2), int(x + w / 2) + 1, int(y + h / 2) + 1), scale


def _overlaps(a, b, margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def layout_labels(label_map: np.ndarray, texts: dict, reserved=()) -> dict[int, tuple]:
    """Where each label's text goes, so that no two texts touch: `{id: (box, lines, scale)}`.

    texts: `{id: str or [(class, score), ...]}`; reserved: boxes `(x0, y0, x1, y1)` to keep
    clear (the credit line). Each text is centred on its label's innermost pixel, its digit
    height about half the radius of the largest disc inside the label (between about
    `side/120` and `side/36` px). Labels are placed largest first; where a text does not fit
    inside its label or would touch a text already placed, it is made smaller, then cut to
    its first line, then to the first line's first word (the class code); a label where none
    of that fits gets no text (its tint still shows its class).
    """
    side = max(label_map.shape)
    h_img, w_img = label_map.shape
    lo, hi = max(9.0, side / 120), max(9.0, side / 36)
    margin = max(2, side // 400)
    pos = _text_positions(label_map)
    placed: list = list(reserved)
    out: dict[int, tuple] = {}
    for i in sorted((int(k) for k in texts if int(k) in pos), key=lambda k: -pos[k][2]):
        x, y, r = pos[i]
        lines = _label_lines(texts[i])
        if not lines or not lines[0]:
            continue
        variants = [lines, lines[:1], lines[0].split()[:1]]
        variants = [v for k, v in enumerate(variants) if v not in variants[:k]]
        heights, h = [], float(np.clip(0.5 * r, lo, hi))
        while h > lo:
            heights.append(h)
            h *= 0.8
        heights.append(lo)
        found = None
        for inside in (True, False):  # first inside the label; else just clear of every text
            for v in variants:
                for h in heights:
                    box, scale = _box(v, (x, y), h)
                    if box[0] < 0 or box[1] < 0 or box[2] > w_img or box[3] > h_img:
                        continue
                    if any(_overlaps(box, b, margin) for b in placed):
                        continue
                    if inside and (label_map[box[1]:box[3], box[0]:box[2]] == i).mean() < 0.9:
                        continue
                    found = (box, v, scale)
                    break
                if found:
                    break
            if found:
                break
        if found:
            placed.append(found[0])
            out[i] = found
    return out


def _is_classes(text) -> bool:
    return not isinstance(text, str)


def draw_overlay(image: np.ndarray, label_map: np.ndarray, texts: dict | None = None,
                 color=(255, 255, 255), text_color=(255, 255, 255), credit: bool = True,
                 nuclei: np.ndarray | None = None, min_side: int = 0, legend: bool = True) -> np.ndarray:
    """Outlines of `label_map` and a text per label over `composite_rgb(image)`.

    image: `HxWx4 uint8` (R, G, B, Y). label_map: `HxW` ints, 0 = background.
    texts: `{id: text}` to write at each label; None = write the ids; {} = no text. A text is
      a str (lines split on newlines) or a prediction `[(class, score), ...]`, best first:
      then the label is tinted and outlined in its best class's colour (`CLASS_COLORS`), its
      text is `class score` per line (class numbers 0-18), and, with `legend`, a panel on the
      right names every class shown, in its colour (the result is then wider than the image).
    Texts never touch each other: see `layout_labels` (smaller, fewer lines, or none).
    nuclei: optional second label map, outlined in cyan.
    min_side: a smaller image is first enlarged by an integer factor (nearest neighbour) so
      that labels stay legible; the result is then `kH x kW x 3` (plus the legend).
    Returns `HxWx3 uint8` RGB. Line width and text size grow with the image and cell size.
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
    if texts is None:
        from scipy import ndimage

        texts = {i: str(i) for i, sl in enumerate(ndimage.find_objects(label_map), start=1) if sl is not None}
    top = {int(i): int(t[0][0]) for i, t in texts.items() if _is_classes(t) and len(t)}
    if top:
        # Tint each predicted cell with its best class's colour (30 %), then outline in it.
        lut = np.zeros((int(label_map.max()) + 1, 3), np.uint16)
        tinted = np.zeros(int(label_map.max()) + 1, bool)
        for i, c in top.items():
            if 0 < i < len(lut):
                lut[i], tinted[i] = CLASS_COLORS[c], True
        where = tinted[label_map]
        rgb[where] = ((rgb[where].astype(np.uint16) * 7 + lut[label_map[where]] * 3) // 10).astype(np.uint8)
    if nuclei is not None:
        rgb[outlines(nuclei, thick)] = (0, 255, 255)
    edge = outlines(label_map, thick)
    rgb[edge] = color
    if top:
        colored = edge & tinted[label_map]
        rgb[colored] = lut[label_map[colored]].astype(np.uint8)
    reserved = []
    credit_at = (int(side * 0.01), label_map.shape[0] - int(side * 0.012))
    if credit:
        scale = side / 2000
        (tw, th), _ = cv2.getTextSize(CREDIT, _FONT, scale, max(1, int(round(2 * scale))))
        reserved.append((credit_at[0], credit_at[1] - th - 4, credit_at[0] + tw + 4, credit_at[1] + 6))
    for i, (box, lines, scale) in layout_labels(label_map, texts, reserved).items():
        _put_lines(rgb, lines, box, scale, text_color)
    if credit:
        _put_text(rgb, CREDIT, credit_at, side / 2000, (255, 255, 255), centre=False)
    if top and legend:
        rgb = np.concatenate([rgb, _legend(sorted({c for t in texts.values() if _is_classes(t)
                                                   for c, _ in t}), label_map.shape[0], side)], axis=1)
    return rgb


def _legend(classes: list[int], height: int, side: int) -> np.ndarray:
    """`height x w x 3` panel: a swatch, the class number and its name for each class."""
    from common.labels import CLASS_NAMES

    h = max(9.0, side / 70)
    scale = h / _FONT_PX
    thick = max(1, int(round(2 * scale)))
    rows = ["classes (best class tints the cell)"] + [f"{c} {CLASS_NAMES[c]}" for c in classes]
    row_h = int(h * 2.0)
    # Shrink when the rows would not fit in the image's height.
    if row_h * (len(rows) + 1) > height:
        f = height / (row_h * (len(rows) + 1))
        h, scale, row_h = h * f, scale * f, max(1, int(row_h * f))
        thick = max(1, int(round(2 * scale)))
    swatch = int(h * 1.2)
    pad = int(h)
    width = pad * 3 + swatch + max(cv2.getTextSize(t, _FONT, scale, thick)[0][0] for t in rows)
    panel = np.full((height, width, 3), 24, np.uint8)
    y = pad + row_h // 2
    for k, text in enumerate(rows):
        x = pad
        if k:
            c = classes[k - 1]
            cv2.rectangle(panel, (x, y - swatch // 2), (x + swatch, y + swatch // 2), CLASS_COLORS[c], -1)
            x += swatch + pad
        cv2.putText(panel, text, (x, y + int(h / 2)), _FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)
        y += row_h
    return panel


def _put_lines(rgb, lines, box, scale, color):
    """Write `lines` centred in `box` (from `_box`), white with a dark outline."""
    thick = max(1, int(round(2 * scale)))
    n = len(lines)
    line_h = (box[3] - box[1] - 2 * thick) / n
    cx = (box[0] + box[2]) / 2
    for k, t in enumerate(lines):
        (tw, th), _ = cv2.getTextSize(t, _FONT, scale, thick)
        org = (int(cx - tw / 2), int(box[1] + thick + line_h * k + (line_h + th) / 2))
        cv2.putText(rgb, t, org, _FONT, scale, (0, 0, 0), thick + 2 * max(1, thick // 2), cv2.LINE_AA)
        cv2.putText(rgb, t, org, _FONT, scale, color, thick, cv2.LINE_AA)


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
