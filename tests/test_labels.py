import numpy as np
import pytest

from common import labels as L


def test_class_table():
    assert L.NUM_CLASSES == 19
    assert L.CLASS_NAMES[0] == "Nucleoplasm"
    assert L.CLASS_NAMES[11] == "Mitotic spindle"
    assert L.CLASS_NAMES[17] == "Vesicles and punctate cytosolic patterns"
    assert L.CLASS_NAMES[L.NEGATIVE] == "Negative"
    assert len(set(L.CLASS_NAMES)) == 19


@pytest.mark.parametrize("text,expected", [("8|5|0", [8, 5, 0]), ("18", [18]), (" 3 | 3|16 ", [3, 16])])
def test_parse_and_format_round_trip(text, expected):
    got = L.parse_labels(text)
    assert got == expected
    assert L.parse_labels(L.format_labels(got)) == expected


@pytest.mark.parametrize("bad,fragment", [("19", "outside"), ("-1", "outside"), ("3|x", "not an integer"),
                                          ("", "empty"), ("1||2", "not an integer"), ("2.5", "not an integer")])
def test_parse_errors_name_the_row(bad, fragment):
    with pytest.raises(L.LabelError) as err:
        L.parse_labels(bad, where="train.csv row 7 (ID abc)")
    assert "train.csv row 7 (ID abc)" in str(err.value)
    assert fragment in str(err.value)


def test_multi_hot_round_trip():
    vec = L.multi_hot([0, 5, 18])
    assert vec.shape == (19,) and vec.dtype == np.float32
    assert vec.sum() == 3 and vec[5] == 1
    assert L.from_multi_hot(vec) == [0, 5, 18]
    with pytest.raises(L.LabelError):
        L.multi_hot([19])
    with pytest.raises(L.LabelError):
        L.format_labels([20])


def test_read_labels_csv_reports_file_and_row(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("ID,Label\na,1|2\nb,3\nc,4|99\n")
    with pytest.raises(L.LabelError) as err:
        L.read_labels_csv(str(path))
    assert str(path) in str(err.value) and "row 3" in str(err.value) and "ID c" in str(err.value)
    path.write_text("Id,Labels\na,1\n")
    with pytest.raises(L.LabelError, match="header"):
        L.read_labels_csv(str(path))


def test_real_train_csv(shared_data):
    rows = L.read_labels_csv(str(shared_data / "kaggle2021" / "train.csv"))
    assert len(rows) == 21806
    counts = np.sum([L.multi_hot(lab) for _, lab in rows], axis=0)
    assert counts[11] == 78  # Mitotic spindle, per the data README
    assert counts[18] == 34  # Negative
    assert all(1 <= len(lab) for _, lab in rows)


def test_public_hpa_list_parses(shared_data):
    rows = L.read_labels_csv(str(shared_data / "hpa_public" / "public_hpa_labels.csv"))
    assert len(rows) == 67579


def test_format_label_rows_round_trips_through_the_reader(tmp_path):
    """The one label-list writer: quoted where a cell holds a comma or a quote, read back as
    written by `read_label_rows` (the builder's reader)."""
    rows = [("a1", "0|5", "U-2 OS"), ('b,"2"', "18", ""), ("c", "", "A-431")]
    text = L.format_label_rows(["ID", "Label", "Cellline"], rows)
    assert text.splitlines()[0] == "ID,Label,Cellline"
    assert text.splitlines()[2] == '"b,""2""",18,'
    assert text.endswith("\n") and "\r" not in text
    path = tmp_path / "labels.csv"
    path.write_text(text)
    back = [(r["ID"], r["Label"], r["Cellline"]) for r in L.read_label_rows(str(path))]
    assert back == rows
