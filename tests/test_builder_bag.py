"""Builder `--mode bag`: one record per image holding its cells, on both engines."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from common import bags as bag_rules
from common import features, images, preprocess, shard_folder
from common.labels import multi_hot, read_labels_csv
from tfrecords_builder import beam_engine
from tfrecords_builder import build as buildlib
from tfrecords_builder.config import make_config
from tests.test_builder import shard_files

BAG = 3  # small, so that most synthetic images have more cells than a bag holds


def read_bags(folder, bag: int, tile: int) -> dict[str, dict]:
    import tensorflow as tf

    files = [str(p) for p in shard_files(folder)]
    ds = tf.data.TFRecordDataset(files).map(lambda s: features.parse_bag(s, tile, bag))
    out = {}
    for ex in ds:
        ex = {k: v.numpy() for k, v in ex.items()}
        out[ex["image_id"].decode()] = ex
    return out


@pytest.fixture(scope="module")
def bag_build(synthetic_small, tmp_path_factory):
    data = synthetic_small
    out = tmp_path_factory.mktemp("bags") / "local"
    kw = dict(images=str(data / "images"), labels=str(data / "train.csv"), masks=str(data / "masks"),
              mode="bag", max_cells=BAG, size=32, folds=2, shard_mb=0.02, workers=0, seed=3)
    result = buildlib.build(make_config(out=str(out), **kw), progress=False, log=lambda s: None)
    assert result.exit_code == 0
    return data, out, kw


def test_a_bag_holds_the_cell_modes_tiles_of_a_seeded_choice_of_cells(bag_build):
    data, out, _ = bag_build
    spec = preprocess.Preprocess.load(str(out / preprocess.PREPROCESS_FILE))
    assert spec.mode == "cell" and spec.bag == BAG and spec.size == 32
    bags = read_bags(out, BAG, 32)
    labels = dict(read_labels_csv(str(data / "train.csv")))
    assert sorted(bags) == sorted(labels)
    more = 0
    for image_id, ex in bags.items():
        image = images.load_image(str(data / "images"), image_id)
        cells = cv2.imread(str(data / "masks" / f"{image_id}_cells.png"), cv2.IMREAD_UNCHANGED).astype(np.int32)
        ids = np.unique(cells[cells > 0])
        assert ex["cell_count"] == len(ids)
        chosen = ids[bag_rules.choose_cells(len(ids), BAG, image_id, seed=3)]
        k = min(BAG, len(ids))
        more += len(ids) > BAG
        np.testing.assert_array_equal(ex["mask"], np.arange(BAG) < k)
        # the first k are the chosen cells in id order, then the same cells again (padding)
        order = np.arange(BAG) % k
        np.testing.assert_array_equal(ex["cell_index"], chosen[order])
        tiles, _, boxes = preprocess.cell_tiles(image, cells, spec.tile, cell_ids=chosen)
        np.testing.assert_array_equal(ex["image"], tiles[order])
        np.testing.assert_array_equal(ex["bbox"], boxes[order])
        np.testing.assert_array_equal(ex["labels"], multi_hot(labels[image_id]))
    assert more >= 1, "the fixture should hold an image with more cells than a bag"


def test_manifest_counts_one_record_per_image_and_the_cells(bag_build):
    _, out, _ = bag_build
    manifest = json.loads((out / shard_folder.MANIFEST_FILE).read_text())
    assert manifest["config"]["mode"] == "bag" and manifest["config"]["max_cells"] == BAG
    assert manifest["totals"]["examples"] == manifest["totals"]["images"] == 6


def test_the_beam_engine_writes_the_same_bag_shards(bag_build, tmp_path):
    _, out, kw = bag_build
    logs = []
    result = beam_engine.build_beam(make_config(out=str(tmp_path / "beam"), engine="beam", **kw), log=logs.append)
    assert result.exit_code == 0
    local = {p.name: p.read_bytes() for p in shard_files(out)}
    beam = {p.name: p.read_bytes() for p in shard_files(tmp_path / "beam")}
    assert beam == local
    cells = sum(int(ex["mask"].sum()) for ex in read_bags(out, BAG, 32).values())
    assert any(line.startswith(f"beam counters: images=6, cells={cells}, records=6,") for line in logs), logs


def test_a_bag_record_with_one_cell_pads_by_repeating_it():
    import tensorflow as tf

    tile = np.random.default_rng(0).integers(0, 255, (1, 16, 16, 4), dtype=np.uint8)
    rec = features.serialize_bag(tile, image_id="x", labels=[2], source_size=(64, 64), fold=1,
                                 cell_ids=[7], bboxes=[(1, 2, 17, 18)], touches_border=[True],
                                 has_nucleus=[False], cell_areas=[100], cell_count=1)
    ex = {k: v.numpy() for k, v in features.parse_bag(tf.constant(rec), 16, 4).items()}
    assert ex["image"].shape == (4, 16, 16, 4) and (ex["image"] == tile[0]).all()
    np.testing.assert_array_equal(ex["mask"], [1, 0, 0, 0])
    np.testing.assert_array_equal(ex["cell_index"], [7] * 4)
    np.testing.assert_array_equal(ex["touches_border"], [1] * 4)
    with pytest.raises(ValueError, match="x: 1 tiles but 2 cell_ids"):
        features.serialize_bag(tile, image_id="x", labels=[], source_size=(64, 64), fold=0, cell_ids=[1, 2],
                               bboxes=[(0, 0, 1, 1)], touches_border=[0], has_nucleus=[1], cell_areas=[1],
                               cell_count=2)
