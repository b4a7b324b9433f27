"""predict's outputs: each finished image's part (and overlay) on a writer thread, then the CSV.

A part on disk means the image is completely done: its overlay PNG is written first. The final
CSV is assembled from the parts in the sample submission's order and written atomically, so a
resumed run writes the same file as an uninterrupted one.
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

    def __init__(self, store: PartStore, overlays: str | None = None):
        self.store, self.overlays = store, overlays
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
        self.store.put(result.record)


def assemble(out: str, sample, store: PartStore) -> list[dict] | None:
    """Write the final CSV from the parts, in sample order, when every ID has one.

    Returns every image's error `[{"id", "error", "failed"}]` (earlier runs' too), or None
    when some ID has no part yet (a `--limit` run): then nothing is written.
    """
    from common import submission

    parts = store.read_all()
    if not all(i in parts for i, _, _ in sample):
        return None
    submission.write_submission(out, [(i, w, h, parts[i]["prediction"]) for i, w, h in sample])
    return [{"id": i, "error": parts[i]["error"], "failed": part_failed(parts[i])}
            for i, _, _ in sample if parts[i].get("error")]
