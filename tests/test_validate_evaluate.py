"""`infer_gpu validate` / `infer_gpu evaluate`: every kind of problem caught, CLIs run."""
from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from common import masks
from common.submission import validate, write_submission
from infer_gpu import evaluate as evaluate_cmd
from infer_gpu import validate as validate_cmd

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TEXT = "ID,ImageWidth,ImageHeight,PredictionString\nimg_a,40,30,\nimg_b,40,30,\nimg_c,64,48,\n"


def _mask(h, w, y0=2, x0=3, y1=9, x1=12):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return masks.encode(m)


def _run(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


@pytest.fixture()
def sample(tmp_path):
    path = tmp_path / "sample_submission.csv"
    path.write_text(SAMPLE_TEXT)
    return str(path)


def _valid_rows():
    return [
        ("img_a", 40, 30, [(0, 0.5, _mask(30, 40)), (16, 0.25, _mask(30, 40))]),
        ("img_b", 40, 30, []),
        ("img_c", 64, 48, [(3, 1.0, _mask(48, 64, 10, 10, 40, 50))]),
    ]


def test_valid_submission_has_no_problems(tmp_path, sample, capsys):
    sub = str(tmp_path / "submission.csv")
    write_submission(sub, _valid_rows())
    assert validate(sub, sample) == []
    assert _run(validate_cmd, ["--submission", sub, "--sample-submission", sample]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("OK ") and "3 images, 3 predictions" in out[0]


def test_every_kind_of_problem_is_listed(tmp_path, sample, capsys):
    good = _mask(30, 40)
    wrong_size = _mask(20, 20, 1, 1, 5, 5)
    empty = masks.encode(np.zeros((30, 40), bool))
    not_zlib = base64.b64encode(b"hello").decode()
    not_rle = base64.b64encode(zlib.compress(b"\x01\x02")).decode()
    sub = tmp_path / "submission.csv"
    sub.write_text(
        "ID,ImageWidth,ImageHeight,Predictions\n"                    # header
        f"img_a,41,30,0 0.5 {good} 19 0.5 {good} x 0.5 {good}\n"     # row 1: width, 2 labels
        f"img_a,40,30,0 0.5 {good}\n"                                # row 2: duplicate ID
        f"img_zz,40,30,0 0.5 {good}\n"                               # row 3: not in the sample
        f"img_c,64,47,1 1.5 {good} 2 abc {good} 3 0.5\n"             # row 4: height, 8 fields
        "just,two\n"                                                 # row 5: field count
        f"img_b,40,30,8 -0.1 {good} 4 0.5 {wrong_size} 5 0.5 {empty} 6 0.5 {not_zlib} 7 0.5 {not_rle}\n"
    )
    problems = validate(str(sub), sample)
    expected = [
        "header is 'ID,ImageWidth,ImageHeight,Predictions'",
        "row 1 (ID img_a): ImageWidth 41, the sample says 40",
        "row 1 (ID img_a) prediction 2: label 19 outside 0-18",
        "row 1 (ID img_a) prediction 3: label 'x' is not an integer",
        "row 2 (ID img_a): ID appears again (first at row 1)",
        "row 3 (ID img_zz): ID is not in the sample submission",
        "row 4 (ID img_c): ImageHeight 47, the sample says 48",
        "row 4 (ID img_c): PredictionString has 8 fields, not a multiple of 3",
        "row 5: 2 fields, expected 4",
        "row 6 (ID img_b) prediction 1: confidence -0.1 outside [0, 1]",
        "row 6 (ID img_b) prediction 2 (label 4): mask does not decode to the 40x30 (WxH) image",
        "row 6 (ID img_b) prediction 3 (label 5): mask is empty",
        "row 6 (ID img_b) prediction 4 (label 6): mask does not decode",
        "row 6 (ID img_b) prediction 5 (label 7): mask does not decode",
    ]
    for part in expected:
        assert any(part in p for p in problems), f"missing: {part}\n" + "\n".join(problems)
    # Listed in file order: the header, then row by row.
    rows = [int(p.split(" row ")[1].split()[0].rstrip(":")) for p in problems[1:]]
    assert rows == sorted(rows)
    # row 1's width is wrong, so its masks are checked against the row's own 41x30: they fail.
    assert sum("row 1 (ID img_a) prediction 1 (label 0): mask does not decode" in p for p in problems) == 1
    assert len(problems) == len(expected) + 1
    # img_c is present (at row 4), so nothing is reported missing; remove it and it is.
    assert not any("missing from the submission" in p for p in problems)

    assert _run(validate_cmd, ["--submission", str(sub), "--sample-submission", sample]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"INVALID {sub}: {len(problems)} problem(s)"
    assert out[:-1] == problems


def test_missing_ids_are_listed(tmp_path, sample):
    sub = str(tmp_path / "submission.csv")
    write_submission(sub, _valid_rows()[:1])
    problems = validate(sub, sample)
    assert problems == [
        f"{sub}: ID img_b (sample row 2) is missing from the submission",
        f"{sub}: ID img_c (sample row 3) is missing from the submission",
    ]


def test_validate_command_reports_unreadable_sample(tmp_path, capsys):
    sub = str(tmp_path / "submission.csv")
    write_submission(sub, _valid_rows())
    assert _run(validate_cmd, ["--submission", sub, "--sample-submission", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv" in capsys.readouterr().err


def test_evaluate_command_prints_per_class_ap_and_map_last(tmp_path, capsys):
    truth = str(tmp_path / "truth.csv")
    sub = str(tmp_path / "submission.csv")
    a, b = _mask(30, 40), _mask(30, 40, 15, 20, 28, 39)
    write_submission(truth, [("img_a", 40, 30, [(0, 1, a), (16, 1, b)])])
    write_submission(sub, [("img_a", 40, 30, [(0, 0.9, a), (16, 0.8, a)])])
    assert _run(evaluate_cmd, ["--truth", truth, "--submission", sub]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "mAP 0.5000"
    assert any(line.startswith(" 0 Nucleoplasm") and "1.0000" in line for line in lines)
    assert any(line.startswith("16 Cytosol") and "0.0000" in line for line in lines)
    assert any(line.startswith(" 5 Nuclear bodies") and " - " in line for line in lines)

    assert _run(evaluate_cmd, ["--truth", truth, "--submission", truth]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "mAP 1.0000"


def test_evaluate_command_errors(tmp_path, capsys):
    truth = str(tmp_path / "truth.csv")
    write_submission(truth, [("img_a", 40, 30, [(0, 1, _mask(20, 20))])])  # wrong-size mask
    assert _run(evaluate_cmd, ["--truth", truth, "--submission", truth]) == 2
    assert f"{truth} row 1 (ID img_a) prediction 1" in capsys.readouterr().err
    empty_truth = str(tmp_path / "empty.csv")
    write_submission(empty_truth, [("img_a", 40, 30, [])])
    assert _run(evaluate_cmd, ["--truth", empty_truth, "--submission", empty_truth]) == 2
    assert "no truth cells" in capsys.readouterr().err


def test_synthetic_truth_validates_and_scores_one(synthetic_small, capsys):
    truth = str(synthetic_small / "truth.csv")
    sample = str(synthetic_small / "sample_submission.csv")
    assert validate(truth, sample) == []
    assert _run(evaluate_cmd, ["--truth", truth, "--submission", truth]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "mAP 1.0000"


def test_every_cli_command_module_exists():
    from infer_gpu.cli import COMMANDS

    assert {"predict", "segment", "validate", "evaluate"} <= set(COMMANDS)
    missing = [m for m in COMMANDS.values() if importlib.util.find_spec(m) is None]
    assert missing == []


def test_python_m_infer_gpu_runs_both_commands(tmp_path):
    truth = str(tmp_path / "truth.csv")
    sample = str(tmp_path / "sample.csv")
    write_submission(truth, [("img_a", 40, 30, [(0, 1, _mask(30, 40))])])
    Path(sample).write_text("ID,ImageWidth,ImageHeight,PredictionString\nimg_a,40,30,\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    ev = subprocess.run([sys.executable, "-m", "infer_gpu", "evaluate", "--truth", truth, "--submission", truth],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr
    assert ev.stdout.strip().splitlines()[-1] == "mAP 1.0000"
    va = subprocess.run([sys.executable, "-m", "infer_gpu", "validate", "--submission", truth,
                         "--sample-submission", sample], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert va.returncode == 0, va.stderr
    assert va.stdout.startswith("OK ")
