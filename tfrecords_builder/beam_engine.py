"""The Apache Beam engine: the same plan, per-image function and shards as the local engine,
run as a Beam pipeline (DirectRunner on one machine, DataflowRunner on many).

    plan (made here, before the pipeline, by the build core `tfrecords_builder.core`, shared with the
      local engine; saved in _build/plan.json)
      -> Create(names of the shards still to build)
      -> ParDo(ExpandShard): one Item per planned image, from the saved plan (read once per worker)
      -> Reshuffle (spreads the images of one shard over all workers)
      -> ParDo(ProcessImage): worker.process(task)  == the local engine's per-image function
           main output: records, keyed by planned shard;  tagged output "skipped": bad input
      -> CoGroupByKey(shard) -> ParDo(WriteShard): sort by planned position, write the shard to a
           local temp file, publish it under its final name (common.storage.put_file: atomic move,
           or upload with a CRC32C check), then its `_build/done/{shard}.json` record
    manifest.json from the done records (core.finish), as in the local engine.

The pipeline itself carries only shard names, so its size does not grow with the dataset (runners
cap the size of a submitted job); the images' list travels in plan.json, which the workers read
(and the --cell-labels table, read by ExpandShard, whose Items carry each image's rows).
Shard names, contents (byte for byte), manifest and resume behaviour are those of the local
engine, and a build interrupted under one engine can be finished by the other.
A Python exception from our code fails the pipeline; only bad input becomes a skip.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Sequence

from common import beam as beamlib
from common import storage
from tfrecords_builder import core
from tfrecords_builder import manifest as manifestlib
from tfrecords_builder import worker
from tfrecords_builder.config import BuildConfig

SKIPPED = "skipped"  # tag of ProcessImage's side output
COUNTERS = ("images", "cells", "records", "skipped", "shards", "bytes")
NAMESPACE = "tfrecords_builder"
LOCAL_RUNNERS = beamlib.LOCAL_RUNNERS  # workers that see this machine's files


@dataclass(frozen=True)
class Item:
    """One image of the plan, with where its records go: everything a worker needs, nothing big."""

    shard: str  # planned shard name
    fold: int
    pos: int  # position in the shard's planned image list: the write order
    count: int  # images planned into this shard (the writer checks it got them all)
    origin: str  # label-list row, for the skip list
    task: worker.Task


def shard_items(by_id: dict, shard: dict, job: worker.Job, targets: dict | None = None) -> list[Item]:
    """One Item per planned image of `shard` ({"name", "fold", "images"}), in planned order;
    `by_id` is `Plan.by_id()`, `targets` `core.image_targets` (each image's cell labels)."""
    out = []
    for pos, image_id in enumerate(shard["images"]):
        e = by_id[image_id]
        out.append(Item(shard["name"], shard["fold"], pos, len(shard["images"]), e.origin,
                        core.make_task(e, job, targets)))
    return out


def _counter(name: str):
    import apache_beam as beam

    return beam.metrics.Metrics.counter(NAMESPACE, name)


def _expand_shard_fn():
    import apache_beam as beam

    class ExpandShard(beam.DoFn):
        """Shard name -> its Items, from `OUT/_build/plan.json` (read once per worker, in setup).

        With --cell-labels the table is read here too, once per worker, and must be the one the
        plan was made with (its fingerprint); each Item's Task then carries its image's rows."""

        def __init__(self, out: str, job: worker.Job, cell_labels: str = ""):
            self.out = out
            self.job = job
            self.cell_labels = cell_labels

        def setup(self):
            from common import cell_labels
            from tfrecords_builder import cell_targets
            from tfrecords_builder import plan as planlib

            plan = planlib.Plan.from_json(
                storage.read_text(storage.join(self.out, core.STATE_DIR, core.PLAN_FILE)))
            self.by_id = plan.by_id()
            self.shards = {s["name"]: s for s in plan.shards}
            self.targets = None
            if self.cell_labels:
                table = cell_labels.read(self.cell_labels)
                if table.fingerprint != plan.config.get(cell_targets.FINGERPRINT_KEY):
                    raise RuntimeError(f"{self.cell_labels} changed while the build ran")
                self.targets = core.image_targets(table, plan.entries)

        def process(self, name: str):
            yield from shard_items(self.by_id, self.shards[name], self.job, self.targets)

    return ExpandShard


def _process_image_fn():
    """The DoFn class, made on first use so that importing this module needs no Beam."""
    import apache_beam as beam

    class ProcessImage(beam.DoFn):
        """Item -> (shard, (pos, fold, count, id, labels, records, cell-label counts)) or, tagged
        SKIPPED, (shard, (pos, fold, count, id, reason, origin))."""

        def setup(self):
            # The heavy, per-worker part: import the decoding/segmentation stack once, not per image.
            # worker.process itself holds no state between images.
            from common import images, preprocess, segmentation  # noqa: F401

            self.images = _counter("images")
            self.cells = _counter("cells")
            self.records = _counter("records")
            self.skipped = _counter("skipped")

        def process(self, item: Item):
            result = worker.process(item.task)
            if result.image_id != item.task.image_id:  # a bug, never bad input
                raise RuntimeError(f"result for {result.image_id} arrived where {item.task.image_id} was due")
            if result.error:
                self.skipped.inc()
                yield beam.pvalue.TaggedOutput(
                    SKIPPED, (item.shard, (item.pos, item.fold, item.count, item.task.image_id, result.error,
                                           item.origin)))
                return
            self.images.inc()
            self.records.inc(len(result.records))
            self.cells.inc(result.cells)
            yield (item.shard, (item.pos, item.fold, item.count, item.task.image_id,
                                list(item.task.labels), result.records, result.cell_labels))

    return ProcessImage


def _write_shard_fn():
    import apache_beam as beam

    class WriteShard(beam.DoFn):
        """(shard, {"records": [...], "skipped": [...]}) -> the published shard and its done record."""

        def __init__(self, out: str, cell_labels: str = ""):
            self.out = out
            self.cell_labels = cell_labels

        def setup(self):
            self.tmp = tempfile.mkdtemp(prefix="hpa-beam-shard-")
            self.nbytes = _counter("bytes")
            self.shards = _counter("shards")

        def teardown(self):
            shutil.rmtree(self.tmp, ignore_errors=True)

        def process(self, element):
            from tfrecords_builder.writer import ShardWriter

            name, groups = element
            good = sorted(groups["records"], key=lambda v: v[0])
            bad = sorted(groups[SKIPPED], key=lambda v: v[0])
            positions = sorted([v[0] for v in good] + [v[0] for v in bad])
            count = (good or bad)[0][2]
            fold = (good or bad)[0][1]
            if positions != list(range(count)):  # every planned image exactly once, or it is our bug
                raise RuntimeError(f"{name}: got images at positions {positions}, planned 0..{count - 1}")
            writer = ShardWriter(os.path.join(self.tmp, name))
            try:
                examples: dict[str, int] = {}
                labels: dict[str, SimpleNamespace] = {}
                counts: dict[str, list[int]] = {}
                for _, _, _, image_id, image_labels, records, cell_counts in good:
                    for rec in records:
                        writer.write(rec)
                    examples[image_id] = len(records)
                    labels[image_id] = SimpleNamespace(labels=image_labels)
                    if cell_counts is not None:
                        counts[image_id] = cell_counts
                # In planned order, as the local engine lists them.
                skipped = [{"id": image_id, "reason": reason, "origin": origin}
                           for _, _, _, image_id, reason, origin in bad]
                writer.publish(storage.join(self.out, name))
            finally:
                writer.discard()
            record = manifestlib.shard_record({"name": name, "fold": fold}, labels, examples, skipped,
                                              writer.nbytes, writer.crc32c,
                                              cell_labels=counts if self.cell_labels else None)
            core.write_done(self.out, record)
            self.nbytes.inc(writer.nbytes)
            self.shards.inc()
            yield name

    return WriteShard


def pipeline_options(cfg: BuildConfig, beam_args: Sequence[str]):
    """Beam's PipelineOptions from the arguments the builder did not know (`common.beam`):
    DirectRunner unless told; `--workers N` (N > 1) = N worker processes on DirectRunner."""
    return beamlib.pipeline_options(cfg.workers, beam_args)


def run_pipeline(cfg: BuildConfig, shards: list[str], options) -> dict[str, int]:
    """Decode and write the named planned shards; returns the Beam counters (committed where known).

    The plan must already be saved in the output's state folder (workers read it there).
    """
    import apache_beam as beam

    p = beam.Pipeline(options=options)
    outputs = (
        p
        | "Shards" >> beam.Create(shards)
        | "Images" >> beam.ParDo(_expand_shard_fn()(cfg.out, core.job(cfg), cfg.cell_labels))
        | "Spread" >> beam.Reshuffle()
        | "Process" >> beam.ParDo(_process_image_fn()()).with_outputs(SKIPPED, main="records")
    )
    _ = (
        {"records": outputs.records, SKIPPED: outputs[SKIPPED]}
        | "ByShard" >> beam.CoGroupByKey()
        | "WriteShards" >> beam.ParDo(_write_shard_fn()(cfg.out, cfg.cell_labels))
    )
    result = p.run()
    result.wait_until_finish()
    return beamlib.counters(result, NAMESPACE, COUNTERS)


def build_beam(cfg: BuildConfig, beam_args: Sequence[str] = (), progress: bool = True,
               log: Callable[[str], None] = print) -> core.BuildResult:
    """`build.build` on Apache Beam: same checks, plan, shards, manifest and resume.

    beam_args: Beam pipeline options (`--runner DataflowRunner --project ...`); DirectRunner
    when no runner is given. Returns the BuildResult (`exit_code` 2 when images were skipped).
    """
    del progress  # Beam reports progress itself (DirectRunner logs, the Dataflow job page)
    options = pipeline_options(cfg, beam_args)
    problem = beamlib.remote_paths_problem(beamlib.runner_name(options), [
        ("--out", cfg.out), *(("--images", p) for p in cfg.images), ("--masks", cfg.masks),
        ("--cell-labels", cfg.cell_labels)])
    if problem:
        raise core.BuildError(problem)
    table, finished = core.start(cfg, log)
    if finished is not None:
        return finished
    with core.Runner(0) as runner:  # the pilot decodes 8 images here, on the launching machine
        # The pilot's results are not reused (unlike the local engine's): the workers decode
        # those 8 images again rather than receive their records inside the pipeline's definition.
        plan = core.load_or_make_plan(cfg, runner, log, {}, table)
    core.image_targets(table, plan.entries)  # a resumed plan: refused here, not on a worker
    todo = core.shards_to_build(cfg, plan, log)
    start = time.perf_counter()
    counts = run_pipeline(cfg, [s["name"] for s in todo], options) if todo else dict.fromkeys(COUNTERS, 0)
    write_s = time.perf_counter() - start
    log("beam counters: " + ", ".join(f"{k}={counts[k]}" for k in COUNTERS))
    missing = [s["name"] for s in todo if not storage.exists(core.done_path(cfg.out, s["name"]))]
    if missing:
        raise core.BuildError(f"the pipeline finished but {len(missing)} shard(s) were not written "
                                  f"(e.g. {missing[0]}); run the same command again to finish them")
    manifest = core.finish(cfg, plan, log, table)
    return core.BuildResult(cfg.out, manifest, len(todo), len(plan.shards) - len(todo),
                                write_s=write_s,
                                images_written=sum(len(s["images"]) for s in todo))
