"""`python -m infer_gpu predict`: test images + trained run directories -> submission.csv."""
from __future__ import annotations

import argparse
import os
import sys

from common.config import positive_int

HELP = "Predict every cell of every test image: segment, score, combine, write submission.csv."

EPILOG = """\
combine rule, per cell and class (module infer_gpu.scoring):
  1. c = mean probability over the --model runs and TTA transforms; i = the same over the
     --image-model runs (one whole-image tile).
  2. s = c**a * i**(1-a), a = --cell-weight (0.5 = geometric mean); only cell runs: s = c;
     only image runs: every cell gets s = i.
  3. Negative: s_neg = max(s_neg, prod over the other 18 classes of (1 - s_k)).
  4. s *= --border-weight for cells touching the border, *= --no-nucleus-weight for cells
     without a nucleus.
  5. every (cell, class) with s >= --min-score becomes a detection (mAP rewards recall).

Every ID of the sample submission is written once with its width and height; an image with
no cells gets an empty PredictionString. An image that fails (a missing, corrupt or wrongly
sized file; a read that still fails after the retries of transient I/O errors, see
HPA_IO_TRIES / HPA_IO_BACKOFF in README; memory running out) is reported on stderr and in
OUT.report.json, gets an empty row, and the run goes on. Any other error (a bug, models that
do not fit the tiles) stops the run with its traceback. Results are kept per image in
OUT.parts/ until the final CSV is written (atomically), so --resume after a kill continues
and gives the same file as an uninterrupted run; --resume also tries every failed image
again (OUT.parts/ is kept while some image failed).

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
    parser.formatter_class = _Formatter  # keep the rule's layout, and show defaults
    parser.epilog = EPILOG
    parser.add_argument("--images", required=True,
                        help="folder or gs:// prefix holding {ID}_{red,green,blue,yellow}.png (or .tif/.tif.gz/.jpg)")
    parser.add_argument("--sample-submission", required=True,
                        help="the competition's sample_submission.csv: which IDs to predict, with their sizes")
    parser.add_argument("--model", action="append", default=[], metavar="RUN_DIR",
                        help="a trained cell-mode run directory (model.keras + preprocess.json); "
                             "repeat to average several models")
    parser.add_argument("--image-model", action="append", default=[], metavar="RUN_DIR",
                        help="an image-mode run directory whose whole-image score is combined with "
                             "the cell scores (see the rule below); repeatable")
    parser.add_argument("--out", required=True, help="the submission CSV to write (local or gs://)")
    parser.add_argument("--backend", default="default", choices=("default", "hpa"),
                        help="cell segmentation: the weight-free default, or the HPA U-Nets (needs "
                             "PyTorch, hpacellseg and its model files: see common/segmentation/hpa.py)")
    parser.add_argument("--work-size", type=positive_int, default=512,
                        help="segmentation: long side in px of the labelling's working resolution")
    parser.add_argument("--nuclei-model", default=None, help="hpa backend: hpacellseg nucleus model file (.pth)")
    parser.add_argument("--cell-model", default=None, help="hpa backend: hpacellseg 3-channel cell model file (.pth)")
    parser.add_argument("--trust-model-files", action="store_true",
                        help="hpa backend: allow loading the .pth files, which are pickled PyTorch "
                             "modules (loading runs code from them): only for files you trust")
    parser.add_argument("--tta", type=_tta, default=1,
                        help="test-time augmentation: average over the first N of the 8 flips and "
                             "rotations of each tile (1 = none)")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="tiles per model call; batches span the cells of several images")
    parser.add_argument("--cell-weight", type=_unit, default=0.5,
                        help="a in c**a * i**(1-a) when both cell and image models are given")
    parser.add_argument("--border-weight", type=_unit, default=0.8,
                        help="confidence factor for cells touching the image border")
    parser.add_argument("--no-nucleus-weight", type=_unit, default=0.5,
                        help="confidence factor for cells without a nucleus")
    parser.add_argument("--min-score", type=_unit, default=0.01,
                        help="lowest confidence written as a detection")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="parallel readers (decode, segment, tiles, mask encoding) running "
                             "ahead of the model; 0 = inline")
    parser.add_argument("--processes", action="store_true",
                        help="run the readers as processes instead of threads (more CPU parallelism, "
                             "more memory; not with a GPU segmentation backend)")
    parser.add_argument("--device", default="auto", choices=("auto", "gpu", "cpu"),
                        help="where TensorFlow scores: auto = a GPU when one is listed, else the CPU; "
                             "gpu fails without one")
    parser.add_argument("--overlays", metavar="DIR",
                        help="also write DIR/{ID}.png: the composite with cell outlines and each cell's top labels")
    parser.add_argument("--resume", action="store_true",
                        help="continue a killed run: skip the images already done in OUT.parts/ and "
                             "try the failed ones again (refused if they were made with other "
                             "models or options)")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="process at most N more images, then stop without the final CSV "
                             "(continue with --resume): for trials and for work in slices")
    parser.add_argument("--keep-parts", action="store_true",
                        help="keep OUT.parts/ after the final CSV is written (without it, it is deleted)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from infer_gpu.parts import ResumeError
    from infer_gpu.pipeline import EXIT_FAILED_IMAGES, PredictOptions, predict
    from infer_gpu.scoring import CombineRule

    if not args.model and not args.image_model:
        print("predict: give at least one --model or --image-model RUN_DIR", file=sys.stderr)
        return 2
    options = PredictOptions(
        rule=CombineRule(cell_weight=args.cell_weight, border_weight=args.border_weight,
                         no_nucleus_weight=args.no_nucleus_weight, min_score=args.min_score),
        tta=args.tta, batch_size=args.batch_size, backend=args.backend,
        work_size=args.work_size, nuclei_model=args.nuclei_model, cell_model=args.cell_model,
        trust_model_files=args.trust_model_files,
        workers=max(0, args.workers), processes=args.processes, device=args.device,
        overlays=args.overlays, resume=args.resume, limit=args.limit or 0,
        keep_parts=args.keep_parts, progress=not args.no_progress,
    )
    try:
        summary = predict(args.images, args.sample_submission, args.model, args.out,
                          image_models=args.image_model, options=options)
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
    print(f"wrote {s.out}")
    if s.failed:
        every = "every image" if s.failed == s.total else f"{s.failed} of {s.total} images"
        print(f"predict: {every} failed and got an empty row (see {s.out}.report.json); "
              f"rerun with --resume to try them again (exit status {EXIT_FAILED_IMAGES})", file=sys.stderr)
        return EXIT_FAILED_IMAGES
    return 0
