"""The steps both predict engines share (the local one, `infer_gpu.engine`, and Apache Beam's,
`infer_gpu.beam_engine`): start a run (`start_run`: config, ID list, device, runs, segmentation,
parts, what is left to do), the per-image function (`image_reader`: read, segment, tiles,
masks), the end of one image (`finish_image`: the combine rule, its part) and of the run
(`finish_run`: the CSV and the cell table from the parts, the report).
"""
from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass

from infer_gpu.combine import image_result
from infer_gpu.config import PredictConfig
from infer_gpu.parts import PartStore, part_failed
from infer_gpu.reading import (STAGES, prepare_image, read_labelled, read_sample, segmentation_options,
                               segmentation_to_use)
from infer_gpu.report import Summary, run_settings, write_report
from infer_gpu.writing import PartWriter, assemble


@dataclass
class Run:
    """A predict run once its inputs are read and checked and its runs loaded: what both
    engines (this one, and `infer_gpu.beam_engine`'s) start from and finish with."""

    config: PredictConfig
    sample: list  # [(ID, width, height)], the CSV's order
    summary: Summary
    runs: list  # runs.RunDir, cell and bag mode
    image_runs: list
    scorers: object  # scorer.Scorers
    used: object  # the SegmentationSpec predict segments with
    settings: dict  # what decides the results (report.run_settings): the parts' guard
    store: PartStore
    todo: list  # [(ID, width, height)] still to predict this run
    wall: float  # perf_counter at the start


def start_run(config: PredictConfig, runs=None, image_runs=None) -> Run:
    """Check the config, read the ID list, set up the device, load the runs, choose the
    segmentation, start (or resume) the parts and list what is still to do."""
    config.check_paths()  # done by the config when it has paths; a preset has none
    config.require_models(loaded=bool(runs or image_runs))
    wall = time.perf_counter()
    sample = read_sample(config.sample_submission) if not config.labels else read_labelled(config.labels)

    from infer_gpu.scorer import Scorers, setup_device

    summary = Summary(out=config.out, total=len(sample), seconds={s: 0.0 for s in STAGES})
    summary.device = setup_device(config.device)
    size_thread_pools(config.workers, summary.device, config.tf_threads)  # before any model
    runs, image_runs = load_runs(config.models, config.image_models, runs, image_runs)
    scorers = Scorers.build([*runs, *image_runs], tta=config.tta, batch_size=config.batch_size)
    used = segmentation_to_use(config, [*runs, *image_runs])  # the runs' unless told otherwise
    settings = run_settings(sample, runs, image_runs, config, used)
    if config.cells:
        settings["cell_table"] = True  # the parts hold cell rows: a resume must ask for them too
    store = PartStore(config.out)
    todo = images_to_do(sample, store.start(settings, resume=config.resume), config.limit, summary)
    return Run(config, sample, summary, runs, image_runs, scorers, used, settings, store, todo, wall)


def image_reader(config: PredictConfig, scorers, used):
    """The per-image function of both engines: `(ID, width, height) -> reading.Prepared` (read,
    segment, cut every spec's tiles, encode every mask; `reading.prepare_image`)."""
    return functools.partial(prepare_image, source=config.images, specs=scorers.specs, backend=used.backend,
                             seg_options=segmentation_options(config, used), keep_image=bool(config.overlays))


def finish_image(job, scorers, rule, writer: PartWriter):
    """A scored `batching.Job` -> its `combine.ImageResult`, reported (stderr) and queued on
    `writer` as the image's part (and overlay): the per-image end of both engines."""
    result = image_result(job, scorers.roles, scorers.weights, rule)
    _report_problem(result)
    writer.put(job.prepared, result)
    return result


def finish_run(run: Run) -> Summary:
    """The CSV (and --cells table) from the parts, in the ID list's order, once every ID has
    one; then the report. Both engines end here."""
    config, summary, store = run.config, run.summary, run.store
    summary.wall_seconds = time.perf_counter() - run.wall
    summary.images_per_second = summary.processed / max(summary.wall_seconds, 1e-9)
    inputs = config.inputs()
    provenance = {**run.settings, "inputs": inputs, "combine": "infer_gpu.combine (the rule's c, i, s)"}
    errors = assemble(config.out, run.sample, store, cells=config.cells or None, provenance=provenance)
    if errors is not None:
        summary.complete, summary.errors = True, errors
        summary.failed = sum(1 for e in errors if e["failed"])
        if not config.keep_parts and not summary.failed:  # kept, so --resume can retry the failed
            store.remove()
    if config.cells:
        inputs = {**inputs, "cells": config.cells}
    write_report(summary, config=config, settings=run.settings, inputs=inputs)
    return summary


def size_thread_pools(workers: int, device: str, tf_threads: int = 0) -> dict:
    """Size TensorFlow's thread pools against the reader threads, before TensorFlow starts.

    tf_threads N > 0 on the CPU: N intra-op threads and one inter-op thread (a model call is one
    chain of ops), e.g. `cores - workers` so that the scorer and `workers` readers do not
    oversubscribe the cores. 0 keeps TensorFlow's defaults (one intra-op thread per core):
    measured on the 2-core machine, `cores - workers` (1 thread) made the pipeline no faster
    and the naive baseline of bench_predict faster (ratios 0.94x, 1.10x against 1.39x, 1.57x
    with the defaults), so it is not the default. With a GPU, or once TensorFlow has started
    (a library caller that built a model first), nothing changes.
    Returns `{readers, intra_op, inter_op, how}` (0 = TensorFlow's default: one per core).
    """
    import tensorflow as tf

    threading = tf.config.threading
    how = "TensorFlow's defaults"
    if device == "CPU" and tf_threads:
        try:
            threading.set_intra_op_parallelism_threads(int(tf_threads))
            threading.set_inter_op_parallelism_threads(1)
            how = f"--tf-threads {tf_threads}"
        except RuntimeError:  # TensorFlow has started in this process: its pools are fixed
            how = "fixed before predict started"
    return {"readers": max(0, int(workers)), "intra_op": threading.get_intra_op_parallelism_threads(),
            "inter_op": threading.get_inter_op_parallelism_threads(), "how": how}


def load_runs(models, image_models, runs=None, image_runs=None) -> tuple[list, list]:
    """The cell-mode and image-mode runs: loaded from their folders unless given."""
    from infer_gpu.runs import load_run

    if runs is None:
        runs = [load_run(p, expect_mode="cell") for p in models]
    if image_runs is None:
        image_runs = [load_run(p, expect_mode="image") for p in image_models]
    return list(runs), list(image_runs)


def images_to_do(sample, earlier: dict, limit: int, summary: Summary) -> list[tuple]:
    """The sample's `(ID, w, h)` still to predict: not done by an earlier run (its failures
    are tried again), at most `limit` of them (0 = all). Counts resumed and retried."""
    done = {i for i, record in earlier.items() if not part_failed(record)}
    summary.resumed = sum(1 for i, _, _ in sample if i in done)
    summary.retried = sum(1 for i, _, _ in sample if i in earlier and i not in done)
    if summary.retried:
        _log(f"predict: trying again {summary.retried} image(s) that failed in an earlier run")
    todo = [t for t in sample if t[0] not in done]
    return todo[:limit] if limit else todo


def _report_problem(result) -> None:
    if result.failed:
        _log(f"predict: {result.record['id']}: {result.note} (failed: empty row for now, run goes on)")
    elif result.note:
        _log(f"predict: {result.record['id']}: {result.note}")


def _log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)
