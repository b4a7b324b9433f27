"""TrainConfig: one frozen dataclass, named presets, overrides; written to the run's config.json."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common import config as cfglib
from common.models import BACKBONES
from train_tpu.backend import NAMES as BACKENDS

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; `config.json` in the run folder reruns it."""

    data: str = ""  # shard folder (local or gs://) with fold{K}-*.tfrec and preprocess.json
    out: str = ""  # run folder (local or gs://)
    mode: str = "cell"  # "cell", "image" or "bag": must match the dataset's mode (preprocess.json)
    backbone: str = "efficientnet_b0"  # a common.models.BACKBONES name
    size: int = 0  # model input side, px; 0 = the dataset's (resized in tf.data otherwise)
    weights: str = "none"  # "imagenet", "none" or a 3-channel weights file
    epochs: int = 10
    batch_size: int = 64  # GLOBAL batch (all replicas together)
    steps_per_epoch: int = 0  # 0 = training examples // batch_size
    val_fold: int = 0  # validate on fold{K}-*.tfrec, train on the other folds
    val_steps: int = 0  # 0 = the whole validation fold; else this many batches
    strategy: str = "auto"  # auto|tpu|gpu|cpu
    backend: str = "auto"  # Keras backend: auto|tensorflow|jax; config.json records the one used
    tpu: str = ""  # TPU name/address; "" = from the environment, "local" = a TPU VM
    cpu_replicas: int = 1  # >1: split the CPU into logical devices (tests the multi-replica path)
    precision: str = "auto"  # auto (bf16 TPU, fp16 GPU, fp32 CPU)|float32|mixed_float16|mixed_bfloat16
    steps_per_execution: int = 0  # 0 = auto: 32 on TPU (fewer host round trips), 1 elsewhere
    optimizer: str = "adamw"  # adamw|sgd
    learning_rate: float = 1e-3  # peak learning rate for the global batch
    weight_decay: float = 1e-5
    warmup_epochs: float = 1.0  # linear warmup, then cosine decay to min_lr_ratio * peak
    min_lr_ratio: float = 0.01
    loss: str = "bce"  # bce|focal
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    dropout: float = 0.2  # before the classifier
    drop_connect_rate: float = 0.2  # stochastic depth inside the backbone
    bn_momentum: float = 0.0  # BatchNorm moving-average momentum; 0 = the backbone's (0.99)
    prior_bias: bool = True  # start the head's bias at the training class frequencies (manifest)
    flip: bool = True  # random horizontal and vertical flips
    rotate: bool = True  # random 90-degree rotations
    scale: float = 0.1  # random zoom in [1 - scale, 1 + scale]
    brightness: float = 0.2  # per-channel gain in [1 - b, 1 + b]
    shuffle_buffer: int = 2048  # examples
    keep_checkpoints: int = 0  # keep the newest K epoch checkpoints; 0 = all
    seed: int = 0
    pooling: str = "max"  # bag mode: the image head's pooling over cells: max|lse|attention
    cell_weight: float = 0.1  # bag mode: loss = BCE(image) + cell_weight * BCE(cell, inherited labels)

    def __post_init__(self):
        checks = {
            "mode": self.mode in ("cell", "image", "bag"),
            "pooling": self.pooling in ("max", "lse", "attention"),
            "cell_weight": self.cell_weight >= 0,
            "backbone": self.backbone in BACKBONES,
            "strategy": self.strategy in ("auto", "tpu", "gpu", "cpu"),
            "backend": self.backend in BACKENDS,
            "precision": self.precision in ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
            "optimizer": self.optimizer in ("adamw", "sgd"),
            "loss": self.loss in ("bce", "focal"),
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


_HINTS = (" (mode cell|image; strategy auto|tpu|gpu|cpu; backend " + "|".join(BACKENDS) + "; precision auto|float32|mixed_float16|"
          "mixed_bfloat16; optimizer adamw|sgd; loss bce|focal; size 0 or >= 32; "
          "scale in [0, 0.5); backbones: " + ", ".join(BACKBONES) + ")")

# Named presets. Learning rates are for the global batch given.
PRESETS: dict[str, TrainConfig] = {
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
    # the demo's recipe as a bag model (red.ai's dual head): bags of 8 cells, 48 px, the same
    # backbone and steps; a batch of 4 bags is 32 cells, as many as the demo's cell batch
    "demo_mil": TrainConfig(mode="bag", backbone="efficientnetv2_b0", size=48, epochs=12,
                            batch_size=4, steps_per_epoch=40, learning_rate=3e-3,
                            warmup_epochs=0.5, shuffle_buffer=256, dropout=0.0,
                            drop_connect_rate=0.0, bn_momentum=0.9),
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


def get_preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def make_config(preset: str = "smoke", **overrides) -> TrainConfig:
    """The preset, then every override that is not None; strict names (typos are errors)."""
    return cfglib.override(get_preset(preset), **overrides)


def save(cfg: TrainConfig, path: str) -> None:
    cfglib.save(cfg, path)


def load(path: str) -> TrainConfig:
    return cfglib.load(TrainConfig, path)
