"""Synthetic HPA-like data: the embedded default for the demo and the tests.

`python -m testkit.synthetic --out DIR --n N --size S --seed K` (or `generate(...)`) writes

- `DIR/images/{ID}_{red,green,blue,yellow}.png`: uint8 channels. blue = nuclei, red =
  microtubules (radial filaments), yellow = ER (cytoplasm, brighter near the nucleus), green =
  the protein, whose pattern depends on each CELL's classes (see `_PATTERNS`);
- `DIR/train.csv` (`ID,Label`): image labels, the union of the image's cell labels;
- `DIR/sample_submission.csv` (`ID,ImageWidth,ImageHeight,PredictionString`, empty predictions);
- `DIR/truth.csv`: cell-level truth in the submission format, one `label 1 mask` triple per
  cell and label (a multi-label cell repeats its mask), masks in the competition codec;
- `DIR/masks/{ID}_cells.png`, `DIR/masks/{ID}_nuclei.png`: uint16 label maps (0 = background;
  a cell and its nucleus share the id, ids 1..K);
- `DIR/cell_labels.csv` (`ID,cell,Label`).

Cells touch (a noisy, weighted Voronoi tessellation around the nuclei, limited in distance),
have one nucleus each, vary in size (diameter ~ 1/6 .. 1/3 of the image side), and some are
cut by the border. Each image draws 1-3 classes; each cell shows a random subset of them or
nothing (Negative), so image labels are weak for single cells, as in the competition (how weak:
`--share`, `--negative-cells`). As in the competition's train.csv, Negative (18) is an image
label only when no cell shows a pattern.

Deterministic: image i depends only on (seed, i), and the same arguments give byte-identical
files. Everything is drawn in crops around each cell, so a 512 px image takes a few tens of ms.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np
from scipy import ndimage

from common import masks, storage
from common.labels import NEGATIVE, NUM_CLASSES, format_labels

CHANNEL_NAMES = ("red", "green", "blue", "yellow")
ID_FORMAT = "syn_{:04d}"
# Patterned classes: everything but Negative.
_POSITIVE = tuple(c for c in range(NUM_CLASSES) if c != NEGATIVE)
# A cell reaches this far (in units of its radius) unless a neighbour is closer: above 1 so
# that neighbours, packed at 0.85 x the sum of their radii, share borders.
_EXTENT = 1.1
# How weak the image labels are for single cells (`generate(share=, negative=)`): a cell of a
# positive image shows nothing with probability NEGATIVE_CELLS, else each of the image's classes
# with probability SHARE. Changing these defaults changes every dataset's bytes.
SHARE = 0.6
NEGATIVE_CELLS = 0.2


# ------------------------------------------------------------------------------ geometry
@dataclass
class _Cell:
    """One cell in crop coordinates: the crop is `[y0:y1, x0:x1]` of the frame."""

    id: int
    cy: float
    cx: float
    r: float  # cell radius, px
    rn: float  # nucleus radius, px
    y0: int = 0
    x0: int = 0
    y1: int = 0
    x1: int = 0
    cell: np.ndarray | None = None  # bool crop
    nucleus: np.ndarray | None = None  # bool crop
    nucleoli: list = field(default_factory=list)  # [(y, x, radius)] in crop coordinates
    labels: list = field(default_factory=list)
    centrosome_angle: float = 0.0  # direction from the nucleus centre to the centrosome, rad

    @property
    def cyto(self) -> np.ndarray:
        return self.cell & ~self.nucleus

    @property
    def ly(self) -> float:  # nucleus centre in crop coordinates
        return self.cy - self.y0

    @property
    def lx(self) -> float:
        return self.cx - self.x0


def _smooth_noise(rng: np.random.Generator, h: int, w: int, period: float) -> np.ndarray:
    """`hxw float32` smooth noise, roughly in [-1, 1], with features about `period` px wide."""
    gh = max(2, int(np.ceil(h / period)) + 2)
    gw = max(2, int(np.ceil(w / period)) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    big = cv2.resize(grid, (int(round(gw * period)), int(round(gh * period))), interpolation=cv2.INTER_CUBIC)
    oy = (big.shape[0] - h) // 2
    ox = (big.shape[1] - w) // 2
    return np.ascontiguousarray(np.clip(big[oy:oy + h, ox:ox + w] / 1.5, -1.0, 1.0))


def _place_seeds(rng: np.random.Generator, h: int, w: int, ref: float) -> list[tuple[float, float, float]]:
    """Nucleus centres (inside the frame) with radii ~ U(ref/12, ref/6), packed so neighbours overlap."""
    seeds: list[tuple[float, float, float]] = []
    arr = np.zeros((0, 3))
    for _ in range(400):
        r = rng.uniform(ref / 12.0, ref / 6.0)
        cy = rng.uniform(0, h)
        cx = rng.uniform(0, w)
        if len(arr):
            dist = np.hypot(arr[:, 0] - cy, arr[:, 1] - cx)
            # 0.85 * (r_i + r_j): closer than the sum of radii, so neighbouring cells meet.
            if np.any(dist < 0.85 * (arr[:, 2] + r)):
                continue
        seeds.append((cy, cx, r))
        arr = np.asarray(seeds)
    return seeds


def _ellipse_distance(yy, xx, cy, cx, radius, aspect, angle) -> np.ndarray:
    """Normalised elliptic distance: < 1 inside an ellipse of mean radius `radius`."""
    dy = yy - cy
    dx = xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u = (dx * c + dy * s) / (radius * aspect)
    v = (-dx * s + dy * c) / (radius / aspect)
    return np.sqrt(u * u + v * v)


def _keep_component(mask: np.ndarray, y: float, x: float) -> np.ndarray:
    """The connected part of `mask` that holds (y, x), or its largest part when (y, x) is off it."""
    if not mask.any():
        return mask
    n, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    if n <= 2:
        return mask
    iy = int(np.clip(round(y), 0, mask.shape[0] - 1))
    ix = int(np.clip(round(x), 0, mask.shape[1] - 1))
    keep = comp[iy, ix]
    if keep == 0:
        keep = int(np.argmax(np.bincount(comp.ravel())[1:])) + 1
    return comp == keep


def _layout(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, list[_Cell]]:
    """Cells and nuclei label maps (`hxw int32`) and the cells, ids 1..K."""
    ref = float(np.sqrt(h * w))
    seeds = _place_seeds(rng, h, w, ref)
    boundary = _smooth_noise(rng, h, w, ref / 10.0) * 0.12  # wiggly cell outlines
    best = np.full((h, w), np.inf, dtype=np.float32)
    owner = np.zeros((h, w), dtype=np.int32)
    shapes = []
    for k, (cy, cx, r) in enumerate(seeds, start=1):
        aspect = rng.uniform(0.8, 1.25)
        angle = rng.uniform(0, np.pi)
        reach = int(np.ceil(r * 1.25 * (_EXTENT + 0.15))) + 2
        y0, y1 = max(0, int(cy) - reach), min(h, int(cy) + reach + 1)
        x0, x1 = max(0, int(cx) - reach), min(w, int(cx) + reach + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        d = _ellipse_distance(yy, xx, cy, cx, r, aspect, angle) + boundary[y0:y1, x0:x1]
        win = d < best[y0:y1, x0:x1]
        best[y0:y1, x0:x1][win] = d[win]
        owner[y0:y1, x0:x1][win] = k
        shapes.append((cy, cx, r))
    owner[best >= _EXTENT] = 0  # distance-limited: gaps between cells where no seed is near

    cells_map = np.zeros((h, w), dtype=np.int32)
    nuclei_map = np.zeros((h, w), dtype=np.int32)
    cells: list[_Cell] = []
    margin = 4  # crop margin, px: outlines are found by erosion, the crop edge must not look like one
    for k, (cy, cx, r) in enumerate(shapes, start=1):
        # Draw the nucleus parameters for every seed, kept or not, so the stream of random
        # numbers does not depend on which cells survive.
        rn = r * rng.uniform(0.3, 0.45)
        n_aspect = rng.uniform(0.8, 1.25)
        n_angle = rng.uniform(0, np.pi)
        ncy = cy + rng.uniform(-0.08, 0.08) * r
        ncx = cx + rng.uniform(-0.08, 0.08) * r
        reach = int(np.ceil(r * 1.25 * (_EXTENT + 0.15))) + 2
        y0, y1 = max(0, int(cy) - reach), min(h, int(cy) + reach + 1)
        x0, x1 = max(0, int(cx) - reach), min(w, int(cx) + reach + 1)
        cell = _keep_component(owner[y0:y1, x0:x1] == k, cy - y0, cx - x0)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        nd = _ellipse_distance(yy, xx, ncy, ncx, rn, n_aspect, n_angle) + boundary[y0:y1, x0:x1] * 0.3
        # Erode the cell by 2 px first so the nucleus never touches the cell outline.
        inner = cv2.erode(cell.astype(np.uint8), np.ones((5, 5), np.uint8), borderValue=1).astype(bool)
        nucleus = _keep_component((nd < 1.0) & inner, ncy - y0, ncx - x0)
        # Drop slivers: cells mostly outside the frame, or whose nucleus is mostly cut away.
        if cell.sum() < 0.2 * np.pi * r * r or nucleus.sum() < 0.3 * np.pi * rn * rn:
            continue
        new_id = len(cells) + 1
        cells_map[y0:y1, x0:x1][cell] = new_id
        nuclei_map[y0:y1, x0:x1][nucleus] = new_id
        rows = np.flatnonzero(cell.any(axis=1))
        cols = np.flatnonzero(cell.any(axis=0))
        c = _Cell(id=new_id, cy=ncy, cx=ncx, r=r, rn=rn)
        c.y0, c.y1 = max(0, y0 + rows[0] - margin), min(h, y0 + rows[-1] + 1 + margin)
        c.x0, c.x1 = max(0, x0 + cols[0] - margin), min(w, x0 + cols[-1] + 1 + margin)
        cells.append(c)
    for c in cells:
        c.cell = cells_map[c.y0:c.y1, c.x0:c.x1] == c.id
        c.nucleus = nuclei_map[c.y0:c.y1, c.x0:c.x1] == c.id
    return cells_map, nuclei_map, cells


# ------------------------------------------------------------------------------ drawing
@dataclass
class _Ctx:
    """Per-image drawing context: the random stream, the scale and shared noise fields."""

    rng: np.random.Generator
    s: float  # pixel scale relative to a 512 px image
    coarse: np.ndarray  # hxw smooth noise, ~8 px features
    fine: np.ndarray  # hxw smooth noise, ~2.5 px features (reticular texture)


def _px(value: float) -> int:
    return max(1, int(round(value)))


def _rim(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Outline of `mask`, `thickness` px wide. Outside the crop counts as inside the mask, so a
    cell cut by the image border gets no outline along the cut (the crop margin keeps the other
    sides away from the crop edge)."""
    k = 2 * thickness + 1
    inner = cv2.erode(mask.astype(np.uint8), np.ones((k, k), np.uint8), borderValue=1)
    return mask & ~inner.astype(bool)


def _pick(rng: np.random.Generator, mask: np.ndarray, count: int) -> np.ndarray:
    """`count` random (y, x) positions inside `mask` (with replacement), `countx2` int."""
    idx = np.flatnonzero(mask)
    if idx.size == 0 or count <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    chosen = rng.choice(idx, size=count)
    return np.stack(np.unravel_index(chosen, mask.shape), axis=1)


def _dots(canvas, rng, mask, count, radius, value=(0.6, 1.0)) -> None:
    """Filled discs of radius U(radius) px at random places inside `mask`."""
    for y, x in _pick(rng, mask, count):
        r = _px(rng.uniform(*radius))
        cv2.circle(canvas, (int(x), int(y)), r, float(rng.uniform(*value)), -1)


def _edge_point(c: _Cell, angle: float, extra: float = 0.0) -> tuple[float, float]:
    """Crop (y, x) at the nucleus edge (plus `extra` px outward) in direction `angle`."""
    d = c.rn + extra
    return c.ly + d * np.sin(angle), c.lx + d * np.cos(angle)


def _radial_lines(canvas, rng, c: _Cell, origin, count, value, thickness=1) -> None:
    """Slightly bent filaments fanning out from `origin` (y, x) past the cell edge
    (microtubule-like), with intensities U(value) in 4 levels (one drawing call per level)."""
    oy, ox = origin
    angle = rng.uniform(0, 2 * np.pi, size=count)[:, None]
    length = c.r * rng.uniform(0.9, 1.6, size=count)[:, None]
    bend = rng.uniform(-0.3, 0.3, size=count)[:, None]
    level = rng.integers(0, 4, size=count)
    t = np.linspace(0.0, 1.0, 5)[None, :]
    a = angle + bend * t
    pts = np.stack([ox + length * t * np.cos(a), oy + length * t * np.sin(a)], axis=-1)
    pts = np.round(pts).astype(np.int32)  # (count, 5, 2) as (x, y)
    for k in range(4):
        chosen = pts[level == k]
        if len(chosen):
            v = value[0] + (value[1] - value[0]) * (k + 0.5) / 4
            cv2.polylines(canvas, list(chosen), False, float(v), thickness)


def _crop(field_: np.ndarray, c: _Cell) -> np.ndarray:
    return field_[c.y0:c.y1, c.x0:c.x1]


def _zeros(c: _Cell) -> np.ndarray:
    return np.zeros(c.cell.shape, dtype=np.float32)


def _er_texture(ctx: _Ctx, c: _Cell) -> np.ndarray:
    """Cytoplasm brighter near the nucleus, reticular (yellow channel and class 6)."""
    dist = cv2.distanceTransform((~c.nucleus).astype(np.uint8), cv2.DIST_L2, 3)
    decay = np.exp(-dist / (0.45 * c.r))
    tex = 0.55 + 0.45 * _crop(ctx.fine, c)
    return (0.15 + 0.85 * decay) * tex * c.cyto


# Class patterns: each returns the green signal of one cell for that class, an `hxw float32`
# crop in ~[0, 1] that is already zero outside the class's compartment.
def _p_nucleoplasm(ctx, c):
    out = (0.75 + 0.25 * _crop(ctx.coarse, c)) * c.nucleus
    for y, x, r in c.nucleoli:  # nucleoli stay dark
        cv2.circle(out, (int(x), int(y)), r, 0.15, -1)
    return out * c.nucleus


def _p_nuclear_membrane(ctx, c):
    return _rim(c.nucleus, _px(2 * ctx.s)) * 1.0 + 0.08 * c.nucleus


def _p_nucleoli(ctx, c):
    out = _zeros(c)
    for y, x, r in c.nucleoli:
        cv2.circle(out, (int(x), int(y)), r, float(ctx.rng.uniform(0.8, 1.0)), -1)
    return out * c.nucleus


def _p_fibrillar_center(ctx, c):
    out = _zeros(c)
    for y, x, r in c.nucleoli:
        for _ in range(int(ctx.rng.integers(3, 7))):
            dy, dx = ctx.rng.uniform(-0.7, 0.7, size=2) * r
            cv2.circle(out, (int(round(x + dx)), int(round(y + dy))), _px(0.8 * ctx.s), 1.0, -1)
    return out * c.nucleus


def _p_speckles(ctx, c):
    out = 0.1 * c.nucleus.astype(np.float32)
    _dots(out, ctx.rng, c.nucleus, int(ctx.rng.integers(15, 31)), (1.5 * ctx.s, 3.0 * ctx.s), (0.5, 0.9))
    return out * c.nucleus


def _p_nuclear_bodies(ctx, c):
    out = _zeros(c)
    inner = cv2.erode(c.nucleus.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    _dots(out, ctx.rng, inner if inner.any() else c.nucleus, int(ctx.rng.integers(1, 4)),
          (2.5 * ctx.s, 4.0 * ctx.s), (0.9, 1.0))
    return out * c.nucleus


def _p_er(ctx, c):
    return _er_texture(ctx, c)


def _p_golgi(ctx, c):
    out = _zeros(c)
    cy, cx = _edge_point(c, c.centrosome_angle, 0.12 * c.r)
    for _ in range(int(ctx.rng.integers(6, 13))):
        dy, dx = ctx.rng.normal(0, 0.1 * c.r, size=2)
        cv2.circle(out, (int(round(cx + dx)), int(round(cy + dy))),
                   _px(ctx.rng.uniform(2.0, 4.0) * ctx.s), float(ctx.rng.uniform(0.7, 1.0)), -1)
    return out * c.cyto


def _p_intermediate_filaments(ctx, c):
    """Long wavy thin filaments winding around the nucleus."""
    out = _zeros(c)
    for _ in range(int(ctx.rng.integers(8, 16))):
        a = ctx.rng.uniform(0, 2 * np.pi)
        y, x = _edge_point(c, a, ctx.rng.uniform(0, 0.4) * c.r)
        heading = a + np.pi / 2 * ctx.rng.choice([-1, 1])
        step = 0.12 * c.r
        pts = [(x, y)]
        for _ in range(14):
            heading += ctx.rng.normal(0, 0.35)
            x += step * np.cos(heading)
            y += step * np.sin(heading)
            pts.append((x, y))
        cv2.polylines(out, [np.round(pts).astype(np.int32)], False, float(ctx.rng.uniform(0.6, 1.0)), 1)
    return out * c.cyto


def _p_actin(ctx, c):
    """Straight, parallel stress fibres of one orientation per cell, plus a cortical rim."""
    out = 0.4 * _rim(c.cell, _px(1.5 * ctx.s)).astype(np.float32)
    a = ctx.rng.uniform(0, np.pi)
    h, w = out.shape
    diag = float(np.hypot(h, w))
    ux, uy = np.cos(a), np.sin(a)
    for off in ctx.rng.uniform(-0.5, 0.5, size=int(ctx.rng.integers(6, 13))) * c.r * 1.6:
        mx, my = c.lx - uy * off, c.ly + ux * off
        p1 = (int(round(mx - ux * diag)), int(round(my - uy * diag)))
        p2 = (int(round(mx + ux * diag)), int(round(my + uy * diag)))
        cv2.line(out, p1, p2, float(ctx.rng.uniform(0.6, 1.0)), _px(1.5 * ctx.s))
    return out * c.cell


def _p_microtubules(ctx, c):
    out = 0.1 * c.cell.astype(np.float32)
    _radial_lines(out, ctx.rng, c, _edge_point(c, c.centrosome_angle, 2), int(ctx.rng.integers(30, 50)), (0.5, 0.9))
    return out * c.cell


def _p_mitotic_spindle(ctx, c):
    """A bipolar fusiform spindle across the nucleus: fibres from two poles to a midplane."""
    out = _zeros(c)
    a = ctx.rng.uniform(0, np.pi)
    ux, uy = np.cos(a), np.sin(a)
    half = 0.9 * c.rn
    poles = [(c.lx + ux * half, c.ly + uy * half), (c.lx - ux * half, c.ly - uy * half)]
    for t in np.linspace(-0.6, 0.6, 9) * c.rn:
        mid = (c.lx - uy * t, c.ly + ux * t)
        for px_, py_ in poles:
            cv2.line(out, (int(round(px_)), int(round(py_))), (int(round(mid[0])), int(round(mid[1]))),
                     float(ctx.rng.uniform(0.7, 1.0)), 1)
    for px_, py_ in poles:
        cv2.circle(out, (int(round(px_)), int(round(py_))), _px(2 * ctx.s), 1.0, -1)
    return out * c.cell


def _p_centrosome(ctx, c):
    out = _zeros(c)
    for k in range(int(ctx.rng.integers(1, 3))):
        y, x = _edge_point(c, c.centrosome_angle + 0.25 * k, 3 * ctx.s + 2)
        cv2.circle(out, (int(round(x)), int(round(y))), _px(2 * ctx.s), 1.0, -1)
    return out * c.cyto


def _p_plasma_membrane(ctx, c):
    return _rim(c.cell, _px(2 * ctx.s)) * 1.0 + 0.06 * c.cell


def _p_mitochondria(ctx, c):
    """Many short worm-like segments, denser near the nucleus."""
    out = _zeros(c)
    for _ in range(int(ctx.rng.integers(40, 80))):
        a = ctx.rng.uniform(0, 2 * np.pi)
        y, x = _edge_point(c, a, abs(ctx.rng.normal(0, 0.35 * c.r)))
        b = ctx.rng.uniform(0, np.pi)
        half = ctx.rng.uniform(1.5, 4.0) * ctx.s
        cv2.line(out, (int(round(x - half * np.cos(b))), int(round(y - half * np.sin(b)))),
                 (int(round(x + half * np.cos(b))), int(round(y + half * np.sin(b)))),
                 float(ctx.rng.uniform(0.6, 1.0)), _px(ctx.rng.uniform(1.0, 2.0) * ctx.s))
    return out * c.cyto


def _p_aggresome(ctx, c):
    out = _zeros(c)
    radius = ctx.rng.uniform(0.18, 0.28) * c.r
    y, x = _edge_point(c, ctx.rng.uniform(0, 2 * np.pi), radius * 0.9)
    cv2.circle(out, (int(round(x)), int(round(y))), _px(radius), 1.0, -1)
    return out * c.cyto


def _p_cytosol(ctx, c):
    return (0.6 + 0.2 * _crop(ctx.coarse, c)) * c.cyto


def _p_vesicles(ctx, c):
    out = _zeros(c)
    _dots(out, ctx.rng, c.cyto, int(ctx.rng.integers(25, 51)), (1.5 * ctx.s, 3.0 * ctx.s), (0.6, 1.0))
    return out * c.cyto


_PATTERNS: dict[int, Callable[[_Ctx, _Cell], np.ndarray]] = {
    0: _p_nucleoplasm,
    1: _p_nuclear_membrane,
    2: _p_nucleoli,
    3: _p_fibrillar_center,
    4: _p_speckles,
    5: _p_nuclear_bodies,
    6: _p_er,
    7: _p_golgi,
    8: _p_intermediate_filaments,
    9: _p_actin,
    10: _p_microtubules,
    11: _p_mitotic_spindle,
    12: _p_centrosome,
    13: _p_plasma_membrane,
    14: _p_mitochondria,
    15: _p_aggresome,
    16: _p_cytosol,
    17: _p_vesicles,
}


# ------------------------------------------------------------------------------ one image
def _assign_labels(rng: np.random.Generator, n_cells: int, primary: int, share: float = SHARE,
                   negative: float = NEGATIVE_CELLS) -> list[list[int]]:
    """Per-cell label lists. The image draws `primary` and 0-2 more classes; each cell shows
    nothing (Negative) with probability `negative`, else each class with probability `share`
    (a cell that drew none shows one of them at random); every drawn class is shown by at least
    one cell. `primary == NEGATIVE`: every cell is negative."""
    if primary == NEGATIVE:
        return [[NEGATIVE] for _ in range(n_cells)]
    others = [c for c in _POSITIVE if c != primary]
    extra = rng.choice(others, size=int(rng.integers(0, 3)), replace=False)
    classes = [primary] + sorted(int(c) for c in extra)
    out: list[list[int]] = []
    for _ in range(n_cells):
        if rng.random() < negative:
            out.append([NEGATIVE])
            continue
        subset = [c for c in classes if rng.random() < share]
        out.append(subset or [classes[int(rng.integers(len(classes)))]])
    for cls in classes:
        if n_cells and not any(cls in labels for labels in out):
            j = int(rng.integers(n_cells))
            out[j] = [cls] if out[j] == [NEGATIVE] else sorted(out[j] + [cls])
    return out


def image_labels(cell_labels: Sequence[Sequence[int]]) -> list[int]:
    """The image label from its cells': the union of their classes, Negative (18) only when no
    cell shows a pattern (as in the competition's train.csv, where 18 never joins another)."""
    union = sorted({int(c) for labels in cell_labels for c in labels if int(c) != NEGATIVE})
    return union or [NEGATIVE]


def read_cell_labels(data_dir: str) -> dict[tuple[str, int], list[int]]:
    """`DIR/cell_labels.csv` -> `{(image ID, cell id): [classes]}` (the cell-level truth)."""
    from common.labels import parse_labels

    path = storage.join(data_dir, "cell_labels.csv")
    rows = csv.DictReader(io.StringIO(storage.read_text(path)))
    return {(r["ID"], int(r["cell"])): parse_labels(r["Label"], f"{path} row {i} (ID {r['ID']})")
            for i, r in enumerate(rows, start=2)}


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _check_probability(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return value


def render_image(seed: int, index: int, height: int, width: int, share: float = SHARE,
                 negative: float = NEGATIVE_CELLS) -> dict:
    """Draw synthetic image `index` of dataset `seed` (depends on nothing else but `share` and
    `negative`, which only change the cells' labels: see `_assign_labels`).

    Returns `{"channels": {name: HxW uint8}, "cells": HxW int32, "nuclei": HxW int32,
    "cell_labels": [[int, ...] per cell id 1..K]}`.
    """
    layout_rng = np.random.default_rng([seed, index, 0])
    label_rng = np.random.default_rng([seed, index, 1])
    draw_rng = np.random.default_rng([seed, index, 2])
    h, w = int(height), int(width)
    cells_map, nuclei_map, cells = _layout(layout_rng, h, w)
    primary = (seed + index) % NUM_CLASSES  # cycle through all classes, Negative included
    for c, labels in zip(cells, _assign_labels(label_rng, len(cells), primary, share, negative)):
        c.labels = labels

    s = float(np.sqrt(h * w)) / 512.0
    ctx = _Ctx(draw_rng, s, _smooth_noise(draw_rng, h, w, 8 * s + 1), _smooth_noise(draw_rng, h, w, 2.5 * s + 1))
    rng = draw_rng
    red, green, blue, yellow = (np.zeros((h, w), np.float32) for _ in range(4))
    for c in cells:
        c.centrosome_angle = float(rng.uniform(0, 2 * np.pi))
        inner = cv2.erode(c.nucleus.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        c.nucleoli = [(int(y), int(x), _px(c.rn * rng.uniform(0.12, 0.2)))
                      for y, x in _pick(rng, inner if inner.any() else c.nucleus, int(rng.integers(2, 5)))]
        box = (slice(c.y0, c.y1), slice(c.x0, c.x1))
        # blue: DNA, textured, darker in the nucleoli
        dna = rng.uniform(0.45, 0.8) * (0.85 + 0.15 * _crop(ctx.coarse, c))
        for y, x, r in c.nucleoli:
            cv2.circle(dna, (x, y), r, float(rng.uniform(0.15, 0.3)), -1)
        blue[box] += dna * c.nucleus
        # red: microtubules from the centrosome
        mt = 0.1 * c.cell.astype(np.float32)
        _radial_lines(mt, rng, c, _edge_point(c, c.centrosome_angle, 2), int(rng.integers(30, 50)), (0.25, 0.55))
        red[box] += mt * c.cell
        # yellow: ER
        yellow[box] += rng.uniform(0.5, 0.9) * _er_texture(ctx, c) + 0.05 * c.nucleus
        # green: the protein, one pattern per class of this cell, at a per-cell expression level
        expression = rng.uniform(0.5, 1.0)
        for label in c.labels:
            if label != NEGATIVE:
                green[box] += expression * _PATTERNS[label](ctx, c)

    channels = {}
    sigma = 0.6 * s + 0.4  # optical blur
    for name, plane, floor in (("red", red, 0.02), ("green", green, 0.01), ("blue", blue, 0.02), ("yellow", yellow, 0.02)):
        plane = cv2.GaussianBlur(plane, (0, 0), sigma)
        plane += floor + rng.normal(0.0, 0.01, size=plane.shape).astype(np.float32)
        channels[name] = _to_uint8(plane)
    return {
        "channels": channels,
        "cells": cells_map,
        "nuclei": nuclei_map,
        "cell_labels": [c.labels for c in cells],
    }


# ------------------------------------------------------------------------------ files
def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)  # OpenCV's defaults: the fastest of the settings tried
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def generate(out_dir: str, n: int = 8, size: int = 512, seed: int = 0, height: int | None = None,
             *, share: float = SHARE, negative: float = NEGATIVE_CELLS, progress: bool = False) -> dict:
    """Write `n` synthetic images of `size` px wide (`height` px high, default square) to `out_dir`.

    `share`: the probability that a cell of a positive image shows each of its image's classes
    (a cell that drew none shows one of them, so in a one-class image every cell that is not
    Negative shows it); `negative`: the probability that such a cell shows none (Negative). Lower `share` / higher
    `negative` = weaker image labels for single cells. The defaults give the same bytes as ever.

    `out_dir` is a local folder or `gs://` prefix; see the module docstring for the files.
    Returns a summary: `{"out_dir", "ids", "width", "height", "seed", "cells" (total),
    "labels" ({ID: image labels}), "seconds"}`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    width = int(size)
    height = int(height) if height is not None else width
    if width < 32 or height < 32:
        raise ValueError(f"images must be at least 32x32 px, got {height}x{width} (HxW)")
    share = _check_probability("share", share)
    negative = _check_probability("negative", negative)
    from tqdm import tqdm

    start = time.perf_counter()
    storage.makedirs(storage.join(out_dir, "images"))
    storage.makedirs(storage.join(out_dir, "masks"))
    train_rows, sample_rows, truth_rows, cell_rows = [], [], [], []
    labels_by_id: dict[str, list[int]] = {}
    total_cells = 0
    for index in tqdm(range(n), desc="synthetic images", unit="img", disable=not progress):
        image_id = ID_FORMAT.format(index)
        img = render_image(seed, index, height, width, share, negative)
        for name in CHANNEL_NAMES:
            storage.write_bytes(storage.join(out_dir, "images", f"{image_id}_{name}.png"), _png(img["channels"][name]))
        storage.write_bytes(storage.join(out_dir, "masks", f"{image_id}_cells.png"), _png(img["cells"].astype(np.uint16)))
        storage.write_bytes(storage.join(out_dir, "masks", f"{image_id}_nuclei.png"), _png(img["nuclei"].astype(np.uint16)))
        triples = []
        boxes = ndimage.find_objects(img["cells"])
        for cell_id, labels in enumerate(img["cell_labels"], start=1):
            ys, xs = boxes[cell_id - 1]
            crop = img["cells"][ys, xs] == cell_id
            mask_str = masks.encode_cell(crop, (ys.start, xs.start, ys.stop, xs.stop), (height, width))
            triples += [f"{label} 1 {mask_str}" for label in sorted(labels)]
            cell_rows.append((image_id, cell_id, format_labels(sorted(labels))))
        labels = image_labels(img["cell_labels"])
        labels_by_id[image_id] = labels
        total_cells += len(img["cell_labels"])
        train_rows.append((image_id, format_labels(labels)))
        sample_rows.append((image_id, width, height, ""))
        truth_rows.append((image_id, width, height, " ".join(triples)))
    sub_header = ("ID", "ImageWidth", "ImageHeight", "PredictionString")
    storage.write_text(storage.join(out_dir, "train.csv"), _csv_text(("ID", "Label"), train_rows))
    storage.write_text(storage.join(out_dir, "sample_submission.csv"), _csv_text(sub_header, sample_rows))
    storage.write_text(storage.join(out_dir, "truth.csv"), _csv_text(sub_header, truth_rows))
    storage.write_text(storage.join(out_dir, "cell_labels.csv"), _csv_text(("ID", "cell", "Label"), cell_rows))
    return {
        "out_dir": out_dir,
        "ids": list(labels_by_id),
        "width": width,
        "height": height,
        "seed": seed,
        "cells": total_cells,
        "labels": labels_by_id,
        "seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testkit.synthetic",
        description="Write a synthetic HPA-like dataset: 4-channel PNGs, train.csv, "
        "sample_submission.csv, cell-level truth.csv, label maps and cell_labels.csv.",
    )
    parser.add_argument("--out", required=True, help="output folder or gs:// prefix")
    parser.add_argument("--n", type=int, default=8, help="number of images (default 8)")
    parser.add_argument("--size", type=int, default=512, help="image width in pixels (default 512)")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: --size, square)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument("--share", type=float, default=SHARE,
                        help=f"probability that a cell of a positive image shows each of its image's "
                        f"classes (default {SHARE})")
    parser.add_argument("--negative-cells", type=float, default=NEGATIVE_CELLS,
                        help=f"probability that a cell of a positive image shows none of them, i.e. is "
                        f"Negative (default {NEGATIVE_CELLS})")
    args = parser.parse_args(argv)
    try:
        summary = generate(args.out, n=args.n, size=args.size, seed=args.seed, height=args.height,
                           share=args.share, negative=args.negative_cells, progress=True)
    except ValueError as err:
        parser.error(str(err))
    print(
        f"wrote {len(summary['ids'])} images ({summary['height']}x{summary['width']} px, "
        f"{summary['cells']} cells) to {args.out} in {summary['seconds']:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
