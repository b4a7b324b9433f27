"""predict on Apache Beam: the same rows as the local engine, from many workers (DirectRunner
on this machine, DataflowRunner with GPU workers for collections too big for one GPU).

    on the launching machine (the local engine's own steps, `steps.start_run`):
      read and check the ID list and the runs, choose the segmentation, start or resume the
      parts (OUT.parts/, the local engine's store), list the IDs still to do; write them to
      OUT.parts/todo.jsonl (the pipeline carries only slice numbers, so its size does not grow
      with the collection)
    the pipeline:
      Create(slice numbers) -> ParDo(ExpandSlice): the slice's (ID, width, height) tasks
      -> Reshuffle (spreads the images over every worker)
      -> ParDo(PredictImages): per worker process, `setup` loads the runs and compiles the
           scorers once (shared by the process's threads); per image `steps.image_reader`
           (read, segment, tiles, masks: `reading.prepare_image`), tiles batched across the
           images of a bundle (`batching.CrossImageBatcher`), `steps.finish_image` (the
           combine rule, `combine.image_result`) writes the image's part (and overlay) as it
           finishes (`writing.PartWriter`)
    back on the launching machine: `steps.finish_run` assembles the CSV (and the --cells
    table) from the parts in the ID list's order and writes the report, as the local engine does.

An image whose data is bad becomes a failed part and an empty row (exit status 3, `--resume`
tries it again); any other error (a bug, models that do not fit the tiles) fails the pipeline
(`report.RunStopped`), and the parts written so far stay. Parts and their settings are the
local engine's, so a run killed under one engine can be finished by the other with `--resume`.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from common import beam as beamlib
from common import storage
from infer_gpu.config import PredictConfig
from infer_gpu.report import RunStopped, Summary

NAMESPACE = "infer_gpu"
STAGE_MS = ("decode", "segment", "tiles", "encode", "score")  # milliseconds counters, summed over images
COUNTERS = ("images", "failed", "cells", "detections", "batches", *(f"ms_{s}" for s in STAGE_MS))
TODO_FILE = "todo.jsonl"  # in OUT.parts/: the IDs this run predicts, one JSON list per line
SLICE = 64  # IDs per Create element


@dataclass
class _Worker:
    """What one worker process holds for a run: its scorers (models compiled once), the
    per-image reader and the part store."""

    scorers: object
    read: object
    store: object


_WORKERS: dict[str, _Worker] = {}  # run token -> the process's loaded runs
_LOCK = threading.Lock()


def _same_runs(settings: dict, runs, image_runs) -> bool:
    from infer_gpu.runs import describe

    mine = {"models": [describe(r) for r in runs], "image_models": [describe(r) for r in image_runs]}
    theirs = {k: settings[k] for k in mine}
    return json.dumps(mine, sort_keys=True, default=str) == json.dumps(theirs, sort_keys=True, default=str)


def worker_state(token: str, config: PredictConfig, used, settings: dict) -> _Worker:
    """The process's `_Worker` for the run `token`: loaded on first use (by the first of the
    process's threads), checked against the launcher's `settings` (the runs' weights)."""
    with _LOCK:
        state = _WORKERS.get(token)
        if state is None:
            from infer_gpu.steps import image_reader, load_runs, size_thread_pools
            from infer_gpu.parts import PartStore
            from infer_gpu.scorer import Scorers, setup_device

            device = setup_device(config.device)
            size_thread_pools(0, device, config.tf_threads)
            runs, image_runs = load_runs(config.models, config.image_models)
            if not _same_runs(settings, runs, image_runs):
                raise RuntimeError("a run folder changed after predict started (its weights or spec "
                                   "differ from what the launching machine read): rerun")
            scorers = Scorers.build([*runs, *image_runs], tta=config.tta, batch_size=config.batch_size)
            state = _Worker(scorers, image_reader(config, scorers, used), PartStore(config.out))
            _WORKERS[token] = state
        return state


def _dofns():
    """The DoFn classes, made on first use so that importing this module needs no Beam."""
    import apache_beam as beam
    from apache_beam.metrics import Metrics

    class ExpandSlice(beam.DoFn):
        """Slice number -> its `(ID, width, height)` tasks, from OUT.parts/todo.jsonl (read once
        per worker, in setup)."""

        def __init__(self, todo_path: str):
            self.todo_path = todo_path

        def setup(self):
            self.todo = [tuple(json.loads(line)) for line in storage.read_text(self.todo_path).splitlines() if line]

        def process(self, k: int):
            yield from self.todo[k * SLICE:(k + 1) * SLICE]

    class PredictImages(beam.DoFn):
        """`(ID, width, height)` -> the image's part in OUT.parts/ (no output element)."""

        def __init__(self, token: str, config: PredictConfig, used, settings: dict):
            self.token, self.config, self.used, self.settings = token, config, used, settings
            self.writer = None

        def setup(self):
            from common import quiet

            quiet.quiet()  # a Beam worker process imports TensorFlow here first (HPA_VERBOSE=1: all its lines)
            self.state = worker_state(self.token, self.config, self.used, self.settings)
            self.count = {name: Metrics.counter(NAMESPACE, name) for name in COUNTERS}

        def start_bundle(self):
            from infer_gpu.batching import CrossImageBatcher
            from infer_gpu.writing import PartWriter

            scorers = self.state.scorers
            self.batcher = CrossImageBatcher(scorers.predictors, scorers.batch_sizes)
            self.writer = PartWriter(self.state.store, self.config.overlays, cells=bool(self.config.cells))
            self.writer.__enter__()

        def process(self, task):
            prepared = self.state.read(tuple(task))  # bad data: a failed Prepared; a bug raises
            self.batcher.add(prepared)
            self._finish(self.batcher.step(force=self.batcher.pending >= self.config.max_pending))
            return []

        def finish_bundle(self):
            self._finish(self.batcher.step(force=True))
            writer, self.writer = self.writer, None
            writer.__exit__(None, None, None)  # every part of the bundle is written
            self.count["batches"].inc(self.batcher.batches)
            self.count["ms_score"].inc(int(round(self.batcher.score_seconds * 1000)))

        def teardown(self):
            if self.writer is not None:  # a failed bundle: stop the writer thread, write no more
                self.writer.__exit__(RuntimeError, None, None)

        def _finish(self, jobs):
            from infer_gpu.steps import finish_image

            for job in jobs:
                result = finish_image(job, self.state.scorers, self.config.rule, self.writer)
                p = job.prepared
                self.count["images"].inc()
                self.count["failed"].inc(int(result.failed))
                self.count["cells"].inc(p.n_cells)
                self.count["detections"].inc(result.detections)
                for stage, seconds in p.seconds.items():
                    self.count[f"ms_{stage}"].inc(int(round(seconds * 1000)))

    return ExpandSlice, PredictImages


def predict_beam(config: PredictConfig, runs=None, image_runs=None) -> Summary:
    """`engine.predict` as an Apache Beam pipeline; the same inputs, checks, outputs and resume.

    `config.beam_args`: Beam's pipeline options (DirectRunner without `--runner`, with
    `config.workers` worker processes when above 1). A runner whose workers run elsewhere
    (Dataflow) needs gs:// images, models, output and overlays. `runs` / `image_runs`
    (already-loaded `runs.RunDir`s) only reach workers that run in this process (DirectRunner,
    in memory, or its worker threads with `--direct_running_mode multi_threading`: then the
    workers score with the runs this process loaded). Returns the Summary (its counts from the
    pipeline's counters).
    """
    import uuid

    from infer_gpu.steps import finish_run, image_reader, start_run

    beamlib.require_beam()
    import apache_beam as beam

    config.check_paths()
    options = beamlib.pipeline_options(config.workers, config.beam_args)
    runner = beamlib.runner_name(options)
    problem = beamlib.remote_paths_problem(runner, [
        ("--images", config.images), ("--out", config.out), *(("--model", m) for m in config.models),
        *(("--image-model", m) for m in config.image_models), ("--overlays", config.overlays or "")])
    if problem:
        raise ValueError(problem)
    here = beamlib.in_this_process(options)
    if (runs or image_runs) and not here:
        raise ValueError("runs passed as loaded objects reach only workers in this process: use the "
                         "in-memory DirectRunner (--workers 1) or worker threads (--direct_running_mode "
                         "multi_threading), or pass the run folders")
    run = start_run(config, runs, image_runs)
    summary = run.summary
    summary.device = f"Beam {runner}" + (f" ({summary.device})" if here else " workers")
    token = uuid.uuid4().hex
    if here:  # the workers are this process: they use the runs loaded already
        with _LOCK:
            _WORKERS[token] = _Worker(run.scorers, image_reader(config, run.scorers, run.used), run.store)
    try:
        if run.todo:
            todo_path = storage.join(run.store.dir, TODO_FILE)
            storage.write_text(todo_path, "".join(json.dumps(list(t)) + "\n" for t in run.todo))
            expand, predict_images = _dofns()
            p = beam.Pipeline(options=options)
            _ = (p
                 | "Slices" >> beam.Create(list(range((len(run.todo) + SLICE - 1) // SLICE)))
                 | "IDs" >> beam.ParDo(expand(todo_path))
                 | "Spread" >> beam.Reshuffle()
                 | "Predict" >> beam.ParDo(predict_images(token, config, run.used, run.settings)))
            try:
                result = p.run()
                result.wait_until_finish()
            except Exception as err:  # a worker's error: never one image's data (those are parts)
                raise RunStopped(f"the Beam pipeline failed: {type(err).__name__}: {err} (not a problem "
                                 "of an image's data; the parts written so far stay for --resume)") from err
            _count(summary, beamlib.counters(result, NAMESPACE, COUNTERS))
            storage.delete(todo_path)
    finally:
        with _LOCK:
            _WORKERS.pop(token, None)
    from infer_gpu.parts import part_failed, part_name

    finished = run.store.finished_names()  # listed only: finish_run reads the parts once
    missing = [i for i, _, _ in run.todo if part_name(i) not in finished]
    if missing:
        raise RunStopped(f"the pipeline finished but {len(missing)} image(s) have no part (e.g. {missing[0]}); "
                         "run the same command again with --resume to finish them")
    if config.limit:  # a slice may end before the CSV: the report lists this run's errors
        parts = run.store.read_all()
        summary.errors = [{"id": i, "error": parts[i]["error"], "failed": part_failed(parts[i])}
                          for i, _, _ in run.todo if parts[i].get("error")]
    return finish_run(run)


def _count(summary: Summary, counts: dict) -> None:
    """The pipeline's counters into the Summary (seconds from the milliseconds counters)."""
    summary.processed = counts["images"]
    summary.cells = counts["cells"]
    summary.detections = counts["detections"]
    summary.batches = counts["batches"]
    for stage in STAGE_MS:
        summary.seconds[stage] = counts[f"ms_{stage}"] / 1000.0
