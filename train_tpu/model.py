"""What only training does to a model: ImageNet weights carried from 3 to 4 channels, the
BatchNorm momentum, the prior head bias, and the float32 export for inference; `build`, the one
builder of both modes (a tile model, or with `bag` N the dual-head bag model of
`train_tpu.bag_model`), and `export_float32`, the one export of both.

ImageNet weights (downloaded by Keras, or read from a local file for offline Kaggle runs) are
carried from 3 to 4 channels so that the 4-channel model computes exactly what the 3-channel one
computes on the RGB channels: the per-channel input normalisation is copied for R, G, B (the
yellow channel gets the mean of the three) and the stem kernel's yellow slice is zero, so the
yellow channel starts with no influence and training lets it in. The architecture itself is
`common.models.build_model`, which inference shares.
"""
from __future__ import annotations

import os

import numpy as np

from common import models
from common.labels import NUM_CLASSES
from common.models import IMAGENET_MEAN, IMAGENET_STD, Backbone


def _keras():
    import keras

    return keras


def _backbone_fn(bb: Backbone):
    return getattr(_keras().applications, bb.keras_fn)


def build_model(backbone: str = "efficientnet_b0", size: int = 224, num_classes: int = NUM_CLASSES,
                weights: str = "none", dropout: float = 0.2, drop_connect_rate: float = 0.2,
                dtype_policy: str | None = None, bn_momentum: float | None = None,
                head_bias=None):
    """`common.models.build_model` ready to train: `float32 [B, size, size, 4]` in [0, 255] ->
    sigmoid `float32 [B, num_classes]`.

    weights: "none" (random init, ImageNet input normalisation), "imagenet" (Keras downloads the
    3-channel weights) or a PATH to a 3-channel weights file (`.h5` / `.weights.h5` of the
    headless Keras model, e.g. Keras' own `efficientnetb0_notop.h5`, or a `.keras` model).
    dtype_policy: e.g. "mixed_bfloat16"; None keeps the global policy. The final sigmoid always
    runs in float32. Call inside `strategy.scope()` when training distributed.
    bn_momentum: the BatchNormalization moving-average momentum of every backbone layer; None
    keeps Keras' 0.99. With 0.99 the inference statistics trail the weights by ~100 steps, which
    ruins short from-scratch runs (their inference-mode loss can be several times the training
    loss); 0.9 follows within ~10 steps.
    head_bias: initial logit bias per class, e.g. `prior_logits(p)` for the training class
    frequencies p, so that the first steps start from the prior instead of 0.5 everywhere
    (the focal-loss paper's initialisation); None = zeros.
    """
    bb = models.get_backbone(backbone)
    weights = "none" if weights in (None, "", "none") else str(weights)
    if bb.is_test and weights != "none" and not is_run_source(weights):
        raise ValueError(f"--weights {weights}: {backbone} (a test backbone) has no ImageNet weights: "
                         "use 'none' or a run folder of it")
    src, affine, from_run = None, None, False
    if weights != "none":
        # the source model is built in float32, before build_model changes the policy
        src = _load_source(bb, weights, size)
        from_run = _channels(src) == models.NUM_CHANNELS  # a trained run of this project
        if from_run:
            affine = input_affine(src, size)
        else:
            a3, b3 = _fix_keras_imagenet_v1(src, bb, *input_affine(src, size))
            affine = (np.append(a3, a3.mean()), np.append(b3, b3.mean()))
    model = models.build_model(backbone, size, num_classes=num_classes, dropout=dropout,
                               drop_connect_rate=drop_connect_rate, dtype_policy=dtype_policy,
                               input_affine=affine)
    if from_run and copy_run_weights(src, model, weights):
        head_bias = None  # the run's trained head is a better start than the prior
    elif src is not None and not from_run:
        transfer_weights(src, model, bb)
    if bn_momentum is not None:
        set_bn_momentum(model, bn_momentum)
    if head_bias is not None:
        model.get_layer(models.LOGITS_LAYER).bias.assign(check_head_bias(head_bias, num_classes))
    return model


POOL_LAYER = "pool_cells"  # the MaskedPooling layer (its config holds the pooling)


def build_bag_model(backbone: str = "efficientnet_b0", size: int = 224, bag: int = 16,
                    num_classes: int = NUM_CLASSES, weights: str = "none", dropout: float = 0.2,
                    drop_connect_rate: float = 0.2, dtype_policy: str | None = None,
                    bn_momentum: float | None = None, head_bias=None, pooling: str = "max"):
    """Inputs `{cells: float32 [B, bag, size, size, 4], mask: float32 [B, bag]}`, outputs
    `{cell: [B, bag, 19], image: [B, 19]}` (float32 sigmoid). Arguments as
    `train_tpu.model.build_model`; `head_bias` starts both heads at the class prior. `weights`
    may name a trained run (a cell-tile run, or a bag run): the backbone starts as its
    backbone and both heads as its cell head."""

    if bag < 1:
        raise ValueError(f"bag must be >= 1, got {bag}")
    keras = _keras()
    from common import mil  # imports Keras: only once the backend is chosen

    single = build_model(backbone, size, num_classes=num_classes, weights=weights,
                                dropout=0.0, drop_connect_rate=drop_connect_rate,
                                dtype_policy=dtype_policy, bn_momentum=bn_momentum)
    embed = keras.Model(single.inputs[0], single.get_layer(models.FEATURES_LAYER).output,
                        name=f"{backbone}_cell_embedding")
    with models.dtype_policy_scope(dtype_policy):
        cells = keras.Input(shape=(bag, size, size, models.NUM_CHANNELS), dtype="float32", name=mil.CELLS)
        mask = keras.Input(shape=(bag,), dtype="float32", name=mil.MASK)
        flat = mil.CellsOfBags(name="cells_of_bags")(cells)  # [B*N, S, S, 4]: one backbone call
        feats = mil.BagsOfCells(bag, name="bags_of_cells")(embed(flat))  # [B, N, C]
        pooled = mil.MaskedPooling(pooling, name=POOL_LAYER)([feats, mask])
        if dropout > 0:
            feats = keras.layers.Dropout(dropout, name="cell_dropout")(feats)
            pooled = keras.layers.Dropout(dropout, name="image_dropout")(pooled)
        cell_dense = keras.layers.Dense(num_classes, name=mil.CELL_LOGITS)
        image_dense = keras.layers.Dense(num_classes, name=mil.IMAGE_LOGITS)
        cell_logits, image_logits = cell_dense(feats), image_dense(pooled)
        if is_run_source(weights):
            # started from a trained run: both heads start as its (cell) head, the image head
            # on the pooled features ("the image shows c where its most-c cell does")
            head = single.get_layer(models.LOGITS_LAYER).get_weights()
            cell_dense.set_weights(head)
            image_dense.set_weights(head)
        elif head_bias is not None:
            bias = check_head_bias(head_bias, num_classes)
            cell_dense.bias.assign(bias)
            image_dense.bias.assign(bias)
        outputs = {
            mil.CELL: keras.layers.Activation("sigmoid", dtype="float32", name=mil.CELL)(cell_logits),
            mil.IMAGE: keras.layers.Activation("sigmoid", dtype="float32", name=mil.IMAGE)(image_logits),
        }
        return keras.Model({mil.CELLS: cells, mil.MASK: mask}, outputs,
                           name=f"{backbone}_{size}_bag{bag}_{pooling}")


def pooling_of(model) -> str:
    """The pooling ("max", "lse", "attention", ...) a bag model of `build_bag_model` was built with."""
    return model.get_layer(POOL_LAYER).mode


def build(backbone: str = "efficientnet_b0", size: int = 224, *, bag: int = 0, pooling: str = "max",
          **kwargs):
    """The model of either mode: `build_model` for tiles (bag 0), or the dual-head bag model of
    N = `bag` cells with `pooling` (`build_bag_model`). Other keywords as
    `build_model`'s."""
    if bag:
        return build_bag_model(backbone, size, bag=bag, pooling=pooling, **kwargs)
    return build_model(backbone, size, **kwargs)


def check_head_bias(head_bias, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Initial logit biases -> `float32 [num_classes]`; ValueError unless that many finite values."""
    bias = np.asarray(head_bias, np.float64).reshape(-1)
    if bias.shape != (num_classes,) or not np.all(np.isfinite(bias)):
        raise ValueError(f"head_bias: expected {num_classes} finite values, got {bias.tolist()}")
    return bias.astype(np.float32)


def set_bn_momentum(model, momentum: float) -> int:
    """Set the moving-average momentum of every BatchNormalization layer; returns how many."""
    keras = _keras()
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1), got {momentum}")
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.momentum = float(momentum)  # read at every call, and saved in the layer config
    return len(layers)


def prior_logits(prior, floor: float = 1e-3) -> np.ndarray:
    """`log(p / (1 - p))` per class, with p clipped to `[floor, 1 - floor]` (a class absent from
    the training data starts at a very low but finite logit)."""
    p = np.clip(np.asarray(prior, np.float64), floor, 1.0 - floor)
    return np.log(p / (1.0 - p))


def export_float32(model, backbone: str, size: int, num_classes: int = NUM_CLASSES,
                   dropout: float = 0.2):
    """A float32, optimizer-free copy of a trained model (any dtype policy) for inference: a
    tile model, or a bag model (its N and pooling read from the model), rebuilt by `build`
    with the same layers and given the model's weights."""
    from common import mil

    bag, pooling = 0, "max"
    if mil.is_bag_model(model):
        bag, pooling = mil.bag_size(model), pooling_of(model)
    out = build(backbone, size, bag=bag, pooling=pooling, num_classes=num_classes, dropout=dropout,
                drop_connect_rate=0.0, dtype_policy="float32")
    set_weights(out, model)
    return out


def set_weights(model, weights) -> None:
    """`model.set_weights(weights)` (a list, or another model's weights), then refresh the
    input Normalization: Keras snapshots its mean/variance, and `set_weights` alone would leave
    the old snapshot in use."""
    model.set_weights(weights if isinstance(weights, list) else weights.get_weights())
    _finalize_normalization(model)


def _finalize_normalization(model) -> None:
    # Keras' Normalization snapshots its mean/variance variables into constants; after
    # assigning or loading them by hand the snapshot must be refreshed.
    keras = _keras()
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()


def input_affine(model, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel `a * x + b` a model applies to [0, 255] input before its stem.

    Measured by running the model's own preprocessing layers on constant images, so it is right
    whatever those layers are (V1's Rescaling + Normalization + ImageNet fix-up, V2's variants).
    Returns `(a, b)`, each `(C,)` float64.
    """
    keras = _keras()
    sub = keras.Model(model.inputs[0], _pre_stem_tensor(model))
    channels = int(model.inputs[0].shape[-1])
    probe = np.stack([np.zeros((size, size, channels)), np.full((size, size, channels), 255.0)])
    out = np.asarray(sub(probe.astype(np.float32), training=False), np.float64)
    f0, f255 = out[0, size // 2, size // 2], out[1, size // 2, size // 2]
    return (f255 - f0) / 255.0, f0


def _pre_stem_tensor(model):
    """The tensor entering the stem convolution (after the model's own input normalisation)."""
    names = {layer.name for layer in model.layers}
    for name in ("stem_conv_pad", "stem_conv"):
        if name in names:
            return model.get_layer(name).input
    raise ValueError(f"model {model.name!r} has no 'stem_conv' layer: not a Keras EfficientNet")


def _fix_keras_imagenet_v1(src, bb: Backbone, a: np.ndarray, b: np.ndarray):
    """Keras' ImageNet V1 files store the std where Normalization expects the variance; Keras
    corrects it with an extra Rescaling (of the whole normalised value) only when it downloads
    them itself (weights="imagenet", TF issue 49930). A file holding exactly those values gets
    the same correction here. Returns the corrected `(a, b)`."""
    if bb.family != "v1":
        return a, b
    keras = _keras()
    norms = [layer for layer in src.layers if isinstance(layer, keras.layers.Normalization)]
    extra_rescale = any(
        isinstance(layer, keras.layers.Rescaling) and np.ndim(layer.scale) > 0 for layer in src.layers
    )
    if len(norms) == 1 and hasattr(norms[0], "adapt_variance") and not extra_rescale:
        var = norms[0].adapt_variance.numpy()
        mean = norms[0].adapt_mean.numpy()
        if np.allclose(var, IMAGENET_STD, atol=1e-6) and np.allclose(mean, IMAGENET_MEAN, atol=1e-6):
            fix = 1.0 / np.sqrt(np.asarray(IMAGENET_STD))
            return a * fix, b * fix
    return a, b


def is_run_source(weights) -> bool:
    """`--weights` names a run of this project (a run folder, local or gs://, or its
    `model.keras`) rather than ImageNet weights."""
    from common import storage
    from common.run_folder import MODEL_FILE

    weights = str(weights or "")
    if weights in ("", "none", "imagenet"):
        return False
    if storage.is_gcs(weights):
        return True
    return os.path.isdir(weights) or (os.path.basename(weights) == MODEL_FILE)


def _channels(model) -> int:
    return int(model.inputs[0].shape[-1])


def _load_source(bb: Backbone, weights: str, size: int):
    """The model that holds the weights to transfer: a 3-channel ImageNet backbone, or the
    single-tile model of a trained run (a bag run's cell embedding, with its cell head)."""
    keras = _keras()
    if weights == "imagenet":
        # The real download path (Keras fetches and caches the file); needs the internet.
        return _backbone_fn(bb)(include_top=False, weights="imagenet", input_shape=(size, size, 3))
    if is_run_source(weights):
        return _run_source(weights)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"--weights {weights}: no such file (expected 'imagenet', 'none', "
                                f"a run folder, or a 3-channel {bb.keras_fn} weights file)")
    if weights.endswith(".keras"):
        try:
            src = keras.saving.load_model(weights, compile=False)
        except Exception as err:  # Keras raises many types; name the file either way
            raise ValueError(f"--weights {weights}: cannot load as a Keras model: {err}") from err
    else:
        kwargs = dict(include_top=False, weights=None, input_shape=(size, size, 3))
        if bb.family == "v2":
            kwargs["include_preprocessing"] = True
        src = _backbone_fn(bb)(**kwargs)
        try:
            src.load_weights(weights)
        except Exception as err:
            raise ValueError(
                f"--weights {weights}: does not fit a headless 3-channel {bb.keras_fn} "
                f"(include_top=False): {err}") from err
        _finalize_normalization(src)
    channels = _channels(src)
    if channels != 3:
        raise ValueError(f"--weights {weights}: expected a 3-channel model, it has {channels}")
    return src


def _run_source(weights: str):
    """A run's model as one tile -> features -> head model. A bag model is cut at its cell
    embedding; its cell head (`cell_logits`) stands for the single-tile model's head."""
    from common import mil

    try:
        model = models.load_model(weights)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--weights {weights}: {err}") from err
    except Exception as err:  # Keras raises many types; name the file either way
        raise ValueError(f"--weights {weights}: cannot load the run's model: {err}") from err
    if not mil.is_bag_model(model) and len(model.inputs[0].shape) == 4:
        return model
    embed = [layer for layer in model.layers if isinstance(layer, _keras().Model)]
    if len(embed) != 1 or mil.CELL_LOGITS not in {layer.name for layer in model.layers}:
        raise ValueError(f"--weights {weights}: neither a tile model nor a bag model of this project")
    embed = embed[0]
    head = model.get_layer(mil.CELL_LOGITS)
    out = _keras().layers.Dense(head.units, name=models.LOGITS_LAYER)
    single = _keras().Model(embed.inputs[0], out(embed.outputs[0]), name=embed.name)
    out.set_weights(head.get_weights())
    return single


def copy_run_weights(src, dst, weights: str):
    """Copy a trained 4-channel run's model into `dst` layer by layer (by name; the input
    normalisation is set by `input_affine`). Returns whether the head was copied too (it is when
    the class counts agree). Raises ValueError naming `weights` when the backbones differ."""
    keras = _keras()
    src_layers = {layer.name: layer for layer in src.layers}
    missing = []
    for layer in dst.layers:
        if not layer.weights or isinstance(layer, keras.layers.Normalization):
            continue
        s = src_layers.get(layer.name)
        if s is None or [w.shape for w in s.weights] != [w.shape for w in layer.weights]:
            missing.append(layer.name)
            continue
        layer.set_weights(s.get_weights())
    backbone_missing = [m for m in missing if m not in models.HEAD_LAYERS]
    if backbone_missing:
        raise ValueError(f"--weights {weights}: its model ({src.name}) lacks or shapes differently "
                         f"{len(backbone_missing)} layers of this backbone, e.g. {backbone_missing[:5]}; "
                         "a run can only start from a run of the same backbone")
    return models.LOGITS_LAYER not in missing


def transfer_weights(src, dst, bb: Backbone) -> None:
    """Copy a 3-channel backbone's weights into the 4-channel model, layer by layer (by name;
    the head, which the source lacks, is skipped).

    The stem kernel `[3, 3, 3, F]` becomes `[3, 3, 4, F]` with a zero yellow slice; input
    normalisation layers are handled separately (`input_affine`).
    """
    keras = _keras()
    src_layers = {layer.name: layer for layer in src.layers}
    missing = []
    for layer in dst.layers:
        if (not layer.weights or isinstance(layer, keras.layers.Normalization)
                or layer.name in models.HEAD_LAYERS):
            continue
        s = src_layers.get(layer.name)
        if s is None:
            missing.append(layer.name)
            continue
        values = s.get_weights()
        if layer.name == "stem_conv":
            kernel = values[0]
            grown = np.zeros(kernel.shape[:2] + (models.NUM_CHANNELS,) + kernel.shape[3:], kernel.dtype)
            grown[:, :, :3] = kernel
            values = [grown] + values[1:]
        layer.set_weights(values)
    if missing:
        raise ValueError(f"source weights lack {len(missing)} {bb.keras_fn} layers, "
                         f"e.g. {missing[:5]}")
