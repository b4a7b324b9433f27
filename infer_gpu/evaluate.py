"""`python -m infer_gpu evaluate`: the competition mAP of a submission against cell-level truth."""
from __future__ import annotations

import argparse
import sys

HELP = ("score a submission against a cell-level truth CSV: AP per class, then "
        "'mAP 0.xxxx' as the last line")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--truth", required=True,
                        help="truth CSV in the submission format (one mask per cell and label; "
                        "confidence ignored), e.g. the synthetic truth.csv; local path or gs://")
    parser.add_argument("--submission", required=True, help="submission CSV to score")
    parser.add_argument("--iou", type=float, default=0.6,
                        help="mask IoU a detection needs with an unmatched truth cell to be a "
                        "true positive (the competition uses 0.6)")
    parser.add_argument("--image-labels", default=None,
                        help="optional ID,Label CSV of verified image-level labels (as train.csv): "
                        "detections of these classes count even on images without a truth cell "
                        "of that class")
    parser.add_argument("--all-labels-verified", action="store_true",
                        help="count detections of every class on every truth image (stricter); by "
                        "default, as in the Open Images challenge metric, detections of a class "
                        "that the image's truth does not contain are ignored")
    parser.add_argument("--progress", action="store_true", help="show a progress bar over images")


def run(args: argparse.Namespace) -> int:
    import math

    from common import metrics
    from common.labels import LabelError, read_labels_csv
    from common.masks import MaskCodecError
    from common.submission import SubmissionError

    if not 0.0 < args.iou <= 1.0:
        print(f"error: --iou {args.iou} must be in (0, 1]", file=sys.stderr)
        return 2
    try:
        image_labels = dict(read_labels_csv(args.image_labels)) if args.image_labels else None
        result = metrics.evaluate_files(
            args.truth, args.submission, iou_threshold=args.iou, image_labels=image_labels,
            all_labels_verified=args.all_labels_verified, progress=args.progress,
        )
    except (SubmissionError, MaskCodecError, LabelError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if math.isnan(result.mAP):
        print(f"error: {args.truth} has no truth cells, so there is no class to average",
              file=sys.stderr)
        return 2
    print("\n".join(result.lines()))
    return 0
