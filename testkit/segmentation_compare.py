"""Compare two label maps cell by cell: IoU matrix and matches at an IoU threshold."""
from __future__ import annotations

import numpy as np


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`(Ka, Kb)` IoU of every label of `a` (rows, ids 1..Ka) with every label of `b` (columns).

    One pass over the pixels (a joint histogram), so it costs O(H*W + Ka*Kb).
    """
    a = np.asarray(a).ravel().astype(np.int64)
    b = np.asarray(b).ravel().astype(np.int64)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in size: {a.size} vs {b.size} pixels")
    na, nb = int(a.max(initial=0)) + 1, int(b.max(initial=0)) + 1
    inter = np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb).astype(np.float64)
    area_a, area_b = inter.sum(1), inter.sum(0)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    iou = iou[1:, 1:]
    # Ids absent from a map (gaps in numbering) are dropped.
    return iou[area_a[1:] > 0][:, area_b[1:] > 0]


def match(truth: np.ndarray, pred: np.ndarray, threshold: float = 0.6) -> dict:
    """Match predicted cells to true cells at IoU >= `threshold` (>= 0.5 makes matches unique).

    Returns `{"true": Kt, "pred": Kp, "matched": M, "matched_fraction": M / Kt (1.0 if Kt = 0),
    "mean_iou": mean IoU of the matched pairs (nan if none), "best_iou": (Kt,) best IoU per
    true cell}`.
    """
    iou = iou_matrix(truth, pred)
    kt, kp = iou.shape
    best = iou.max(axis=1) if kp else np.zeros(kt)
    ok = best >= threshold
    return {
        "true": kt,
        "pred": kp,
        "matched": int(ok.sum()),
        "matched_fraction": float(ok.mean()) if kt else 1.0,
        "mean_iou": float(best[ok].mean()) if ok.any() else float("nan"),
        "best_iou": best,
    }
