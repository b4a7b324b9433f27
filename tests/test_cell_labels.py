"""common.cell_labels: the cell-labels file round-trips, and every kind of bad file is refused
with the file and line named."""
from __future__ import annotations

import numpy as np
import pytest

from common import cell_labels as cl
from common.segmentation import spec_for


def _rows():
    rng = np.random.default_rng(0)
    return [("img_a", 1, rng.uniform(0, 1, 19)), ("img_a", 3, np.zeros(19)), ("img_b", 2, np.eye(19)[18])]


def test_round_trip_keeps_targets_provenance_and_cell_order(tmp_path):
    spec = spec_for("default", 512)
    path = str(tmp_path / "cell_labels.csv")
    fp = cl.write(path, _rows(), {"segmentation": spec.to_dict(), "rule": {"name": "r", "floor": 0.1}})
    table = cl.read(path)
    assert table.fingerprint == fp and fp.startswith("crc32:")
    assert table.images == {"img_a": [1, 3], "img_b": [2]}
    for image_id, cell, t in _rows():
        np.testing.assert_allclose(table.targets[(image_id, cell)], t, rtol=1e-5, atol=1e-7)
    assert table.meta["rule"] == {"name": "r", "floor": 0.1} and table.segmentation() == spec
    cl.check_segmentation(table, spec, "the build")  # same: accepted
    with pytest.raises(cl.CellLabelsError, match=r"work_size: 512 \(cell labels\) vs 256 \(the build\)"):
        cl.check_segmentation(table, spec_for("default", 256), "the build")
    import csv

    with open(path) as fh:  # a plain CSV reader only has to skip the first line
        rows = list(csv.reader(line for line in fh if not line.startswith("#")))
    assert tuple(rows[0]) == cl.COLUMNS and len(rows) == 4


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("# hpa-scc cell labels v1", "# something else"), "not a cell-labels file"),
    (lambda t: t.replace("# hpa-scc cell labels v1", "# hpa-scc cell labels v9"), "version '9'"),
    (lambda t: t[: t.rindex(",")], "line 5: 20 fields|truncated"),
    (lambda t: t.rstrip("\n"), "truncated"),
    (lambda t: t.replace("img_b,2,0,", "img_b,2,nan,"), "line 5: t_00 outside"),
    (lambda t: t.replace("img_b,2,0,", "img_b,2,1.5,"), "line 5: t_00 outside"),
    (lambda t: t.replace("img_b,2,", "img_b,x,"), "line 5: cell 'x'"),
    (lambda t: t.replace("img_b,2,", "img_a,1,"), "line 5: img_a cell 1 appears twice"),
    (lambda t: t.replace("ID,cell", "ID,cellid"), "line 2: expected the header"),
])
def test_bad_files_are_refused_naming_the_file_and_line(tmp_path, edit, message):
    path = tmp_path / "cl.csv"
    cl.write(str(path), _rows(), {"segmentation": spec_for().to_dict()})
    path.write_text(edit(path.read_text()))
    with pytest.raises(cl.CellLabelsError, match=message) as err:
        cl.read(str(path))
    assert str(path) in str(err.value)


def test_writer_refuses_targets_outside_the_unit_interval(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        cl.write(str(tmp_path / "x.csv"), [("a", 1, np.full(19, 1.2))], {})
    assert not (tmp_path / "x.csv").exists()
