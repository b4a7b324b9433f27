"""Batching across images: tiles of consecutive images fill fixed-size model batches.

Small images do not waste the accelerator: a batch takes tiles from as many images as it
needs, and scores go back to their images' cells. Images come out in the order they went in.
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

    def add(self, prepared) -> None:
        """Queue one `reading.Prepared`'s tiles."""
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


def score_stream(prepared_images, batcher: CrossImageBatcher, max_pending: int):
    """Prepared images in -> scored `Job`s out, in the same order. A partial batch is scored
    once `max_pending` images wait (so memory stays bounded), and at the end."""
    for prepared in prepared_images:
        batcher.add(prepared)
        yield from batcher.step(force=batcher.pending >= max_pending)
    yield from batcher.step(force=True)
