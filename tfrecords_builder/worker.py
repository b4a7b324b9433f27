"""One image -> its serialized examples. Runs in worker processes: no TensorFlow here.

Everything a worker needs travels in the `Task` (a few hundred bytes), so workers hold no
global state (but the HPA networks, loaded once per process) and the same function runs in the
main process when `workers == 0`.

What stops a build and what skips one image: an image whose data is bad (missing or corrupt
channel files, a bad label map, no cells), or whose reads still fail after the retries of
transient I/O errors (`common.retry`), or that runs out of memory, is skipped with its reason.
Any other exception is a bug (or a misconfiguration) and raises ImageCodeError, which stops
the build with the original traceback: it must not turn into a skip for every image.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from common import bags, features
from common.segmentation import WORK_SIZE


@dataclass(frozen=True)
class Job:
    """What every task of one build shares."""

    mode: str  # "image" | "cell" | "bag"
    spec: dict  # Preprocess as its flat dict (a bag build's `bag`: the most cells per record)
    masks: str = ""  # folder of precomputed `{ID}_cells.png` / `{ID}_nuclei.png`, or ""
    segmenter: str = "default"
    nuclei_model: str = ""  # segmenter "hpa": hpacellseg's model files (.pth)
    cell_model: str = ""
    trust_model_files: bool = False
    seed: int = 0  # bag mode: which cells an image with more than `bag` keeps
    work_size: int = WORK_SIZE  # segmentation: long side in px of the labelling's working resolution


class SkipImage(ValueError):
    """This image's own data cannot be used (a bad label map, no cells, sizes that disagree)."""


class ImageCodeError(RuntimeError):
    """An error that is not about the image's data: the build stops (its traceback is chained)."""


@dataclass(frozen=True)
class Task:
    image_id: str
    source: str  # image folder or gs:// prefix
    labels: tuple[int, ...]
    fold: int
    job: Job
    # --cell-labels: this image's rows of the table, ((cell id, (19 targets)), ...), () when it
    # has none; None: the build has no cell labels (records without cell_targets)
    cell_targets: tuple | None = None


@dataclass
class Result:
    image_id: str
    records: list[bytes] = field(default_factory=list)  # serialized tf.train.Example, in order
    error: str | None = None  # why the image was skipped
    cells: int = 0  # cells written (cell and bag modes)
    source_size: tuple[int, int] = (0, 0)  # (height, width), px
    # --cell-labels: [cells written with the table's targets, with the image's labels (the
    # table lacks them), table cells not in the image's label map]; None without cell labels
    cell_labels: list[int] | None = None

    @property
    def nbytes(self) -> int:
        return sum(len(r) + 16 for r in self.records)  # + TFRecord framing


def _describe_load_error(task: Task, err: Exception) -> str:
    """A skip reason that tells 'no files at all for this ID' apart from one bad channel."""
    from common import images

    message = str(err)
    if "no file for channel" not in message:
        return message
    missing = []
    for channel in images.CHANNELS:
        try:
            images.channel_path(task.source, task.image_id, channel)
        except images.ImageLoadError:
            missing.append(channel)
    if len(missing) == len(images.CHANNELS):
        return f"no image files for ID {task.image_id} in {task.source}"
    return f"missing channel file(s) {', '.join(missing)}: {message}"


def _read_label_map(path: str, required: bool) -> np.ndarray | None:
    """`common.segmentation.load_labels`, or None when an optional map is absent."""
    from common import retry
    from common.segmentation import load_labels

    try:
        return retry.call(load_labels, path, what=path)
    except FileNotFoundError:
        if required:
            raise SkipImage(f"{path}: cell mask not found") from None
        return None
    except ValueError as err:  # load_labels: not a label map
        raise SkipImage(str(err)) from err


def segmentation_spec(job: Job):
    """How the job's cells are segmented (`common.segmentation.SegmentationSpec`, saved in the
    dataset's preprocess.json); None in image mode (no segmentation)."""
    from common.segmentation import spec_for

    if job.mode == "image":
        return None
    hpa = job.segmenter == "hpa"
    return spec_for(job.segmenter, job.work_size, masks=bool(job.masks),
                    nuclei_model=job.nuclei_model if hpa else None, cell_model=job.cell_model if hpa else None)


def segment_options(job: Job) -> dict:
    """Keyword options of `common.segmentation.segment` for the job's segmenter (the HPA
    networks loaded once per process: `common.segmentation.backend_options`)."""
    from common.segmentation import backend_options

    return {"work_size": job.work_size, **backend_options(
        job.segmenter, job.nuclei_model, job.cell_model, job.trust_model_files)}


def label_maps(task: Task, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Cell and nucleus label maps (`HxW int32`, full resolution) of one image.

    From `{masks}/{ID}_cells.png` (+ optional `{ID}_nuclei.png`) when the job has a masks folder,
    else from `common.segmentation.segment`.
    """
    from common import storage

    job = task.job
    if job.masks:
        cells = _read_label_map(storage.join(job.masks, f"{task.image_id}_cells.png"), required=True)
        nuclei = _read_label_map(storage.join(job.masks, f"{task.image_id}_nuclei.png"), required=False)
    else:
        from common import segmentation

        seg = segmentation.segment(image, backend=job.segmenter, **segment_options(job))
        cells, nuclei = np.asarray(seg.cells), np.asarray(seg.nuclei)
    for name, arr in (("cell", cells), ("nucleus", nuclei)):
        if arr is not None and arr.shape != image.shape[:2]:
            raise SkipImage(
                f"{name} label map is {arr.shape[0]}x{arr.shape[1]} but image {task.image_id} is "
                f"{image.shape[0]}x{image.shape[1]}"
            )
    return cells, nuclei


def _cells(task: Task, image: np.ndarray):
    """The image's cell label map and its cells' facts (`common.segmentation.CellInfo`, id order)."""
    from common.segmentation import Segmentation

    cells, nuclei = label_maps(task, image)
    # Without a nuclei map the flag cannot be known: every cell counts as having its nucleus
    # (the schema's default), which is what passing the cells as their own nuclei gives.
    info = Segmentation(cells=cells, nuclei=cells if nuclei is None else nuclei).cell_info()
    if not info:
        raise SkipImage("no cells in the label map")
    return cells, info


def cell_targets(task: Task, info, kept) -> tuple[list[np.ndarray] | None, list[int] | None]:
    """The `(19,) float32` targets of the `kept` cells (CellInfo) from the task's table rows,
    the image's labels (multi-hot) for a cell the table lacks; and the counts of
    `Result.cell_labels` (`info`: all the image's cells). (None, None) without cell labels."""
    if task.cell_targets is None:
        return None, None
    from common.labels import multi_hot

    rows = {cell: np.asarray(t, np.float32) for cell, t in task.cell_targets}
    inherited = multi_hot(task.labels)
    out = [rows.get(c.id, inherited) for c in kept]
    from_table = sum(c.id in rows for c in kept)
    not_in_map = len(set(rows) - {c.id for c in info})
    return out, [from_table, len(kept) - from_table, not_in_map]


def cell_examples(task: Task, image: np.ndarray, spec) -> tuple[list[bytes], list[int] | None]:
    """Every cell of one image as a serialized example, in cell-id order (weak labels, and the
    soft targets with --cell-labels); and the counts of `Result.cell_labels`."""
    from common import preprocess

    cells, info = _cells(task, image)
    tiles, ids, _ = preprocess.cell_tiles(image, cells, spec, cell_ids=[c.id for c in info],
                                          boxes=[c.bbox for c in info])
    targets, counts = cell_targets(task, info, info)
    h, w = image.shape[:2]
    return [
        features.serialize(
            tile, image_id=task.image_id, labels=task.labels, source_size=(h, w), fold=task.fold,
            cell_index=c.id, bbox=c.bbox, touches_border=c.touches_border,
            has_nucleus=c.has_nucleus, cell_area=c.area,
            cell_targets=None if targets is None else targets[i],
        )
        for i, (tile, c) in enumerate(zip(tiles, info))
    ], counts


def bag_example(task: Task, image: np.ndarray, spec, bag: int) -> tuple[bytes, int, list[int] | None]:
    """One image as one bag record: up to `bag` of its cells, cut like cell mode's (`spec`, a TileSpec).
    Returns the record, how many cells it holds and the counts of `Result.cell_labels` (over
    the bag's cells)."""
    from common import preprocess

    cells, info = _cells(task, image)
    keep = [info[i] for i in bags.choose_cells(len(info), bag, task.image_id, task.job.seed)]
    tiles, _, _ = preprocess.cell_tiles(image, cells, spec, cell_ids=[c.id for c in keep],
                                        boxes=[c.bbox for c in keep])
    targets, counts = cell_targets(task, info, keep)
    return features.serialize_bag(
        tiles, image_id=task.image_id, labels=task.labels, source_size=image.shape[:2],
        fold=task.fold, cell_ids=[c.id for c in keep], bboxes=[c.bbox for c in keep],
        touches_border=[c.touches_border for c in keep], has_nucleus=[c.has_nucleus for c in keep],
        cell_areas=[c.area for c in keep], cell_count=len(info),
        cell_targets=None if targets is None else np.stack(targets)), len(keep), counts


def image_failure(err: BaseException) -> bool:
    """True for what skips ONE image (see the module docstring), False for a code error."""
    from common import images

    return images.is_image_failure(err, (SkipImage,))


def process(task: Task) -> Result:
    """Load, tile and serialize one image. Bad input does not raise: the reason goes in the
    Result. Transient read errors are retried first. Any other error raises ImageCodeError."""
    from common import images, retry

    result = Result(task.image_id)
    try:
        image = retry.call(images.load_image, task.source, task.image_id, what=f"image {task.image_id}")
    except images.ImageLoadError as err:
        result.error = _describe_load_error(task, err)
        return result
    except Exception as err:  # noqa: BLE001 - sorted by image_failure
        if not image_failure(err):
            raise ImageCodeError(f"image {task.image_id}: loading raised {type(err).__name__}: {err} "
                                 "(not a problem of the image's data)") from err
        result.error = f"cannot load image: {type(err).__name__}: {err}"
        return result
    result.source_size = (int(image.shape[0]), int(image.shape[1]))
    try:
        _tile(task, image, result)
    except Exception as err:  # noqa: BLE001 - sorted by image_failure
        if not image_failure(err):
            raise ImageCodeError(f"image {task.image_id}: tiling raised {type(err).__name__}: {err} "
                                 "(not a problem of the image's data)") from err
        result.error = f"{type(err).__name__}: {err}"
        result.records = []
        result.cell_labels = None
    return result


def _tile(task: Task, image: np.ndarray, result: Result) -> None:
    """The image's records into `result.records`."""
    from common import preprocess

    pre = preprocess.Preprocess.from_dict(task.job.spec)
    spec = pre.tile
    if task.job.mode == "image":
        result.records = [features.serialize(
            preprocess.image_tile(image, spec),
            image_id=task.image_id, labels=task.labels,
            source_size=result.source_size, fold=task.fold,
        )]
    elif task.job.mode == "bag":
        record, result.cells, result.cell_labels = bag_example(task, image, spec, pre.bag)
        result.records = [record]
    else:
        result.records, result.cell_labels = cell_examples(task, image, spec)
        result.cells = len(result.records)


def init_worker(parent_pid: int) -> None:
    """Worker-process initializer: exit when the parent dies.

    A killed parent leaves its pool workers blocked on their task queue (each worker holds an
    end of that pipe itself, so it never sees end-of-file); this watchdog ends them instead.
    """
    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
