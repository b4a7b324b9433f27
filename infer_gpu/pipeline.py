"""`predict`'s engine: test images -> cells -> batched scores -> submission.csv, streamed.

Shape of a run (memory stays bounded by the prefetch depth and the batcher's image cap):

    sample IDs --prefetch_map(prepare_image)--> Prepared (tiles, encoded masks, cell facts)
      [threads or processes: decode, segment, cut tiles, encode masks -- CPU work that
       overlaps scoring, since TensorFlow releases the GIL while it runs]
    --CrossImageBatcher--> fixed-size batches that span the cells of several images
      [one ModelGroup per distinct TileSpec: several runs averaged, optional TTA]
    --finish--> combine rule (infer_gpu.scoring) -> PredictionString -> one part per image
      [writer thread: overlay PNG, then the part, atomically]
    --assemble--> the final CSV in sample order, written atomically, plus a JSON report.

Failures: an image whose data is bad (`common.images.ImageLoadError`: missing, corrupt,
wrong size) or that met a transient I/O error on every try (`common.retry`), or ran out of
memory, gets a part marked `failed` with an empty row; `--resume` tries it again. Any other
exception (a bug, models that do not fit the tiles) stops the run as `RunStopped`, with the
original traceback, instead of writing empty rows for every image that follows.

Masks are encoded once per cell from its bounding-box crop (`common.masks.encode_cell`), in
the reader, and the string is repeated for each of the cell's labels.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from common import storage
from common.labels import NUM_CLASSES
from common.preprocess import TileSpec
from infer_gpu.parts import PartStore, part_failed
from infer_gpu.scoring import CombineRule, combine, detections

STAGES = ("decode", "segment", "tiles", "encode")
REPORT_SUFFIX = ".report.json"
EXIT_FAILED_IMAGES = 3  # CLI exit status: the CSV is written, but some images failed (empty rows)


class RunStopped(Exception):
    """An error that is not about one image's data (a bug, models that do not fit the tiles):
    the run stops; the parts written so far stay for `--resume`."""


# ---------------------------------------------------------------------------------------------
# Reader: one image -> everything scoring and writing need, no model involved.
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
    masks: list = field(default_factory=list)  # encoded mask string per cell
    tiles: dict = field(default_factory=dict)  # spec index -> KxNxNx4 uint8 (1xNxNx4 for image specs)
    overlay: tuple | None = None  # (image HxWx4 uint8, cell label map) when overlays are asked for
    seconds: dict = field(default_factory=dict)  # stage -> seconds

    @property
    def n_cells(self) -> int:
        return len(self.cell_ids)


def prepare_image(task: tuple, source: str, specs: Sequence[TileSpec], backend: str = "default",
                  seg_options: dict | None = None, keep_image: bool = False) -> Prepared:
    """Load, segment, cut tiles for every spec and encode every cell mask of one image.

    task: `(image_id, width, height)` from the sample submission. A bad image (see
    `common.images.is_image_failure`) does not raise: the failure is returned in `Prepared.error` as
    `"stage: message"`, so a run goes on. Transient read errors are retried first
    (`common.retry`). Anything else raises RunStopped naming the image.
    """
    from common import masks as masklib
    from common import retry
    from common.images import ImageLoadError, is_image_failure, load_image
    from common.preprocess import cell_tiles, image_tile
    from common.segmentation import segment

    image_id, width, height = task[0], int(task[1]), int(task[2])
    out = Prepared(image_id=image_id, width=width, height=height)
    stage = "decode"
    t = time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        out.seconds[name] = out.seconds.get(name, 0.0) + now - t
        t = now

    try:
        image = retry.call(load_image, source, image_id, what=f"image {image_id}")
        if image.shape[:2] != (height, width):
            raise ImageLoadError(f"image is {image.shape[1]}x{image.shape[0]} (WxH) but the sample "
                             f"submission says {width}x{height}")
        lap("decode")
        stage = "segment"
        seg = segment(image, backend=backend, **(seg_options or {}))
        info = seg.cell_info()
        lap("segment")
        stage = "tiles"
        ids = [int(c.id) for c in info]
        out.cell_ids = np.asarray(ids, dtype=np.int64)
        out.touches_border = np.asarray([bool(c.touches_border) for c in info], dtype=bool)
        out.has_nucleus = np.asarray([bool(c.has_nucleus) for c in info], dtype=bool)
        if ids:
            for k, spec in enumerate(specs):
                if spec.mode == "image":
                    out.tiles[k] = image_tile(image, spec)[None]
                else:
                    out.tiles[k] = cell_tiles(image, seg.cells, spec, cell_ids=ids)[0]
        lap("tiles")
        stage = "encode"
        for c in info:
            y0, x0, y1, x1 = (int(v) for v in c.bbox)
            crop = seg.cells[y0:y1, x0:x1] == c.id  # the box only, never the full frame
            out.masks.append(masklib.encode_cell(crop, (y0, x0, y1, x1), (height, width)))
        lap("encode")
        if keep_image:
            cells = seg.cells.astype(np.uint16) if seg.cells.max(initial=0) < 65536 else seg.cells
            out.overlay = (image, cells)  # uint16 halves what waiting overlays hold
    except Exception as err:  # noqa: BLE001 - sorted just below
        if not is_image_failure(err):
            raise RunStopped(f"image {image_id}, stage {stage}: {type(err).__name__}: {err} "
                             "(not a problem of the image's data: see the traceback above)") from err
        out.error = f"{stage}: {type(err).__name__}: {err}"
        out.cell_ids = out.cell_ids[:0]
        out.touches_border, out.has_nucleus = out.touches_border[:0], out.has_nucleus[:0]
        out.masks, out.tiles, out.overlay = [], {}, None
    return out


def prefetch_map(fn: Callable, items: Iterable, workers: int = 2, depth: int | None = None,
                 processes: bool = False) -> Iterator:
    """`map(fn, items)` in order, computed ahead by `workers` threads (or spawned processes).

    At most `depth` (default `workers + 2`) results exist at once, so memory stays bounded
    however many items there are. `workers=0` runs inline (no concurrency).
    """
    if workers <= 0:
        for item in items:
            yield fn(item)
        return
    depth = max(1, depth or workers + 2)
    if processes:
        # spawn, not fork: the parent may already hold TensorFlow's threads and a GPU context.
        executor = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    else:
        executor = cf.ThreadPoolExecutor(workers, thread_name_prefix="prefetch")
    pending: collections.deque = collections.deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(executor.submit(fn, item))
            if len(pending) >= depth:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:
                pending.append(executor.submit(fn, item))
                break
            yield result
    finally:
        for fut in pending:
            fut.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Batching across images.
@dataclass
class Job:
    """An image in the batcher: its Prepared and the scores filled in so far."""

    prepared: Prepared
    scores: dict = field(default_factory=dict)  # spec index -> Kx19 float32
    remaining: int = 0  # tiles still to score, over all specs


class CrossImageBatcher:
    """Collects tiles from consecutive images and scores them in full batches.

    predictors: `{spec index: fn(tiles BxNxNx4 uint8) -> Bx19}`. A batch takes tiles from as
    many images as it needs, so small images do not waste the accelerator. `step()` runs the
    full batches and returns the images whose tiles are all scored, in the order they came.
    """

    def __init__(self, predictors: dict, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.predictors = dict(predictors)
        self.batch_size = int(batch_size)
        self.jobs: collections.deque = collections.deque()
        self.queues = {k: collections.deque() for k in self.predictors}  # (job, tiles, offset)
        self.queued = {k: 0 for k in self.predictors}
        self.batches = 0
        self.score_seconds = 0.0

    @property
    def pending(self) -> int:
        """Images held (not yet returned)."""
        return len(self.jobs)

    def add(self, prepared: Prepared) -> None:
        job = Job(prepared)
        for k, tiles in prepared.tiles.items():
            if k not in self.predictors:
                raise KeyError(f"{prepared.image_id}: tiles for spec {k}, which has no model")
            if len(tiles):
                job.scores[k] = np.zeros((len(tiles), NUM_CLASSES), np.float32)
                self.queues[k].append([job, tiles, 0])
                self.queued[k] += len(tiles)
                job.remaining += len(tiles)
        self.jobs.append(job)

    def _run_one(self, k) -> None:
        queue, b = self.queues[k], self.batch_size
        parts, where = [], []
        while queue and sum(len(p) for p in parts) < b:
            entry = queue[0]
            job, tiles, offset = entry
            take = min(b - sum(len(p) for p in parts), len(tiles) - offset)
            parts.append(tiles[offset:offset + take])
            where.append((job, offset, take))
            entry[2] += take
            if entry[2] == len(tiles):
                queue.popleft()
        batch = np.concatenate(parts) if len(parts) > 1 else parts[0]
        t = time.perf_counter()
        probs = np.asarray(self.predictors[k](batch), dtype=np.float32)
        self.score_seconds += time.perf_counter() - t
        self.batches += 1
        if probs.shape != (len(batch), NUM_CLASSES):
            raise ValueError(f"model group {k} returned {probs.shape} for {len(batch)} tiles")
        pos = 0
        for job, offset, take in where:
            job.scores[k][offset:offset + take] = probs[pos:pos + take]
            job.remaining -= take
            pos += take
        self.queued[k] -= len(batch)

    def step(self, force: bool = False) -> list[Job]:
        """Score every full batch (and the partial rest too when `force`); return finished jobs."""
        for k in self.queues:
            while self.queued[k] >= self.batch_size or (force and self.queued[k] > 0):
                self._run_one(k)
        done = []
        while self.jobs and self.jobs[0].remaining == 0:
            done.append(self.jobs.popleft())
        return done


# ---------------------------------------------------------------------------------------------
# Turning scores into a row.
def cell_scores(job: Job, roles: dict, weights: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Average the spec groups of each role ('cell' or 'image'), each model counting once.

    roles: `{spec index: 'cell'|'image'}`; weights: `{spec index: number of models}`.
    Returns `(cell Kx19 or None, image (19,) or None)`.
    """
    out = {}
    for role in ("cell", "image"):
        keys = [k for k in job.scores if roles[k] == role]
        if keys:
            total = sum(weights[k] for k in keys)
            out[role] = sum(job.scores[k] * (weights[k] / total) for k in keys)
    image = out.get("image")
    return out.get("cell"), (None if image is None else image[0])


def prediction_triples(prepared: Prepared, scores: np.ndarray, min_score: float) -> list[tuple]:
    """`[(label, confidence, mask), ...]`: per cell (id order), its classes best first."""
    triples = []
    for mask, dets in zip(prepared.masks, detections(scores, min_score)):
        triples.extend((label, conf, mask) for label, conf in dets)
    return triples


def overlay_texts(cell_ids, scores: np.ndarray, top: int = 2, min_score: float = 0.25) -> dict[int, list]:
    """`{cell id: [(16, 0.81), (0, 0.40)]}`: each cell's best class, then up to `top - 1` more
    scoring at least `min_score`; common.overlay tints the cell and names the classes."""
    texts = {}
    for cid, row in zip(cell_ids, scores):
        best = np.argsort(-row, kind="stable")[:top]
        texts[int(cid)] = [(int(c), float(row[c])) for k, c in enumerate(best) if k == 0 or row[c] >= min_score]
    return texts


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictOptions:
    """Everything `predict` takes besides paths; see `python -m infer_gpu predict --help`."""

    rule: CombineRule = CombineRule()
    tta: int = 1
    batch_size: int = 64
    backend: str = "default"
    work_size: int = 512  # segmentation's working resolution, px (long side)
    nuclei_model: str | None = None  # hpa backend: hpacellseg model files
    cell_model: str | None = None
    trust_model_files: bool = False  # hpa backend: allow unpickling those files
    seg_options: tuple = ()  # more ((key, value), ...) for common.segmentation.segment
    workers: int = 2
    processes: bool = False
    prefetch: int = 0  # images decoded ahead; 0 = workers + 2
    max_pending: int = 32  # images the batcher may hold before it scores a partial batch
    device: str = "auto"
    overlays: str | None = None
    resume: bool = False
    limit: int = 0  # stop after this many images this run (0 = all)
    keep_parts: bool = False
    progress: bool = True


@dataclass
class Summary:
    """What a run did; also written as `OUT.report.json`."""

    out: str
    complete: bool = False
    total: int = 0  # IDs in the sample submission
    resumed: int = 0  # done by an earlier run
    retried: int = 0  # failed in an earlier run, tried again in this one
    failed: int = 0  # images whose row is empty because they failed (see `errors`)
    processed: int = 0  # done by this run
    cells: int = 0
    detections: int = 0
    errors: list = field(default_factory=list)  # [{"id", "error", "failed"}]
    device: str = ""
    batches: int = 0
    seconds: dict = field(default_factory=dict)  # stage -> seconds, summed over images
    wall_seconds: float = 0.0
    images_per_second: float = 0.0


def read_sample(path: str) -> list[tuple[str, int, int]]:
    """`[(ID, width, height), ...]` of a sample submission, in file order."""
    from common import submission

    # read_sample_submission rejects duplicates and bad sizes, naming the rows.
    return [(r.image_id, int(r.width), int(r.height)) for r in submission.read_sample_submission(path)]


def _settings(sample, runs, image_runs, opts: PredictOptions) -> dict:
    """What decides the results; a resumed run must match it (batching and threads do not)."""
    def describe(r):
        return {"path": r.path, "weights": r.fingerprint, "spec": r.spec.to_json()}

    ids = "\n".join(f"{i},{w},{h}" for i, w, h in sample)
    return {
        "models": [describe(r) for r in runs],
        "image_models": [describe(r) for r in image_runs],
        "rule": dataclasses.asdict(opts.rule),
        "tta": opts.tta,
        "segmentation": {"backend": opts.backend, "work_size": opts.work_size,
                         "nuclei_model": opts.nuclei_model, "cell_model": opts.cell_model,
                         "options": sorted(k for k, _ in opts.seg_options)},
        "sample_sha1": hashlib.sha1(ids.encode()).hexdigest(),
    }


def segmentation_options(opts: PredictOptions) -> dict:
    """Keyword options for `common.segmentation.segment`; loads the HPA networks once."""
    seg = {"work_size": opts.work_size, **dict(opts.seg_options)}
    if opts.backend == "hpa" and "networks" not in seg and "nuclei_net" not in seg:
        if not opts.nuclei_model or not opts.cell_model:
            raise ValueError("--backend hpa needs --nuclei-model and --cell-model (hpacellseg's .pth files)")
        if opts.processes:
            raise ValueError("--backend hpa runs its networks in this process: use reader threads, not --processes")
        from common.segmentation import hpa

        seg["networks"] = hpa.load_networks(opts.nuclei_model, opts.cell_model,
                                            trust_model_files=opts.trust_model_files)
    return seg


def _log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


def predict(images: str, sample_submission: str, models: Sequence[str], out: str,
            image_models: Sequence[str] = (), options: PredictOptions = PredictOptions(),
            runs=None, image_runs=None) -> Summary:
    """Write `out` (the submission CSV) for every ID of `sample_submission`.

    images: folder or `gs://` prefix of `{ID}_{channel}.png`; models / image_models: run
    directories (cell-mode / image-mode `preprocess.json`). `runs` / `image_runs` may pass
    already-loaded `scoring.RunDir`s instead (benchmarks, tests). Returns the Summary; the
    CSV is only written when every image is done (see `options.limit`).
    """
    from tqdm import tqdm

    from common import submission
    from infer_gpu import scoring

    opts = options
    wall = time.perf_counter()
    if not (models or image_models or runs or image_runs):
        raise ValueError("predict needs at least one --model or --image-model run directory")
    sample = read_sample(sample_submission)
    summary = Summary(out=out, total=len(sample))
    summary.device = scoring.setup_device(opts.device)
    if runs is None:
        runs = [scoring.load_run(p, expect_mode="cell") for p in models]
    if image_runs is None:
        image_runs = [scoring.load_run(p, expect_mode="image") for p in image_models]

    # One group per distinct TileSpec, so tiles are cut once however many runs share them.
    specs: list[TileSpec] = []
    members: dict[int, list] = {}
    for r in list(runs) + list(image_runs):
        if r.spec not in specs:
            specs.append(r.spec)
        members.setdefault(specs.index(r.spec), []).append(r.model)
    roles = {k: specs[k].mode for k in range(len(specs))}
    groups = {k: scoring.model_group(specs[k], members[k], tta=opts.tta, batch_size=opts.batch_size)
              for k in range(len(specs))}
    weights = {k: len(members[k]) for k in members}

    store = PartStore(out)
    earlier = store.start(_settings(sample, runs, image_runs, opts), resume=opts.resume)
    done = {i for i, record in earlier.items() if not part_failed(record)}
    summary.resumed = sum(1 for i, _, _ in sample if i in done)
    summary.retried = sum(1 for i, _, _ in sample if i in earlier and i not in done)
    if summary.retried:
        _log(f"predict: trying again {summary.retried} image(s) that failed in an earlier run")
    todo = [t for t in sample if t[0] not in done]
    if opts.limit:
        todo = todo[:opts.limit]
    if opts.overlays:
        storage.makedirs(opts.overlays)

    prepare = functools.partial(prepare_image, source=images, specs=tuple(specs), backend=opts.backend,
                                seg_options=segmentation_options(opts), keep_image=bool(opts.overlays))
    batcher = CrossImageBatcher({k: g.predict for k, g in groups.items()}, opts.batch_size)
    stage_seconds = {s: 0.0 for s in STAGES}
    writer = cf.ThreadPoolExecutor(1, thread_name_prefix="writer")
    written: collections.deque = collections.deque()
    bar = tqdm(total=len(todo), unit="img", desc="predict", disable=not opts.progress, dynamic_ncols=True)

    def write(prepared: Prepared, record: dict, scores) -> None:
        # Overlay first: a part on disk then means the image is completely done.
        if opts.overlays and prepared.overlay is not None and scores is not None:
            from common.overlay import draw_overlay, save_png

            image, cells = prepared.overlay
            rgb = draw_overlay(image, cells, overlay_texts(prepared.cell_ids, scores), min_side=1024)
            save_png(storage.join(opts.overlays, f"{prepared.image_id}.png"), rgb)
        store.put(record)

    def finish(job: Job) -> None:
        p = job.prepared
        scores, prediction = None, ""
        failed = bool(p.error)
        if failed:
            summary.errors.append({"id": p.image_id, "error": p.error, "failed": True})
            _log(f"predict: {p.image_id}: {p.error} (failed: empty row for now, run goes on)")
        elif p.n_cells:
            cell, image = cell_scores(job, roles, weights)
            bad = sum(int(np.size(a) - np.isfinite(a).sum()) for a in (cell, image) if a is not None)
            if bad:  # a model that overflowed: score those entries 0, say so, go on
                note = f"score: {bad} non-finite model outputs, scored 0"
                summary.errors.append({"id": p.image_id, "error": note, "failed": False})
                _log(f"predict: {p.image_id}: {note}")
                p.error = note
                cell = None if cell is None else np.nan_to_num(cell, nan=0.0, posinf=1.0, neginf=0.0)
                image = None if image is None else np.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0)
            scores = combine(cell, image, p.touches_border, p.has_nucleus, opts.rule)
            triples = prediction_triples(p, scores, opts.rule.min_score)
            prediction = submission.format_prediction_string(triples)
            summary.detections += len(triples)
        summary.cells += p.n_cells
        for s in STAGES:
            stage_seconds[s] += p.seconds.get(s, 0.0)
        record = {"id": p.image_id, "width": p.width, "height": p.height,
                  "prediction": prediction, "error": p.error, "failed": failed}
        written.append(writer.submit(write, p, record, scores))
        while len(written) > 4:  # bounded: the writer holds at most a few overlays
            written.popleft().result()
        summary.processed += 1
        bar.update(1)

    reader = prefetch_map(prepare, todo, workers=opts.workers, depth=opts.prefetch or None,
                          processes=opts.processes)
    try:
        for prepared in reader:
            batcher.add(prepared)
            for job in batcher.step(force=batcher.pending >= opts.max_pending):
                finish(job)
        for job in batcher.step(force=True):
            finish(job)
        while written:
            written.popleft().result()
    except RunStopped:
        raise
    except Exception as err:  # scoring or writing: never one image's data
        raise RunStopped(f"{type(err).__name__}: {err} (while scoring or writing; not a problem "
                         "of an image's data: see the traceback above)") from err
    finally:
        reader.close()
        writer.shutdown(wait=True)
        bar.close()

    summary.batches = batcher.batches
    summary.seconds = {**stage_seconds, "score": batcher.score_seconds}
    summary.wall_seconds = time.perf_counter() - wall
    summary.images_per_second = summary.processed / max(summary.wall_seconds, 1e-9)
    parts = store.read_all()
    summary.complete = all(i in parts for i, _, _ in sample)
    if summary.complete:
        rows = [(i, w, h, parts[i]["prediction"]) for i, w, h in sample]
        submission.write_submission(out, rows)
        summary.errors = [{"id": i, "error": parts[i]["error"], "failed": part_failed(parts[i])}
                          for i, _, _ in sample if parts[i].get("error")]
        summary.failed = sum(1 for e in summary.errors if e["failed"])
        if not opts.keep_parts and not summary.failed:  # kept, so --resume can retry the failed
            store.remove()
    storage.write_text(out + REPORT_SUFFIX, json.dumps(dataclasses.asdict(summary), indent=2) + "\n")
    return summary
