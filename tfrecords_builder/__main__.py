"""`python -m tfrecords_builder ...`: images + labels -> fold-split TFRecord shards + manifest.json.

`--engine beam` runs the same build as an Apache Beam pipeline (DirectRunner, Dataflow).
Exit status: 0 all images built, 2 some images skipped (reasons in manifest.json; the same
command again tries them once more), 1 error (an error in the code prints its traceback).
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from tfrecords_builder.config import DEFAULT_SIZE, PRESETS

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
    p.add_argument("--images", action="append", required=True, metavar="DIR_or_gs",
                   help="folder or gs:// prefix of {ID}_{red,green,blue,yellow}.{png,tif.gz,jpg,...}; "
                   "once for all label lists, or once per --labels in the same order")
    p.add_argument("--labels", action="append", required=True, metavar="CSV",
                   help="label list with ID,Label columns (train.csv, public_hpa_labels.csv, ...); repeatable")
    p.add_argument("--out", required=True, metavar="DIR_or_gs",
                   help="output folder or gs://bucket/prefix for shards, preprocess.json, manifest.json")
    p.add_argument("--mode", choices=("image", "cell"), default=None,
                   help="image: one example per whole image; cell: one per segmented cell, with the "
                   "image's labels (default: image)")
    p.add_argument("--size", type=int, default=None,
                   help=f"tile side in pixels (default: {DEFAULT_SIZE['image']} in image mode, "
                   f"{DEFAULT_SIZE['cell']} in cell mode)")
    p.add_argument("--folds", type=int, default=None, help="number of stratified folds K (default: 5)")
    p.add_argument("--shard-mb", type=float, default=None,
                   help="target shard size in MB; shard counts are planned from a pilot of 8 images "
                   "(default: 100)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes; 0 decodes in the main process (default: 1)")
    p.add_argument("--segmenter", choices=("default", "hpa"), default=None,
                   help="cell mode without --masks: common.segmentation backend (default: default)")
    p.add_argument("--nuclei-model", default=None,
                   help="--segmenter hpa: hpacellseg nucleus model file (.pth), as for predict")
    p.add_argument("--cell-model", default=None,
                   help="--segmenter hpa: hpacellseg 3-channel cell model file (.pth)")
    p.add_argument("--trust-model-files", action="store_true",
                   help="--segmenter hpa: allow loading the .pth files, which are pickled PyTorch "
                   "modules (loading runs code from them): only for files you trust")
    p.add_argument("--masks", default=None, metavar="DIR_or_gs",
                   help="cell mode: use precomputed label maps {ID}_cells.png (+ optional "
                   "{ID}_nuclei.png, same ids) instead of segmenting")
    p.add_argument("--limit", type=int, default=None, help="use only the first N usable images (default: all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the fold assignment and shard order (default: 0)")
    p.add_argument("--margin", type=float, default=None,
                   help="cell mode: widen each cell box by this fraction of its longer side (default: 0)")
    p.add_argument("--keep-outside", action="store_true",
                   help="cell mode: keep the pixels around the cell instead of zeroing them")
    p.add_argument("--interpolation", choices=("area", "linear", "nearest"), default=None,
                   help="resize filter (default: area)")
    p.add_argument("--preset", default="default",
                   help="named defaults: 'default' (full build) or 'smoke' (64 px, 2 folds, 8 images, "
                   "tiny shards; seconds on a CPU); explicit options override it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--engine", choices=("local", "beam"), default="local",
                   help="local: this machine's worker processes; beam: an Apache Beam pipeline "
                   "(pip install hpa-scc[beam]) over the same plan and per-image function, giving the "
                   "same shards. With beam, options the builder does not know go to Beam, e.g. "
                   "--runner DataflowRunner --project P --region R --temp_location gs://B/tmp "
                   "--setup_file ./setup.py (default runner: DirectRunner, with --workers processes)")
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


def main(argv=None) -> int:
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    if beam_args and args.engine != "beam":
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    from tfrecords_builder.build import BuildError
    from tfrecords_builder.config import make_config

    try:
        cfg = make_config(
            args.preset, images=tuple(args.images), labels=tuple(args.labels), out=args.out,
            mode=args.mode, size=args.size, folds=args.folds, shard_mb=args.shard_mb,
            workers=args.workers, segmenter=args.segmenter, masks=args.masks, limit=args.limit,
            nuclei_model=args.nuclei_model, cell_model=args.cell_model,
            trust_model_files=args.trust_model_files or None,
            seed=args.seed, margin=args.margin, interpolation=args.interpolation,
            mask_outside=False if args.keep_outside else None, engine=args.engine,
        )
        result = _run(cfg, beam_args, progress=not args.no_progress)
    except (BuildError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result.summary())
    return result.exit_code


if __name__ == "__main__":  # guarded: spawned workers import this module as __mp_main__
    sys.exit(main())
