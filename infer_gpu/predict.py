"""`python -m infer_gpu predict`: the command line (test images + trained run directories ->
submission.csv). Its options are `infer_gpu.config.PredictConfig`'s and `combine.CombineRule`'s
fields (the paths included, as in the other stages), with `--preset`; the work is
`infer_gpu.engine.predict`."""
from __future__ import annotations

import argparse
import sys

from common import config as cfglib
from common.config import positive_int

HELP = "Predict every cell of every test image: segment, score, combine, write submission.csv."

EPILOG = """\
combine rule, per cell and class (module infer_gpu.combine):
  1. c = mean probability over the --model runs and TTA transforms; i = the same over the
     --image-model runs (one whole-image tile). A bag run (--model whose preprocess.json has
     bag N > 0) scores the image's cells in bags of N (id order; the last bag filled up by
     repeating its cells): its cell head joins c, its image head (max over the bags) joins i.
     --image-from-cells: m = the image's highest c per class (its best cell); i = m without
     image runs, else sqrt(i * m).
  2. s = c**a * i**(1-a), a = --cell-weight (0.5 = geometric mean, which ranks each class as
     the product c*i does); only cell runs: s = c; only image runs: every cell gets s = i.
  3. Negative: s_neg = max(s_neg, prod over the other 18 classes of (1 - s_k)).
  4. s *= --border-weight for cells touching the border, *= --no-nucleus-weight for cells
     without a nucleus.
  5. every (cell, class) with s >= --min-score becomes a detection (mAP rewards recall).

Every ID of the sample submission (or of --labels, with its files' size; 0 x 0 when no file
of a failed ID gives one) is written once with its width and height; an image with
no cells gets an empty PredictionString. An image that fails (a missing, corrupt or wrongly
sized file; a read that still fails after the retries of transient I/O errors, see
HPA_IO_TRIES / HPA_IO_BACKOFF in README; memory running out) is reported on stderr and in
OUT.report.json, gets an empty row, and the run goes on. Any other error (a bug, models that
do not fit the tiles) stops the run with its traceback. Results are kept per image in
OUT.parts/ until the final CSV is written (atomically), so --resume after a kill continues
and gives the same file as an uninterrupted run; --resume also tries every failed image
again (OUT.parts/ is kept while some image failed).

--cells PATH: one row per cell of every image that did not fail (module common.cell_table):
ID, width, height, cell (its id in the label map), y0 x0 y1 x1 (box, full-resolution px),
area, touches_border, has_nucleus, c_00..c_18 / i_00..i_18 / s_00..s_18 (per class the rule's
c, i and s; null where a kind is absent, e.g. i without image runs unless --image-from-cells),
mask (the submission's string). Parquet (provenance - runs with their weights' fingerprints,
segmentation, rule, failed IDs - in its metadata), or CSV (the same, PATH.meta.json). Written
from OUT.parts/ with the CSV; the detections of OUT are its rows' classes with s >= --min-score.

--engine beam: the same work and outputs as an Apache Beam pipeline (module infer_gpu.beam_engine):
DirectRunner with --workers processes on this machine (threads of this process with
--direct_running_mode multi_threading), or e.g. --runner DataflowRunner --project P
--region R --temp_location gs://... with GPU workers (gs:// images, runs and --out; the exact
command in docs/predict.md, "Predict on Beam and Dataflow"). Parts are the same, so a run
killed under one engine can be finished by the other with --resume.

exit status:
  0  OUT written, every image done
  1  the run stopped on an error that is not an image's data (traceback on stderr)
  2  bad arguments or inputs (nothing predicted), or --resume refused
  3  OUT written with every ID, but some images failed (empty rows; listed in
     OUT.report.json): fix the files, or wait out the outage, and rerun with --resume
"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's layout; shows a default only where there is a value to show."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or action.required:
            return action.help
        return super()._get_help_string(action)


def _unit(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _tta(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(f"must be 1-8 (dihedral transforms of the tile), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    import dataclasses

    from infer_gpu.combine import CombineRule
    from infer_gpu.config import BACKENDS, DEVICES, ENGINES, PATH_FIELDS, PRESETS, PredictConfig

    parser.formatter_class = _Formatter  # keep the rule's layout, and show defaults
    parser.epilog = EPILOG
    base = PRESETS["default"]
    others = tuple(f.name for f in dataclasses.fields(PredictConfig) if f.name not in PATH_FIELDS)
    cfglib.add_arguments(  # the paths first, as fields of the config (help: their comments)
        parser, PredictConfig, defaults=base, skip=others, required=("images", "sample_submission", "out"),
        exclusive=(("sample_submission", "labels"),), flags={"models": "--model", "image_models": "--image-model"},
        metavars={"labels": "CSV", "models": "RUN_DIR", "image_models": "RUN_DIR", "cells": "PATH"})
    parser.add_argument("--preset", default="default", choices=tuple(PRESETS),
                        help="the base options (infer_gpu.config.PRESETS; smoke: seconds on a CPU); "
                             "the options below change it")
    cfglib.add_arguments(
        parser, PredictConfig, defaults=base, skip=("rule", "seg_options", "beam_args", *PATH_FIELDS),
        types={"work_size": positive_int, "tta": _tta, "batch_size": positive_int, "limit": positive_int,
               "max_pending": positive_int},
        choices={"backend": BACKENDS, "device": DEVICES, "engine": ENGINES}, metavars={"overlays": "DIR", "limit": "N"},
        false_flags={"progress": "--no-progress"})
    rule = parser.add_argument_group("combine rule (see below)")
    cfglib.add_arguments(rule, CombineRule, defaults=base.rule,
                         types={f: _unit for f in ("cell_weight", "border_weight", "no_nucleus_weight", "min_score")})
    cfglib.add_set_argument(parser, "PredictConfig")  # e.g. --set rule.min_score=0.02


def config_from_args(args):
    """The PredictConfig the command line asks for: the preset, the options given, then
    --set KEY=VALUE (rule.FIELD for the combine rule's)."""
    import dataclasses

    from infer_gpu.combine import CombineRule
    from infer_gpu.config import PRESETS, PredictConfig

    if getattr(args, "workers", 0) < 0:
        args.workers = 0  # as ever: a negative count of readers means inline
    base = cfglib.preset(PRESETS, args.preset)
    base = dataclasses.replace(base, rule=cfglib.from_args(CombineRule, args, base=base.rule))
    config = cfglib.from_args(PredictConfig, args, base=base, sets=getattr(args, "set", ()))
    extra = tuple(getattr(args, "beam_args", None) or ())
    if extra and config.engine != "beam":
        raise ValueError(f"unrecognized arguments: {' '.join(extra)} (Beam's pipeline options need --engine beam)")
    return dataclasses.replace(config, beam_args=extra) if extra else config


def run(args) -> int:
    from infer_gpu.engine import predict
    from infer_gpu.parts import ResumeError
    from infer_gpu.report import EXIT_FAILED_IMAGES

    try:
        config = config_from_args(args)  # the paths included: PredictConfig checks them
        config.require_models()
        summary = predict(config)
    except (FileNotFoundError, ValueError, ResumeError, RuntimeError, PermissionError, ImportError) as err:
        print(f"predict: {err}", file=sys.stderr)
        return 2
    s = summary
    retried = f"; {s.retried} tried again after failing" if s.retried else ""
    print(f"device {s.device}; {s.processed} images this run ({s.resumed} from an earlier run{retried}) in "
          f"{s.wall_seconds:.1f} s, {s.images_per_second:.2f} images/s; {s.cells} cells, "
          f"{s.detections} detections, {len(s.errors)} image(s) with errors")
    if s.errors:
        print(f"errors listed in {s.out}.report.json", file=sys.stderr)
    if not s.complete:
        print(f"stopped before the end (--limit); {s.out} not written yet: rerun with --resume")
        return 0
    print(f"wrote {s.out}" + (f" and {config.cells}" if config.cells else ""))
    if s.failed:
        every = "every image" if s.failed == s.total else f"{s.failed} of {s.total} images"
        print(f"predict: {every} failed and got an empty row (see {s.out}.report.json); "
              f"rerun with --resume to try them again (exit status {EXIT_FAILED_IMAGES})", file=sys.stderr)
        return EXIT_FAILED_IMAGES
    return 0
