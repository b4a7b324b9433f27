"""Pseudo-labels from a trained model are closer to the true cell labels than the image labels
the cells inherit: the step self-training stands on, checked against the truth no stage sees.

A deterministic `demo` run (5 of its 12 epochs, as tests/test_learning.py) on cell shards cut
by the default segmenter (what predict cuts again), 57 synthetic images, 3 folds. Its
validation fold (19 images it never trained on: out of fold) is scored with `predict --labels
--cells`, turned into cell labels by `pseudo-label` with its default rule, and compared with the
true cell labels (cells matched to the true cells at IoU >= 0.5; scripts/pseudo_label_quality.py):
per-class AUC of the targets over the cells of images with the class, and the mean absolute
error over each image's classes and Negative.

Measured (this test's setting, deterministic: two runs here, one alone and one after the
learning tests in the same pytest-xdist worker, gave the same numbers to 6 digits): 345 matched
cells; inherited labels AUC 0.500, MAE 0.349; the default rule AUC 0.744 (Negative AUC 0.786),
MAE 0.276. (This docstring said 0.727 / 0.701 / 0.260 before: an earlier measurement that a9534db
does not give on this machine.) Bars: AUC >= 0.65 (0.094 below the measured value) and an MAE
at least 0.05 under the inherited labels' (measured 0.074), room for another machine's float
rounding. On the self-training study's data (share 0.3, seed 0, 57 images, all three folds out
of fold) the same rule scored AUC 0.793 / MAE 0.290 against the inherited labels' 0.500 / 0.435.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(1800)


def _quality():
    spec = importlib.util.spec_from_file_location("pseudo_label_quality", ROOT / "scripts" / "pseudo_label_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_out_of_fold_pseudo_labels_beat_the_inherited_image_labels(tmp_path):
    from common import shard_folder
    from infer_gpu.config import PredictConfig
    from infer_gpu.engine import run_predict
    from infer_gpu.pseudo_label import PseudoLabelRule
    from testkit import synthetic
    from tfrecords_builder.__main__ import main as build_main
    from train_tpu.config import make_config
    from train_tpu.train import train

    syn, shards, run = tmp_path / "syn", tmp_path / "shards", tmp_path / "run"
    synthetic.generate(str(syn), n=57, size=256, seed=3)
    assert build_main(["--images", str(syn / "images"), "--labels", str(syn / "train.csv"), "--out", str(shards),
                       "--mode", "cell", "--size", "48", "--folds", "3", "--workers", "2", "--no-progress"]) == 0
    cfg = make_config("demo", data=str(shards), out=str(run), epochs=5, strategy="cpu", deterministic=True)
    train(cfg)

    manifest = shard_folder.read_manifest(str(shards))
    rows = [line for line in (syn / "train.csv").read_text().splitlines()[1:]
            if manifest["images"][line.split(",")[0]]["fold"] == cfg.val_fold]
    assert len(rows) >= 15
    labels = tmp_path / "val.csv"
    labels.write_text("ID,Label\n" + "\n".join(rows) + "\n")
    cells = tmp_path / "cells.parquet"
    summary = run_predict(str(syn / "images"), None, [str(run)], str(tmp_path / "val_sub.csv"),
                          config=PredictConfig(progress=False), cells=str(cells), labels=str(labels))
    assert summary.complete and not summary.failed

    q = _quality()
    (base_name, inherit), (rule_name, rule) = q.evaluate(str(cells), str(syn), [PseudoLabelRule()], str(tmp_path))
    print(f"{inherit['cells']} cells: inherit AUC {inherit['AUC']:.6f} MAE {inherit['MAE']:.6f}; "
          f"{rule_name}: AUC {rule['AUC']:.6f} negAUC {rule['negAUC']:.6f} MAE {rule['MAE']:.6f}")
    assert inherit["cells"] >= 250 and inherit["AUC"] == 0.5
    assert rule["AUC"] >= BAR_AUC
    assert rule["MAE"] <= inherit["MAE"] - BAR_MAE_GAIN


# Bars from the measured deterministic run (values in the module docstring's "Measured").
BAR_AUC = 0.65
BAR_MAE_GAIN = 0.05
