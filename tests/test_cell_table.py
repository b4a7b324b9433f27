"""The per-cell table (`common.cell_table`, `predict --cells`) and `predict --labels`.

The format round trip is a unit test; the rest run `predict` for real on the session's small
synthetic set (real images, segmentation, mask codec, writers) with the stand-in models of
test_predict_e2e (seeded scores per tile, exact and fast), and the CLI with a tiny untrained
Keras run folder (no training). The SIGKILL + `--resume` path of the table is checked in
test_predict_e2e's resume test, beside the CSV's.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from common import cell_table, masks, submission
from common.labels import NUM_CLASSES
from common.preprocess import Preprocess, TileSpec
from infer_gpu import cli, combine, report
from tests.test_predict_e2e import (TableModel, _copy_images, _random_scores, _rows, _save_run, _tiny_cnn,
                                    _write_sample, run_predict, stand_in_run)

IDS = [f"syn_{i:04d}" for i in range(6)]


def _cell_run():
    return stand_in_run(TableModel({}, _random_scores), name="cells-random")


def _image_run():
    return stand_in_run(TableModel({}, _random_scores), spec=Preprocess(TileSpec(size=48, mode="image")),
                        name="image-random")


def _table(n_images: int = 3, seed: int = 0, with_c: bool = True) -> cell_table.CellTable:
    rng = np.random.default_rng(seed)
    chunks = []
    for k in range(n_images):
        n = int(rng.integers(0, 5))
        boxes = rng.integers(0, 300, (n, 4))
        entry = cell_table.part_entry(
            np.arange(1, n + 1) * 3, boxes, rng.integers(1, 10_000, n), rng.random(n) < 0.5, rng.random(n) < 0.5,
            [f"eNoLCAgIsLEBAA{j}==" for j in range(n)],
            cell=rng.random((n, NUM_CLASSES)).astype(np.float32) if with_c else None,
            image=rng.random(NUM_CLASSES).astype(np.float32),
            final=rng.random((n, NUM_CLASSES)).astype(np.float32) ** 3)
        chunks.append(cell_table.from_part(f"img,{k}", 320 + k, 300, entry))  # a comma: CSV quoting
    return cell_table.CellTable.concat(chunks)


def _same(a: cell_table.CellTable, b: cell_table.CellTable) -> None:
    assert a.ids == b.ids and a.masks == b.masks
    for name in ("width", "height", "cell", "box", "area", "touches_border", "has_nucleus"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for kind in cell_table.SCORE_KINDS:
        assert np.array_equal(a.scores[kind], b.scores[kind], equal_nan=True), kind  # exact float32


# --- the format ----------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".parquet", ".csv"])
def test_round_trip_keeps_every_value_nulls_and_the_provenance(tmp_path, ext):
    import pyarrow.parquet as pq

    table = _table(n_images=6, with_c=False)
    assert len(table) > 5 and np.isnan(table.scores["c"]).all()
    path = str(tmp_path / f"cells{ext}")
    meta = {"models": [{"path": "run", "weights": "sha256:abc"}], "rule": {"min_score": 0.01}}
    assert cell_table.write(path, [table], meta) == len(table)
    back = cell_table.read(path)
    _same(table, back)
    assert back.meta == {"format": "hpa-cell-table", "version": 1, **meta}
    assert list(back.rows()[0]) == list(cell_table.COLUMNS)
    assert back.rows()[0]["c_00"] != back.rows()[0]["c_00"] and isinstance(back.rows()[0]["s_18"], float)
    if ext == ".parquet":  # what any Parquet reader sees: the columns, nulls, the metadata key
        arrow = pq.read_table(path)
        assert arrow.column_names == list(cell_table.COLUMNS)
        assert arrow.column("c_05").null_count == len(table) and arrow.column("s_05").null_count == 0
        assert str(arrow.schema.field("s_05").type) == "float" and str(arrow.schema.field("y0").type) == "int32"
        assert json.loads(arrow.schema.metadata[cell_table.META_KEY])["models"] == meta["models"]
    else:  # a plain CSV a person opens, provenance beside it
        lines = Path(path).read_text().splitlines()
        assert lines[0] == ",".join(cell_table.COLUMNS) and len(lines) == len(table) + 1
        assert json.loads(Path(path + ".meta.json").read_text())["rule"] == meta["rule"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_empty_table_and_bad_files(tmp_path):
    for ext in (".parquet", ".csv"):
        path = str(tmp_path / f"empty{ext}")
        assert cell_table.write(path, [], {}) == 0
        assert len(cell_table.read(path)) == 0
    with pytest.raises(ValueError, match=r"cells\.txt: unsupported extension '\.txt'"):
        cell_table.format_of("out/cells.txt")
    (tmp_path / "other.csv").write_text("ID,cell\na,1\n")
    with pytest.raises(cell_table.CellTableError, match=r"other\.csv: not a cell table, missing column\(s\) width"):
        cell_table.read(str(tmp_path / "other.csv"))


# --- predict --cells -----------------------------------------------------------------------------
def _triples_from_table(table: cell_table.CellTable, image_id: str, min_score: float) -> list[tuple]:
    """The submission's detections of one image, rebuilt from the table alone."""
    out = []
    for r in np.flatnonzero(np.asarray(table.ids) == image_id):
        s = table.scores["s"][r]
        for label in np.argsort(-s, kind="stable"):
            if s[label] >= min_score:
                out.append((int(label), submission.format_confidence(s[label]), table.masks[r]))
    return out


def test_table_agrees_with_the_submission_row_for_row(synthetic_small, tmp_path):
    data = Path(synthetic_small)
    images = tmp_path / "images"
    _copy_images(data / "images", images, IDS)
    os.remove(images / "syn_0002_blue.png")  # a failed image: no rows, listed in the metadata
    rule = combine.CombineRule(min_score=0.05, image_from_cells=False)
    out, cells = tmp_path / "submission.csv", tmp_path / "cells.parquet"
    summary = run_predict(images, data / "sample_submission.csv", out, runs=[_cell_run()],
                          image_runs=[_image_run()], cells=str(cells), rule=rule)
    assert summary.complete and summary.failed == 1
    table = cell_table.read(str(cells))
    assert len(table) == summary.cells > 60
    rows = _rows(out)
    assert list(dict.fromkeys(table.ids)) == [i for i in IDS if i != "syn_0002"]  # sample order
    assert rows["syn_0002"].predictions == []
    for image_id, row in rows.items():
        want = [(p.label, submission.format_confidence(p.confidence), p.mask) for p in row.predictions]
        assert _triples_from_table(table, image_id, rule.min_score) == want, image_id
    # the masks decode to the cells the other columns describe
    for r in range(0, len(table), 7):
        m = masks.decode(table.masks[r], int(table.height[r]), int(table.width[r]))
        assert m.sum() == table.area[r] and masks.mask_bbox(m) == tuple(table.box[r])
    # s is the rule applied to the table's own c and i
    for image_id in set(table.ids):
        k = np.asarray(table.ids) == image_id
        assert np.all(table.scores["i"][k] == table.scores["i"][k][0])
        s = combine.combine(table.scores["c"][k], table.scores["i"][k][0], table.touches_border[k],
                            table.has_nucleus[k], rule)
        assert np.allclose(s, table.scores["s"][k], atol=1e-6, rtol=0)
    meta = table.meta
    assert meta["images"] == 6 and meta["failed"] == ["syn_0002"]
    assert [m["weights"] for m in meta["models"]] == ["cells-random"]
    assert [m["weights"] for m in meta["image_models"]] == ["image-random"]
    assert meta["rule"]["min_score"] == 0.05 and meta["segmentation"]["backend"] == "default"


def test_null_image_scores_without_image_runs_unless_image_from_cells(synthetic_small, tmp_path):
    data = Path(synthetic_small)
    tables = {}
    for flag in (False, True):
        cells = tmp_path / f"cells_{flag}.csv"
        run_predict(data / "images", data / "sample_submission.csv", tmp_path / f"sub_{flag}.csv",
                    runs=[_cell_run()], cells=str(cells), rule=combine.CombineRule(image_from_cells=flag))
        tables[flag] = cell_table.read(str(cells))
    assert np.isnan(tables[False].scores["i"]).all() and not np.isnan(tables[False].scores["c"]).any()
    t = tables[True]
    assert not np.isnan(t.scores["i"]).any()
    k = np.asarray(t.ids) == "syn_0000"
    assert np.allclose(t.scores["i"][k][0], t.scores["c"][k].max(axis=0))  # i = m, the best cell
    assert np.array_equal(tables[False].scores["c"], t.scores["c"])


def test_limited_then_resumed_run_writes_the_same_table_bytes(synthetic_small, tmp_path):
    data = Path(synthetic_small)
    sample = data / "sample_submission.csv"
    full_csv, full_pq = tmp_path / "full.csv", tmp_path / "full.parquet"
    run_predict(data / "images", sample, full_csv, runs=[_cell_run()], cells=str(full_pq))
    out, cells = tmp_path / "out.csv", tmp_path / "out.parquet"
    first = run_predict(data / "images", sample, out, runs=[_cell_run()], cells=str(cells), limit=2, workers=1)
    assert not first.complete and not cells.exists() and not out.exists()
    with pytest.raises(Exception, match="cell_table: True then, '<absent>' now"):
        run_predict(data / "images", sample, out, runs=[_cell_run()], resume=True)  # parts hold cell rows
    part = json.loads((Path(str(out) + ".parts") / "syn_0000.json").read_text())
    assert set(part["cells"]) >= {"cell", "box", "c", "i", "s", "mask"} and part["cells"]["i"] is None
    rest = run_predict(data / "images", sample, out, runs=[_cell_run()], cells=str(cells), resume=True)
    assert rest.complete and rest.resumed == 2
    assert cells.read_bytes() == full_pq.read_bytes()
    assert out.read_bytes() == full_csv.read_bytes()


# --- predict --labels ----------------------------------------------------------------------------
def _label_list(path: Path, ids) -> Path:
    path.write_text("ID,Label\n" + "".join(f"{i},{k % 19}|0\n" for k, i in enumerate(ids)))
    return path


def test_labels_give_the_same_rows_as_the_sample_submission(synthetic_small, tmp_path):
    data = Path(synthetic_small)
    order = IDS[3:] + IDS[:3]  # the label list's order, not the sample's
    sample = tmp_path / "sample.csv"
    _write_sample(sample, [(i, 256, 256) for i in order])
    labels = _label_list(tmp_path / "train.csv", order)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    run_predict(data / "images", sample, a, runs=[_cell_run()], cells=str(tmp_path / "a.parquet"))
    summary = engine_labels(data / "images", labels, b, cells=str(tmp_path / "b.parquet"))
    assert summary.complete and summary.total == 6
    assert b.read_bytes() == a.read_bytes()
    assert [r.image_id for r in submission.read_submission(str(b))] == order
    ta, tb = cell_table.read(str(tmp_path / "a.parquet")), cell_table.read(str(tmp_path / "b.parquet"))
    _same(ta, tb)
    assert list(dict.fromkeys(tb.ids)) == order  # the ID list's order, as the CSV's
    assert tb.meta["inputs"]["labels"] == str(labels)


def engine_labels(images, labels, out, **options):
    from infer_gpu import engine
    from infer_gpu.config import PredictConfig

    cells = options.pop("cells", None)
    config = PredictConfig(**{"progress": False, "workers": 2, "batch_size": 16, **options})
    return engine.run_predict(str(images), None, [], str(out), config=config, runs=[_cell_run()],
                              cells=cells, labels=str(labels))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """An untrained tiny CNN saved as a run folder: for the command line (no training)."""
    return _save_run(_tiny_cnn(seed=3), tmp_path_factory.mktemp("tiny") / "run")


def test_cli_labels_with_a_missing_and_a_corrupt_image_fail_those_only(synthetic_small, tiny_run, tmp_path, capsys):
    data = Path(synthetic_small)
    images = tmp_path / "images"
    _copy_images(data / "images", images, IDS[:4])
    (images / "syn_0001_green.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")  # corrupt; red still gives the size
    labels = _label_list(tmp_path / "train.csv", IDS[:4] + ["not_there"])
    out, cells = tmp_path / "submission.csv", tmp_path / "cells.csv"
    status = cli.main(["predict", "--images", str(images), "--labels", str(labels), "--model", str(tiny_run),
                       "--out", str(out), "--cells", str(cells), "--preset", "smoke"])
    assert status == report.EXIT_FAILED_IMAGES, capsys.readouterr().err[-2000:]
    import csv

    with open(out) as fh:
        rows = {r["ID"]: r for r in csv.DictReader(fh)}
    assert list(rows) == IDS[:4] + ["not_there"]
    assert (rows["syn_0001"]["ImageWidth"], rows["syn_0001"]["ImageHeight"]) == ("256", "256")
    assert (rows["not_there"]["ImageWidth"], rows["not_there"]["PredictionString"]) == ("0", "")
    assert rows["syn_0001"]["PredictionString"] == "" and rows["syn_0000"]["PredictionString"]
    table = cell_table.read(str(cells))
    assert set(table.ids) == {"syn_0000", "syn_0002", "syn_0003"}
    assert table.meta["failed"] == ["syn_0001", "not_there"] and table.meta["images"] == 5
    parts = Path(str(out) + ".parts")
    assert json.loads((parts / "not_there.json").read_text())["failed"] is True


def test_cli_refuses_a_bad_cells_extension_and_a_label_list_without_its_columns(tiny_run, tmp_path, capsys):
    labels = _label_list(tmp_path / "train.csv", IDS)
    out = tmp_path / "submission.csv"
    base = ["predict", "--images", str(tmp_path), "--model", str(tiny_run), "--out", str(out), "--preset", "smoke"]
    assert cli.main([*base, "--labels", str(labels), "--cells", str(tmp_path / "cells.xlsx")]) == 2
    err = capsys.readouterr().err
    assert "cells.xlsx: unsupported extension '.xlsx'" in err and ".parquet or .csv" in err
    assert cli.main([*base, "--labels", str(labels), "--cells", str(out)]) == 2
    assert "is also --out" in capsys.readouterr().err
    bad = tmp_path / "ids.csv"
    bad.write_text("Id,Target\nsyn_0000,1\n")
    assert cli.main([*base, "--labels", str(bad)]) == 2
    assert f"{bad}: expected a header with ID and Label columns" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["ids.csv", "train.csv"]  # nothing predicted, nothing written
    with pytest.raises(SystemExit):  # exactly one of the two ID lists
        cli.main([*base, "--labels", str(labels), "--sample-submission", str(labels)])
    with pytest.raises(SystemExit):
        cli.main(base)
