"""The local engine: plan -> decode in worker processes -> write shards -> manifest; resumable.

The plan, the resume rules, the state folder and the manifest are the build core's
(`tfrecords_builder.core`, shared with the Beam engine); here the planned shards are decoded by
this machine's worker processes (`core.Runner`) and written in plan order, one shard uploading
in the background while the next decodes.

An error that is not an image's data (worker.ImageCodeError: a bug) stops the build with its
traceback; the shards finished so far are kept for the resume.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from common import storage
from tfrecords_builder import core
from tfrecords_builder import manifest as manifestlib
# what the CLI and callers of `build` meet: the result, its error, the state folder's names
from tfrecords_builder.core import DONE_DIR, PLAN_FILE, STATE_DIR, BuildError, BuildResult, Runner  # noqa: F401
from tfrecords_builder.config import BuildConfig
from tfrecords_builder.worker import Result
from tfrecords_builder.writer import ShardWriter


def build(cfg: BuildConfig, progress: bool = True, log: Callable[[str], None] = print) -> core.BuildResult:
    """Build (or finish building) the shards and manifest described by `cfg`.

    Returns the result; `result.exit_code` is 2 when images were skipped. Raises
    `common.resume.ResumeError` (a ValueError) when the output folder holds a different build.
    """
    import time

    from tqdm import tqdm

    table, finished = core.start(cfg, log)
    if finished is not None:
        return finished
    with core.Runner(cfg.workers) as runner:
        pilot: dict[str, Result] = {}  # results decoded while planning, used once
        plan = core.load_or_make_plan(cfg, runner, log, pilot, table)
        targets = core.image_targets(table, plan.entries)
        todo = core.shards_to_build(cfg, plan, log)
        tmp_dir = (tempfile.mkdtemp(prefix="hpa-tfrec-") if storage.is_gcs(cfg.out)
                   else os.path.join(cfg.out, core.STATE_DIR, "tmp"))
        shutil.rmtree(tmp_dir, ignore_errors=True)
        planned = time.perf_counter()
        try:
            decoded = _write_shards(cfg, plan, todo, runner, tmp_dir, progress, tqdm, pilot, targets)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        written = time.perf_counter()

    manifest = core.finish(cfg, plan, log, table)
    return core.BuildResult(cfg.out, manifest, len(todo), len(plan.shards) - len(todo),
                            write_s=written - planned, images_written=decoded)


def _write_shards(cfg, plan, todo, runner, tmp_dir, progress, tqdm, pilot: dict,
                  targets: dict | None = None) -> int:
    """Decode and write the `todo` shards; returns how many images were decoded here (not in the pilot)."""
    by_id = plan.by_id()
    job = core.job(cfg)
    cached = set(pilot)  # fixed up front: the task generator runs ahead of the loop below

    def tasks():
        for shard in todo:
            for image_id in shard["images"]:
                if image_id in cached:
                    continue
                yield core.make_task(by_id[image_id], job, targets)

    def publish(shard, writer: ShardWriter, examples: dict, skipped: list, counts: dict | None) -> None:
        # Runs in one background thread, so an upload overlaps the decoding of the next shard.
        writer.publish(storage.join(cfg.out, shard["name"]))
        record = manifestlib.shard_record(shard, by_id, examples, skipped, writer.nbytes, writer.crc32c,
                                          cell_labels=counts)
        core.write_done(cfg.out, record)

    total = sum(len(s["images"]) for s in todo)
    results = runner.imap(tasks())
    n_skipped = 0
    with ThreadPoolExecutor(1) as finisher, tqdm(total=total, unit="img", desc="images",
                                                 disable=not progress, smoothing=0.1) as bar:
        pending = None
        for shard in todo:
            writer = ShardWriter(os.path.join(tmp_dir, shard["name"]))
            examples: dict[str, int] = {}
            counts: dict[str, list[int]] | None = None if targets is None else {}
            skipped: list[dict] = []
            for image_id in shard["images"]:
                result = pilot.pop(image_id) if image_id in cached else next(results)
                if result.image_id != image_id:  # a bug, never bad input
                    raise RuntimeError(f"result for {result.image_id} arrived where {image_id} was due")
                if result.error:
                    skipped.append({"id": image_id, "reason": result.error, "origin": by_id[image_id].origin})
                    n_skipped += 1
                    bar.set_postfix(skipped=n_skipped)
                else:
                    for rec in result.records:
                        writer.write(rec)
                    examples[image_id] = len(result.records)
                    if counts is not None:
                        counts[image_id] = result.cell_labels
                bar.update(1)
            writer.close()
            if pending is not None:
                pending.result()  # one shard uploading at a time; re-raises its error here
            pending = finisher.submit(publish, shard, writer, examples, skipped, counts)
        if pending is not None:
            pending.result()
    return total - len(cached)
