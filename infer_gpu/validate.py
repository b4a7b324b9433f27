"""`python -m infer_gpu validate`: check a submission against the sample submission."""
from __future__ import annotations

import argparse
import sys

HELP = "check a submission.csv against the sample submission; list every problem"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--submission", required=True,
                        help="submission CSV to check (ID,ImageWidth,ImageHeight,PredictionString); "
                        "local path or gs://")
    parser.add_argument("--sample-submission", required=True,
                        help="the competition's sample_submission.csv: the IDs and sizes the "
                        "submission must have, each exactly once")
    parser.add_argument("--max-problems", type=int, default=0,
                        help="print at most this many problems (0 = all); the count is always printed")


def run(args: argparse.Namespace) -> int:
    from common.submission import SubmissionError, read_submission, validate

    try:
        problems = validate(args.submission, args.sample_submission)
    except (SubmissionError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if problems:
        shown = problems if args.max_problems <= 0 else problems[: args.max_problems]
        for p in shown:
            print(p)
        if len(shown) < len(problems):
            print(f"... {len(problems) - len(shown)} more not shown")
        print(f"INVALID {args.submission}: {len(problems)} problem(s)")
        return 1
    rows = read_submission(args.submission)
    n_pred = sum(len(r.predictions) for r in rows)
    print(f"OK {args.submission}: {len(rows)} images, {n_pred} predictions, "
          f"matches {args.sample_submission}")
    return 0
