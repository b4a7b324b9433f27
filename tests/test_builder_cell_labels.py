"""Builder `--cell-labels`: each cell's soft targets in its record (cell and bag modes, both
engines), the cells and rows the table does not match counted in the manifest, and what is
refused before any image is read (another segmentation, an unreadable table, a class the image
lacks) or on a resume (a changed table)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from common import cell_labels, features
from common.labels import NEGATIVE, multi_hot, read_labels_csv
from common.resume import ResumeError
from common.segmentation import MASKS
from tests.test_builder import shard_files
from tests.test_builder_bag import read_bags
from tfrecords_builder import build as buildlib
from tfrecords_builder.config import make_config

MASKS_SPEC = {"backend": MASKS, "work_size": None}
META = {"segmentation": MASKS_SPEC, "rule": {"name": "test"}, "source": {}}
BAG = 3
STRANGER = "not-in-this-build"


def soft(labels, cell: int) -> np.ndarray:
    """Soft targets within the cell's true classes, different per cell (a fixed function)."""
    t = multi_hot(labels) * np.float32(0.5 + 0.05 * (cell % 9))
    if not labels:
        t[NEGATIVE] = 0.75
    return t.astype(np.float32)


def make_table(data, path, meta=META):
    """From the synthetic truth: every third cell left out; 2 rows of an image not in the
    build; one cell id (999) that the first image's label map lacks."""
    from testkit import synthetic

    truth = synthetic.read_cell_labels(str(data))
    rows = [(i, c, soft(ls, c)) for (i, c), ls in sorted(truth.items()) if c % 3]
    first = sorted(truth)[0][0]
    rows += [(first, 999, np.zeros(19, np.float32)), (STRANGER, 1, soft([0], 1)), (STRANGER, 2, soft([], 2))]
    cell_labels.write(str(path), rows, meta)
    left_out = {k for k in truth if not k[1] % 3}
    return {(i, c): t for i, c, t in rows}, left_out, first


def _kw(data, out, table, **more):
    return dict(images=str(data / "images"), labels=str(data / "train.csv"), masks=str(data / "masks"),
                out=str(out), size=32, folds=2, shard_mb=0.05, workers=0, cell_labels=str(table)) | more


def _build(**kw):
    return buildlib.build(make_config(**kw), progress=False, log=lambda s: None)


def read_cells(folder) -> dict[tuple[str, int], dict]:
    import tensorflow as tf

    ds = tf.data.TFRecordDataset([str(p) for p in shard_files(folder)]).map(
        lambda s: features.parse(s, targets=True))
    out = {}
    for ex in ds:
        out[(ex["image_id"].numpy().decode(), int(ex["cell_index"]))] = {k: v.numpy() for k, v in ex.items()}
    return out


@pytest.fixture(scope="module")
def table(synthetic_small, tmp_path_factory):
    path = tmp_path_factory.mktemp("cell_labels") / "cell_labels.csv"
    targets, left_out, first = make_table(synthetic_small, path)
    return path, targets, left_out, first


def test_cell_records_carry_the_tables_targets_and_the_image_labels_where_it_has_none(synthetic_small, table, tmp_path):
    path, targets, left_out, first = table
    result = _build(**_kw(synthetic_small, tmp_path / "cells", path, mode="cell"))
    assert result.exit_code == 0
    labels = dict(read_labels_csv(str(synthetic_small / "train.csv")))
    recs = read_cells(tmp_path / "cells")
    assert recs and {k[0] for k in recs} == set(labels)
    for key, ex in recs.items():
        want = multi_hot(labels[key[0]]) if key in left_out else targets[key]
        np.testing.assert_array_equal(ex[features.CELL_TARGETS], want, err_msg=str(key))
        np.testing.assert_array_equal(ex[features.LABELS], multi_hot(labels[key[0]]))  # unchanged
    assert left_out and set(left_out) <= set(recs)
    m = result.manifest
    assert m["config"]["cell_labels_fingerprint"] == cell_labels.read(str(path)).fingerprint
    assert m["cell_labels"] == {
        "path": str(path), "fingerprint": m["config"]["cell_labels_fingerprint"], "rows": len(targets),
        "cells_from_table": len(recs) - len(left_out), "cells_from_image_labels": len(left_out),
        "rows_not_in_build": 2, "images_not_in_build": 1, "cells_not_in_label_map": {first: 1}}
    # an old reader ignores the new key: the records parse as before
    import tensorflow as tf

    plain = next(iter(tf.data.TFRecordDataset([str(shard_files(tmp_path / "cells")[0])]).map(features.parse)))
    assert features.CELL_TARGETS not in plain


def test_bag_records_carry_the_targets_of_their_cells(synthetic_small, table, tmp_path):
    path, targets, left_out, first = table
    result = _build(**_kw(synthetic_small, tmp_path / "bags", path, mode="bag", max_cells=BAG, seed=3))
    assert result.exit_code == 0
    labels = dict(read_labels_csv(str(synthetic_small / "train.csv")))
    import tensorflow as tf

    files = [str(p) for p in shard_files(tmp_path / "bags")]
    bags = {}
    for ex in tf.data.TFRecordDataset(files).map(lambda s: features.parse_bag(s, 32, BAG, targets=True)):
        bags[ex["image_id"].numpy().decode()] = {k: v.numpy() for k, v in ex.items()}
    assert sorted(bags) == sorted(labels)
    from_table = inherited = 0
    for image_id, ex in bags.items():
        k = int(ex["mask"].sum())
        for j in range(BAG):  # padding repeats the real cells, targets included
            key = (image_id, int(ex["cell_index"][j]))
            want = multi_hot(labels[image_id]) if key in left_out else targets[key]
            np.testing.assert_array_equal(ex[features.CELL_TARGETS][j], want, err_msg=str(key))
            if j < k:
                from_table += key not in left_out
                inherited += key in left_out
    assert inherited and from_table
    c = result.manifest["cell_labels"]
    assert (c["cells_from_table"], c["cells_from_image_labels"]) == (from_table, inherited)
    assert c["cells_not_in_label_map"] == {first: 1} and c["rows_not_in_build"] == 2
    # the bag build records its segmentation too (the table was checked against it)
    assert json.loads((tmp_path / "bags" / "preprocess.json").read_text())["segmentation"]["backend"] == MASKS


def test_refused_before_any_image_is_read(synthetic_small, table, tmp_path):
    path, targets, _, first = table
    data = synthetic_small
    other = tmp_path / "other_seg.csv"
    cell_labels.write(str(other), [(first, 1, targets[(first, 1)])],
                      META | {"segmentation": {"backend": "default", "work_size": 512}})
    with pytest.raises(buildlib.BuildError, match=r"another segmentation.*backend: 'default'.*'masks'"):
        _build(**_kw(data, tmp_path / "a", other, mode="cell"))
    truncated = tmp_path / "truncated.csv"
    text = path.read_text()
    truncated.write_text(text[: text.index("\n", len(text) // 2) + 8])
    with pytest.raises(cell_labels.CellLabelsError, match=rf"{truncated}.*(line \d+|truncated)"):
        _build(**_kw(data, tmp_path / "b", truncated, mode="bag"))
    labels = dict(read_labels_csv(str(data / "train.csv")))
    image_id = next(i for i, ls in labels.items() if 0 not in ls)
    foreign = tmp_path / "foreign.csv"
    bad = np.zeros(19, np.float32)
    bad[0] = 0.2
    cell_labels.write(str(foreign), [(image_id, 2, bad)], META)
    with pytest.raises(buildlib.BuildError, match=rf"{foreign}: {image_id} cell 2: target > 0 for class\(es\) 0"):
        _build(**_kw(data, tmp_path / "c", foreign, mode="cell"))
    negative = tmp_path / "negative.csv"
    only_negative = np.zeros(19, np.float32)
    only_negative[NEGATIVE] = 1.0
    cell_labels.write(str(negative), [(image_id, 2, only_negative)], META)
    for name in "abc":
        assert not (tmp_path / name).exists()  # nothing planned, no pilot image read
    with pytest.raises(ValueError, match="--cell-labels needs --mode cell or bag"):
        make_config(**_kw(data, tmp_path / "d", negative, mode="image"))
    # Negative is the one class a cell may have that its image lacks
    assert _build(**_kw(data, tmp_path / "e", negative, mode="cell", limit=2)).exit_code == 0


def test_a_resume_with_a_changed_table_is_refused(synthetic_small, table, tmp_path, monkeypatch):
    path, targets, _, first = table
    changed = tmp_path / "changed.csv"
    t = targets[(first, 1)].copy()
    t[t > 0] = 0.25
    cell_labels.write(str(changed), [(first, 1, t)], META)
    kw = _kw(synthetic_small, tmp_path / "out", path, mode="cell")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(buildlib, "_write_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _build(**kw)
    monkeypatch.undo()
    assert (tmp_path / "out" / buildlib.STATE_DIR / buildlib.PLAN_FILE).exists()
    with pytest.raises(ResumeError, match="unfinished build.*cell_labels_fingerprint"):
        _build(**kw | {"cell_labels": str(changed)})
    moved = tmp_path / "moved.csv"
    shutil.copy(path, moved)  # the same bytes elsewhere: the same build
    assert _build(**kw | {"cell_labels": str(moved)}).exit_code == 0
    with pytest.raises(ResumeError, match="finished build.*cell_labels_fingerprint"):
        _build(**kw | {"cell_labels": str(changed)})
    with pytest.raises(ResumeError, match="cell_labels_fingerprint"):
        _build(**kw | {"cell_labels": ""})


def test_beam_engine_equals_the_local_engine_with_cell_labels(synthetic_small, table, tmp_path):
    pytest.importorskip("apache_beam")
    from tests.test_builder_beam import assert_same_build
    from tfrecords_builder import beam_engine

    path = table[0]
    kw = _kw(synthetic_small, tmp_path / "local", path, mode="bag", max_cells=BAG, seed=3, limit=4)
    assert _build(**kw).exit_code == 0
    beam_cfg = make_config(**kw | {"out": str(tmp_path / "beam"), "engine": "beam"})
    assert beam_engine.build_beam(beam_cfg, progress=False, log=lambda s: None).exit_code == 0
    m = assert_same_build(tmp_path / "beam", tmp_path / "local")
    assert m["cell_labels"]["cells_from_table"] > 0 and m["cell_labels"]["images_not_in_build"] == 3


def test_cell_targets_are_the_float_list_tensorflow_builds():
    import tensorflow as tf

    tile = np.zeros((8, 8, 4), np.uint8)
    t = np.linspace(0, 1, 19, dtype=np.float32)
    ours = tf.train.Example.FromString(features.serialize(
        tile, image_id="a", labels=[1], source_size=(8, 8), cell_targets=t))
    plain = tf.train.Example.FromString(features.serialize(tile, image_id="a", labels=[1], source_size=(8, 8)))
    plain.features.feature[features.CELL_TARGETS].CopyFrom(
        tf.train.Feature(float_list=tf.train.FloatList(value=t.tolist())))
    assert ours == plain
    with pytest.raises(ValueError, match="outside"):
        features.serialize(tile, image_id="a", labels=[1], source_size=(8, 8), cell_targets=t + 0.5)
    with pytest.raises(ValueError, match="18 cell targets"):
        features.serialize(tile, image_id="a", labels=[1], source_size=(8, 8), cell_targets=t[:18])
