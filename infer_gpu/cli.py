"""`python -m infer_gpu COMMAND ...`: one entry point, one module per command.

Each command module exposes `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`,
and imports nothing heavy (TensorFlow) at import time.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from common import quiet

COMMANDS = {
    "segment": "infer_gpu.segment",
    "predict": "infer_gpu.predict",
    "validate": "infer_gpu.validate",
    "evaluate": "infer_gpu.evaluate",
    "pseudo-label": "infer_gpu.pseudo_label",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infer_gpu",
        description="HPA single-cell inference: segment cells, predict a submission, "
        "validate it, evaluate it against a truth file.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.add_argument("--verbose", action="store_true", help=quiet.VERBOSE_HELP)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "predict":  # predict --engine beam hands them to Beam
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.beam_args = extra
    quiet.quiet(verbose=args.verbose)  # python -m infer_gpu did it already; a library call here
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
