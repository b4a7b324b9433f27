"""`python -m train_tpu --data DIR_or_gs --mode cell|image --out RUN_DIR_or_gs [...]`.

Parses arguments into a TrainConfig (preset, then the options given), selects the Keras backend
(before anything imports Keras) and calls `train_tpu.train.train`. No TensorFlow, JAX or Keras
at import time.
"""
from __future__ import annotations

import argparse
import logging
import sys

from common import config as cfglib
from common import quiet
from common.models import BACKBONES
from train_tpu import backend as backend_lib
from train_tpu.config import (LOSSES, MODES, OPTIMIZERS, POOLINGS, PRECISIONS, PRESETS, STRATEGIES,
                              TARGETS, TrainConfig, get_preset)
from train_tpu.strategy import HardwareNotFoundError

DEFAULT_PRESET = "default"  # as in the builder and predict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train_tpu",
        description="Train an EfficientNet on 4-channel HPA tiles (TFRecord shards from "
        "tfrecords_builder) on a TPU, GPUs or the CPU. Settings come from --preset, then the "
        f"options given (the defaults shown are the {DEFAULT_PRESET} preset's); the final config "
        "is written to RUN_DIR/config.json.")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), metavar="NAME",
                   help="named settings to start from (default: TrainConfig's own values, shown "
                   "below; smoke: seconds on a CPU; demo: "
                   "minutes on a CPU; b0_cell_224, b4_cell_384, v2s_cell_384, b0_image_512, "
                   "b4_image_768: realistic TPU/GPU runs with ImageNet weights)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest checkpoint (optimizer state "
                   "included)")
    cfglib.add_arguments(
        p, TrainConfig, defaults=PRESETS[DEFAULT_PRESET], required=("data", "mode", "out"),
        choices={"mode": MODES, "backbone": BACKBONES, "strategy": STRATEGIES,
                 "backend": backend_lib.NAMES, "precision": PRECISIONS, "optimizer": OPTIMIZERS,
                 "loss": LOSSES, "pooling": POOLINGS, "targets": TARGETS},
        metavars={"data": "DIR_or_gs", "out": "RUN_DIR_or_gs", "backbone": "NAME"},
    )
    cfglib.add_set_argument(p, "TrainConfig")
    p.add_argument("--verbose", action="store_true", help=quiet.VERBOSE_HELP)
    return p


def config_from_args(args) -> TrainConfig:
    """The preset, then the options given, then --set KEY=VALUE; a ValueError if invalid."""
    return cfglib.from_args(TrainConfig, args, base=get_preset(args.preset), sets=args.set)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet.quiet(verbose=args.verbose)  # python -m train_tpu did it already; a library call here
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
