"""The trainer learns the synthetic task (issue #5's "done when"), checked against the truth
the trainer never sees: the cell-level labels of the validation fold.

Tiles inherit their image's labels, so the trainer's own validation AUC (against image labels)
has a ceiling well below 1. The cell-level AUC of the exported model is what inference relies
on. A short `--deterministic` run of the `demo` preset on the CPU must lift it far above an
untrained model's ~0.5, on Keras' TensorFlow backend and on its JAX backend (the CLI in a
subprocess; its model.keras is scored here, under TensorFlow, as inference would).

The data and the TensorFlow run are the session's shared ones (tests/learning_runs.py: 57
synthetic images, seed 31, 48 px cell shards cut by the builder from the label maps, 3 folds;
`demo`, 5 of its 12 epochs = 200 steps), which tests/test_learning_mil.py starts its recipes
from: the run is trained once. The JAX run trains 3 epochs (120 steps) on the same shards: JAX
is the slowest trainer here, and 120 steps learn enough to tell a working JAX path from a
broken one.

Measured (deterministic: two TensorFlow runs gave the same history to the last digit; two JAX
runs did not: 0.725 / 0.229 and 0.712 / 0.227, the second alone in its process on a loaded
machine, so XLA's CPU reductions are not bit-repeatable here), against the cells' true labels,
untrained (seed 0) 0.515 AUC / 0.095 mAP: TensorFlow 0.798 / 0.374, JAX (3 epochs) 0.712-0.725
/ 0.227-0.229; TensorFlow on an AMD EPYC with AVX2 only (other kernels, other rounding: the
same data and seed, 2026-12-03) 0.781 / 0.346, and on that CPU with one TensorFlow thread per
process (what the suite runs since, tests/conftest.py) 0.806 / 0.357; JAX there 0.699 / 0.201,
the same to 6 digits alone and in the suite. Bars: TensorFlow AUC > 0.74 and mAP up by more than 0.2 (0.058 and 0.08 below
the measured values); JAX AUC > 0.68 and mAP up by more than 0.10 (0.032 and 0.032 below the
lower run; its mAP bar is below the old 5-epoch bar of 0.12 because it trains 3 epochs).
The room is for another machine's float rounding; the old bars (0.62, +0.12) were set below the
spread of non-deterministic runs.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from common import features, models
from testkit import synthetic
from common.labels import NUM_CLASSES
from common.run_folder import read_config
from tests.jax_env import ROOT, jax_env
from train_tpu import data, history
from train_tpu.config import make_config

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
JAX_EPOCHS = 3  # of the demo preset's 40 steps each
pytestmark = pytest.mark.timeout(1800)  # the JAX run compiles its programs first


def _val_cell_truth(split, truth) -> np.ndarray:
    """Multi-hot TRUE cell labels of the validation tiles, in `eval_dataset`'s order."""
    spec = features.feature_spec()  # the common schema; the PNGs are not decoded
    out = np.zeros((split.val_examples, NUM_CLASSES), np.float32)
    for i, rec in enumerate(data._val_records(split.val_files, split.val_examples)):
        ex = tf.io.parse_single_example(rec, spec)
        out[i, truth[(ex[features.IMAGE_ID].numpy().decode(), int(ex[features.CELL_INDEX]))]] = 1
    return out


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])  # xdist groups: tests/conftest.py
def test_demo_preset_learns_cell_labels_from_image_labels(backend, learning_data, request,
                                                          tmp_path, tmp_path_factory):
    syn, shards = learning_data["train"], str(learning_data["cell"])
    cfg = make_config("demo", data=shards, out=str(tmp_path / "run"), epochs=5, strategy="cpu",
                      deterministic=True)
    if backend == "tensorflow":
        run = request.getfixturevalue("learning_base")  # the same settings, trained once
        assert read_config(str(run))["epochs"] == cfg.epochs
    else:
        run, cfg = tmp_path / "run", cfg.replace(epochs=JAX_EPOCHS)
        res = subprocess.run(
            [sys.executable, "-m", "train_tpu", "--backend", "jax", "--data", cfg.data,
             "--mode", cfg.mode, "--out", cfg.out, "--preset", "demo", "--epochs", str(cfg.epochs),
             "--strategy", "cpu", "--deterministic"],
            cwd=ROOT, env=jax_env(tmp_path_factory), capture_output=True, text=True, timeout=1500)
        assert res.returncode == 0, res.stderr[-4000:]
        assert "jax backend" in res.stdout

    split = data.find_split(str(shards), cfg.val_fold)
    x = data.eval_dataset(split.val_files, 48, 48, cfg.batch_size, split.val_examples)
    cells = _val_cell_truth(split, synthetic.read_cell_labels(str(syn)))
    keras.utils.set_random_seed(0)  # the same untrained model every run
    untrained = models.build_model(cfg.backbone, 48)
    trained = models.load_model(str(run))
    before = history.validation_metrics(cells, untrained.predict(x, verbose=0)[:len(cells)])
    after = history.validation_metrics(cells, trained.predict(x, verbose=0)[:len(cells)])
    print(f"{backend}: cell-level macro AUC {before['val_macro_auc']:.6f} untrained -> "
          f"{after['val_macro_auc']:.6f} trained; mAP {before['val_map']:.6f} -> {after['val_map']:.6f}")
    assert abs(before["val_macro_auc"] - 0.5) < 0.1
    bar_auc, bar_map_gain = BARS[backend]  # from the measured deterministic runs (docstring)
    assert after["val_macro_auc"] > bar_auc
    assert after["val_map"] > before["val_map"] + bar_map_gain


BARS = {"tensorflow": (0.74, 0.2), "jax": (0.68, 0.10)}  # (cell AUC, mAP gain): see the docstring
