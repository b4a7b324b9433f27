"""The competition score: Open Images Challenge style instance-segmentation mAP at mask IoU 0.6.

A re-implementation of the rules of tensorflow/models `research/object_detection`
(`OpenImagesInstanceSegmentationChallengeEvaluator` -> `ObjectDetectionEvaluation` ->
`per_image_evaluation.PerImageEvaluation` with masks -> `metrics.compute_precision_recall` and
`metrics.compute_average_precision`), with no group-of and no difficult instances:

1. Ground truth: every truth mask counts once for its class (`num_gt_instances`); a cell
   with several labels is one instance per label. The classes "verified" for an image are the
   classes of its truth masks plus any image-level labels given (`image_labels`).
2. Detections of a class not verified for their image are ignored (neither TP nor FP), and so
   are all detections on an image absent from the truth (the OID challenge rule). A detection
   whose mask is empty is dropped too: the reference gives it the box [0, 0, 0, 0], and
   `PerImageEvaluation._remove_invalid_boxes` removes every box with ymin >= ymax or
   xmin >= xmax before matching.
3. Images are visited in sorted ImageID order (the reference's `groupby('ImageID')`), whatever
   the order of the submission's rows; within an image, detections keep their order in the
   PredictionString (one CSV row each in the reference's input, kept in order by groupby).
   Tied confidences therefore end up exactly where the reference puts them: every sort below
   is numpy's default `argsort` applied to the same array, in the same order, as there.
4. Per image and class: detections ordered by `np.argsort(scores)[::-1]` (the reference's
   sort: descending, ties in numpy's default unstable order), at most 10000 kept; the mask IoU
   matrix in float32 as `np_mask_ops.iou`; each detection, in that order, looks only at the
   ground truth with the largest IoU (`argmax`, first on ties): a TP if that IoU >= 0.6 and
   that ground truth is not matched yet, else a FP (a second detection on a matched cell is
   a FP even if another cell overlaps it enough).
5. Per class: the per-image scores and TP flags concatenated in image order, sorted again
   by `np.argsort(scores)[::-1]`; precision = cumTP / (cumTP + cumFP), recall = cumTP / num_gt;
   precision made non-increasing from the right, AP = sum over recall steps of
   (recall step) * precision. A class with ground truth but no detection has AP 0; a class
   with no ground truth has no AP and is left out of the mean.
6. mAP = mean of the per-class APs that exist.

Mask IoUs come from pycocotools' RLE `iou` (bounding-box pre-check, run-length
intersection; no full frames), turned back into exact pixel counts and divided in float32.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from common import masks
from common.labels import CLASS_NAMES, NUM_CLASSES
from common.submission import ImageRow, SubmissionError, read_submission

IOU_THRESHOLD = 0.6
MAX_DETECTIONS_PER_CLASS = 10000  # the reference's nms_max_output_boxes (NMS itself is off)
_EPSILON = np.float32(1e-7)  # np_mask_ops.EPSILON


@dataclass
class Result:
    """Per-class AP (None: no ground truth, excluded from the mean), the mAP and counts."""

    per_class_ap: dict[int, float | None]
    mAP: float
    iou_threshold: float
    num_gt: dict[int, int] = field(default_factory=dict)
    num_detections: dict[int, int] = field(default_factory=dict)
    num_tp: dict[int, int] = field(default_factory=dict)
    num_images: int = 0
    ignored_detections: int = 0
    empty_detections: int = 0

    def lines(self) -> list[str]:
        """Human-readable report: one line per class, then `mAP 0.xxxx` as the last line."""
        out = [f"{'class':<48} {'AP':>7} {'gt':>6} {'det':>7} {'tp':>6}"]
        for c in range(NUM_CLASSES):
            ap = self.per_class_ap.get(c)
            name = f"{c:2d} {CLASS_NAMES[c]}"
            ap_s = "-" if ap is None else f"{ap:.4f}"
            out.append(
                f"{name:<48} {ap_s:>7} {self.num_gt.get(c, 0):>6} "
                f"{self.num_detections.get(c, 0):>7} {self.num_tp.get(c, 0):>6}"
            )
        out.append(
            f"images {self.num_images}; classes with ground truth "
            f"{sum(ap is not None for ap in self.per_class_ap.values())}; "
            f"IoU threshold {self.iou_threshold}; ignored detections "
            f"{self.ignored_detections} (class not in the image's truth); dropped empty "
            f"masks {self.empty_detections}"
        )
        out.append(f"mAP {self.mAP:.4f}")
        return out


# ---------------------------------------------------------------------- reference arithmetic
def precision_recall(scores: np.ndarray, tp: np.ndarray, num_gt: float):
    """`metrics.compute_precision_recall`: sorted by `argsort(scores)[::-1]`; float arrays."""
    order = np.argsort(scores)[::-1]
    tp = np.asarray(tp, dtype=float)[order]
    fp = (tp <= 0).astype(float)
    cum_tp = np.cumsum(tp)
    cum_fp = np.cumsum(fp)
    precision = cum_tp.astype(float) / (cum_tp + cum_fp)
    recall = cum_tp.astype(float) / num_gt
    return precision, recall


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """`metrics.compute_average_precision` (VOC style): 0.0 for no detections."""
    if precision.size == 0:
        return 0.0
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    # Non-increasing from the right: the same values as the reference's backward loop.
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.where(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def mask_iou(det_rles: list[dict], gt_rles: list[dict]) -> np.ndarray:
    """[D, G] float32 IoU of pycocotools RLEs, computed as `np_mask_ops.iou` would on pixels."""
    from pycocotools import mask as coco_mask

    if not det_rles or not gt_rles:
        return np.zeros((len(det_rles), len(gt_rles)), dtype=np.float32)
    iou64 = np.asarray(coco_mask.iou(det_rles, gt_rles, [0] * len(gt_rles)), dtype=np.float64)
    iou64 = iou64.reshape(len(det_rles), len(gt_rles))
    det_area = coco_mask.area(det_rles).astype(np.float64)[:, None]
    gt_area = coco_mask.area(gt_rles).astype(np.float64)[None, :]
    # pycocotools returns i/u in double; i = iou * (a + b) / (1 + iou) recovers the exact
    # pixel count (|error| << 0.5 for any frame below 2**26 pixels).
    inter = np.rint(iou64 * (det_area + gt_area) / (1.0 + iou64))
    inter32 = inter.astype(np.float32)
    union32 = det_area.astype(np.float32) + gt_area.astype(np.float32) - inter32
    return inter32 / np.maximum(union32, _EPSILON)


def match_image_class(scores: np.ndarray, det_rles: list[dict], gt_rles: list[dict],
                      iou_threshold: float = IOU_THRESHOLD):
    """TP/FP for the detections of one class on one image (`_compute_tp_fp_for_single_class`).

    Returns (scores in evaluation order, bool TP flags) after the reference's sort and cap.
    """
    scores = np.asarray(scores, dtype=float)
    keep = np.flatnonzero(scores > -10.0)  # the reference's NMS score filter (a no-op in [0, 1])
    scores = scores[keep]
    det_rles = [det_rles[i] for i in keep]
    if scores.size == 0:
        return np.array([], dtype=float), np.array([], dtype=bool)
    order = np.argsort(scores)[::-1][:MAX_DETECTIONS_PER_CLASS]
    scores = scores[order]
    tp = np.zeros(scores.size, dtype=bool)
    if not gt_rles:
        return scores, tp
    iou = mask_iou([det_rles[i] for i in order], gt_rles)
    best = np.argmax(iou, axis=1)
    best_iou = iou[np.arange(scores.size), best]
    matched = np.zeros(len(gt_rles), dtype=bool)
    for i in range(scores.size):
        g = best[i]
        if best_iou[i] >= iou_threshold and not matched[g]:
            tp[i] = True
            matched[g] = True
    return scores, tp


# ------------------------------------------------------------------------------ evaluation
class _RleCache:
    """Mask string -> checked pycocotools RLE, per image (multi-label cells repeat masks)."""

    def __init__(self, row: ImageRow, source: str):
        self.row, self.source, self.cache = row, source, {}

    def get(self, k: int, mask: str, allow_empty: bool) -> dict | None:
        """The RLE, or None for an empty mask where `allow_empty` (a detection to drop)."""
        if mask not in self.cache:
            where = f"{self.source} row {self.row.row} (ID {self.row.image_id}) prediction {k + 1}"
            try:
                rle = masks.coco_rle(mask, self.row.height, self.row.width)
            except masks.MaskCodecError as err:
                raise SubmissionError(f"{where}: {err}") from None
            from pycocotools import mask as coco_mask

            if int(coco_mask.area(rle)) == 0:
                if not allow_empty:
                    raise SubmissionError(f"{where}: truth mask is empty (no pixel set)")
                rle = None
            self.cache[mask] = rle
        return self.cache[mask]


def _index(rows: Sequence[ImageRow], source: str) -> dict[str, ImageRow]:
    out: dict[str, ImageRow] = {}
    for r in rows:
        if r.image_id in out:
            raise SubmissionError(
                f"{source} row {r.row}: ID {r.image_id} appears again (first at row {out[r.image_id].row})"
            )
        out[r.image_id] = r
    return out


def evaluate(
    truth_rows: Sequence[ImageRow],
    submission_rows: Sequence[ImageRow],
    iou_threshold: float = IOU_THRESHOLD,
    image_labels: Mapping[str, Iterable[int]] | None = None,
    all_labels_verified: bool = False,
    progress: bool = False,
    truth_name: str = "truth",
    submission_name: str = "submission",
) -> Result:
    """Score a submission against cell-level truth (both `ImageRow`s, submission format).

    iou_threshold: mask IoU for a true positive (0.6 in the competition).
    image_labels: extra verified image-level classes per image ID (the reference's
      `groundtruth_image_classes`): detections of those classes count even where no truth
      mask has them (as FPs).
    all_labels_verified: treat all 19 classes as verified on every truth image, so no
      detection on a truth image is ignored (stricter than the reference's default).
    truth_name, submission_name: how error messages name the two inputs (their paths).
    Raises SubmissionError for duplicate IDs, a size that differs between the files, or a
    mask that does not decode to its image's size (or an empty truth mask).
    """
    truth = _index(truth_rows, truth_name)
    subm = _index(submission_rows, submission_name)
    num_gt = np.zeros(NUM_CLASSES, dtype=float)
    gt_by_image: dict[str, dict[int, list[dict]]] = {}
    for r in truth.values():
        rles = _RleCache(r, truth_name)
        per_class: dict[int, list[dict]] = defaultdict(list)
        for k, p in enumerate(r.predictions):
            per_class[p.label].append(rles.get(k, p.mask, allow_empty=False))
        for c, lst in per_class.items():
            num_gt[c] += len(lst)
        gt_by_image[r.image_id] = per_class

    scores_per_class: list[list[np.ndarray]] = [[] for _ in range(NUM_CLASSES)]
    tp_per_class: list[list[np.ndarray]] = [[] for _ in range(NUM_CLASSES)]
    ignored = empty = 0
    # sorted ImageID order, as the reference's groupby: tied scores depend on it
    items = [subm[i] for i in sorted(subm)]
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="evaluate", unit="image")
    for r in items:
        t = truth.get(r.image_id)
        if t is None:
            ignored += len(r.predictions)
            continue
        if (r.width, r.height) != (t.width, t.height):
            raise SubmissionError(
                f"{submission_name} row {r.row} (ID {r.image_id}): size {r.width}x{r.height} "
                f"(WxH), {truth_name} says {t.width}x{t.height}"
            )
        gts = gt_by_image[r.image_id]
        if all_labels_verified:
            verified = set(range(NUM_CLASSES))
        else:
            verified = set(gts) | {int(c) for c in (image_labels or {}).get(r.image_id, ())}
        rles = _RleCache(r, submission_name)
        by_class: dict[int, tuple[list[float], list[dict]]] = {}
        for k, p in enumerate(r.predictions):
            if p.label not in verified:
                ignored += 1
                continue
            rle = rles.get(k, p.mask, allow_empty=True)
            if rle is None:  # the reference's box [0,0,0,0]: removed as invalid
                empty += 1
                continue
            s, m = by_class.setdefault(p.label, ([], []))
            s.append(p.confidence)
            m.append(rle)
        for c in sorted(by_class):
            s, m = by_class[c]
            scores, tp = match_image_class(np.asarray(s, dtype=float), m, gts.get(c, []), iou_threshold)
            if scores.size:
                scores_per_class[c].append(scores)
                tp_per_class[c].append(tp.astype(float))

    per_class_ap: dict[int, float | None] = {}
    aps = np.full(NUM_CLASSES, np.nan)
    n_det, n_tp = {}, {}
    for c in range(NUM_CLASSES):
        scores = np.concatenate(scores_per_class[c]) if scores_per_class[c] else np.array([], dtype=float)
        tp = np.concatenate(tp_per_class[c]) if tp_per_class[c] else np.array([], dtype=float)
        n_det[c], n_tp[c] = int(scores.size), int(tp.sum())
        if num_gt[c] == 0:
            per_class_ap[c] = None
            continue
        aps[c] = average_precision(*precision_recall(scores, tp, num_gt[c]))
        per_class_ap[c] = float(aps[c])
    mean = float(np.nanmean(aps)) if np.isfinite(aps).any() else math.nan
    return Result(
        per_class_ap=per_class_ap,
        mAP=mean,
        iou_threshold=iou_threshold,
        num_gt={c: int(num_gt[c]) for c in range(NUM_CLASSES)},
        num_detections=n_det,
        num_tp=n_tp,
        num_images=len(truth),
        ignored_detections=ignored,
        empty_detections=empty,
    )


def evaluate_files(truth_path: str, submission_path: str, **kwargs) -> Result:
    """`evaluate` on two CSV files (local or `gs://`); keyword arguments as `evaluate`."""
    kwargs.setdefault("truth_name", truth_path)
    kwargs.setdefault("submission_name", submission_path)
    return evaluate(read_submission(truth_path), read_submission(submission_path), **kwargs)
