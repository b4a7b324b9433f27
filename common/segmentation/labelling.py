"""THE labelling step, shared by every backend: probability maps -> full-resolution label maps.

Input: a nucleus probability map and (optionally) a cell probability map, float in [0, 1], at
any resolution (a backend usually hands them in at its working resolution already). Output:
cell and nucleus label maps (`HxW int32`, 0 = background, a cell and its nucleus share the id)
at the image's full resolution.

Steps, all at a reduced working resolution (`LabelParams.work_size` px on the long side):
1. nuclei = nucleus map > threshold, small holes filled, small objects removed, touching nuclei
   split by a seeded watershed on the distance transform (seeds = h-maxima of the distance),
   kept split only where the neck between two parts is narrow (`split_neck`), so a notched
   or kidney-shaped nucleus stays whole;
2. cells = seeded watershed from the nuclei over the cell foreground (cell map > threshold, or
   the nuclei themselves), flooding the elevation `1 - cell map` plus a small term that grows
   with the distance from the nuclei (so flat, saturated cytoplasm splits near half way);
3. each cell cut at `max_cell_extent` nucleus radii beyond its nucleus (so a cell cannot
   swallow cytoplasm that belongs to no visible nucleus), per-cell hole filling, size
   filters, and each nucleus clipped to its own cell;
4. upscaling to full resolution (`upscale_labels`): each label's 0/1 indicator is upsampled
   bilinearly inside its own box and a pixel takes the label whose indicator is > 0.5 there.
   The indicators sum to <= 1 everywhere, so at most one label can pass; the rare pixels at a
   three-way junction where none passes take the nearest-neighbour label. This gives smooth,
   sub-pixel boundaries instead of the `scale x scale` staircase of nearest-neighbour
   upsampling, while never inventing a label the working-resolution map did not have.

Every length and area is given in "reference pixels": pixels of the image resampled so that
its long side is `REFERENCE_SIDE` = 2048 px (the usual HPA size). They are converted to working
pixels by `work_size / REFERENCE_SIDE`, so the same parameters give the same segmentation of
the same field of view at 1728, 2048, 3072 or 4096 px, and labelling at full resolution
(`work_size=None`) is the same algorithm, only slower.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

WORK_SIZE = 512  # the default long side, px, of the working resolution (builder, predict, segment)

REFERENCE_SIDE = 2048  # px; lengths and areas below are in pixels of an image this long


@dataclass(frozen=True)
class LabelParams:
    """Parameters of the labelling step. Lengths in reference px, areas in reference px^2."""

    work_size: int | None = WORK_SIZE  # long side of the working resolution, px; None = full res
    nucleus_threshold: float = 0.5  # nucleus map above this is nucleus
    cell_threshold: float = 0.5  # cell map above this is cell
    min_nucleus_area: float = 2500.0  # smaller nuclei are debris (HPA's tool uses 2500 px)
    max_nucleus_hole: float = 1000.0  # holes in a nucleus up to this area are filled
    split_depth: float = 8.0  # h-maxima depth of the distance transform to split nuclei
    split_neck: float = 0.7  # ...and only where the neck is < this x the smaller half-width
    min_cell_area: float = 5500.0  # smaller cells are dropped with their nucleus
    distance_weight: float = 0.25  # elevation added per REFERENCE_SIDE/4 px from a nucleus
    max_cell_extent: float | None = 3.0  # cut cells this far beyond their nucleus, in nucleus radii
    nuclei_only_expand: float = 0.0  # with no cell map: cells = nuclei grown by this many px

    def replace(self, **changes) -> "LabelParams":
        return dataclasses.replace(self, **changes)


def working_shape(shape: tuple[int, int], work_size: int | None) -> tuple[int, int]:
    """(h, w) of the working resolution for a full-resolution `shape`; never larger than it."""
    h, w = int(shape[0]), int(shape[1])
    if work_size is None or max(h, w) <= work_size:
        return h, w
    s = work_size / max(h, w)
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def resize_map(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample a float map to `shape` (h, w): area averaging down, bilinear up."""
    prob = np.asarray(prob, dtype=np.float32)
    if prob.shape == tuple(shape):
        return prob
    shrink = shape[0] < prob.shape[0] or shape[1] < prob.shape[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(prob, (int(shape[1]), int(shape[0])), interpolation=interp)


def _check_map(name: str, prob) -> np.ndarray:
    prob = np.asarray(prob)
    if prob.ndim != 2 or prob.shape[0] < 2 or prob.shape[1] < 2:
        raise ValueError(f"{name} map must be a 2-D HxW array, got shape {prob.shape}")
    if not np.issubdtype(prob.dtype, np.floating):
        raise ValueError(f"{name} map must be float in [0, 1], got dtype {prob.dtype}")
    return prob


def _edt(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each True pixel to the nearest False one (exact; OpenCV, float32)."""
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def _remove_small(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Zero every label whose area is below `min_area` (px); ids are kept."""
    if labels.max() == 0 or min_area <= 0:
        return labels
    areas = np.bincount(labels.ravel())
    small = areas < min_area
    small[0] = False
    if small.any():
        labels = labels.copy()
        labels[small[labels]] = 0
    return labels


def _fill_holes_per_label(labels: np.ndarray, max_hole: float | None = None) -> np.ndarray:
    """Fill holes inside each label (holes up to `max_hole` px, or all), without crossing labels."""
    out = labels.copy()
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        own = labels[sl] == i
        filled = ndimage.binary_fill_holes(own)
        holes = filled & ~own
        if max_hole is not None and holes.any():
            hl, n = ndimage.label(holes)
            sizes = np.bincount(hl.ravel())
            keep = sizes <= max_hole
            keep[0] = False
            holes = keep[hl]
        # A hole is taken only where no other cell lies (a cell enclosed by another stays).
        holes &= labels[sl] == 0
        out[sl][holes] = i
    return out


def label_nuclei(nuc: np.ndarray, p: LabelParams, ref: float) -> np.ndarray:
    """Nucleus label map at the working resolution of `nuc`. `ref` = working px per ref px."""
    area = ref * ref
    mask = nuc > p.nucleus_threshold
    if not mask.any():
        return np.zeros(nuc.shape, np.int32)
    # Open away one-pixel bridges and specks (JPEG haze around nuclei) before anything else.
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
    cc, n = ndimage.label(mask)
    cc = _remove_small(cc, p.min_nucleus_area * area)
    cc = _fill_holes_per_label(cc, p.max_nucleus_hole * area)
    mask = cc > 0
    if not mask.any():
        return np.zeros(nuc.shape, np.int32)
    dist = _edt(mask).astype(np.float32)
    # Smooth so that a ragged outline does not create extra maxima.
    dist = cv2.GaussianBlur(dist, (0, 0), max(0.5, 2.0 * ref))
    depth = max(p.split_depth * ref, 0.5)
    min_area = p.min_nucleus_area * area
    labels = np.zeros(nuc.shape, np.int32)
    next_id = 1
    # One nucleus blob at a time, in its box: reconstruction (h-maxima) is costly and nuclei
    # cover a small part of the image.
    for i, sl in enumerate(ndimage.find_objects(cc), start=1):
        if sl is None:
            continue
        own = cc[sl] == i
        d = np.where(own, dist[sl], 0)
        lab = _split_blob(own, d, depth, p.split_neck, min_area)
        labels[sl][own] = lab[own] + next_id - 1
        next_id += int(lab.max())
    return labels


def _split_blob(own: np.ndarray, d: np.ndarray, depth: float, neck: float, min_area: float) -> np.ndarray:
    """Split one nucleus blob (bool crop, its smoothed distance map) into nuclei: labels 1..n.

    Seeds are h-maxima of the distance of height >= `depth`; the watershed parts are then
    merged back while the neck between two parts is wider than `neck` x the smaller part's
    half-width (a nucleus with a notch is not two nuclei), and parts below `min_area` join
    their widest neighbour.
    """
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    peaks = h_maxima(np.pad(d, 1), depth)[1:-1, 1:-1].astype(bool) & own
    markers, n = ndimage.label(peaks, structure=np.ones((3, 3), bool))
    if n <= 1:
        return own.astype(np.int32)
    lab = watershed(-d, markers, mask=own)
    top = ndimage.maximum(d, lab, np.arange(n + 1))
    areas = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
    # Neck between two touching parts: the highest distance along their shared border.
    saddle: dict[tuple[int, int], float] = {}
    for a, b, da, db in ((lab[1:, :], lab[:-1, :], d[1:, :], d[:-1, :]),
                         (lab[:, 1:], lab[:, :-1], d[:, 1:], d[:, :-1])):
        m = (a != b) & (a > 0) & (b > 0)
        for x, y, v in zip(a[m].tolist(), b[m].tolist(), np.minimum(da[m], db[m]).tolist()):
            key = (min(x, y), max(x, y))
            if v > saddle.get(key, -1.0):
                saddle[key] = v
    parent = list(range(n + 1))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    # Widest necks first; a merged part keeps the larger half-width and the summed area.
    for (a, b), v in sorted(saddle.items(), key=lambda kv: -kv[1]):
        ra, rb = find(a), find(b)
        if ra == rb:
            continue
        if v > neck * min(top[ra], top[rb]) or min(areas[ra], areas[rb]) < min_area:
            parent[rb] = ra
            top[ra] = max(top[ra], top[rb])
            areas[ra] += areas[rb]
    roots = np.array([find(x) for x in range(n + 1)])
    _, dense = np.unique(roots, return_inverse=True)
    return dense.reshape(roots.shape)[lab].astype(np.int32)


def label_cells(nuclei: np.ndarray, cell: np.ndarray | None, p: LabelParams, ref: float):
    """Cells grown from `nuclei` (working res) over the cell map. Returns (cells, nuclei)."""
    from skimage.segmentation import expand_labels, watershed

    area = ref * ref
    if nuclei.max() == 0:
        z = np.zeros(nuclei.shape, np.int32)
        return z, z.copy()
    if cell is None:
        cells = expand_labels(nuclei, distance=p.nuclei_only_expand * ref) if p.nuclei_only_expand > 0 else nuclei
        return cells.astype(np.int32), nuclei
    fg = (cell > p.cell_threshold) | (nuclei > 0)
    # Distance from the nearest nucleus, in units of REFERENCE_SIDE / 4 ref px: with a
    # saturated cell map, this is what splits the cytoplasm between two neighbours.
    dist = _edt(nuclei == 0).astype(np.float32)
    elevation = (1.0 - cell.astype(np.float32)) + p.distance_weight * dist / (ref * REFERENCE_SIDE / 4)
    cells = watershed(elevation, nuclei, mask=fg)
    if p.max_cell_extent is not None:
        cells = _limit_extent(cells, nuclei, p.max_cell_extent)
    cells = _fill_holes_per_label(cells)
    cells = _remove_small(cells, p.min_cell_area * area)
    nuclei = np.where(cells == nuclei, nuclei, 0)
    return cells.astype(np.int32), nuclei.astype(np.int32)


def _limit_extent(cells: np.ndarray, nuclei: np.ndarray, extent: float) -> np.ndarray:
    """Cut each cell at `extent` x its nucleus' equivalent radius beyond the nucleus' edge.

    Keeps a cell from swallowing neighbouring cytoplasm that has no nucleus of its own (a cell
    whose nucleus is out of focus or outside the blue channel); what is cut off, and any piece
    no longer connected to the nucleus, becomes background.
    """
    out = cells.copy()
    nuc_areas = np.bincount(nuclei.ravel(), minlength=int(cells.max()) + 1)
    for i, sl in enumerate(ndimage.find_objects(cells), start=1):
        if sl is None or nuc_areas[i] == 0:
            continue
        own = cells[sl] == i
        limit = extent * np.sqrt(nuc_areas[i] / np.pi)
        # The whole nucleus lies inside its cell's box, so distances inside the box are exact.
        d = _edt(nuclei[sl] != i)
        keep = own & (d <= limit)
        cc, n = ndimage.label(keep)
        if n > 1:
            main = np.bincount(cc[nuclei[sl] == i]).argmax() if (nuclei[sl] == i).any() else 0
            keep = cc == main
        out[sl][own & ~keep] = 0
    return out


def upscale_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Label map -> `shape` (h, w) with smooth boundaries (see the module docstring)."""
    labels = np.asarray(labels)
    h, w = int(shape[0]), int(shape[1])
    if labels.shape == (h, w):
        return labels.astype(np.int32)
    lh, lw = labels.shape
    sy, sx = h / lh, w / lw
    out = np.zeros((h, w), np.int32)
    near = cv2.resize(labels.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int32)
    fg = cv2.resize((labels > 0).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) > 0.5
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        # One low-res pixel of margin: bilinear weights reach one pixel beyond the label.
        y0, y1 = max(sl[0].start - 1, 0), min(sl[0].stop + 1, lh)
        x0, x1 = max(sl[1].start - 1, 0), min(sl[1].stop + 1, lw)
        # Full-res pixels whose centres fall inside the low-res box [y0, y1) x [x0, x1).
        Y0, Y1 = int(np.ceil(y0 * sy - 0.5)), min(int(np.ceil(y1 * sy - 0.5)), h)
        X0, X1 = int(np.ceil(x0 * sx - 0.5)), min(int(np.ceil(x1 * sx - 0.5)), w)
        Y0, X0 = max(Y0, 0), max(X0, 0)
        if Y1 <= Y0 or X1 <= X0:
            continue
        ind = (labels[y0:y1, x0:x1] == i).astype(np.float32)
        # Map full-res pixel centres into the crop's coordinates and sample bilinearly.
        ys = (np.arange(Y0, Y1) + 0.5) / sy - 0.5 - y0
        xs = (np.arange(X0, X1) + 0.5) / sx - 0.5 - x0
        mx, my = np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))
        up = cv2.remap(ind, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out[Y0:Y1, X0:X1][up > 0.5] = i
    gaps = fg & (out == 0) & (near > 0)
    out[gaps] = near[gaps]
    return out


def label(nucleus_prob, cell_prob=None, shape=None, params: LabelParams | None = None):
    """Probability maps -> (cells, nuclei) label maps, `HxW int32` at `shape` (full resolution).

    nucleus_prob, cell_prob: float maps in [0, 1] of the same size (any resolution); cell_prob
    None = nuclei only (cells are the nuclei grown by `params.nuclei_only_expand`).
    shape: (H, W) of the full-resolution image; default = the maps' size.
    A cell and its nucleus share the id; ids are 1..K.
    """
    p = params or LabelParams()
    nuc = _check_map("nucleus", nucleus_prob)
    cell = None if cell_prob is None else _check_map("cell", cell_prob)
    if cell is not None and cell.shape != nuc.shape:
        raise ValueError(f"nucleus map {nuc.shape} and cell map {cell.shape} differ in size")
    shape = tuple(int(v) for v in (shape if shape is not None else nuc.shape))[:2]
    work = working_shape(shape, p.work_size)
    ref = max(work) / REFERENCE_SIDE  # working px per reference px
    nuc = resize_map(nuc, work)
    cell = None if cell is None else resize_map(cell, work)
    nuclei = label_nuclei(nuc, p, ref)
    cells, nuclei = label_cells(nuclei, cell, p, ref)
    ids = np.unique(cells)
    ids = ids[ids > 0]
    lut = np.zeros(int(cells.max()) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    cells, nuclei = lut[cells], lut[nuclei]
    cells, nuclei = upscale_labels(cells, shape), upscale_labels(nuclei, shape)
    # Upscaled separately, a nucleus edge could poke a pixel out of its cell: clip it.
    nuclei[cells != nuclei] = 0
    return cells, nuclei
