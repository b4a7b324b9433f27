"""Batching across images: tiles of consecutive images fill fixed-size model batches.

Small images do not waste the accelerator: a batch takes tiles from as many images as it
needs, and scores go back to their images' cells. Images come out in the order they went in.
A bag spec's items are an image's bags of cells (`bags.chunk_cells`: a `(chunks, mask)` pair,
sliced and joined together), batched across images the same way.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np

from common.labels import NUM_CLASSES


@dataclass
class Job:
    """An image in the batcher: its Prepared and the scores filled in so far."""

    prepared: object  # a reading.Prepared
    scores: dict = field(default_factory=dict)  # spec index -> K x ... float32, one row per item
    remaining: int = 0  # tiles still to score, over all specs


class CrossImageBatcher:
    """Collects tiles from consecutive images and scores them in full batches.

    predictors: `{spec index: fn(items) -> B x ... x 19}`, items `BxNxNx4 uint8` tiles or, for
    a bag spec, a `(chunks, mask)` pair of arrays B long. batch_size: items per call, one
    number or `{spec index: number}`. A batch takes items from as many images as it needs, so
    small images do not waste the accelerator. `step()` runs the full batches and returns the
    images whose items are all scored, in the order they came.
    """

    def __init__(self, predictors: dict, batch_size):
        self.predictors = dict(predictors)
        sizes = batch_size if isinstance(batch_size, dict) else {k: batch_size for k in self.predictors}
        self.batch_sizes = {k: int(sizes[k]) for k in self.predictors}
        if any(b < 1 for b in self.batch_sizes.values()):
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.jobs: collections.deque = collections.deque()
        self.queues = {k: collections.deque() for k in self.predictors}  # (job, tiles, offset)
        self.queued = {k: 0 for k in self.predictors}
        self.batches = 0
        self.score_seconds = 0.0

    @property
    def pending(self) -> int:
        """Images held (not yet returned)."""
        return len(self.jobs)

    def add(self, prepared) -> None:
        """Queue one `reading.Prepared`'s tiles (or bags)."""
        job = Job(prepared)
        for k, items in prepared.tiles.items():
            if k not in self.predictors:
                raise KeyError(f"{prepared.image_id}: tiles for spec {k}, which has no model")
            n = _length(items)
            if n:
                self.queues[k].append([job, items, 0, n])
                self.queued[k] += n
                job.remaining += n
        self.jobs.append(job)

    def _run_one(self, k) -> None:
        queue, b = self.queues[k], self.batch_sizes[k]
        parts, where, size = [], [], 0
        while queue and size < b:
            entry = queue[0]
            job, items, offset, n = entry
            take = min(b - size, n - offset)
            parts.append(_slice(items, offset, offset + take))
            where.append((job, offset, take, n))
            size += take
            entry[2] += take
            if entry[2] == n:
                queue.popleft()
        batch = _join(parts)
        t = time.perf_counter()
        probs = np.asarray(self.predictors[k](batch), dtype=np.float32)
        self.score_seconds += time.perf_counter() - t
        self.batches += 1
        if probs.ndim < 2 or probs.shape[0] != size or probs.shape[-1] != NUM_CLASSES:
            raise ValueError(f"model group {k} returned {probs.shape} for {size} items")
        pos = 0
        for job, offset, take, n in where:
            if k not in job.scores:
                job.scores[k] = np.zeros((n,) + probs.shape[1:], np.float32)
            job.scores[k][offset:offset + take] = probs[pos:pos + take]
            job.remaining -= take
            pos += take
        self.queued[k] -= size

    def step(self, force: bool = False) -> list[Job]:
        """Score every full batch (and the partial rest too when `force`); return finished jobs."""
        for k in self.queues:
            while self.queued[k] >= self.batch_sizes[k] or (force and self.queued[k] > 0):
                self._run_one(k)
        done = []
        while self.jobs and self.jobs[0].remaining == 0:
            done.append(self.jobs.popleft())
        return done


def _length(items) -> int:
    return len(items[0]) if isinstance(items, tuple) else len(items)


def _slice(items, start: int, stop: int):
    if isinstance(items, tuple):
        return tuple(a[start:stop] for a in items)
    return items[start:stop]


def _join(parts: list):
    """Slices of one spec's items -> one batch (arrays joined, or pairs joined field by field)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(field) for field in zip(*parts))
    return np.concatenate(parts)


def score_stream(prepared_images, batcher: CrossImageBatcher, max_pending: int):
    """Prepared images in -> scored `Job`s out, in the same order. A partial batch is scored
    once `max_pending` images wait (so memory stays bounded), and at the end."""
    for prepared in prepared_images:
        batcher.add(prepared)
        yield from batcher.step(force=batcher.pending >= max_pending)
    yield from batcher.step(force=True)
