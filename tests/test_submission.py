"""The submission CSV: formatting, atomic writing, reading with row-numbered errors."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

from common import masks
from common.submission import (
    HEADER,
    ImageRow,
    Prediction,
    SubmissionError,
    format_prediction_string,
    parse_prediction_string,
    read_sample_submission,
    read_submission,
    write_submission,
)

EXAMPLE_MASK = "eNqLi8xJM7BOTjS08DT2NfI38DfyM/Q3NMAJgJJ+RkBs7JecF5tnAADw+Q9I"


def _mask(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return masks.encode(m)


def test_format_prediction_string_matches_the_sample_row_format():
    text = format_prediction_string([(0, 0.6378329, EXAMPLE_MASK), Prediction(16, 1.0, "abc=")])
    assert text == f"0 0.637833 {EXAMPLE_MASK} 16 1.000000 abc="
    assert format_prediction_string([]) == ""
    assert parse_prediction_string(text) == [Prediction(0, 0.637833, EXAMPLE_MASK), Prediction(16, 1.0, "abc=")]


@pytest.mark.parametrize(
    "triple, message",
    [((19, 0.5, "m"), "label 19"), ((-1, 0.5, "m"), "label -1"), ((3, 1.5, "m"), "confidence"),
     ((3, float("nan"), "m"), "confidence"), ((3, 0.5, ""), "mask"), ((3, 0.5, "a b"), "mask")],
)
def test_writer_refuses_invalid_triples(triple, message):
    with pytest.raises(ValueError, match=message):
        format_prediction_string([(0, 0.1, "ok"), triple])


def test_parse_prediction_string_names_every_problem():
    with pytest.raises(SubmissionError) as err:
        parse_prediction_string("0 0.5 m 19 0.5 m x 0.5 m 3 nan m 4 2 m", where="sub.csv row 7")
    text = str(err.value)
    for part in ("prediction 2: label 19", "prediction 3: label 'x'", "prediction 4: confidence nan",
                 "prediction 5: confidence 2"):
        assert f"sub.csv row 7 {part}" in text
    with pytest.raises(SubmissionError, match="not a multiple of 3"):
        parse_prediction_string("0 0.5")


def test_write_then_read_round_trip(tmp_path):
    m1, m2 = _mask(30, 40, 2, 3, 9, 12), _mask(30, 40, 10, 10, 20, 30)
    rows = [
        ImageRow("img_a", 40, 30, [Prediction(0, 0.25, m1), Prediction(5, 0.75, m1), Prediction(16, 0.5, m2)]),
        ("img_b", 64, 48, []),
        ("img_c", 40, 30, f"2 0.100000 {m2}"),
    ]
    path = str(tmp_path / "out" / "submission.csv")
    write_submission(path, rows)
    assert sorted(os.listdir(tmp_path / "out")) == ["submission.csv"]  # no temporary left over
    with open(path) as fh:
        lines = fh.read().splitlines()
    assert lines[0] == ",".join(HEADER)
    assert lines[2] == "img_b,64,48,"
    back = read_submission(path)
    assert [(r.image_id, r.width, r.height, r.row) for r in back] == [
        ("img_a", 40, 30, 1), ("img_b", 64, 48, 2), ("img_c", 40, 30, 3)]
    assert back[0].predictions == rows[0].predictions
    assert back[2].predictions == [Prediction(2, 0.1, m2)]
    assert masks.decode(back[0].predictions[2].mask, 30, 40).sum() == 200


def test_read_submission_lists_every_problem_with_row_numbers(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(
        "ID,Width,ImageHeight,PredictionString\n"
        "a,10,10,0 0.5 m\n"
        "b,10\n"
        "c,ten,10,\n"
        "a,10,10,\n"
        "d,10,-3,1 0.5\n"
    )
    with pytest.raises(SubmissionError) as err:
        read_submission(str(path))
    text = str(err.value)
    assert "header is 'ID,Width,ImageHeight,PredictionString'" in text
    assert f"{path} row 2: 2 fields, expected 4" in text
    assert f"{path} row 3 (ID c): ImageWidth 'ten' is not an integer" in text
    assert f"{path} row 4: ID a appears again (first at row 1)" in text
    assert f"{path} row 5 (ID d): ImageHeight -3 is not positive" in text
    assert f"{path} row 5 (ID d): PredictionString has 2 fields" in text
    assert text.startswith("6 problem(s)")


def test_read_sample_submission_synthetic_style(tmp_path):
    path = tmp_path / "sample.csv"
    path.write_text("ID,ImageWidth,ImageHeight,PredictionString\nx1,2048,2048,\nx2,1728,1728,0 1 eNoLCAgIMAEABJkBdQ==\n")
    rows = read_sample_submission(str(path))
    assert [(r.image_id, r.width, r.height, r.row) for r in rows] == [("x1", 2048, 2048, 1), ("x2", 1728, 1728, 2)]
    path.write_text("ID,ImageWidth,ImageHeight\nx1,2048,0\nx1,5,5\n")
    with pytest.raises(SubmissionError) as err:
        read_sample_submission(str(path))
    assert "row 1 (ID x1): ImageHeight 0 is not positive" in str(err.value)
    assert "row 2: ID x1 appears again" in str(err.value)


def test_read_the_real_sample_submission(shared_data):
    rows = read_sample_submission(str(shared_data / "kaggle2021" / "sample_submission.csv"))
    assert len(rows) == 559
    assert len({r.image_id for r in rows}) == 559
    assert Counter(r.width for r in rows) == {2048: 462, 1728: 68, 3072: 29}
    assert all(r.width == r.height for r in rows)


def test_a_row_longer_than_the_csv_default_field_limit_reads_back(tmp_path):
    """A 2048 px image with ~30 cells x several labels writes a PredictionString past the csv
    module's default 128 KiB field limit; read_submission must still read it."""
    rng = np.random.default_rng(0)
    preds = []
    while sum(len(p.mask) for p in preds) < 200_000:
        m = rng.random((256, 256)) > 0.5  # noisy masks encode long
        preds.append(Prediction(len(preds) % 19, 0.5, masks.encode(m)))
    path = str(tmp_path / "submission.csv")
    write_submission(path, [ImageRow("big", 256, 256, preds)])
    back = read_submission(path)
    assert len(back) == 1 and back[0].predictions == preds
