"""TrainConfig: one frozen dataclass, named presets, overrides; written to the run's config.json."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common import config as cfglib
from common.mil import POOLINGS  # the bag model's poolings (importing common.mil imports no Keras)
from common.models import BACKBONES
from train_tpu.backend import NAMES as BACKENDS


MODES = ("cell", "image", "bag")
STRATEGIES = ("auto", "tpu", "gpu", "cpu")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
OPTIMIZERS = ("adamw", "sgd")
LOSSES = ("bce", "focal")
TARGETS = ("auto", "cell_labels", "image_labels")  # what the cells learn (see TrainConfig.targets)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; `config.json` in the run folder reruns it.

    The comments are `python -m train_tpu --help` (common.config.add_arguments).
    """

    # shard folder, local or gs://, holding fold<K>-*.tfrec and preprocess.json (and
    # manifest.json, whose counts save a counting pass)
    data: str = ""
    # run folder, local or gs://: model.keras, config.json, preprocess.json, history.csv/png,
    # checkpoints/
    out: str = ""
    # cell tiles, whole-image tiles, or bags of an image's cells (the dual-head MIL model); must
    # match the dataset's mode (its preprocess.json)
    mode: str = "cell"
    backbone: str = "efficientnet_b0"  # Keras EfficientNet / EfficientNetV2 variant
    # model input side in px; 0 = the dataset's (tiles are resized in the input pipeline when it
    # differs; the effective spec goes to preprocess.json)
    size: int = 0
    # imagenet (Keras downloads it), none, a PATH to a 3-channel Keras weights file (e.g.
    # efficientnetb0_notop.h5) for offline runs, carried to 4 channels; or a RUN folder (local
    # or gs://) of the same backbone to start from its trained model (e.g. a bag model from a
    # cell-tile run: both heads start as its head)
    weights: str = "none"
    epochs: int = 10  # number of epochs
    batch_size: int = 64  # GLOBAL batch size (split over the replicas)
    steps_per_epoch: int = 0  # training steps per epoch; 0 = training examples // batch size
    val_fold: int = 0  # fold K to validate on (fold<K>-*.tfrec); the other folds train
    val_steps: int = 0  # validation batches per epoch; 0 = the whole fold
    # hardware; auto picks TPU > GPUs > CPU and logs it; asking for missing hardware is an error
    strategy: str = "auto"
    # Keras backend: tensorflow (tf.distribute: TPUStrategy, MirroredStrategy) or jax
    # (keras.distribution.DataParallel over jax.devices(): TPU VMs, GPUs, CPU); auto takes
    # KERAS_BACKEND if set, else jax on a TPU VM with JAX installed, else tensorflow, and logs
    # its choice; config.json records the one used
    backend: str = "auto"
    # TPU name or grpc address; "" = from the environment (Colab/Kaggle), "local" = a TPU VM
    tpu: str = ""
    # split the CPU into N logical devices and mirror over them (exercises the multi-replica
    # path without accelerators)
    cpu_replicas: int = 1
    precision: str = "auto"  # auto: bfloat16 on TPU, float16 on GPU, float32 on CPU
    steps_per_execution: int = 0  # steps per host call; 0 = 32 on TPU (fewer round trips), else 1
    # adamw; or sgd (plain, no momentum: its update shows gradient scale errors, for tests)
    optimizer: str = "adamw"
    learning_rate: float = 1e-3  # peak learning rate (for the global batch)
    weight_decay: float = 1e-5  # AdamW's decoupled weight decay
    warmup_epochs: float = 1.0  # linear warmup, then cosine decay to min_lr_ratio * peak
    min_lr_ratio: float = 0.01  # the final learning rate as a fraction of the peak
    loss: str = "bce"  # binary cross-entropy or focal loss
    focal_gamma: float = 2.0  # focal loss: the focusing exponent gamma
    label_smoothing: float = 0.0  # targets become y * (1 - s) + 0.5 * s
    dropout: float = 0.2  # dropout rate before the classifier
    drop_connect_rate: float = 0.2  # stochastic depth inside the backbone
    bn_momentum: float = 0.0  # BatchNorm moving-average momentum; 0 = the backbone's (0.99)
    prior_bias: bool = True  # start the head's bias at the training class frequencies (manifest)
    flip: bool = True  # random horizontal and vertical flips
    rotate: bool = True  # random 90-degree rotations
    scale: float = 0.1  # random zoom in [1 - scale, 1 + scale]
    brightness: float = 0.2  # random per-channel gain in [1 - b, 1 + b]
    shuffle_buffer: int = 2048  # shuffle buffer, in examples
    keep_checkpoints: int = 0  # keep the newest K epoch checkpoints; 0 = all
    seed: int = 0  # shuffle and augmentation seed
    # the same run twice gives the same weights and history (TensorFlow's op determinism, tf.data
    # included; on the same machine and thread count; a --resume continues, it does not replay)
    deterministic: bool = False
    # bag mode: how the image head pools the cells' features: max (red.ai), lse (log-sum-exp)
    # or attention (gated attention)
    pooling: str = "max"
    # bag mode: loss = BCE(image head, image labels) + cell_weight * BCE(cell head, the image's
    # labels for every real cell)
    cell_weight: float = 0.1
    # bag mode: cells per training bag, the model's N; 0 = the dataset's bag size. Fewer draws a
    # new random choice of each image's stored cells every time it is seen, so that a step holds
    # more images for the same cells; inference then scores chunks of N
    bag_cells: int = 0
    # cell and bag modes: what the cells learn. auto: each cell's soft targets when the shards
    # carry them (built with --cell-labels), else the image's labels; cell_labels: the soft
    # targets (an error when the shards lack them); image_labels: the image's labels even then.
    # The bag model's image head always learns the image labels. config.json records the one used
    targets: str = "auto"
    # set by the trainer from the data (a value given is replaced): the fingerprint of the
    # cell-labels table the shards were built with (their manifest.json); a --resume with
    # another is refused
    targets_fingerprint: str = ""

    def __post_init__(self):
        checks = {
            "mode": self.mode in MODES,
            "pooling": self.pooling in POOLINGS,
            "cell_weight": self.cell_weight >= 0,
            "bag_cells": self.bag_cells >= 0,
            "backbone": self.backbone in BACKBONES,
            "strategy": self.strategy in STRATEGIES,
            "backend": self.backend in BACKENDS,
            "precision": self.precision in PRECISIONS,
            "optimizer": self.optimizer in OPTIMIZERS,
            "loss": self.loss in LOSSES,
            "targets": self.targets in TARGETS,
            "size": self.size == 0 or self.size >= 32,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "steps_per_epoch": self.steps_per_epoch >= 0,
            "val_steps": self.val_steps >= 0,
            "cpu_replicas": self.cpu_replicas >= 1,
            "learning_rate": self.learning_rate > 0,
            "scale": 0 <= self.scale < 0.5,
            "brightness": 0 <= self.brightness < 1,
            "dropout": 0 <= self.dropout < 1,
            "drop_connect_rate": 0 <= self.drop_connect_rate < 1,
            "bn_momentum": 0 <= self.bn_momentum < 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("TrainConfig: invalid " + ", ".join(
                f"{k}={getattr(self, k)!r}" for k in bad) + _HINTS)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


_HINTS = (f" (mode {'|'.join(MODES)}; strategy {'|'.join(STRATEGIES)}; backend {'|'.join(BACKENDS)}; "
          f"precision {'|'.join(PRECISIONS)}; optimizer {'|'.join(OPTIMIZERS)}; loss {'|'.join(LOSSES)}; "
          f"targets {'|'.join(TARGETS)}; "
          f"size 0 or >= 32; scale in [0, 0.5); backbones: {', '.join(BACKBONES)})")

# Named presets. Learning rates are for the global batch given.
PRESETS: dict[str, TrainConfig] = {
    # the command line's default (as in the builder and predict): TrainConfig's own values
    "default": TrainConfig(),
    # seconds on a CPU: tests and CI
    "smoke": TrainConfig(size=32, epochs=2, batch_size=8, steps_per_epoch=3, val_steps=0,
                         warmup_epochs=0.0, shuffle_buffer=64, strategy="cpu", dropout=0.0,
                         drop_connect_rate=0.0),
    # the demo: learns the synthetic task in ~4 minutes on 2 CPU cores (48 px cell tiles of 190
    # images, 3 folds): 480 steps from scratch. EfficientNetV2-B0, whose fused early blocks run
    # faster on a CPU than B0's and learned more in the same time; BatchNorm momentum 0.9 so
    # the inference statistics keep up with a short run; regularisation off (too short to
    # overfit much, and it slows early learning)
    "demo": TrainConfig(backbone="efficientnetv2_b0", size=48, epochs=12, batch_size=32,
                        steps_per_epoch=40, learning_rate=3e-3, warmup_epochs=0.5,
                        shuffle_buffer=1024, dropout=0.0, drop_connect_rate=0.0,
                        bn_momentum=0.9),
    # the demo's recipe as a bag model (red.ai's dual head): the same backbone, tiles, steps and
    # 32 cells per step, as 8 bags of 4 cells drawn anew from each image's stored 16; the cell
    # loss at full weight, as the backbone starts from scratch. On the demo's data this scored
    # 0.476 strict / 0.880 Open Images mAP, against 0.213 / 0.734 with 2 bags of 16 cells and
    # cell_weight 0.1, and 0.587 / 0.921 for the `demo` cell-tile recipe (README, "MIL")
    "demo_mil": TrainConfig(mode="bag", backbone="efficientnetv2_b0", size=48, epochs=12,
                            batch_size=8, bag_cells=4, cell_weight=1.0, steps_per_epoch=40,
                            learning_rate=3e-3, warmup_epochs=0.5, shuffle_buffer=256,
                            dropout=0.0, drop_connect_rate=0.0, bn_momentum=0.9),
    # the bag recipe as a fine-tune (red.ai started from pretrained weights; with none to
    # download, a `demo` cell-tile run is the pretraining): `--weights RUN` of a demo run, then
    # 120 steps of the same 32 cells per step as bags, log-sum-exp pooling, a tenth of the
    # learning rate. README, "MIL": against 120 more steps of cell tiles from the same run
    # (demo_mil with these changes, below)
    # red.ai's recipe on a TPU v3-8: bags of 16 cells at 224 px, 32 bags (512 cells) per step
    "b0_mil_224": TrainConfig(mode="bag", backbone="efficientnet_b0", size=224, weights="imagenet",
                              epochs=15, batch_size=32, learning_rate=1e-3, warmup_epochs=1.0),
    # realistic runs (TPU v3-8 / v5e-8 or a GPU): cell tiles that inherit their image's labels
    "b0_cell_224": TrainConfig(mode="cell", backbone="efficientnet_b0", size=224, weights="imagenet",
                               epochs=15, batch_size=256, learning_rate=2e-3, warmup_epochs=1.0),
    "b4_cell_384": TrainConfig(mode="cell", backbone="efficientnet_b4", size=384, weights="imagenet",
                               epochs=12, batch_size=128, learning_rate=1e-3, warmup_epochs=1.0),
    "v2s_cell_384": TrainConfig(mode="cell", backbone="efficientnetv2_s", size=384,
                                weights="imagenet", epochs=12, batch_size=128, learning_rate=1e-3),
    # whole-image models (image labels are exact there; their scores are combined with cells')
    "b0_image_512": TrainConfig(mode="image", backbone="efficientnet_b0", size=512, weights="imagenet",
                                epochs=20, batch_size=64, learning_rate=1e-3, warmup_epochs=2.0),
    "b4_image_768": TrainConfig(mode="image", backbone="efficientnet_b4", size=768, weights="imagenet",
                                epochs=20, batch_size=32, learning_rate=5e-4, warmup_epochs=2.0),
}

PRESETS["demo_mil_ft"] = PRESETS["demo_mil"].replace(epochs=3, learning_rate=3e-4, pooling="lse")


def get_preset(name: str) -> TrainConfig:
    return cfglib.preset(PRESETS, name)


def make_config(preset: str = "smoke", **overrides) -> TrainConfig:
    """The preset, then every override that is not None; strict names (typos are errors)."""
    return cfglib.override(get_preset(preset), **overrides)


def save(cfg: TrainConfig, path: str) -> None:
    cfglib.save(cfg, path)


def load(path: str) -> TrainConfig:
    return cfglib.load(TrainConfig, path)
