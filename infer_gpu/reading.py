"""predict's reader: one test image -> everything scoring and writing need, no model involved.

`prepare_image` runs the CPU steps in order -- read, segment, tile, encode -- and returns a
`Prepared`. It runs on the reader threads (or processes) of `common.pool`, ahead of the model.
Each cell's bounding box is found once, by the segmentation's cell facts
(`Segmentation.cell_info`), and handed to the tile cutter and to the mask encoder.

Failures: an image whose data is bad (`common.images.is_image_failure`: missing, corrupt,
wrong size, a transient I/O error on every try, memory running out) is returned with
`Prepared.error = "stage: message"`, and the run goes on; any other error raises
`report.RunStopped` naming the image and the stage, with the original traceback.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from common.preprocess import Preprocess
from infer_gpu.report import RunStopped

STAGES = ("decode", "segment", "tiles", "encode")


@dataclass
class Prepared:
    """One image after the CPU stages. Arrays are per cell, in cell-id order."""

    image_id: str
    width: int
    height: int
    error: str | None = None  # "stage: message" when the image could not be used (it failed)
    cell_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    touches_border: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    has_nucleus: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))  # Kx4 (y0, x0, y1, x1), full resolution
    areas: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # px per cell
    masks: list = field(default_factory=list)  # encoded mask string per cell
    # spec index -> KxNxNx4 uint8 (1xNxNx4 for image specs; bag specs: bags.chunk_cells's (chunks, mask))
    tiles: dict = field(default_factory=dict)
    overlay: tuple | None = None  # (image HxWx4 uint8, cell label map) when overlays are asked for
    seconds: dict = field(default_factory=dict)  # stage -> seconds

    @property
    def n_cells(self) -> int:
        return len(self.cell_ids)


def read_sample(path: str) -> list[tuple[str, int, int]]:
    """`[(ID, width, height), ...]` of a sample submission, in file order."""
    from common import submission

    # read_sample_submission rejects duplicates and bad sizes, naming the rows.
    return [(r.image_id, int(r.width), int(r.height)) for r in submission.read_sample_submission(path)]


def read_labelled(path: str) -> list[tuple[str, int, int]]:
    """`[(ID, 0, 0), ...]` of a label list (`ID,Label` CSV, `common.labels.read_label_rows`),
    in file order: predict without a sample submission. Size 0 = taken from the image files
    (`prepare_image`). Raises ValueError naming the file for a missing ID/Label column, an
    empty ID or an ID listed twice."""
    from common.labels import read_label_rows

    out, seen, problems = [], {}, []
    for row in read_label_rows(path):
        image_id = (row.get("ID") or "").strip()
        if not image_id:
            problems.append(f"row {row['_row']}: empty ID")
        elif image_id in seen:
            problems.append(f"row {row['_row']}: ID {image_id} appears again (first at row {seen[image_id]})")
        else:
            seen[image_id] = row["_row"]
            out.append((image_id, 0, 0))
    if problems:
        more = f"; ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"{path}: " + "; ".join(problems[:10]) + more)
    return out


def segmentation_used(config, recorded=None):
    """The `SegmentationSpec` predict segments with: the options the user gave (backend,
    work_size not None), else the training data's (`recorded`, from the runs), else the default
    (`common.segmentation.SegmentationSpec()`). Fingerprints hpa's model files (reads them)."""
    from common.segmentation import MASKS, SegmentationSpec, spec_for

    base = recorded if recorded is not None and recorded.backend != MASKS else SegmentationSpec()
    backend = config.backend or base.backend
    work_size = config.work_size if config.work_size is not None else base.work_size
    hpa = backend == "hpa"
    return spec_for(backend, work_size, nuclei_model=config.nuclei_model if hpa else None,
                    cell_model=config.cell_model if hpa else None, **dict(config.seg_options))


def segmentation_to_use(config, runs: Sequence, warn=None):
    """Check predict's segmentation against the one each run's training data was cut with
    (`Preprocess.segmentation` in its preprocess.json) and return the `SegmentationSpec` to use.

    Without --backend/--work-size, the runs' is used. Raises ValueError naming each differing
    field with both values and the run, or the runs that disagree with each other, unless
    `config.allow_other_segmentation`. Runs that recorded none (older run folders, image
    mode) are not checked. Runs cut from precomputed masks ("masks") cannot be reproduced:
    one warning (`warn`, default stderr), then the options or the default are used.
    """
    import sys

    from common.segmentation import MASKS

    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    recorded = [(r.path, r.spec.segmentation) for r in runs]
    recorded = [(path, spec) for path, spec in recorded if spec is not None]
    masks = [path for path, spec in recorded if spec.backend == MASKS]
    made = [(path, spec) for path, spec in recorded if spec.backend != MASKS]
    allow = config.allow_other_segmentation
    problems = []
    for path, spec in made[1:]:
        diff = made[0][1].describe_difference(spec, made[0][0], path)
        if diff:
            problems.append(f"the runs {made[0][0]} and {path} were trained on different segmentations: "
                            + "; ".join(diff))
    used = segmentation_used(config, made[0][1] if made else None)
    for path, spec in made:
        theirs = used
        if used.backend == "hpa" and not used.model_files:  # networks passed as objects: unknown
            theirs = dataclasses.replace(used, model_files=spec.model_files)
        diff = spec.describe_difference(theirs, f"training of {path}", "predict")
        if diff:
            problems.append(f"predict would segment cells otherwise than the training data of {path}: "
                            + "; ".join(diff))
    if problems and not allow:
        raise ValueError("; ".join(problems) + ". Pass the runs' settings (--backend, --work-size, "
                         "--nuclei-model/--cell-model), or --allow-other-segmentation to predict anyway")
    for problem in problems:
        warn(f"predict: warning: {problem} (--allow-other-segmentation)")
    if masks:
        warn(f"predict: warning: {', '.join(masks)} trained on precomputed label maps (builder --masks), "
             f"which predict cannot make; it segments with backend {used.backend!r}, "
             f"work size {used.work_size}")
    return used


def segmentation_options(config, used=None) -> dict:
    """Keyword options for `common.segmentation.segment` from a PredictConfig and the spec in
    use (`segmentation_to_use`; None = `segmentation_used(config)`); loads the HPA networks once
    (in this process: the reader threads share them)."""
    used = used or segmentation_used(config)
    seg = {"work_size": used.work_size, **dict(config.seg_options)}
    if used.backend == "hpa" and "networks" not in seg and "nuclei_net" not in seg:
        if config.processes:
            raise ValueError("--backend hpa runs its networks in this process: use reader threads, not --processes")
        from common.segmentation import backend_options

        seg.update(backend_options("hpa", config.nuclei_model, config.cell_model, config.trust_model_files))
    return seg


# --- the steps ---------------------------------------------------------------------------------
def read_image(source: str, image_id: str, width: int, height: int) -> np.ndarray:
    """`HxWx4 uint8` of one ID; transient read errors are retried (`common.retry`), a size
    other than the sample submission's is an ImageLoadError (width, height 0: not checked)."""
    from common import retry
    from common.images import ImageLoadError, load_image

    image = retry.call(load_image, source, image_id, what=f"image {image_id}")
    if (width or height) and image.shape[:2] != (height, width):
        raise ImageLoadError(f"image is {image.shape[1]}x{image.shape[0]} (WxH) but the sample "
                             f"submission says {width}x{height}")
    return image


def segment_cells(image: np.ndarray, backend: str, seg_options: dict):
    """-> `(Segmentation, [CellInfo, ...])`: label maps and per-cell facts (id, box, border, nucleus)."""
    from common.segmentation import segment

    seg = segment(image, backend=backend, **seg_options)
    return seg, seg.cell_info()


def cut_tiles(image: np.ndarray, cells: np.ndarray, info: list, specs: Sequence[Preprocess]) -> dict:
    """`{spec index: KxNxNx4 uint8}` (image specs: `1xNxNx4`; bag specs: the cells' tiles in
    bags, `bags.chunk_cells`'s `(chunks, mask)`); the cells' boxes come from `info`. Specs that
    with the same `tile` (bag runs and tile runs cut alike) share their tiles (cut once)."""
    from common.preprocess import cell_tiles, image_tile
    from infer_gpu.bags import chunk_cells

    if not info:
        return {}
    ids, boxes = [c.id for c in info], [c.bbox for c in info]
    cut: dict = {}

    def tiles(spec):
        key = spec.tile
        if key not in cut:
            cut[key] = (image_tile(image, key)[None] if key.mode == "image"
                        else cell_tiles(image, cells, key, cell_ids=ids, boxes=boxes)[0])
        return cut[key]

    return {k: chunk_cells(tiles(spec), spec.bag) if spec.bag else tiles(spec) for k, spec in enumerate(specs)}


def encode_masks(cells: np.ndarray, info: list) -> list[str]:
    """Each cell's competition mask string, encoded from its box crop (never the full frame)."""
    from common.masks import encode_cell

    out = []
    for c in info:
        y0, x0, y1, x1 = c.bbox
        out.append(encode_cell(cells[y0:y1, x0:x1] == c.id, c.bbox, cells.shape))
    return out


class _Clock:
    """Times the steps of one image into `seconds` and remembers which step runs (for errors)."""

    def __init__(self, seconds: dict):
        self.seconds, self.stage, self._t = seconds, STAGES[0], time.perf_counter()

    def lap(self, next_stage: str | None = None) -> None:
        now = time.perf_counter()
        self.seconds[self.stage] = self.seconds.get(self.stage, 0.0) + now - self._t
        self._t, self.stage = now, next_stage or self.stage


def prepare_image(task: tuple, source: str, specs: Sequence[Preprocess], backend: str = "default",
                  seg_options: dict | None = None, keep_image: bool = False) -> Prepared:
    """Read, segment, cut tiles for every spec and encode every cell mask of one image.

    task: `(image_id, width, height)` from the sample submission; size 0 (a label list,
    `read_labelled`) = the image files' size. A bad image does not raise: see the module
    docstring (a failed image of unknown size gets its files' size when a channel file's
    header gives it, else 0 x 0).
    """
    from common.images import is_image_failure

    image_id, width, height = task[0], int(task[1]), int(task[2])
    out = Prepared(image_id=image_id, width=width, height=height)
    clock = _Clock(out.seconds)
    try:
        image = read_image(source, image_id, width, height)
        out.height, out.width = (int(n) for n in image.shape[:2])
        clock.lap("segment")
        seg, info = segment_cells(image, backend, seg_options or {})
        clock.lap("tiles")
        out.cell_ids = np.asarray([c.id for c in info], dtype=np.int64)
        out.touches_border = np.asarray([c.touches_border for c in info], dtype=bool)
        out.has_nucleus = np.asarray([c.has_nucleus for c in info], dtype=bool)
        out.boxes = np.asarray([c.bbox for c in info], dtype=np.int64).reshape(-1, 4)
        out.areas = np.asarray([c.area for c in info], dtype=np.int64)
        out.tiles = cut_tiles(image, seg.cells, info, specs)
        clock.lap("encode")
        out.masks = encode_masks(seg.cells, info)
        clock.lap()
        if keep_image:
            cells = seg.cells.astype(np.uint16) if seg.cells.max(initial=0) < 65536 else seg.cells
            out.overlay = (image, cells)  # uint16 halves what waiting overlays hold
    except Exception as err:  # noqa: BLE001 - sorted just below
        if not is_image_failure(err):
            raise RunStopped(f"image {image_id}, stage {clock.stage}: {type(err).__name__}: {err} "
                             "(not a problem of the image's data: see the traceback above)") from err
        if not (out.width and out.height):
            out.width, out.height = _size_of_failed(source, image_id)
        return Prepared(image_id=image_id, width=out.width, height=out.height, seconds=out.seconds,
                        error=f"{clock.stage}: {type(err).__name__}: {err}")
    return out


def _size_of_failed(source: str, image_id: str) -> tuple[int, int]:
    """`(width, height)` of an image that failed before its size was known, from a channel
    file's header when one gives it, else `(0, 0)`."""
    from common.images import image_size, is_image_failure

    try:
        return image_size(source, image_id)
    except Exception as err:  # noqa: BLE001 - only the image's own failures are swallowed
        if is_image_failure(err):
            return 0, 0
        raise
