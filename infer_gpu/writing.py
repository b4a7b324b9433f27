"""predict's outputs: each finished image's part (and overlay) on a writer thread, then the CSV
(and the cell table).

A part on disk means the image is completely done: its overlay PNG is written first. With
`--cells`, a part also holds the image's cell rows (`common.cell_table.part_entry`). The final
CSV and the cell table are assembled from the parts in the ID list's order and written
atomically, so a resumed run writes the same files as an uninterrupted one.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf

import numpy as np

from common import storage
from infer_gpu.parts import PartStore, part_failed

MAX_QUEUED = 4  # images waiting for the writer: bounds the overlays held in memory


def overlay_texts(cell_ids, scores: np.ndarray, top: int = 2, min_score: float = 0.25) -> dict[int, list]:
    """`{cell id: [(16, 0.81), (0, 0.40)]}`: each cell's best class, then up to `top - 1` more
    scoring at least `min_score`; common.overlay tints the cell and names the classes."""
    texts = {}
    for cid, row in zip(cell_ids, scores):
        best = np.argsort(-row, kind="stable")[:top]
        texts[int(cid)] = [(int(c), float(row[c])) for k, c in enumerate(best) if k == 0 or row[c] >= min_score]
    return texts


class PartWriter:
    """Writes parts (and overlays) on one background thread, at most MAX_QUEUED behind.

    Use as a context manager: leaving it waits for every write and raises the first error.
    """

    def __init__(self, store: PartStore, overlays: str | None = None, cells: bool = False):
        self.store, self.overlays, self.cells = store, overlays, cells  # cells: keep the cell rows
        self._executor = cf.ThreadPoolExecutor(1, thread_name_prefix="writer")
        self._queued: collections.deque = collections.deque()

    def __enter__(self) -> "PartWriter":
        if self.overlays:
            storage.makedirs(self.overlays)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self._executor.shutdown(wait=True)  # what was queued is finished: parts for --resume

    def put(self, prepared, result) -> None:
        """Queue one image: its `reading.Prepared` (the overlay) and `combine.ImageResult` (the part)."""
        self._queued.append(self._executor.submit(self._write, prepared, result))
        while len(self._queued) > MAX_QUEUED:
            self._queued.popleft().result()

    def flush(self) -> None:
        while self._queued:
            self._queued.popleft().result()

    def _write(self, prepared, result) -> None:
        if self.overlays and prepared.overlay is not None and result.scores is not None:
            from common.overlay import draw_overlay, save_png

            image, cells = prepared.overlay
            rgb = draw_overlay(image, cells, overlay_texts(prepared.cell_ids, result.scores), min_side=1024)
            save_png(storage.join(self.overlays, f"{prepared.image_id}.png"), rgb)
        record = result.record
        if self.cells:
            record = {**record, "cells": part_cells(prepared, result)}
        self.store.put(record)


def part_cells(prepared, result) -> dict:
    """The image's cell rows for its part (`common.cell_table.part_entry`): none when it
    failed or has no cells."""
    from common import cell_table

    if result.failed or result.scores is None:
        return cell_table.part_entry([], [], [], [], [], [], None, None, None)
    p = prepared
    return cell_table.part_entry(p.cell_ids, p.boxes, p.areas, p.touches_border, p.has_nucleus, p.masks,
                                 cell=result.cell, image=result.image, final=result.scores)


def assemble(out: str, sample, store: PartStore, cells: str | None = None,
             provenance: dict | None = None) -> list[dict] | None:
    """Write the final CSV from the parts, in sample order, when every ID has one; with
    `cells`, also the cell table there (`common.cell_table`, `provenance` in its metadata).

    sample: `[(ID, width, height)]`; a size of 0 (a label list) is the part's. Returns every
    image's error `[{"id", "error", "failed"}]` (earlier runs' too), or None when some ID has
    no part yet (a `--limit` run): then nothing is written.
    """
    from common import submission

    parts = store.read_all()
    if not all(i in parts for i, _, _ in sample):
        return None
    sizes = [(i, w or parts[i]["width"], h or parts[i]["height"]) for i, w, h in sample]
    if cells:
        write_cell_table(cells, sizes, parts, provenance)
    submission.write_submission(out, [(i, w, h, parts[i]["prediction"]) for i, w, h in sizes])
    return [{"id": i, "error": parts[i]["error"], "failed": part_failed(parts[i])}
            for i, _, _ in sample if parts[i].get("error")]


def write_cell_table(path: str, sizes, parts: dict, provenance: dict | None = None) -> int:
    """The cell table from the parts' cell rows, images in `sizes` order (`[(ID, w, h)]`);
    failed images have no rows and are listed in the metadata's `failed`. Returns the rows."""
    from common import cell_table

    missing = [i for i, _, _ in sizes if "cells" not in parts[i]]
    if missing:
        raise ValueError(f"--cells {path}: the parts of {len(missing)} image(s) ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}) hold no cell rows")
    failed = [i for i, _, _ in sizes if part_failed(parts[i])]
    meta = {**(provenance or {}), "images": len(sizes), "failed": failed}
    chunks = (cell_table.from_part(i, w, h, parts[i]["cells"]) for i, w, h in sizes if not part_failed(parts[i]))
    return cell_table.write(path, chunks, meta)
