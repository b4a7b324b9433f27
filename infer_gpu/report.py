"""What a predict run did and how it was made: `Summary`, the settings, `OUT.report.json`.

The report keeps, beside the counts and errors, everything needed to trace the submission:
the options (`PredictConfig`, with the combine rule), the paths, the runs with their weights'
fingerprints and tile specs, and the segmentation settings. The same settings guard `--resume`
(`parts.PartStore`), so parts and report describe one run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

REPORT_SUFFIX = ".report.json"
EXIT_FAILED_IMAGES = 3  # CLI exit status: the CSV is written, but some images failed (empty rows)


class RunStopped(Exception):
    """An error that is not about one image's data (a bug, models that do not fit the tiles):
    the run stops; the parts written so far stay for `--resume`."""


@dataclass
class Summary:
    """What a run did; also written as `OUT.report.json`. Counted image by image (`count`)."""

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

    def count(self, result, prepared) -> None:
        """Add one finished image: a `combine.ImageResult` and its `reading.Prepared`."""
        if result.note:
            self.errors.append({"id": result.record["id"], "error": result.note, "failed": result.failed})
        self.cells += prepared.n_cells
        self.detections += result.detections
        for stage, seconds in prepared.seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.processed += 1


def run_settings(sample, runs, image_runs, config, segmentation) -> dict:
    """What decides the results (a resumed run must match it; batching and threads do not).

    sample: `[(ID, width, height), ...]`; runs / image_runs: `runs.RunDir`s; config: PredictConfig;
    segmentation: the `SegmentationSpec` used (`reading.segmentation_to_use`).
    """
    from infer_gpu.runs import describe

    ids = "\n".join(f"{i},{w},{h}" for i, w, h in sample)
    return {
        "models": [describe(r) for r in runs],
        "image_models": [describe(r) for r in image_runs],
        "rule": dataclasses.asdict(config.rule),
        "tta": config.tta,
        "segmentation": segmentation_settings(config, segmentation),
        "sample_sha1": hashlib.sha1(ids.encode()).hexdigest(),
    }


def segmentation_settings(config, segmentation) -> dict:
    """How cells are segmented: the `SegmentationSpec` used (backend, working size, model files'
    fingerprints, options), with the model files' paths."""
    return {**segmentation.to_dict(), "nuclei_model": config.nuclei_model, "cell_model": config.cell_model}


def write_report(summary: Summary, *, config, settings: dict, inputs: dict) -> dict:
    """Write `OUT.report.json`: the summary, then `options` (the PredictConfig), `inputs`
    (images, sample submission), and the settings (`models` / `image_models` with their
    weights' fingerprints and specs, `segmentation`, `sample_sha1`). Returns what was written."""
    from common import storage

    report = {**dataclasses.asdict(summary), "options": config.to_dict(), "inputs": dict(inputs),
              **{k: v for k, v in settings.items() if k not in ("rule", "tta")}}  # both are in options
    storage.write_text(summary.out + REPORT_SUFFIX, json.dumps(report, indent=2, default=str) + "\n")
    return report


def read_report(out: str) -> dict:
    """The report of the run that wrote `out` (the submission CSV)."""
    from common import storage

    return json.loads(storage.read_text(out + REPORT_SUFFIX))
