"""The dual-head bag model (red.ai's recipe, 2nd place) and its masked losses; training only.

    cells [B, N, S, S, 4] --reshape--> [B*N, S, S, 4] --backbone + global average pool-->
      [B*N, C] --reshape--> features [B, N, C]
      features --dropout--> Dense --sigmoid--> cell  [B, N, 19]   (trained on inherited labels)
      [features, mask] --MaskedPooling--> [B, C] --dropout--> Dense --sigmoid--> image [B, 19]

Loss: BCE(image, image labels) + cell_weight * BCE(cell, the image's labels for every real
cell), the cell term averaged over real cells only. Shards built with --cell-labels give the
cell term each cell's soft targets instead (`masked_cell_bce` takes y in [0, 1]); the image
term keeps the image labels. The model itself is built by `train_tpu.model.build_bag_model`
(the one builder of both modes); the shared layer and the names live in `common.mil`, so
inference can load the model without this module.
"""
from __future__ import annotations

import keras
import numpy as np

from common import mil
from common import models
from common.labels import NUM_CLASSES

@keras.saving.register_keras_serializable(package="hpa_scc")
def masked_cell_bce(y_true, y_pred):
    """BCE over real cells only. `y_true [B, N, 19]` holds -1 in every class of a padding cell
    (the data pipeline writes it so), which leaves that cell out of the loss and its mean."""
    ops = keras.ops
    real = ops.cast(y_true[..., :1] >= 0, "float32")  # [B, N, 1]
    y = ops.clip(ops.cast(y_true, "float32"), 0.0, 1.0)
    p = ops.clip(ops.cast(y_pred, "float32"), 1e-7, 1.0 - 1e-7)
    bce = -(y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p))  # [B, N, 19]
    per_bag = ops.sum(bce * real, axis=(1, 2)) / ops.maximum(ops.sum(real, axis=(1, 2)) * y_true.shape[-1], 1.0)
    return per_bag  # [B]: Keras averages over the batch



def compile_args(cfg, image_loss) -> dict:
    """`model.compile` keywords for a bag model: the image loss, the masked cell loss weighted
    by `cfg.cell_weight`, and Keras' running AUC on the image head."""
    return {
        "loss": {mil.IMAGE: image_loss, mil.CELL: masked_cell_bce},
        "loss_weights": {mil.IMAGE: 1.0, mil.CELL: float(cfg.cell_weight)},
        "metrics": {mil.IMAGE: [keras.metrics.AUC(multi_label=True, num_labels=NUM_CLASSES, name="auc")]},
    }


def validation_metrics(labels: np.ndarray, probs: dict, masks: np.ndarray, targets=None) -> dict:
    """Both heads on the validation bags. `labels [K, 19]` image labels, `probs` the model's
    outputs for those K bags, `masks [K, N]`. The image head gets the usual `val_*` columns
    (loss, macro AUC, mAP, per class); the cell head, scored against the inherited labels of
    every real cell, `val_cell_loss`, `val_cell_macro_auc`, `val_cell_map`; with the cells'
    soft `targets [K, N, 19]` (cell labels) also `val_cell_target_macro_auc`, against the
    targets rounded at 0.5."""
    from train_tpu import history

    out = history.validation_metrics(labels, np.asarray(probs[mil.IMAGE], np.float32))
    real = np.asarray(masks) > 0
    cell_probs = np.asarray(probs[mil.CELL], np.float32)[real]  # [cells, 19]
    cell_labels = np.repeat(labels[:, None, :], real.shape[1], axis=1)[real]
    cells = history.validation_metrics(cell_labels, cell_probs, prefix="val_cell_")
    out.update({k: cells[k] for k in ("val_cell_loss", "val_cell_macro_auc", "val_cell_map")})
    if targets is not None:
        out.update(history.target_auc(np.asarray(targets)[real], cell_probs, prefix="val_cell_target_"))
    return out
