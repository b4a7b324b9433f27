"""Training on soft cell targets (shards built with --cell-labels): the first step's loss is the
hand computation with the targets (and not with the image labels), in cell and in bag mode; the
bag model's image head keeps the image labels; config.json records the targets and a resume
with others is refused; a mix of shards with and without targets is refused."""
from __future__ import annotations

import numpy as np
import pytest

from common import features, mil, models
from common.labels import NEGATIVE, multi_hot
from common.preprocess import to_model_input
from common.resume import ResumeError
from tests.train_shards import make_shards, write_manifest
from train_tpu import data
from train_tpu import train as trainlib
from train_tpu.config import make_config

FINGERPRINT = "crc32:0badf00d"
BAG = 4
TOL = 2e-4


def soft_targets(data_dir) -> dict:
    """Soft targets within each cell's true classes (every cell of the synthetic truth), mostly
    well below the image labels' 1: from a head at the class prior (p < 0.5) the loss with them is
    clearly lower than with the image labels (the loss is linear in y: y * log((1 - p) / p))."""
    from testkit import synthetic

    out = {}
    for (image_id, cell), labels in synthetic.read_cell_labels(str(data_dir)).items():
        labels = [c for c in labels if c != NEGATIVE]
        scale = 0.9 if cell % 3 == 0 else 0.1 + 0.03 * (cell % 10)  # some >= 0.5: a rounded AUC
        out[(image_id, cell)] = (multi_hot(labels) * np.float32(scale)).astype(np.float32)
    return out


def _shards(synthetic_small, out, bag=0):
    targets = soft_targets(synthetic_small)
    made = make_shards(synthetic_small, out, size=32, folds=2, bag=bag, targets=targets)
    write_manifest(out, made["files"], cell_labels={"fingerprint": FINGERPRINT})
    return made, targets


def bce(y, p):
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def _one_step_cfg(shard_dir, out, mode, batch, **more):
    # one step over the whole training fold (one shard, read in order: shuffle_buffer 1), no
    # augmentation: the hand computation sees exactly the step's batch. The head starts at the
    # class prior (manifest), far from 0.5, where the targets change the loss. The test
    # backbone: the loss is the trainer's, whatever the backbone
    return make_config("smoke", mode=mode, data=str(shard_dir), out=str(out), epochs=1, steps_per_epoch=1,
                       batch_size=batch, shuffle_buffer=1, optimizer="sgd", flip=False, rotate=False,
                       scale=0.0, brightness=0.0, backbone=models.TEST_BACKBONE, **more)


def _first_model_callback(seen: dict):
    import keras

    class First(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["loss"] = seen["hand"](self.model)

    return First()


def _records(files):
    import tensorflow as tf

    return list(tf.data.TFRecordDataset(list(files)))


def test_cell_mode_learns_the_soft_targets(synthetic_small, tmp_path):
    made, targets = _shards(synthetic_small, tmp_path / "cells")
    train_file = [f for f in made["files"] if "fold1" in f]
    recs = [features.parse(r, 32, targets=True) for r in _records(train_file)]
    x = np.stack([to_model_input(r[features.IMAGE]).numpy() for r in recs])
    soft = np.stack([targets[(r[features.IMAGE_ID].numpy().decode(), int(r[features.CELL_INDEX]))] for r in recs])
    hard = np.stack([r[features.LABELS].numpy() for r in recs])
    np.testing.assert_array_equal(np.stack([r[features.CELL_TARGETS].numpy() for r in recs]), soft)
    assert np.abs(soft - hard).max() > 0.3
    seen = {}

    def hand(model):
        p = model(x, training=True).numpy()
        return {"soft": bce(soft, p).mean(), "image": bce(hard, p).mean()}

    seen["hand"] = hand
    cfg = _one_step_cfg(tmp_path / "cells", tmp_path / "run", "cell", len(recs))
    summary = trainlib.train(cfg, callbacks=[_first_model_callback(seen)])
    logged = summary["last"]["loss"]
    print("cell mode: logged", logged, "hand", seen["loss"])
    assert logged == pytest.approx(seen["loss"]["soft"], rel=TOL)
    assert seen["loss"]["image"] - seen["loss"]["soft"] > 50 * TOL * logged
    assert 0.0 <= summary["last"]["val_target_macro_auc"] <= 1.0  # against the rounded targets
    assert "val_macro_auc" in summary["last"]  # against the image labels, as before
    from common import run_folder

    saved = run_folder.read_config(str(tmp_path / "run"))
    assert (saved["targets"], saved["targets_fingerprint"]) == ("cell_labels", FINGERPRINT)
    with pytest.raises(ResumeError, match=r"targets: 'cell_labels' then, 'image_labels' now"):
        trainlib.train(cfg.replace(epochs=2, targets="image_labels"), resume=True)


def test_bag_mode_cell_head_learns_the_soft_targets_the_image_head_the_labels(synthetic_small, tmp_path):
    import tensorflow as tf

    made, targets = _shards(synthetic_small, tmp_path / "bags", bag=BAG)
    train_file = [f for f in made["files"] if "fold1" in f]
    recs = [features.parse_bag(r, 32, BAG, targets=True) for r in _records(train_file)]
    cells = np.stack([to_model_input(r[features.IMAGE]).numpy() for r in recs])
    mask = np.stack([r["mask"].numpy() for r in recs])
    labels = np.stack([r[features.LABELS].numpy() for r in recs])
    soft = np.stack([[targets[(r[features.IMAGE_ID].numpy().decode(), int(c))] for c in r[features.CELL_INDEX]]
                     for r in recs])
    np.testing.assert_array_equal(np.stack([r[features.CELL_TARGETS].numpy() for r in recs]), soft)
    weight = 1.0
    seen = {}

    def hand(model):
        out = model({mil.CELLS: tf.constant(cells), mil.MASK: tf.constant(mask)}, training=True)
        p_img, p_cell = out[mil.IMAGE].numpy(), out[mil.CELL].numpy()
        image_term = bce(labels, p_img).mean()

        def cell_term(y):  # mean over real cells and classes per bag, then over bags
            per = (bce(y, p_cell).mean(-1) * mask).sum(-1) / mask.sum(-1)
            return per.mean()
        inherited = np.broadcast_to(labels[:, None, :], soft.shape)
        return {"soft": image_term + weight * cell_term(soft), "image": image_term + weight * cell_term(inherited)}

    seen["hand"] = hand
    cfg = _one_step_cfg(tmp_path / "bags", tmp_path / "run", "bag", len(recs), cell_weight=weight)
    summary = trainlib.train(cfg, callbacks=[_first_model_callback(seen)])
    logged = summary["last"]["loss"]
    print("bag mode: logged", logged, "hand", seen["loss"])
    assert logged == pytest.approx(seen["loss"]["soft"], rel=TOL)
    assert seen["loss"]["image"] - seen["loss"]["soft"] > 50 * TOL * logged
    assert 0.0 <= summary["last"]["val_cell_target_macro_auc"] <= 1.0
    from common import run_folder

    assert run_folder.read_config(str(tmp_path / "run"))["targets"] == "cell_labels"


def test_targets_are_detected_from_the_shards_and_a_mix_is_refused(synthetic_small, tmp_path):
    soft = make_shards(synthetic_small, tmp_path / "soft", size=32, folds=2, targets=soft_targets(synthetic_small))
    plain = make_shards(synthetic_small, tmp_path / "plain", size=32, folds=2)
    assert data.shard_targets(soft["files"]) and not data.shard_targets(plain["files"])
    with pytest.raises(ValueError, match="a mix of shards with cell targets"):
        data.shard_targets([soft["files"][0], plain["files"][1]])
    assert data.cell_labels_fingerprint(str(tmp_path / "soft")) == ""  # no manifest
    cfg = make_config("smoke", data=str(tmp_path / "plain"))
    assert trainlib.resolve_targets(cfg, False, "").targets == "image_labels"
    assert trainlib.resolve_targets(cfg, True, FINGERPRINT).targets_fingerprint == FINGERPRINT
    assert trainlib.resolve_targets(cfg.replace(targets="image_labels"), True, FINGERPRINT).targets == "image_labels"
    with pytest.raises(ValueError, match="carry no cell targets"):
        trainlib.resolve_targets(cfg.replace(targets="cell_labels"), False, "")
