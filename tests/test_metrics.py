"""The competition metric on hand-computed cases and against a literal port of the reference.

The port (`_reference_map`) follows tensorflow/models research/object_detection line by line
on full-frame uint8 masks (np_mask_ops IoU, per_image_evaluation's greedy matching, metrics'
precision/recall and VOC AP, OpenImagesChallengeEvaluator's verified-class filter), so the
fast RLE path of common.metrics is checked against it on random cases with tied scores.
"""
from __future__ import annotations

import numpy as np
import pytest

from common import masks, metrics
from common.labels import NUM_CLASSES
from common.submission import ImageRow, Prediction, SubmissionError, write_submission

H, W = 40, 50


def box(y0, x0, y1, x1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def row(image_id, triples, h=H, w=W):
    """ImageRow from (label, confidence, bool mask) triples."""
    return ImageRow(image_id, w, h, [Prediction(lab, conf, masks.encode(m)) for lab, conf, m in triples])


# Four separate 10x10 cells (100 px each).
CELLS = [box(0, 0, 10, 10), box(0, 20, 10, 30), box(20, 0, 30, 10), box(20, 20, 30, 30)]


def test_perfect_submission_scores_one():
    truth = [
        row("a", [(0, 1, CELLS[0]), (16, 1, CELLS[0]), (3, 1, CELLS[1])]),  # cell 0 has two labels
        row("b", [(16, 1, CELLS[2]), (0, 1, CELLS[3])]),
    ]
    result = metrics.evaluate(truth, truth)
    assert result.mAP == 1.0
    assert {c: ap for c, ap in result.per_class_ap.items() if ap is not None} == {0: 1.0, 3: 1.0, 16: 1.0}
    assert result.num_gt[0] == 2 and result.num_tp[16] == 2


def test_known_ap_from_a_tp_fp_order():
    """Class 0, three truth cells; by score: TP, FP, TP, FP; the third cell is never found.

    precision 1, 1/2, 2/3, 2/4; recall 1/3, 1/3, 2/3, 2/3. Made non-increasing from the right:
    1, 2/3, 2/3, 1/2. AP = 1/3 * 1 + 1/3 * 2/3 = 5/9 = 0.5556.
    """
    truth = [row("a", [(0, 1, CELLS[0]), (0, 1, CELLS[1]), (0, 1, CELLS[2])])]
    sub = [row("a", [
        (0, 0.9, CELLS[0]),            # TP
        (0, 0.8, box(32, 32, 40, 40)),  # FP: nowhere near a cell
        (0, 0.7, CELLS[1]),            # TP
        (0, 0.6, CELLS[3]),            # FP: a cell with no class-0 truth
    ])]
    result = metrics.evaluate(truth, sub)
    assert result.per_class_ap[0] == pytest.approx(5 / 9, abs=1e-12)
    assert result.mAP == pytest.approx(5 / 9, abs=1e-12)
    assert (result.num_detections[0], result.num_tp[0], result.num_gt[0]) == (4, 2, 3)


def test_second_detection_of_a_matched_cell_is_a_false_positive():
    """Truth A, B. Detections: A 0.9 (TP), A again 0.8 (FP), B 0.7 (TP).

    precision 1, 1/2, 2/3; recall 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    """
    truth = [row("a", [(5, 1, CELLS[0]), (5, 1, CELLS[1])])]
    sub = [row("a", [(5, 0.9, CELLS[0]), (5, 0.8, CELLS[0]), (5, 0.7, CELLS[1])])]
    result = metrics.evaluate(truth, sub)
    assert result.per_class_ap[5] == pytest.approx(5 / 6, abs=1e-12)
    assert result.num_tp[5] == 2


@pytest.mark.parametrize("pixels, is_tp", [(59, False), (60, True), (61, True)])
def test_iou_threshold_059_060_061(pixels, is_tp):
    """A detection made of `pixels` of a 100 px truth cell has IoU pixels/100."""
    det = np.zeros((H, W), bool)
    det.flat[np.flatnonzero(CELLS[0])[:pixels]] = True
    truth = [row("a", [(2, 1, CELLS[0])])]
    result = metrics.evaluate(truth, [row("a", [(2, 0.5, det)])])
    assert result.per_class_ap[2] == (1.0 if is_tp else 0.0)
    assert result.num_tp[2] == int(is_tp)


def test_classes_without_truth_are_excluded_and_missing_classes_score_zero():
    truth = [row("a", [(0, 1, CELLS[0])]), row("b", [(1, 1, CELLS[1])])]
    # Class 0 perfect; class 1 (has truth) never predicted; class 7 (no truth anywhere) predicted.
    sub = [row("a", [(0, 0.9, CELLS[0]), (7, 0.9, CELLS[0])]), row("b", [(7, 0.9, CELLS[1])])]
    result = metrics.evaluate(truth, sub)
    assert result.per_class_ap[0] == 1.0
    assert result.per_class_ap[1] == 0.0
    assert result.per_class_ap[7] is None
    assert all(result.per_class_ap[c] is None for c in range(NUM_CLASSES) if c not in (0, 1))
    assert result.mAP == 0.5  # mean over classes 0 and 1 only
    assert result.ignored_detections == 2  # class 7 is not verified on either image


def test_unverified_classes_are_ignored_unless_verified():
    """Class 3 has truth only on image b. A class-3 detection on image a (score 0.9) is
    ignored by the reference rule (AP 1); counted as a FP ranked first when class 3 is
    verified on a: precision 0, 1/2; recall 0, 1 -> AP = 1 * 1/2 = 0.5."""
    truth = [row("a", [(0, 1, CELLS[0])]), row("b", [(3, 1, CELLS[1])])]
    sub = [row("a", [(0, 0.8, CELLS[0]), (3, 0.9, CELLS[0])]), row("b", [(3, 0.5, CELLS[1])])]
    assert metrics.evaluate(truth, sub).per_class_ap[3] == 1.0
    assert metrics.evaluate(truth, sub, all_labels_verified=True).per_class_ap[3] == 0.5
    assert metrics.evaluate(truth, sub, image_labels={"a": [3]}).per_class_ap[3] == 0.5


def test_images_missing_from_submission_and_extra_images():
    truth = [row("a", [(0, 1, CELLS[0])]), row("b", [(0, 1, CELLS[1])])]
    sub = [row("a", [(0, 0.9, CELLS[0])]), row("zzz", [(0, 0.9, CELLS[0])])]
    result = metrics.evaluate(truth, sub)
    assert result.per_class_ap[0] == 0.5  # b's cell is never found; zzz is not in the truth
    assert result.ignored_detections == 1


def test_bad_inputs_are_errors_naming_the_row():
    truth = [row("a", [(0, 1, CELLS[0])])]
    with pytest.raises(SubmissionError, match="truth row 0 .*ID a.* prediction 1: truth mask is empty"):
        metrics.evaluate([row("a", [(0, 1, np.zeros((H, W), bool))])], truth)
    wrong_size = [row("a", [(0, 0.5, box(0, 0, 5, 5, h=20, w=20))], h=20, w=20)]
    with pytest.raises(SubmissionError, match="size 20x20"):
        metrics.evaluate(truth, wrong_size)
    bad_mask = [ImageRow("a", W, H, [Prediction(0, 0.5, masks.encode(box(0, 0, 5, 5, h=20, w=20)))], row=3)]
    with pytest.raises(SubmissionError, match="submission row 3 .*prediction 1.*frame"):
        metrics.evaluate(truth, bad_mask)
    with pytest.raises(SubmissionError, match="appears again"):
        metrics.evaluate(truth, truth + truth)


def test_evaluate_files(tmp_path):
    truth = [row("a", [(0, 1, CELLS[0]), (4, 1, CELLS[1])])]
    sub = [row("a", [(0, 0.3, CELLS[0]), (4, 0.2, CELLS[2])])]
    write_submission(str(tmp_path / "t.csv"), truth)
    write_submission(str(tmp_path / "s.csv"), sub)
    result = metrics.evaluate_files(str(tmp_path / "t.csv"), str(tmp_path / "s.csv"))
    assert result.per_class_ap[0] == 1.0 and result.per_class_ap[4] == 0.0
    assert result.lines()[-1] == "mAP 0.5000"


# --------------------------------------------------------------------- port of the reference
def _ref_iou(m1: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """np_mask_ops.iou on uint8 [N,H,W] and [M,H,W]."""
    inter = np.zeros((m1.shape[0], m2.shape[0]), dtype=np.float32)
    for i in range(m1.shape[0]):
        for j in range(m2.shape[0]):
            inter[i, j] = np.sum(np.minimum(m1[i], m2[j]), dtype=np.float32)
    a1 = np.sum(m1, axis=(1, 2), dtype=np.float32)
    a2 = np.sum(m2, axis=(1, 2), dtype=np.float32)
    union = np.expand_dims(a1, 1) + np.expand_dims(a2, 0) - inter
    return inter / np.maximum(union, 1e-7)


def _ref_ap(scores, tp, num_gt):
    """metrics.compute_precision_recall + compute_average_precision, loop form."""
    order = np.argsort(scores)[::-1]
    tpl = tp[order]
    fpl = (tpl <= 0).astype(float)
    ctp, cfp = np.cumsum(tpl), np.cumsum(fpl)
    precision = ctp.astype(float) / (ctp + cfp)
    recall = ctp.astype(float) / num_gt
    if not precision.size:
        return 0.0
    recall = np.concatenate([[0], recall, [1]])
    precision = np.concatenate([[0], precision, [0]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = np.maximum(precision[i], precision[i + 1])
    idx = np.where(recall[1:] != recall[:-1])[0] + 1
    return np.sum((recall[idx] - recall[idx - 1]) * precision[idx])


def _reference_map(truth, sub, thr=0.6):
    num_gt = np.zeros(NUM_CLASSES)
    gt = {}
    for image_id, items in truth.items():
        labels = np.array([lab for lab, _, _ in items], dtype=int)
        frames = np.array([m for _, _, m in items], dtype=np.uint8).reshape(-1, H, W)
        gt[image_id] = (labels, frames)
        for c in range(NUM_CLASSES):
            num_gt[c] += np.sum(labels == c)
    scores_pc = [[] for _ in range(NUM_CLASSES)]
    tp_pc = [[] for _ in range(NUM_CLASSES)]
    for image_id, items in sub.items():
        gl, gm = gt.get(image_id, (np.array([], int), np.zeros((0, H, W), np.uint8)))
        allowed = np.unique(gl)
        dl = np.array([lab for lab, _, _ in items], dtype=int)
        ds = np.array([s for _, s, _ in items], dtype=float)
        dm = np.array([m for _, _, m in items], dtype=np.uint8).reshape(-1, H, W)
        keep = np.where(np.isin(dl, allowed))
        dl, ds, dm = dl[keep], ds[keep], dm[keep]
        for c in range(NUM_CLASSES):
            s, m = ds[dl == c], dm[dl == c]
            g = gm[gl == c]
            if s.size == 0:
                continue
            order = np.argsort(s)[::-1]  # sort_by_field, DESCEND
            s, m = s[order], m[order]
            tp = np.zeros(s.size, dtype=bool)
            if g.shape[0]:
                iou = _ref_iou(m, g)
                best = np.argmax(iou, axis=1)
                detected = np.zeros(g.shape[0], dtype=bool)
                for i in range(s.size):
                    if iou[i, best[i]] >= thr and not detected[best[i]]:
                        tp[i] = True
                        detected[best[i]] = True
            scores_pc[c].append(s)
            tp_pc[c].append(tp.astype(float))
    aps = np.full(NUM_CLASSES, np.nan)
    for c in range(NUM_CLASSES):
        if num_gt[c] == 0:
            continue
        s = np.concatenate(scores_pc[c]) if scores_pc[c] else np.array([], float)
        t = np.concatenate(tp_pc[c]) if tp_pc[c] else np.array([], float)
        aps[c] = _ref_ap(s, t, num_gt[c])
    return aps, np.nanmean(aps)


def _random_case(rng):
    """Truth: 2-5 random rectangles per image, 1-2 of classes {0, 1, 2} each; detections:
    jittered copies of truth cells (some hits, some misses), duplicates, stray boxes, with
    scores from a small set so that ties are common."""
    truth, sub = {}, {}
    for k in range(int(rng.integers(1, 4))):
        t_items, s_items = [], []
        for _ in range(int(rng.integers(2, 6))):
            y0, x0 = int(rng.integers(0, H - 6)), int(rng.integers(0, W - 6))
            cell = box(y0, x0, min(H, y0 + int(rng.integers(4, 14))), min(W, x0 + int(rng.integers(4, 14))))
            labels = rng.choice(3, size=int(rng.integers(1, 3)), replace=False)
            t_items += [(int(c), 1.0, cell) for c in labels]
            for _ in range(int(rng.integers(0, 3))):
                det = np.roll(cell, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
                det &= rng.random(det.shape) > rng.choice([0.0, 0.2, 0.5])
                s_items.append((int(rng.integers(0, 4)), float(rng.choice([0.2, 0.5, 0.5, 0.9])), det))
        if rng.random() < 0.5:
            s_items.append((int(rng.integers(0, 3)), 0.5, box(0, 0, 3, 3)))
        truth[f"img{k}"] = t_items
        sub[f"img{k}"] = s_items
    if rng.random() < 0.3:
        sub["extra"] = [(0, 0.9, box(0, 0, 5, 5))]
    return truth, sub


def test_matches_a_literal_port_of_the_reference_on_random_cases():
    rng = np.random.default_rng(2021)
    compared = 0
    for case in range(150):
        truth, sub = _random_case(rng)
        ref_aps, ref_map = _reference_map(truth, sub)
        result = metrics.evaluate(
            [row(i, items) for i, items in truth.items()],
            [row(i, items) for i, items in sub.items()],
        )
        for c in range(NUM_CLASSES):
            if np.isnan(ref_aps[c]):
                assert result.per_class_ap[c] is None, (case, c)
            else:
                assert result.per_class_ap[c] == ref_aps[c], (case, c)
                compared += 1
        assert result.mAP == ref_map, case
    assert compared > 200
