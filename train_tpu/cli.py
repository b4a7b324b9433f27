"""`python -m train_tpu --data DIR_or_gs --mode cell|image --out RUN_DIR_or_gs [...]`.

Parses arguments into a TrainConfig (preset, then the options given), selects the Keras backend
(before anything imports Keras) and calls `train_tpu.train.train`. No TensorFlow, JAX or Keras
at import time.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from common import config as cfglib
from common.models import BACKBONES
from train_tpu import backend as backend_lib
from train_tpu.config import PRESETS, TrainConfig, make_config
from train_tpu.strategy import HardwareNotFoundError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train_tpu",
        description="Train an EfficientNet on 4-channel HPA tiles (TFRecord shards from "
        "tfrecords_builder) on a TPU, GPUs or the CPU. Settings come from --preset, then the "
        "options given; the final config is written to RUN_DIR/config.json.")
    a = p.add_argument
    a("--data", required=True, help="shard folder, local or gs://, holding fold<K>-*.tfrec and "
      "preprocess.json (and manifest.json, whose counts save a counting pass)")
    a("--mode", required=True, choices=("cell", "image"),
      help="cell tiles or whole-image tiles; must match the dataset's preprocess.json")
    a("--out", required=True, help="run folder, local or gs://: model.keras, config.json, "
      "preprocess.json, history.csv/png, checkpoints/")
    a("--preset", default="smoke", choices=sorted(PRESETS), metavar="NAME",
      help="named settings to start from (default smoke: seconds on a CPU; demo: minutes on a "
      "CPU; b0_cell_224, b4_cell_384, v2s_cell_384, b0_image_512, b4_image_768: realistic "
      "TPU/GPU runs with ImageNet weights)")
    a("--backbone", choices=list(BACKBONES), metavar="NAME",
      help="Keras EfficientNet / EfficientNetV2 variant: " + ", ".join(BACKBONES))
    a("--size", type=int, help="model input side in px (tiles are resized in the input pipeline "
      "when it differs from the dataset's; the effective spec goes to preprocess.json)")
    a("--epochs", type=int, help="number of epochs")
    a("--batch-size", type=int, help="GLOBAL batch size (split over the replicas)")
    a("--val-fold", type=int, help="fold K to validate on (fold<K>-*.tfrec); the rest train")
    a("--weights", help="imagenet (Keras downloads it), none, or a PATH to a 3-channel Keras "
      "weights file (e.g. efficientnetb0_notop.h5) for offline runs; carried to 4 channels")
    a("--strategy", choices=("auto", "tpu", "gpu", "cpu"),
      help="hardware; auto picks TPU > GPUs > CPU and logs it; asking for missing hardware is "
      "an error")
    a("--backend", choices=backend_lib.NAMES,
      help="Keras backend: tensorflow (tf.distribute: TPUStrategy, MirroredStrategy) or jax "
      "(keras.distribution.DataParallel over jax.devices(): TPU VMs, GPUs, CPU); auto (default) "
      "takes KERAS_BACKEND if set, else jax on a TPU VM with JAX installed, else tensorflow, "
      "and logs its choice")
    a("--tpu", help="TPU name or grpc address; default from the environment (Colab/Kaggle), "
      "'local' on a TPU VM")
    a("--resume", action="store_true",
      help="continue the run in --out from its newest checkpoint (optimizer state included)")
    a("--steps-per-epoch", type=int, help="training steps per epoch; 0 = examples // batch")
    a("--val-steps", type=int, help="validation batches per epoch; 0 = the whole fold")
    a("--learning-rate", type=float, help="peak learning rate (for the global batch)")
    a("--loss", choices=("bce", "focal"), help="binary cross-entropy or focal loss")
    a("--precision", choices=("auto", "float32", "mixed_float16", "mixed_bfloat16"),
      help="auto: bfloat16 on TPU, float16 on GPU, float32 on CPU")
    a("--steps-per-execution", type=int, help="steps per host call; 0 = 32 on TPU, else 1")
    a("--cpu-replicas", type=int, help="split the CPU into N logical devices and mirror over "
      "them (exercises the multi-replica path without accelerators)")
    a("--seed", type=int, help="shuffle and augmentation seed")
    a("--keep-checkpoints", type=int, help="keep the newest K epoch checkpoints; 0 = all")
    a("--set", action="append", default=[], metavar="KEY=VALUE",
      help="any other TrainConfig field, e.g. --set weight_decay=1e-4 (repeatable); fields: "
      + ", ".join(f.name for f in dataclasses.fields(TrainConfig)))
    return p


def config_from_args(args) -> TrainConfig:
    # every option named like a TrainConfig field overrides the preset (None = not given)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if hasattr(args, f.name)}
    cfg = make_config(args.preset, **overrides)
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        extra[key.strip()] = value.strip()
    return cfglib.override(cfg, **extra) if extra else cfg


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = config_from_args(args)
        # before train_tpu.train (or anything) imports Keras; auto is resolved (and logged) once
        cfg = cfg.replace(backend=backend_lib.select(cfg.backend))
        from train_tpu.train import train

        summary = train(cfg, resume=args.resume)
    except (HardwareNotFoundError, ValueError, FileNotFoundError, FileExistsError) as err:
        # the messages name the file or option at fault; a traceback would bury them
        print(f"train_tpu: error: {err}", file=sys.stderr)
        return 2
    last = summary["last"]
    print(f"run {summary['out']}: {summary['epochs']} epochs x {summary['steps_per_epoch']} steps "
          f"on {summary['strategy']} ({summary['replicas']} replicas, {summary['precision']}, "
          f"{summary['backend']} backend)")
    if last:
        print(f"val_macro_auc {last.get('val_macro_auc', float('nan')):.4f}  "
              f"val_map {last.get('val_map', float('nan')):.4f}  "
              f"val_loss {last.get('val_loss', float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
