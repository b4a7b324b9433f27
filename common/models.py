"""The one model factory, keyed by backbone name, shared by training and inference.

A model takes `float32 [B, N, N, 4]` tiles in [0, 255] (channels R, G, B, Y; see
`common.preprocess.to_model_input`) and returns sigmoid probabilities `float32 [B, 19]`.
Backbones are Keras 3's own EfficientNet B0-B7 and EfficientNetV2 B0-B3/S/M/L with a
4-channel stem; the input normalisation is ImageNet's (the yellow channel gets the mean of R, G,
B) unless the caller gives another. What only training does (ImageNet weights carried from 3
to 4 channels, BatchNorm momentum, the prior head bias, the float32 export) is in
`train_tpu.model`; inference only loads a trained model (`load_model`).

Only built-in Keras layers are used, so `keras.saving.load_model` needs no custom objects;
`load_model` here adds run folders and `gs://` paths.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np

from common.labels import NUM_CLASSES

MODEL_FILE = "model.keras"  # a trained model's file name inside a run folder (`common.run_folder`)
NUM_CHANNELS = 4  # R, G, B, Y: the names are common.images.CHANNELS
# ImageNet statistics on the [0, 1] scale (the values Keras' EfficientNets normalise with).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_KERAS_DROP_CONNECT = 0.2  # keras.applications' default stochastic-depth rate
FEATURES_LAYER = "avg_pool"  # pooled backbone features, [B, C]
HEAD_DROPOUT_LAYER = "head_dropout"
LOGITS_LAYER = "logits"  # Dense, [B, num_classes]
OUTPUT_LAYER = "probs"
HEAD_LAYERS = (FEATURES_LAYER, HEAD_DROPOUT_LAYER, LOGITS_LAYER, OUTPUT_LAYER)  # after the backbone


@dataclass(frozen=True)
class Backbone:
    name: str  # our name, e.g. "efficientnet_b0"
    keras_fn: str  # the keras.applications function
    family: str  # "v1" or "v2" (keras.applications' EfficientNets), or "test" (TEST_BACKBONE)
    default_size: int  # the resolution the backbone was designed for, px

    @property
    def is_test(self) -> bool:
        """A test backbone (TEST_BACKBONE): built by this module, random init only."""
        return self.family == "test"


BACKBONES: dict[str, Backbone] = {
    **{
        f"efficientnet_b{i}": Backbone(f"efficientnet_b{i}", f"EfficientNetB{i}", "v1", s)
        for i, s in enumerate((224, 240, 260, 300, 380, 456, 528, 600))
    },
    **{
        f"efficientnetv2_{k}": Backbone(f"efficientnetv2_{k}", f"EfficientNetV2{k.upper()}", "v2", s)
        for k, s in (("b0", 224), ("b1", 240), ("b2", 260), ("b3", 300),
                     ("s", 384), ("m", 480), ("l", 480))
    },
}


# A few-layer CNN for tests and CI of the pipelines around the model (resume, data order,
# export, sharding, strategies), as timm's `test_*` models: built and traced in about a second
# where an EfficientNet takes most of a minute on a CPU. Random init only; not for real training.
TEST_BACKBONE = "test_cnn"
BACKBONES[TEST_BACKBONE] = Backbone(TEST_BACKBONE, "", "test", 32)


def get_backbone(name: str) -> Backbone:
    """The registry entry for `name`; a clear error listing the known names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


def _keras():
    import keras

    return keras


def _default_affine() -> tuple[np.ndarray, np.ndarray]:
    """ImageNet normalisation as `a * x + b` per channel on [0, 255] input, yellow = RGB mean."""
    mean = np.array(IMAGENET_MEAN + (float(np.mean(IMAGENET_MEAN)),), np.float64)
    std = np.array(IMAGENET_STD + (float(np.mean(IMAGENET_STD)),), np.float64)
    return 1.0 / (255.0 * std), -mean / std


def _backbone_fn(bb: Backbone):
    return getattr(_keras().applications, bb.keras_fn)


def _test_backbone(inputs):
    """TEST_BACKBONE's layers on `inputs` (normalised): a stride-2 stem and two stride-2 blocks
    with BatchNorm, as an EfficientNet's layers are named where the trainer looks for them."""
    keras = _keras()
    x = inputs
    for i, filters in enumerate((8, 16, 32)):
        name = "stem" if i == 0 else f"block{i}"
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
        x = keras.layers.Activation("swish", name=f"{name}_activation")(x)
    return x


def _build_backbone(bb: Backbone, inputs, size: int, drop_connect_rate: float, channels: int,
                    weights=None, keep_preprocessing: bool = True):
    """A headless keras.applications model built on `inputs` (flattened into the caller's graph)."""
    kwargs = dict(include_top=False, weights=weights, input_tensor=inputs,
                  input_shape=(size, size, channels), pooling=None)
    if bb.family == "v2":
        kwargs["include_preprocessing"] = keep_preprocessing
    with warnings.catch_warnings():
        # "This model usually expects 1 or 3 input channels": 4 is what we want.
        warnings.filterwarnings("ignore", message=".*input channels.*")
        model = _backbone_fn(bb)(**kwargs)
    _scale_stochastic_depth(model, drop_connect_rate)
    return model


def _scale_stochastic_depth(model, drop_connect_rate: float) -> None:
    """Set the stochastic-depth rate: the named EfficientNetBx functions fix it at Keras'
    default (0.2, growing linearly with depth); scale every block's rate to the one asked for."""
    keras = _keras()
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dropout) and layer.noise_shape is not None:
            layer.rate = layer.rate * drop_connect_rate / _KERAS_DROP_CONNECT


def _set_v1_normalization(model, a: np.ndarray, b: np.ndarray) -> None:
    """Make V1's built-in `Rescaling(1/255) -> Normalization` compute `a * x + b`."""
    keras = _keras()
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.Normalization)]
    if len(norms) != 1:
        raise ValueError(f"expected one Normalization layer in {model.name}, found {len(norms)}")
    # (x / 255 - m) / sqrt(v) = a x + b  <=>  sqrt(v) = 1 / (255 a), m = -b sqrt(v)
    sqrt_v = 1.0 / (255.0 * a)
    norms[0].adapt_mean.assign((-b * sqrt_v).astype(np.float32))
    norms[0].adapt_variance.assign((sqrt_v ** 2).astype(np.float32))
    norms[0].finalize_state()


@contextlib.contextmanager
def dtype_policy_scope(dtype_policy: str | None):
    """Keras' global dtype policy set to `dtype_policy` (None: left as it is) while building,
    and restored afterwards, whatever happens. The one home of this rule (the model builders of
    both modes and the float32 export use it)."""
    keras = _keras()
    previous = keras.config.dtype_policy()
    try:
        if dtype_policy:
            keras.config.set_dtype_policy(dtype_policy)
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_model(backbone: str = "efficientnet_b0", size: int = 224, num_classes: int = NUM_CLASSES,
                dropout: float = 0.2, drop_connect_rate: float = 0.2,
                dtype_policy: str | None = None, input_affine=None):
    """A randomly initialised 4-channel multi-label classifier: `float32 [B, size, size, 4]` in
    [0, 255] -> sigmoid `float32 [B, num_classes]`.

    dtype_policy: e.g. "mixed_bfloat16"; None keeps the global policy (which is left as it was).
    The final sigmoid always runs in float32. Call inside `strategy.scope()` when training
    distributed. input_affine: `(a, b)`, each `(4,)`: the per-channel `a * x + b` applied to
    [0, 255] input before the stem; None = ImageNet normalisation.
    """
    keras = _keras()
    bb = get_backbone(backbone)
    if input_affine is None:
        a, b = _default_affine()
    else:
        a, b = (np.asarray(v, np.float64) for v in input_affine)
    with dtype_policy_scope(dtype_policy):
        inputs = keras.Input(shape=(size, size, NUM_CHANNELS), dtype="float32", name="image")
        if bb.family in ("v2", "test"):
            x = keras.layers.Normalization(axis=-1, mean=(-b / a).tolist(),
                                           variance=(1.0 / a ** 2).tolist(), name="input_norm")(inputs)
            if bb.is_test:
                features = _test_backbone(x)
            else:
                features = _build_backbone(bb, x, size, drop_connect_rate, NUM_CHANNELS,
                                           keep_preprocessing=False).output
        else:
            base = _build_backbone(bb, inputs, size, drop_connect_rate, NUM_CHANNELS)
            _set_v1_normalization(base, a, b)
            features = base.output
        x = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(features)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=HEAD_DROPOUT_LAYER)(x)
        x = keras.layers.Dense(num_classes, name=LOGITS_LAYER)(x)
        # float32 so that mixed precision never rounds the probabilities
        outputs = keras.layers.Activation("sigmoid", dtype="float32", name=OUTPUT_LAYER)(x)
        return keras.Model(inputs, outputs, name=f"{backbone}_{size}")


def model_path(path: str) -> str:
    """A run folder -> its `model.keras`; a `.keras` file is returned as is."""
    from common import storage

    return path if str(path).endswith(".keras") else storage.join(path, MODEL_FILE)


def load_model(path: str, compile: bool = False, data: bytes | None = None):
    """Load a `.keras` model file (or a run folder holding one), local or `gs://`.

    compile=True also restores the optimizer state (for resuming training).
    data: the file's bytes when the caller has already read them (no second read or download).
    """
    from common import storage

    path = model_path(path)
    if data is None and storage.is_gcs(path):
        data = storage.read_bytes(path)
    if data is not None:
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(path))
            with open(local, "wb") as fh:
                fh.write(data)
            return _load_keras_file(local, path, compile)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file")
    return _load_keras_file(path, path, compile)


def _load_keras_file(local: str, name: str, compile: bool):
    from common import mil

    mil.register()  # bag models hold its pooling layer
    try:
        return _keras().saving.load_model(local, compile=compile)
    except Exception as err:  # Keras raises many types; name the file either way
        raise ValueError(f"{name}: cannot load the model: {err}") from err


def save_model(model, path: str) -> None:
    """Save a `.keras` file (with the optimizer state when compiled) to a local path or a
    `gs://` URL, atomically: written to a temporary file first, then moved or uploaded."""
    from common import storage

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "export.keras")  # Keras wants the suffix
        model.save(local)
        storage.put_file(local, path)
