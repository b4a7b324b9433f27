"""`python -m tfrecords_builder ...`: images + labels -> fold-split TFRecord shards + manifest.json.

`--engine beam` runs the same build as an Apache Beam pipeline (DirectRunner, Dataflow).
Exit status: 0 all images built, 2 some images skipped (reasons in manifest.json; the same
command again tries them once more), 1 error (an error in the code prints its traceback).
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from common import config as cfglib
    from tfrecords_builder.config import (DEFAULT_SIZE, ENGINES, INTERPOLATIONS, PRESETS,
                                          SEGMENTERS, BuildConfig)

    p = argparse.ArgumentParser(
        prog="python -m tfrecords_builder",
        description="Build multilabel-stratified, fold-split TFRecord shards (local folder or gs://) "
        "from HPA images and label lists, with a manifest.json of what went in. Run the same "
        "command again after an interruption to finish only what is missing.",
        epilog="Exit status: 0 = every image built, 2 = some skipped (see manifest.json; the same "
        "command again tries them once more), 1 = error (an error in the code, not in an image, "
        "stops the build with its traceback). Transient read errors are retried first "
        "(HPA_IO_TRIES, HPA_IO_BACKOFF: see README).",
    )
    cfglib.add_arguments(
        p, BuildConfig, defaults=PRESETS["default"], required=("images", "labels", "out"),
        choices={"mode": tuple(DEFAULT_SIZE), "segmenter": SEGMENTERS,
                 "interpolation": INTERPOLATIONS, "engine": ENGINES},
        metavars={"images": "DIR_or_gs", "labels": "CSV", "out": "DIR_or_gs", "masks": "DIR_or_gs"},
        false_flags={"mask_outside": "--keep-outside"},
    )
    p.add_argument("--preset", default="default",
                   help="named defaults: 'default' (full build; its values are shown above) or "
                   "'smoke' (64 px, 2 folds, 8 images, tiny shards; seconds on a CPU); explicit "
                   "options override it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _run(cfg, beam_args, progress: bool):
    """The engine's build; Beam only imported when asked for."""
    if cfg.engine == "beam":
        try:
            from tfrecords_builder.beam_engine import build_beam
            import apache_beam  # noqa: F401
        except ImportError as err:
            raise ValueError(f"--engine beam needs Apache Beam ({err}): pip install 'hpa-scc[beam]' "
                             "or pip install -r requirements-beam.txt") from None
        return build_beam(cfg, beam_args, progress=progress)
    from tfrecords_builder.build import build

    return build(cfg, progress=progress)


def config_from_args(args):
    """The preset named by --preset with the options given on top (a ValueError if invalid)."""
    from common import config as cfglib
    from tfrecords_builder.config import PRESETS, BuildConfig

    return cfglib.from_args(BuildConfig, args, base=cfglib.preset(PRESETS, args.preset))


def main(argv=None) -> int:
    from tfrecords_builder.build import BuildError

    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    try:
        cfg = config_from_args(args)
        if beam_args and cfg.engine != "beam":
            parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
        result = _run(cfg, beam_args, progress=not args.no_progress)
    except (BuildError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result.summary())
    return result.exit_code


if __name__ == "__main__":  # guarded: spawned workers import this module as __mp_main__
    sys.exit(main())
