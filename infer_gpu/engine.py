"""`predict`'s engine, `run_predict`: test images -> cells -> batched scores -> submission.csv.

The command line is `infer_gpu.predict` (`python -m infer_gpu predict`); this is the library
call behind it. One run, top-down, with the module that does each step:

    read the sample submission (or label list),    reading.read_sample (read_labelled),
    load the runs                                  runs.load_run
    group the runs by tile spec                    scorer.Scorers (device, TTA, compiled fns;
                                                   bag runs: scorer.BagGroup, bags)
    skip what an earlier run did                   parts.PartStore (--resume)
    segment as the runs' training data was          reading.segmentation_to_use
    read, segment, tile, encode each image         reading.prepare_image, on common.pool's
                                                   reader threads/processes, ahead of the model
    score tiles (bag runs: bags of cells) in       batching.score_stream
    batches that span images
    combine cell and image scores into a row       combine.image_result (bag runs: bags.unchunk)
    write the image's part (and overlay)           writing.PartWriter, on a writer thread
                                                   (start, per-image and end steps: steps.py,
                                                   shared with beam_engine)
    assemble the CSV in sample order (and the      writing.assemble, report.write_report
    --cells table), the report                     (common.cell_table)

Memory stays bounded by the readers' depth, the batcher's image cap (`max_pending`) and the
writer's queue. An image whose data is bad gets a part marked `failed` with an empty row, and
the run goes on (`--resume` tries it again); any other error stops the run as
`report.RunStopped`, with the original traceback, and the parts written so far stay.

`predict(config)` takes everything, the paths included, from its `PredictConfig`;
`run_predict(images, sample_submission, models, out, ...)` is the older form with the paths
as arguments, kept for library callers.
"""
from __future__ import annotations

from typing import Sequence

from common.pool import ordered_map
from infer_gpu.batching import CrossImageBatcher, score_stream
from infer_gpu.config import PredictConfig
from infer_gpu.report import RunStopped, Summary
from infer_gpu.steps import (Run, finish_image, finish_run, image_reader, images_to_do, load_runs,  # noqa: F401
                             size_thread_pools, start_run)
from infer_gpu.writing import PartWriter


def predict(config: PredictConfig, *, runs=None, image_runs=None) -> Summary:
    """Write `config.out` (the submission CSV) for every ID of `config.sample_submission`, or
    of the label list `config.labels` (`ID,Label` CSV; sizes from the image files).

    The paths are the config's fields, as for the builder and the trainer (`PredictConfig`
    checks them): images, a folder or `gs://` prefix of `{ID}_{channel}.png`; models /
    image_models, run directories (cell-mode `preprocess.json`, bag runs included /
    image-mode); cells, also write the per-cell table there (`common.cell_table`: `.parquet`
    or `.csv`). `runs` / `image_runs` may pass already-loaded `runs.RunDir`s instead of
    models / image_models (benchmarks, tests). Returns the Summary; the CSV (and the table)
    are only written when every image is done (see `config.limit`); the report always is.
    `config.engine` "beam" runs the same on Apache Beam (`infer_gpu.beam_engine.predict_beam`,
    DirectRunner with `config.workers` processes; `beam_args` there for other runners).
    """
    if config.engine == "beam":
        from infer_gpu.beam_engine import predict_beam

        return predict_beam(config, runs=runs, image_runs=image_runs)
    run = start_run(config, runs, image_runs)
    summary, scorers = run.summary, run.scorers
    batcher = CrossImageBatcher(scorers.predictors, scorers.batch_sizes)
    prepared = ordered_map(image_reader(config, scorers, run.used), run.todo, workers=config.workers,
                           depth=config.prefetch or config.workers + 2, processes=config.processes, name="reader")
    try:
        with _progress(len(run.todo), config.progress) as bar, \
                PartWriter(run.store, config.overlays, cells=bool(config.cells)) as writer:
            for job in score_stream(prepared, batcher, config.max_pending):
                summary.count(finish_image(job, scorers, config.rule, writer), job.prepared)
                bar.update(1)
    except RunStopped:
        raise
    except Exception as err:  # scoring or writing: never one image's data
        raise RunStopped(f"{type(err).__name__}: {err} (while scoring or writing; not a problem "
                         "of an image's data: see the traceback above)") from err
    finally:
        prepared.close()

    summary.batches = batcher.batches
    summary.seconds["score"] = batcher.score_seconds
    return finish_run(run)


def run_predict(images: str, sample_submission: str | None, models: Sequence[str], out: str,
                image_models: Sequence[str] = (), config: PredictConfig | None = None,
                runs=None, image_runs=None, cells: str | None = None, labels: str | None = None) -> Summary:
    """The older, positional form of `predict`: the paths as arguments, set on `config` (a
    preset; default `PredictConfig()`), then `predict(config, runs=, image_runs=)`. Exactly
    one of `sample_submission` and `labels`."""
    import dataclasses

    paths = dict(images=images, sample_submission=sample_submission or "", labels=labels or "",
                 models=tuple(models or ()), image_models=tuple(image_models or ()), out=out, cells=cells or "")
    config = dataclasses.replace(config or PredictConfig(), **paths)
    return predict(config, runs=runs, image_runs=image_runs)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="predict", disable=not enabled, dynamic_ncols=True)
