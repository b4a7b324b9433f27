"""`python -m tfrecords_builder ...`: images + labels -> fold-split TFRecord shards + manifest.json.

`--engine beam` runs the same build as an Apache Beam pipeline (DirectRunner, Dataflow).
Exit status: 0 all images built, 2 some images skipped (reasons in manifest.json; the same
command again tries them once more), 1 error (an error in the code prints its traceback).

`python -m tfrecords_builder download --list LIST --out DEST` fetches the public HPA images
(`tfrecords_builder.download`); exit status 0 all arrived, 3 some failed, 1 error.
"""
from __future__ import annotations

import argparse
import sys

from common import quiet

# At import, not in main: spawned worker processes import this module (as __mp_main__) too.
quiet.quiet(verbose="--verbose" in sys.argv[1:])  # before anything imports TensorFlow


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
        metavars={"images": "DIR_or_gs", "labels": "CSV", "out": "DIR_or_gs", "masks": "DIR_or_gs",
                  "group_by": "auto|image|COLUMN"},
        false_flags={"mask_outside": "--keep-outside"},
    )
    p.add_argument("--preset", default="default",
                   help="named defaults: 'default' (full build; its values are shown above) or "
                   "'smoke' (64 px, 2 folds, 8 images, tiny shards; seconds on a CPU); explicit "
                   "options override it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help=quiet.VERBOSE_HELP)
    cfglib.add_set_argument(p, "BuildConfig")
    return p


def build_download_parser() -> argparse.ArgumentParser:
    from common import config as cfglib
    from tfrecords_builder.download import EXTENSIONS, PRESETS, DownloadConfig

    p = argparse.ArgumentParser(
        prog="python -m tfrecords_builder download",
        description="Fetch the public HPA images of a list (the hosts' kaggle_2021.tsv, or a plain "
        "ID,Label,Image CSV) into a folder or gs:// prefix: 4 files {ID}_{red,green,blue,yellow}"
        ".jpg (or .tif.gz) per image, each decoded before it counts, plus labels.csv (ID,Label,"
        "Cellline of the images that arrived whole: give it to the builder as --labels, with "
        "--images DEST) and download_report.json. The selection follows the hosts' notebook: not "
        "in the competition's train set, with a competition class, of the competition's cell "
        "lines. Transient errors (timeouts, resets, cut bodies, 429, 5xx) are retried with "
        "backoff; the same command again fetches only what is missing.",
        epilog="Exit status: 0 = every selected image arrived whole, 3 = done, with failed images "
        "(named in the summary and the report), 1 = error. Licence: HPA images are (c) the Human "
        "Protein Atlas, www.proteinatlas.org, CC BY-SA 3.0: credit the Human Protein Atlas where "
        "you use or show them, and share alike. A full download (~80k images) is large: try "
        "--limit first.",
    )
    cfglib.add_arguments(
        p, DownloadConfig, defaults=PRESETS["default"], required=("image_list", "out"),
        flags={"image_list": "--list"}, choices={"format": tuple(EXTENSIONS)},
        metavars={"image_list": "LIST", "out": "DEST", "base_url": "URL", "cellline": "NAME"},
    )
    p.add_argument("--preset", default="default",
                   help="named defaults: 'default' (its values are shown above) or 'smoke' "
                   "(4 images, 2 threads); explicit options override it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print every retry as it happens "
                   "(by default they are counted in the summary and the report), and "
                   "TensorFlow's start-up lines")
    cfglib.add_set_argument(p, "DownloadConfig")
    return p


def download_main(argv) -> int:
    from common import config as cfglib
    from tfrecords_builder.download import PRESETS, DownloadConfig, download
    from tfrecords_builder.public_list import ListError

    import logging

    args = build_download_parser().parse_args(argv)
    if not args.verbose:  # one warning per retry would bury the progress bar on a long download
        logging.getLogger("hpa.retry").setLevel(logging.ERROR)
    try:
        cfg = cfglib.from_args(DownloadConfig, args, base=cfglib.preset(PRESETS, args.preset),
                               sets=args.set)
        result = download(cfg, progress=not args.no_progress)
    except (ListError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result.summary())
    return result.exit_code


def _run(cfg, beam_args, progress: bool):
    """The engine's build; Beam only imported when asked for."""
    if cfg.engine == "beam":
        from common.beam import require_beam

        try:
            require_beam()
        except ImportError as err:
            raise ValueError(str(err)) from None
        from tfrecords_builder.beam_engine import build_beam

        return build_beam(cfg, beam_args, progress=progress)
    from tfrecords_builder.build import build

    return build(cfg, progress=progress)


def config_from_args(args):
    """The preset named by --preset, the options given on top, then --set KEY=VALUE (a
    ValueError if invalid)."""
    from common import config as cfglib
    from tfrecords_builder.config import PRESETS, BuildConfig

    return cfglib.from_args(BuildConfig, args, base=cfglib.preset(PRESETS, args.preset),
                            sets=getattr(args, "set", ()))


def main(argv=None) -> int:
    from tfrecords_builder.build import BuildError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["download"]:
        return download_main(argv[1:])
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    quiet.quiet(verbose=args.verbose)
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
