"""infer_gpu pseudo-label: soft cell targets from a cell table and the image labels. Perfect
scores give exactly the true cell labels; never a class the image lacks but Negative; the
command end to end; every kind of bad input refused (file and row named) or counted."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import cell_labels, cell_table
from common.labels import NEGATIVE, NUM_CLASSES, multi_hot, read_labels_csv
from common.segmentation import spec_for
from infer_gpu import cli
from infer_gpu.pseudo_label import PseudoLabelRule, cell_targets, make
from testkit import noisy_cells, synthetic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=[0.3, 0.9], ids=["share0.3", "share0.9"])
def data(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"syn{request.param}")
    synthetic.generate(str(out), n=19, size=96, seed=1, share=request.param)
    return out


def _table(rows, meta=None) -> cell_table.CellTable:
    """A hand-made table: rows are (ID, cell, c scores (19,))."""
    k = len(rows)
    c = np.array([r[2] for r in rows], np.float32).reshape(k, NUM_CLASSES)
    return cell_table.CellTable(
        ids=[r[0] for r in rows], width=np.full(k, 64, np.int32), height=np.full(k, 64, np.int32),
        cell=np.array([r[1] for r in rows], np.int32), box=np.tile(np.array([0, 0, 8, 8], np.int32), (k, 1)),
        area=np.full(k, 64, np.int32), touches_border=np.zeros(k, bool), has_nucleus=np.ones(k, bool),
        scores={"c": c, "i": np.full_like(c, np.nan), "s": c.copy()}, masks=["eNoLCAgIBAAF7AGY"] * k,
        meta=meta if meta is not None else {"segmentation": {**spec_for("default", 512).to_dict(),
                                                            "nuclei_model": None, "cell_model": None}})


def _scores(**values) -> np.ndarray:
    s = np.zeros(NUM_CLASSES, np.float32)
    for k, v in values.items():
        s[int(k[1:])] = v
    return s


def _write(tmp_path, rows, labels: str, name="cells.csv", meta=None):
    cells = tmp_path / name
    cell_table.write(str(cells), _table(rows, meta), _table(rows, meta).meta)
    lab = tmp_path / "train.csv"
    lab.write_text("ID,Label\n" + labels)
    return str(cells), str(lab)


def test_perfect_scores_give_exactly_the_true_cell_labels(data, tmp_path):
    cells = tmp_path / "cells.parquet"
    noisy_cells.write_truth_table(str(cells), str(data))
    out = tmp_path / "cell_labels.csv"
    summary = make(str(cells), str(data / "train.csv"), str(out))
    table = cell_labels.read(str(out))
    truth = synthetic.read_cell_labels(str(data))
    assert set(table.targets) == set(truth) and summary.cells == len(truth)
    for key, labels in truth.items():
        np.testing.assert_array_equal(table.targets[key], multi_hot(labels), err_msg=str(key))
    # and the labels are weak: inheriting the image's labels would be wrong for some cells
    image = {i: set(lab) for i, lab in read_labels_csv(str(data / "train.csv"))}
    assert any(set(labels) != image[i] for (i, _), labels in truth.items())
    meta = table.meta
    assert table.segmentation() == spec_for(masks=True)
    assert meta["rule"]["name"] == "relative-max" and meta["rule"]["tau"] == PseudoLabelRule().tau
    source = meta["source"]["cells"]
    assert source["path"] == str(cells) and source["fingerprint"].startswith("crc32:")


def test_noisy_scores_beat_inheriting_the_image_labels(data, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import pseudo_label_quality as quality

    cells = tmp_path / "cells.parquet"
    noisy_cells.write_truth_table(str(cells), str(data), noise=0.2, spread=0.5, seed=3)
    (base_name, base), (_, rule) = quality.evaluate(str(cells), str(data), [PseudoLabelRule()], str(tmp_path))
    assert base["AUC"] == 0.5 and rule["AUC"] > 0.9
    assert rule["MAE"] < 0.5 * base["MAE"]


def test_never_a_class_the_image_lacks_except_negative():
    rng = np.random.default_rng(0)
    for _ in range(50):
        labels = sorted(rng.choice(18, size=int(rng.integers(1, 4)), replace=False).tolist())
        scores = rng.uniform(0, 1, (int(rng.integers(1, 12)), NUM_CLASSES))
        t = cell_targets(scores, labels, PseudoLabelRule(floor=0.0))
        lacks = [j for j in range(NEGATIVE) if j not in labels]
        assert np.all(t[:, lacks] == 0) and np.all((t >= 0) & (t <= 1))
        for j in labels:  # the image's best cell keeps each of its classes fully
            assert t[np.argmax(scores[:, j]), j] == 1.0
        assert np.all(t[:, NEGATIVE][t[:, labels].max(axis=1) > 0.7] == 0)


def test_the_rule_step_by_step():
    scores = np.stack([_scores(c03=0.8), _scores(c03=0.4), _scores(c03=0.1), _scores(c03=0.0)])
    t = cell_targets(scores, [3], PseudoLabelRule(tau=0.5, negative_min=0.5))
    np.testing.assert_allclose(t[:, 3], [1.0, 1.0, 0.25, 0.0])  # r / tau, capped at 1
    np.testing.assert_allclose(t[:, NEGATIVE], [0, 0, 0.75, 1.0])
    t = cell_targets(scores, [3], PseudoLabelRule(tau=0.5, negative_min=0.8))
    np.testing.assert_allclose(t[:, NEGATIVE], [0, 0, 0, 1.0])  # below --negative-min: none
    t = cell_targets(scores, [3], PseudoLabelRule(tau=0.5, floor=0.3, negative=False))
    np.testing.assert_allclose(t[:, 3], [1.0, 1.0, 0.3, 0.3])
    assert not t[:, NEGATIVE].any()
    # no evidence: the image's best score is 0, so every cell keeps the class
    t = cell_targets(np.zeros((3, NUM_CLASSES)), [3, 7], PseudoLabelRule())
    assert np.all(t[:, [3, 7]] == 1) and not t[:, NEGATIVE].any()
    for bad in (dict(tau=0), dict(tau=1.5), dict(floor=-0.1), dict(negative_min=2)):
        with pytest.raises(ValueError):
            PseudoLabelRule(**bad)


def test_negative_only_images_give_every_cell_negative(tmp_path):
    rows = [("neg", 1, _scores(c05=0.9)), ("neg", 2, _scores()), ("pos", 1, _scores(c05=0.9)),
            ("pos", 2, _scores(c05=0.05))]
    cells, labels = _write(tmp_path, rows, "neg,18\npos,5\n")
    summary = make(cells, labels, str(tmp_path / "out.csv"))
    t = cell_labels.read(str(tmp_path / "out.csv")).targets
    for cell in (1, 2):
        np.testing.assert_array_equal(t[("neg", cell)], np.eye(NUM_CLASSES)[NEGATIVE])
    assert t[("pos", 1)][5] == 1 and t[("pos", 2)][NEGATIVE] > 0.9
    assert summary.negative_images == 1 and summary.negative_image_cells == 2 and summary.negatives == 1
    assert summary.had[5] == 2 and summary.kept[5] == 1


def test_cli_help_and_a_run_in_process(tmp_path, capsys):
    env_help = subprocess.run([sys.executable, "-m", "infer_gpu", "pseudo-label", "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert env_help.returncode == 0
    for text in ("--cells", "--labels", "--out", "--tau", "--floor", "--no-negative", "--negative-min",
                 "r_kj = c_kj", "(default: 0.6)"):
        assert text in env_help.stdout, text
    rows = [("a", 1, _scores(c01=0.9, c02=0.1)), ("a", 2, _scores(c01=0.2, c02=0.8)),
            ("b", 3, _scores()), ("x", 1, _scores(c01=1.0)), ("x", 2, _scores(c01=1.0))]
    cells, labels = _write(tmp_path, rows, "a,1|2\nb,18\nnone,4\n", name="cells.parquet")
    out = tmp_path / "cl.csv"
    rc = cli.main(["pseudo-label", "--cells", cells, "--labels", labels, "--out", str(out), "--tau", "0.5",
                   "--no-negative"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "2 images, 3 cells; scores read: c" in text
    assert "skipped 1 image(s) of the cell table that the labels lack (2 cells): x" in text
    assert "1 labelled image(s) with no cells in the table: none" in text
    assert "1 Nuclear membrane" in text and "2 Nucleoli" in text and f"wrote {out}" in text
    table = cell_labels.read(str(out))
    assert table.images == {"a": [1, 2], "b": [3]}
    np.testing.assert_allclose(table.targets[("a", 2)][[1, 2]], [0.2 / 0.9 / 0.5, 1.0], rtol=1e-5)
    assert table.targets[("a", 1)][NEGATIVE] == 0 and table.meta["rule"]["negative"] is False
    assert table.segmentation() == spec_for("default", 512)


def test_a_table_without_cell_scores_falls_back_to_the_final_score(tmp_path):
    table = _table([("a", 1, _scores(c04=0.9)), ("a", 2, _scores(c04=0.1))])
    table.scores["s"] = table.scores["c"].copy()
    table.scores["c"][:] = np.nan
    cells = tmp_path / "cells.csv"
    cell_table.write(str(cells), table, table.meta)
    (tmp_path / "train.csv").write_text("ID,Label\na,4\n")
    summary = make(str(cells), str(tmp_path / "train.csv"), str(tmp_path / "out.csv"))
    assert summary.score == "s" and "final score s" in summary.lines()[0]
    read = cell_labels.read(str(tmp_path / "out.csv"))
    assert read.meta["rule"]["score"] == "s" and "note" in read.meta["rule"]
    assert read.targets[("a", 2)][4] == pytest.approx(0.1 / 0.9 / 0.6, rel=1e-5)


def _run(tmp_path, cells, labels, capsys):
    out = tmp_path / "out.csv"
    rc = cli.main(["pseudo-label", "--cells", cells, "--labels", labels, "--out", str(out)])
    err = capsys.readouterr().err
    assert not out.exists()  # nothing under the final name
    assert not list(tmp_path.glob("out.csv*"))  # nor a temporary beside it
    return rc, err


GOOD = [("a", 1, _scores(c01=0.9)), ("a", 2, _scores(c01=0.2)), ("b", 1, _scores(c03=0.5))]


@pytest.mark.parametrize("case, message", [
    ("nan", r"cells.csv row 2 \(ID a cell 2\): score outside \[0, 1\] or NaN: c_01 = nan"),
    ("above", r"cells.csv row 2 \(ID a cell 2\): score outside \[0, 1\] or NaN: c_01 = 1.5"),
    ("negative", r"cells.csv row 2 \(ID a cell 2\): score outside \[0, 1\] or NaN: c_01 = -0.2"),
    ("twice", r"cells.csv row 3 \(ID a cell 1\): the cell appears twice \(first at row 1\)"),
    ("cell0", r"cells.csv row 2 \(ID a cell 0\): the cell id is not a label-map id"),
    ("truncated", r"cells.csv row 3"),
    ("not a table", r"cells.csv: not a cell table, missing column"),
    ("missing", r"cells.csv: no such file"),
    ("parquet cut", r"cells.parquet: not a readable Parquet file"),
    ("no segmentation", r"cells.csv: its provenance does not say how the cells were segmented"),
    ("label bad", r"train.csv row 2 \(ID b\): label 40 outside"),
    ("label cut", r"train.csv row 2 \(ID b\): missing label"),
    ("label twice", r"train.csv row 3: ID a appears twice"),
    ("label missing", r"train.csv: no such file"),
    ("label header", r"train.csv: expected a header with ID and Label"),
])
def test_bad_inputs_are_refused_naming_the_file_and_row(tmp_path, capsys, case, message):
    rows = [list(r) for r in GOOD]
    labels = "a,1\nb,3\n"
    name, meta = "cells.csv", None
    if case == "nan":
        rows[1][2] = _scores(c01=np.nan)
    elif case == "above":
        rows[1][2] = _scores(c01=1.5)
    elif case == "negative":
        rows[1][2] = _scores(c01=-0.2)
    elif case == "twice":
        rows[2] = ("a", 1, _scores())
    elif case == "cell0":
        rows[1][1] = 0
    elif case == "parquet cut":
        name = "cells.parquet"
    elif case == "no segmentation":
        meta = {"models": []}
    elif case == "label bad":
        labels = "a,1\nb,40\n"
    elif case == "label cut":
        labels = "a,1\nb"
    elif case == "label twice":
        labels = "a,1\nb,3\na,1\n"
    elif case == "label header":
        labels = None
    cells, lab = _write(tmp_path, [tuple(r) for r in rows], labels or "", name=name, meta=meta)
    path = Path(cells)
    if case == "truncated":
        text = path.read_text()
        path.write_text(text[: text.rindex(",", 0, len(text) - 40)])  # the last row cut short
    elif case == "not a table":
        path.write_text("ID,cell\na,1\n")
    elif case == "missing":
        path.unlink()
    elif case == "parquet cut":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    if case == "label missing":
        Path(lab).unlink()
    elif case == "label header":
        Path(lab).write_text("Image,Labels\na,1\n")
    rc, err = _run(tmp_path, cells, lab, capsys)
    assert rc == 1
    assert "pseudo-label: error:" in err
    assert re.search(message, err), err
