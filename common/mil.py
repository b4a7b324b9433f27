"""The bag (multiple-instance) model's shared parts: its input/output names and its one layer.

A bag model takes an image's cells as one example, `float32 [B, N, S, S, 4]` tiles in
[0, 255] plus a `float32 [B, N]` mask (1 = a real cell, 0 = padding), and returns

    cell  = sigmoid `float32 [B, N, 19]`: each cell's own labels (the cell head)
    image = sigmoid `float32 [B, 19]`: which classes the image holds (the image head),
            computed on the cells' pooled features, padding left out

One backbone embeds every cell: the bags are reshaped to one batch of B*N cells, embedded in a
single call (what a TPU runs best), and reshaped back. Training builds it (`train_tpu`); inference only loads it, which needs the
pooling layer below registered with Keras: `register()` does that (`common.models.load_model`
calls it). Importing this module imports no Keras, so the Keras backend can still be chosen.

Padding never changes a real cell's outputs or the image head: the backbone runs per cell in
inference mode, and `MaskedPooling` ignores masked cells. The data pipeline pads a bag by
repeating its real cells (not with zeros), so that in training mode the BatchNorm batch
statistics, which do see the padding, stay the statistics of real cells.
"""
from __future__ import annotations

import functools

CELLS = "cells"  # input: float32 [B, N, S, S, 4] in [0, 255]
MASK = "mask"  # input: float32 [B, N], 1 = real cell
CELL = "cell"  # output: float32 [B, N, 19]
IMAGE = "image"  # output: float32 [B, 19]
CELL_LOGITS = "cell_logits"  # the cell head's Dense layer (features -> 19 logits)
IMAGE_LOGITS = "image_logits"  # the image head's Dense layer (pooled features -> 19 logits)
POOLINGS = ("max", "lse", "attention")


@functools.lru_cache(maxsize=None)
def register():
    """Define the bag model's layers and register them with Keras (once); returns them by name."""
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="hpa_scc")
    class MaskedPooling(keras.layers.Layer):
        """`[features [B, N, C], mask [B, N]] -> [B, C]`, over the real cells only.

        mode "max": the per-feature maximum (red.ai's image head); "lse": log-sum-exp with
        sharpness `r`, `log(mean(exp(r x))) / r` (between the mean, r -> 0, and the max, r -> inf);
        "attention": gated attention (Ilse et al. 2018), a learned softmax weight per cell.
        A bag with no real cell pools to zeros.
        """

        def __init__(self, mode: str = "max", r: float = 5.0, attention_dim: int = 128, **kwargs):
            super().__init__(**kwargs)
            if mode not in POOLINGS:
                raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")
            self.mode, self.r, self.attention_dim = mode, float(r), int(attention_dim)

        def build(self, input_shape):
            channels = int(input_shape[0][-1])
            if self.mode == "attention":
                d = self.attention_dim
                self.v = self.add_weight(shape=(channels, d), initializer="glorot_uniform", name="v")
                self.u = self.add_weight(shape=(channels, d), initializer="glorot_uniform", name="u")
                self.w = self.add_weight(shape=(d, 1), initializer="glorot_uniform", name="w")

        def call(self, inputs):
            x, mask = inputs
            real = ops.cast(mask, "bool")  # [B, N]
            keep = ops.cast(ops.expand_dims(real, -1), x.dtype)  # [B, N, 1]
            any_real = ops.cast(ops.any(real, axis=1, keepdims=True), x.dtype)  # [B, 1]
            if self.mode == "max":
                low = ops.min(x, axis=1, keepdims=True)  # a value no real cell's maximum is below
                pooled = ops.max(ops.where(ops.expand_dims(real, -1), x, low), axis=1)
            elif self.mode == "lse":
                # a softmax-weighted form of log(mean over real cells of exp(r x)) / r, stable
                z = ops.where(ops.expand_dims(real, -1), self.r * x, ops.cast(-1e4, x.dtype))
                count = ops.maximum(ops.sum(keep, axis=1), ops.cast(1.0, x.dtype))  # [B, 1]
                pooled = (ops.logsumexp(z, axis=1) - ops.log(count)) / self.r
            else:
                xf = ops.cast(x, "float32")
                gate = ops.tanh(ops.matmul(xf, ops.cast(self.v, "float32"))) * ops.sigmoid(
                    ops.matmul(xf, ops.cast(self.u, "float32")))
                score = ops.squeeze(ops.matmul(gate, ops.cast(self.w, "float32")), -1)  # [B, N]
                score = ops.where(real, score, ops.cast(-1e9, "float32"))
                weight = ops.softmax(score, axis=1) * ops.cast(real, "float32")
                pooled = ops.cast(ops.sum(xf * ops.expand_dims(weight, -1), axis=1), x.dtype)
            return pooled * any_real

        def compute_output_shape(self, input_shape):
            return (input_shape[0][0], input_shape[0][-1])

        def get_config(self):
            return {**super().get_config(), "mode": self.mode, "r": self.r,
                    "attention_dim": self.attention_dim}

    @keras.saving.register_keras_serializable(package="hpa_scc")
    class CellsOfBags(keras.layers.Layer):
        """`[B, N, ...] -> [B*N, ...]`: every cell of every bag as one batch (one backbone call)."""

        def call(self, x):
            return ops.reshape(x, (-1,) + tuple(x.shape[2:]))

        def compute_output_shape(self, input_shape):
            n = None if input_shape[0] is None else input_shape[0] * input_shape[1]
            return (n,) + tuple(input_shape[2:])

    @keras.saving.register_keras_serializable(package="hpa_scc")
    class BagsOfCells(keras.layers.Layer):
        """`[B*N, C] -> [B, N, C]`, the inverse of `CellsOfBags` for per-cell features."""

        def __init__(self, bag: int, **kwargs):
            super().__init__(**kwargs)
            self.bag = int(bag)

        def call(self, x):
            return ops.reshape(x, (-1, self.bag) + tuple(x.shape[1:]))

        def compute_output_shape(self, input_shape):
            b = None if input_shape[0] is None else input_shape[0] // self.bag
            return (b, self.bag) + tuple(input_shape[1:])

        def get_config(self):
            return {**super().get_config(), "bag": self.bag}

    return {"MaskedPooling": MaskedPooling, "CellsOfBags": CellsOfBags, "BagsOfCells": BagsOfCells}


def MaskedPooling(*args, **kwargs):  # noqa: N802 - reads as the layer class it builds
    """`MaskedPooling(mode, r, attention_dim)`: the registered layer (see `register`)."""
    return register()["MaskedPooling"](*args, **kwargs)


def CellsOfBags(**kwargs):  # noqa: N802
    return register()["CellsOfBags"](**kwargs)


def BagsOfCells(bag: int, **kwargs):  # noqa: N802
    return register()["BagsOfCells"](bag, **kwargs)


def is_bag_model(model) -> bool:
    """True for a model with the bag inputs (`cells`, `mask`)."""
    names = {t.name.split(":")[0] for t in model.inputs}
    return CELLS in names and MASK in names


def bag_size(model) -> int:
    """N, the cells per bag a bag model was built for (its inputs are static-shaped)."""
    for t in model.inputs:
        if len(t.shape) == 5:
            return int(t.shape[1])
    raise ValueError(f"{model.name}: not a bag model (no [B, N, S, S, 4] input)")
