"""Trainer `--mode bag`: the dual-head bag model, its input pipeline, training and export."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import mil, models
from train_tpu import model as modellib
from tests.train_shards import make_shards, write_manifest
from train_tpu import data
from train_tpu import train as trainlib
from train_tpu.config import make_config

keras = pytest.importorskip("keras")

ROOT = Path(__file__).resolve().parents[1]
BAG = 4


@pytest.fixture(scope="module")
def bag_shards(synthetic_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("bag_shards")
    made = make_shards(synthetic_small, out, size=32, folds=2, bag=BAG)
    write_manifest(out, made["files"])
    return str(out)


@pytest.fixture(scope="module")
def bag_run(bag_shards, tmp_path_factory):
    """One smoke bag run (2 epochs of 3 steps) of the test backbone (the trainer's bag rules do
    not depend on the backbone; the notebook test trains an EfficientNet), shared below."""
    out = str(tmp_path_factory.mktemp("bag_run") / "run")
    cfg = make_config("smoke", mode="bag", data=bag_shards, out=out, batch_size=2, pooling="attention",
                      backbone=models.TEST_BACKBONE)
    summary = trainlib.train(cfg)
    return cfg, out, summary


def _weights_free_bag_model(pooling: str, bag: int):
    from train_tpu.model import build_bag_model

    keras.utils.set_random_seed(1)
    model = build_bag_model("efficientnet_b0", 32, bag=bag, dropout=0.0, drop_connect_rate=0.0,
                            pooling=pooling)
    # large head weights: an untrained backbone's small feature differences become visible
    rng = np.random.default_rng(2)
    for name in ("cell_logits", "image_logits"):
        kernel, bias = model.get_layer(name).get_weights()
        model.get_layer(name).set_weights([rng.normal(0, 200, kernel.shape).astype("float32"), bias])
    return model


@pytest.mark.parametrize("pooling", mil.POOLINGS)
def test_padding_changes_nothing(pooling):
    """A bag of 2 real cells padded to 4 gives the outputs of the same 2 cells in a bag of 2,
    whatever the padding holds."""
    m4 = _weights_free_bag_model(pooling, 4)
    m2 = _weights_free_bag_model(pooling, 2)
    modellib.set_weights(m2, m4)
    rng = np.random.default_rng(0)
    real = rng.uniform(0, 255, (1, 2, 32, 32, 4)).astype("float32")
    mask4 = np.array([[1, 1, 0, 0]], "float32")
    outs = []
    for pad in (np.zeros((1, 2, 32, 32, 4), "float32"), rng.uniform(0, 255, (1, 2, 32, 32, 4)).astype("float32")):
        o = m4({mil.CELLS: np.concatenate([real, pad], 1), mil.MASK: mask4}, training=False)
        outs.append({k: np.asarray(v) for k, v in o.items()})
    o2 = m2({mil.CELLS: real, mil.MASK: np.ones((1, 2), "float32")}, training=False)
    # float32 rounding only: a batch of 4 and a batch of 2 run other convolution kernels (on
    # one TensorFlow thread the lse image score differed by 1.2e-6 in one class); a padded cell
    # that leaked in would move the scores by far more than the real cells' change below
    for o in outs:
        np.testing.assert_allclose(o[mil.IMAGE], np.asarray(o2[mil.IMAGE]), atol=1e-5)
        np.testing.assert_allclose(o[mil.CELL][:, :2], np.asarray(o2[mil.CELL]), atol=1e-5)
    # the image head does depend on the real cells (the test could fail)
    other = m2({mil.CELLS: real[:, ::-1] * 0.5, mil.MASK: np.ones((1, 2), "float32")}, training=False)
    assert np.abs(np.asarray(other[mil.IMAGE]) - np.asarray(o2[mil.IMAGE])).max() > 1e-3


def test_masked_cell_loss_leaves_padding_out():
    from train_tpu.bag_model import masked_cell_bce

    y = np.array([[[1.0] * 19, [-1.0] * 19]], "float32")  # one real cell, one padding cell
    p = np.array([[[0.9] * 19, [0.01] * 19]], "float32")
    loss = float(np.asarray(masked_cell_bce(y, p))[0])
    assert loss == pytest.approx(-np.log(0.9), rel=1e-5)


def test_bag_pipeline_yields_static_bags_with_inherited_cell_targets(bag_shards):
    cfg = make_config("smoke", mode="bag", data=bag_shards)
    split = data.find_split(bag_shards, 0)
    x, y = next(iter(data.train_dataset(split.train_files, cfg, 32, 32, 2, steps_per_epoch=1, bag=BAG)))
    assert x[mil.CELLS].shape == (2, BAG, 32, 32, 4) and x[mil.MASK].shape == (2, BAG)
    mask = x[mil.MASK].numpy()
    cell = y[mil.CELL].numpy()
    assert np.all(cell[mask == 0] == -1.0)
    np.testing.assert_array_equal(cell[mask == 1], np.repeat(y[mil.IMAGE].numpy()[:, None], BAG, 1)[mask == 1])


def test_a_bag_run_trains_validates_both_heads_and_exports_a_loadable_bag_model(bag_run, bag_shards):
    cfg, out, summary = bag_run
    last = summary["last"]
    for key in ("loss", "image_loss", "cell_loss", "val_macro_auc", "val_map", "val_cell_macro_auc", "val_cell_map"):
        assert key in last and np.isfinite(last[key]), (key, last)
    assert last["loss"] == pytest.approx(last["image_loss"] + cfg.cell_weight * last["cell_loss"], rel=0.05)
    model = models.load_model(out)
    assert mil.is_bag_model(model) and mil.bag_size(model) == BAG
    assert json.loads((Path(out) / "preprocess.json").read_text())["bag"] == BAG
    # the exported float32 model computes what the last checkpoint computes
    ckpt = models.load_model(trainlib.last_checkpoint(out)[1])
    split = data.find_split(bag_shards, 0)
    x = next(iter(data.eval_dataset(split.val_files, 32, 32, 2, 2, bag=BAG)))
    a, b = model(x, training=False), ckpt(x, training=False)
    fresh = modellib.build(cfg.backbone, 32, bag=BAG, pooling=cfg.pooling, dropout=cfg.dropout,
                           drop_connect_rate=0.0)(x, training=False)
    for k in (mil.IMAGE, mil.CELL):
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=1e-5)
        # the check can fail: the outputs vary far beyond the tolerance, and a bag model
        # without the run's weights misses them by far more
        assert np.ptp(np.asarray(b[k])) > 1e-2, (k, np.ptp(np.asarray(b[k])))
        assert np.abs(np.asarray(fresh[k]) - np.asarray(b[k])).max() > 1e-3, k


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_the_float32_export_of_a_bag_model_copies_every_weight(policy):
    """`train_tpu.model.export_float32` on a bag model: the same bag size and pooling, both
    heads computing what the float32 model with those weights computes, on outputs that span
    (0, 1); a bag model lacking the copied weights misses them by far more than the tolerance."""
    from tests.test_models import assert_spread, spread_head
    from train_tpu.model import POOL_LAYER, pooling_of

    rng = np.random.default_rng(3)
    keras.utils.set_random_seed(3)
    build = lambda **kw: modellib.build("efficientnet_b0", 32, bag=3, pooling="attention", dropout=0.1,
                                        drop_connect_rate=0.0, **kw)
    ref = build()
    x = {mil.CELLS: rng.uniform(0, 255, (4, 3, 32, 32, 4)).astype("float32"),
         mil.MASK: np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], "float32")}
    spread_head(ref, x, rng, features_layer="bags_of_cells", logits_layer=mil.CELL_LOGITS)
    spread_head(ref, x, rng, features_layer=POOL_LAYER, logits_layer=mil.IMAGE_LOGITS)
    model = ref
    if policy != "float32":
        model = build(dtype_policy=policy)
        modellib.set_weights(model, ref)
    export = modellib.export_float32(model, "efficientnet_b0", 32, dropout=0.1)
    assert mil.bag_size(export) == 3 and pooling_of(export) == "attention"
    stem = lambda m: next(l for l in m.layers if isinstance(l, keras.Model)).get_layer("stem_conv")
    assert stem(model).compute_dtype == ("float32" if policy == "float32" else "bfloat16")
    assert stem(export).compute_dtype == "float32"
    call = lambda m: {k: np.asarray(v, np.float32) for k, v in m(x, training=False).items()}
    want, got, fresh = call(ref), call(export), call(build())
    for k in (mil.IMAGE, mil.CELL):
        assert_spread(want[k].reshape(len(want[k]), -1))
        np.testing.assert_allclose(got[k], want[k], atol=1e-5)
        assert np.abs(fresh[k] - want[k]).max() > 1000 * 1e-5  # the negative case


def test_a_bag_run_refuses_a_cell_dataset_and_the_reverse(bag_shards, tmp_path, synthetic_small):
    with pytest.raises(ValueError, match="built in 'bag' mode, training asked for --mode cell"):
        trainlib.train(make_config("smoke", mode="cell", data=bag_shards, out=str(tmp_path / "a")))


_MULTI_REPLICA = r"""
import json
import numpy as np
from train_tpu import strategy as S
S.configure_cpu_replicas(2)
import tensorflow as tf
from common import mil
from train_tpu import train as T
from train_tpu.model import build_bag_model
from tests import replica_step as R

cfg = R.sgd_config(mode="bag")
rng = np.random.default_rng(0)
cells = rng.uniform(0, 255, (2, 3, 32, 32, 4)).astype("float32")
mask = np.array([[1, 1, 0], [1, 1, 1]], "float32")
cells[0, 2] = cells[0, 0]  # padding by repetition, as the pipeline pads
labels = (rng.uniform(size=(2, 19)) < 0.3).astype("float32")
cell_y = np.where(mask[..., None] > 0, labels[:, None, :], -1.0).astype("float32")
x = {mil.CELLS: np.concatenate([cells, cells]), mil.MASK: np.concatenate([mask, mask])}
y = {mil.IMAGE: np.concatenate([labels, labels]), mil.CELL: np.concatenate([cell_y, cell_y])}
build = lambda: build_bag_model("test_cnn", 32, bag=3, dropout=0.0, drop_connect_rate=0.0)
print(json.dumps(R.compare(S.get_strategy("cpu"), tf.distribute.OneDeviceStrategy("/cpu:0"), build,
                           lambda m: T.compile_model(m, cfg, T.make_optimizer(cfg, 1), bag=3), x, y)))
"""


def test_two_replicas_take_the_step_one_replica_takes():
    """The global batch is two copies of the same 2 bags, so each of 2 replicas sees what one
    replica sees; the step (loss and weight update) must match."""
    proc = subprocess.run([sys.executable, "-c", _MULTI_REPLICA], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["replicas"] == 2
    assert r["loss2"] == pytest.approx(r["loss1"], rel=1e-4)
    assert r["norm1"] > 0 and r["diff"] < 1e-3 * r["norm1"], r


def test_a_bag_run_resumes_from_its_last_epoch(bag_run, tmp_path):
    """Resume (one more epoch) continues the bag run: checkpoints, history and the optimizer."""
    import shutil

    cfg, out, _ = bag_run
    again = str(tmp_path / "again")
    shutil.copytree(out, again)
    summary = trainlib.train(cfg.replace(out=again, epochs=cfg.epochs + 1), resume=True)
    rows = summary["last"]
    assert rows["epoch"] == cfg.epochs + 1 and np.isfinite(rows["val_cell_map"])
    assert trainlib.last_checkpoint(again)[0] == cfg.epochs + 1


def test_the_bag_model_builds_in_mixed_precision_with_float32_outputs():
    from train_tpu.model import build_bag_model

    for pooling in mil.POOLINGS:
        m = build_bag_model("efficientnet_b0", 32, bag=3, dropout=0.1, drop_connect_rate=0.0,
                            dtype_policy="mixed_bfloat16", pooling=pooling)
        x = {mil.CELLS: np.full((1, 3, 32, 32, 4), 100.0, "float32"), mil.MASK: np.array([[1, 1, 0]], "float32")}
        out = m(x, training=False)
        assert {keras.backend.standardize_dtype(out[k].dtype) for k in (mil.IMAGE, mil.CELL)} == {"float32"}
        assert np.all(np.isfinite(np.asarray(out[mil.IMAGE])))


def test_the_training_notebook_trains_a_bag_run(bag_shards, tmp_path):
    """notebooks/train_tpu.ipynb's settings reach a bag run (MODE, POOLING, CELL_WEIGHT)."""
    import os

    from tests.notebooks import read_notebook

    code, _ = read_notebook(ROOT / "notebooks" / "train_tpu.ipynb")

    def sh(*cmd):
        subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)})

    env = {"sh": sh, "sys": sys, "os": os}
    exec(next(s for s in code if s.lstrip().startswith("# --- the project")), env)
    out = tmp_path / "nb_bag"
    env.update(DATA=bag_shards, OUT=str(out), MODE="bag", PRESET="smoke", WEIGHTS="none", STRATEGY="cpu",
               BACKEND="tensorflow", EPOCHS=1, STEPS_PER_EPOCH=1, BATCH_SIZE=2, POOLING="lse", CELL_WEIGHT=0.3,
               EXTRA=["--bag-cells", "2", "--backbone", models.TEST_BACKBONE])
    exec(next(s for s in code if '"train_tpu"' in s), env)
    config = json.loads((out / "config.json").read_text())
    assert (config["mode"], config["pooling"], config["cell_weight"], config["bag_cells"], config["backbone"]) == (
        "bag", "lse", 0.3, 2, models.TEST_BACKBONE)
    # --bag-cells 2: the model takes bags of 2, and the run tells inference to score chunks of 2
    assert mil.bag_size(models.load_model(str(out))) == 2
    assert json.loads((out / "preprocess.json").read_text())["bag"] == 2


def test_smaller_training_bags_draw_real_cells_at_random(bag_shards):
    """`--bag-cells`: a bag of 2 drawn from a record's stored cells (4 here): only real cells,
    no cell twice while there are enough, new draws each time; validation takes the first 2."""
    import tensorflow as tf

    split = data.find_split(bag_shards, 0)
    record = next(iter(tf.data.TFRecordDataset(split.train_files)))
    (full, full_mask), _ = data.parse_bag_example(record, 32, BAG)
    real = [full[i].numpy() for i in range(BAG) if full_mask[i] > 0]
    assert len(real) == BAG  # the fixture's images have at least 4 cells

    def index(tile):
        return next(i for i, r in enumerate(real) if np.array_equal(r, tile))

    draws = set()
    for _ in range(12):
        (cells, mask), _ = data.parse_bag_example(record, 32, BAG, cells=2, sample=True)
        assert cells.shape == (2, 32, 32, 4) and mask.numpy().tolist() == [1.0, 1.0]
        picked = tuple(index(c.numpy()) for c in cells)
        assert picked[0] != picked[1]
        draws.add(picked)
    assert len(draws) > 1
    (cells, _), _ = data.parse_bag_example(record, 32, BAG, cells=2)
    assert [index(c.numpy()) for c in cells] == [0, 1]


def test_a_run_starts_from_another_runs_weights(bag_shards, tmp_path):
    """`--weights RUN`: a cell-tile model built from a bag run computes the bag run's cell head,
    and a bag model built from that cell-tile model computes it again in its cell head, its
    image head starting as the same head on the pooled features. Another backbone is refused.
    The bag run is an EfficientNet-B0 bag model saved as a run folder, its heads' weights drawn
    large (untrained: what is copied, not what was learnt, is checked)."""
    from train_tpu.model import build_bag_model

    out = tmp_path / "bag_run"
    out.mkdir()
    models.save_model(_weights_free_bag_model("attention", BAG), str(out / "model.keras"))
    out = str(out)
    trained = models.load_model(out)
    split = data.find_split(bag_shards, 0)
    x = next(iter(data.eval_dataset(split.val_files, 32, 32, 2, 2, bag=BAG)))
    want = np.asarray(trained(x, training=False)[mil.CELL])  # [2, BAG, 19]
    tiles = np.asarray(x[mil.CELLS]).reshape(-1, 32, 32, 4)

    single = modellib.build_model("efficientnet_b0", 32, weights=out, dropout=0.0, drop_connect_rate=0.0)
    got = np.asarray(single(tiles, training=False)).reshape(want.shape)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.std(want) > 1e-3  # a trained head, not a constant the prior bias would also give

    cell_run = tmp_path / "cell_run"
    cell_run.mkdir()
    single.save(str(cell_run / "model.keras"))
    again = build_bag_model("efficientnet_b0", 32, bag=BAG, weights=str(cell_run), dropout=0.0,
                            drop_connect_rate=0.0, pooling="max")
    np.testing.assert_allclose(np.asarray(again(x, training=False)[mil.CELL]), want, atol=1e-5)
    np.testing.assert_array_equal(again.get_layer("image_logits").get_weights()[0],
                                  again.get_layer("cell_logits").get_weights()[0])
    with pytest.raises(ValueError, match=r"--weights .*cell_run.*same backbone"):
        modellib.build_model("efficientnetv2_b0", 32, weights=str(cell_run))
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        modellib.build_model("efficientnet_b0", 32, weights=str(tmp_path / "no_such_run"))


def test_deterministic_bag_pipeline_repeats_its_augmented_cells(tmp_path):
    """Under op determinism (`--deterministic`) the bag pipeline gives the same augmented cells
    every time: each cell's flips, rotation, zoom and gain come from the same random ops, so the
    cells of a bag are augmented one after another. Run in parallel iterations, they drew in a
    racy order: two deterministic `demo_mil_ft` runs differed in the fourth decimal of the loss,
    and this check (the demo's 48 px bags of 4 cells drawn from 16, 40 batches) failed in about
    half of its runs."""
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    from testkit import synthetic

    synthetic.generate(str(tmp_path), n=6, size=256, seed=3)
    files = make_shards(str(tmp_path), tmp_path / "bags", size=48, folds=2, bag=16)["files"]
    cfg = make_config("demo_mil_ft", mode="bag")
    tf.config.experimental.enable_op_determinism()
    try:
        draws = []
        for _ in range(3):
            keras.utils.set_random_seed(4)
            ds = data.train_dataset(files, cfg, 48, 48, 8, steps_per_epoch=40, bag=16, cells=4)
            draws.append([x[mil.CELLS].numpy() for x, _ in ds.take(40)])
    finally:
        tf_config.disable_op_determinism()
    for other in draws[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(draws[0], other))
    assert not np.array_equal(draws[0][0][0, 0], draws[0][0][0, 1])  # augmented cells, not one tile
