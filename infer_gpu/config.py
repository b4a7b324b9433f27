"""PredictConfig: everything `predict` takes, its paths included; presets are instances.

As with the builder's and the trainer's configs, the paths (images, sample_submission or
labels, models, image_models, out, cells) are fields: a config without any of them is a
preset (its values are checked); with any of them, `__post_init__` requires the inputs.

`python -m infer_gpu predict` derives its options from these fields (help = the field's
comment) and from `combine.CombineRule`'s; `--preset NAME` picks the base that the given
options change. A finished run writes the config into `OUT.report.json`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from infer_gpu.combine import CombineRule

BACKENDS = ("default", "hpa")
DEVICES = ("auto", "gpu", "cpu")
ENGINES = ("local", "beam")


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class PredictConfig:
    """predict's options; see `python -m infer_gpu predict --help`."""

    # cell segmentation: the weight-free default, or the HPA U-Nets (needs PyTorch, hpacellseg and its model files: see common/segmentation/hpa.py); not given = the runs' training data's (recorded in their preprocess.json), else default
    backend: str | None = None
    work_size: int | None = None  # segmentation: long side in px of the labelling's working resolution; not given = the runs' training data's, else 512
    nuclei_model: str | None = None  # hpa backend: hpacellseg nucleus model file (.pth)
    cell_model: str | None = None  # hpa backend: hpacellseg 3-channel cell model file (.pth)
    # predict even when its segmentation differs from the one the runs were trained on (else exit 2 naming each difference). Runs trained on precomputed masks (builder --masks) cannot be matched: predict warns and uses the options given, or the default
    allow_other_segmentation: bool = False
    trust_model_files: bool = False  # hpa backend: allow loading the .pth files, which are pickled PyTorch modules (loading runs code from them): only for files you trust
    tta: int = 1  # test-time augmentation: average over the first N of the 8 flips and rotations of each tile (1 = none)
    batch_size: int = 64  # tiles per model call; batches span the cells of several images
    rule: CombineRule = CombineRule()  # the combine rule's parameters (--cell-weight, --border-weight, --no-nucleus-weight, --min-score, --image-from-cells)
    workers: int = field(default_factory=_default_workers)  # parallel readers (decode, segment, tiles, mask encoding) running ahead of the model; 0 = inline
    tf_threads: int = 0  # TensorFlow's intra-op threads when scoring on the CPU (then one inter-op thread), e.g. cores - workers; 0 = TensorFlow's default (one per core)
    processes: bool = False  # run the readers as processes instead of threads (more CPU parallelism, more memory; not with a GPU segmentation backend)
    device: str = "auto"  # where TensorFlow scores: auto = a GPU when one is listed, else the CPU; gpu fails without one
    overlays: str | None = None  # also write DIR/{ID}.png: the composite with cell outlines and each cell's top labels
    resume: bool = False  # continue a killed run: skip the images already done in OUT.parts/ and try the failed ones again (refused if they were made with other models or options)
    limit: int = 0  # process at most N more images, then stop without the final CSV (continue with --resume): for trials and for work in slices; 0 = all
    keep_parts: bool = False  # keep OUT.parts/ after the final CSV is written (without it, it is deleted)
    progress: bool = True  # a progress bar on stderr
    prefetch: int = 0  # images read ahead of the model; 0 = workers + 2
    max_pending: int = 32  # images the batcher may hold before it scores a partial batch
    seg_options: tuple = ()  # more ((key, value), ...) for common.segmentation.segment (library use)
    # local: this machine (reader threads ahead of one scorer); beam: the same work as an Apache Beam pipeline (infer_gpu.beam_engine): DirectRunner with --workers processes unless --runner names another; flags predict does not know go to Beam's pipeline options
    engine: str = "local"
    beam_args: tuple = ()  # Beam pipeline options (--runner DataflowRunner --project ...): the CLI's unknown flags with --engine beam
    # --- paths (empty in a preset; see __post_init__); the comments are --help, as above ---

    images: str = ""  # folder or gs:// prefix holding {ID}_{red,green,blue,yellow}.png (or .tif/.tif.gz/.jpg)
    sample_submission: str = ""  # the competition's sample_submission.csv: which IDs to predict, with their sizes
    # instead of --sample-submission: a label list (ID,Label CSV such as train.csv; other columns
    # ignored): its IDs in file order, sizes from the image files; an ID whose files are missing or
    # unreadable fails like any image (empty row)
    labels: str = ""
    # a trained cell-mode run directory (model.keras + preprocess.json), a bag run included (see the
    # rule below); repeat to average several models
    models: tuple[str, ...] = ()
    # an image-mode run directory whose whole-image score is combined with the cell scores (see the
    # rule below); repeatable
    image_models: tuple[str, ...] = ()
    out: str = ""  # the submission CSV to write (local or gs://)
    # also write the per-cell table (see below): PATH.parquet, or PATH.csv with its provenance in
    # PATH.csv.meta.json
    cells: str = ""

    def __post_init__(self):
        object.__setattr__(self, "beam_args", tuple(str(a) for a in (self.beam_args or ())))
        for name in PATH_FIELDS:  # os.PathLike -> str, lists -> tuples of str
            value = getattr(self, name)
            if name in ("models", "image_models"):
                value = tuple(os.fspath(v) for v in (value or ()))
            else:
                value = os.fspath(value) if value else ""
            object.__setattr__(self, name, value)
        if self.has_paths():
            self.check_paths()
        checks = {
            "backend": self.backend is None or self.backend in BACKENDS,
            "work_size": self.work_size is None or self.work_size >= 1,
            "tta": 1 <= self.tta <= 8,
            "batch_size": self.batch_size >= 1,
            "workers": self.workers >= 0,
            "tf_threads": self.tf_threads >= 0,
            "device": self.device in DEVICES,
            "limit": self.limit >= 0,
            "prefetch": self.prefetch >= 0,
            "max_pending": self.max_pending >= 1,
            "engine": self.engine in ENGINES,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("PredictConfig: bad " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))

    def has_paths(self) -> bool:
        """Whether any path is set: a run's config, not a preset."""
        return any(getattr(self, name) for name in PATH_FIELDS)

    def check_paths(self) -> None:
        """A ValueError naming the flag unless the inputs a run needs are there (a preset has
        none: `predict` refuses it with the first message)."""
        if not self.images:
            raise ValueError("an image folder (--images) is needed")
        if bool(self.sample_submission) == bool(self.labels):
            raise ValueError("predict needs exactly one of --sample-submission and --labels")
        if not self.out:
            raise ValueError("a submission CSV to write (--out) is needed")
        if self.cells:
            from common.cell_table import format_of

            format_of(self.cells)  # an unsupported extension is refused before any work
            if self.cells == self.out:
                raise ValueError(f"--cells {self.cells} is also --out: give the cell table its own path")

    def require_models(self, loaded: bool = False) -> None:
        """A ValueError unless the config names a run (`loaded`: runs were passed already
        loaded, see `engine.predict`)."""
        if not (self.models or self.image_models or loaded):
            raise ValueError("give at least one --model or --image-model RUN_DIR")

    def inputs(self) -> dict:
        """The inputs as OUT.report.json records them: images, sample_submission (None with
        labels), labels (only when given)."""
        return {"images": self.images, "sample_submission": self.sample_submission or None,
                **({"labels": self.labels} if self.labels else {})}

    def to_dict(self) -> dict:
        """JSON-ready (segmentation objects passed in `seg_options` are written as their repr)."""
        out = dataclasses.asdict(self)
        out["seg_options"] = [[k, v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)]
                              for k, v in self.seg_options]
        return out


PATH_FIELDS = ("images", "sample_submission", "labels", "models", "image_models", "out", "cells")

PRESETS = {
    "default": PredictConfig(),
    # seconds on a CPU: tests, CI and a first look at a new machine
    "smoke": PredictConfig(batch_size=16, workers=1, device="cpu", progress=False),
}
