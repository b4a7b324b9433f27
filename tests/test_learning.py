"""The trainer learns the synthetic task (issue #5's "done when"), checked against the truth
the trainer never sees: the cell-level labels of the validation fold.

Tiles inherit their image's labels, so the trainer's own validation AUC (against image labels)
has a ceiling well below 1 (a perfect cell model scores ~0.77 on this data). The cell-level AUC
of the exported model is what inference relies on. A short run of the `demo` preset on the CPU
(5 of its 12 epochs: about 2 minutes) must lift it far above an untrained model's ~0.5, on
Keras' TensorFlow backend (in this process) and on its JAX backend (the CLI in a subprocess; its
model.keras is scored here, under TensorFlow, as inference would). The shards are shared.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from common import features, models
from testkit import synthetic
from common.labels import NUM_CLASSES
from tests.jax_env import ROOT, jax_env
from tests.train_shards import make_shards, write_manifest
from train_tpu import data, history
from train_tpu import train as trainlib
from train_tpu.config import make_config

tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.timeout(1800)  # the JAX run compiles its programs first


def _val_cell_truth(split, truth) -> np.ndarray:
    """Multi-hot TRUE cell labels of the validation tiles, in `eval_dataset`'s order."""
    spec = features.feature_spec()  # the common schema; the PNGs are not decoded
    out = np.zeros((split.val_examples, NUM_CLASSES), np.float32)
    for i, rec in enumerate(data._val_records(split.val_files, split.val_examples)):
        ex = tf.io.parse_single_example(rec, spec)
        out[i, truth[(ex[features.IMAGE_ID].numpy().decode(), int(ex[features.CELL_INDEX]))]] = 1
    return out


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """57 synthetic images (every class the primary of 3) cut into 48 px cell shards, 3 folds."""
    root = tmp_path_factory.mktemp("learning")
    syn = root / "syn"
    synthetic.generate(str(syn), n=57, size=256, seed=3)
    shards = root / "shards"
    made = make_shards(syn, shards, size=48, folds=3)
    write_manifest(shards, made["files"])
    return syn, shards


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_demo_preset_learns_cell_labels_from_image_labels(backend, demo_data, tmp_path,
                                                          tmp_path_factory):
    syn, shards = demo_data
    cfg = make_config("demo", data=str(shards), out=str(tmp_path / "run"), epochs=5)
    if backend == "tensorflow":
        trainlib.train(cfg)
    else:
        res = subprocess.run(
            [sys.executable, "-m", "train_tpu", "--backend", "jax", "--data", cfg.data,
             "--mode", cfg.mode, "--out", cfg.out, "--preset", "demo", "--epochs", "5"],
            cwd=ROOT, env=jax_env(tmp_path_factory), capture_output=True, text=True, timeout=1500)
        assert res.returncode == 0, res.stderr[-4000:]
        assert "jax backend" in res.stdout

    split = data.find_split(str(shards), cfg.val_fold)
    x = data.eval_dataset(split.val_files, 48, 48, cfg.batch_size, split.val_examples)
    cells = _val_cell_truth(split, synthetic.read_cell_labels(str(syn)))
    untrained = models.build_model(cfg.backbone, 48)
    trained = models.load_model(str(tmp_path / "run"))
    before = history.validation_metrics(cells, untrained.predict(x, verbose=0)[:len(cells)])
    after = history.validation_metrics(cells, trained.predict(x, verbose=0)[:len(cells)])
    print(f"cell-level macro AUC {before['val_macro_auc']:.3f} untrained -> "
          f"{after['val_macro_auc']:.3f} trained; mAP {before['val_map']:.3f} -> {after['val_map']:.3f}")
    assert abs(before["val_macro_auc"] - 0.5) < 0.1
    # 200 steps on 2 CPU cores are not bit-reproducible (thread scheduling, XLA's reductions), and
    # the trained cell-level AUC spreads over runs: TensorFlow 0.677 to 0.76, JAX 0.651 and 0.746
    # (untrained ~0.5). The bar sits below that spread and far above an untrained model.
    assert after["val_macro_auc"] > 0.62
    assert after["val_map"] > before["val_map"] + 0.12
