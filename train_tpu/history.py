"""Validation metrics (per-class ROC AUC and AP, their macro means) and the run's history:
`history.csv` (one row per epoch) and `history.png` (loss, macro AUC, per-class AUC)."""
from __future__ import annotations

import csv
import io
import math

import numpy as np
from scipy.stats import rankdata

from common import storage
from common.labels import CLASS_NAMES, NUM_CLASSES

HISTORY_CSV = "history.csv"
HISTORY_PNG = "history.png"


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve of one class (ties count half); NaN without both classes.

    y_true: `(N,)` 0/1; y_score: `(N,)` float.
    """
    y_true = np.asarray(y_true) > 0.5
    pos, neg = int(y_true.sum()), int((~y_true).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(y_score, np.float64))  # average ranks for ties
    return float((ranks[y_true].sum() - pos * (pos + 1) / 2) / (pos * neg))


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Average precision of one class, sum over thresholds of (R_k - R_k-1) * P_k (the
    step-wise, uninterpolated definition); NaN without positives."""
    y_true = np.asarray(y_true) > 0.5
    pos = int(y_true.sum())
    if pos == 0:
        return float("nan")
    order = np.argsort(-np.asarray(y_score, np.float64), kind="stable")
    scores, hits = np.asarray(y_score)[order], y_true[order]
    # one threshold per distinct score: take the cumulative counts at the last of each run
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tp = np.cumsum(hits)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def validation_metrics(labels: np.ndarray, probs: np.ndarray, prefix: str = "val_") -> dict:
    """`labels`, `probs`: `(N, 19)`. Returns loss (BCE), macro AUC and mAP over the classes that
    have both positives and negatives (AUC) or positives (AP), and every class's AUC and AP."""
    labels = np.asarray(labels, np.float64)
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    out = {f"{prefix}loss": float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))}
    aucs = [roc_auc(labels[:, c], probs[:, c]) for c in range(NUM_CLASSES)]
    aps = [average_precision(labels[:, c], probs[:, c]) for c in range(NUM_CLASSES)]
    out[f"{prefix}macro_auc"] = _nanmean(aucs)
    out[f"{prefix}map"] = _nanmean(aps)
    for c in range(NUM_CLASSES):
        out[f"{prefix}auc_{c:02d}"] = aucs[c]
    for c in range(NUM_CLASSES):
        out[f"{prefix}ap_{c:02d}"] = aps[c]
    return out


def target_auc(targets: np.ndarray, probs: np.ndarray, prefix: str = "val_target_") -> dict:
    """`{prefix}macro_auc`: the macro AUC of `probs (N, 19)` against soft `targets (N, 19)`
    rounded at 0.5 (a cell counts as showing a class when its target is >= 0.5)."""
    hard = (np.asarray(targets, np.float64) >= 0.5).astype(np.float64)
    aucs = [roc_auc(hard[:, c], np.asarray(probs)[:, c]) for c in range(NUM_CLASSES)]
    return {f"{prefix}macro_auc": _nanmean(aucs)}


# ------------------------------------------------------------------ history.csv
def read_history(path: str) -> list[dict]:
    """Rows of `history.csv` as dicts of floats (epoch as int); [] when absent."""
    if not storage.exists(path):
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(storage.read_text(path))):
        rows.append({k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()})
    return rows


def write_history(path: str, rows: list[dict]) -> None:
    """Rewrite `history.csv` whole (atomic), columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", restval="nan")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(float(v)) if k != "epoch" else int(v)) for k, v in row.items()})
    storage.write_text(path, buf.getvalue())


def plot_history(rows: list[dict], path: str, title: str = "") -> None:
    """`history.png`: loss, macro AUC / mAP, and each class's validation AUC per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for key in ("loss", "val_loss"):
        if key in rows[0]:
            axes[0].plot(epochs, [r.get(key, np.nan) for r in rows], marker="o", label=key)
    axes[0].set(title="loss", xlabel="epoch")
    for key in ("auc", "val_auc", "val_macro_auc", "val_map"):
        if key in rows[0]:
            axes[1].plot(epochs, [r.get(key, np.nan) for r in rows], marker="o", label=key)
    axes[1].set(title="macro AUC / mAP", xlabel="epoch", ylim=(0, 1.02))
    cmap = plt.get_cmap("tab20")
    for c in range(NUM_CLASSES):
        key = f"val_auc_{c:02d}"
        values = [r.get(key, np.nan) for r in rows]
        if key in rows[0] and not all(math.isnan(v) for v in values):
            axes[2].plot(epochs, values, color=cmap(c), label=f"{c} {CLASS_NAMES[c]}"[:28])
    axes[2].set(title="validation AUC per class", xlabel="epoch", ylim=(0, 1.02))
    for ax in axes[:2]:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[2].grid(alpha=0.3)
    if axes[2].lines:
        axes[2].legend(fontsize=6, ncol=2, loc="lower right")
    fig.suptitle(title or "training history")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())
