"""Pseudo-labels from a trained model are closer to the true cell labels than the image labels
the cells inherit: the step self-training stands on, checked against the truth no stage sees.

The model is the session's shared deterministic `demo` run (tests/learning_runs.py: 5 of its 12
epochs on 48 px cell tiles of 57 synthetic images, seed 31, 3 folds; trained once for this test,
tests/test_learning.py and tests/test_learning_mil.py). Its validation fold (19 images it never
trained on: out of fold) is scored with `predict --labels --cells`, which cuts the cells with
the default segmenter (the run's tiles came from the label maps, `--masks`: predict warns and
segments), turned into cell labels by `pseudo-label` with its default rule, and compared with
the true cell labels (cells matched to the true cells at IoU >= 0.5;
scripts/pseudo_label_quality.py): per-class AUC of the targets over the cells of images with
the class, and the mean absolute error over each image's classes and Negative.

Measured (deterministic, one TensorFlow thread as the suite runs, AMD EPYC 2026-12-03; the same
to 6 digits alone and in the suite): 388 matched cells; inherited labels AUC 0.500, MAE 0.362;
the default rule AUC 0.803 (Negative AUC 0.712), MAE 0.286. Bars: AUC >= 0.65 (0.153 below the
measured value) and an MAE at least 0.05 under the inherited labels' (measured 0.076), room for
another machine's float rounding. (Before the shared run, this test trained its own `demo` run
on default-segmenter shards of seed-3 data: 345 cells, AUC 0.744 / MAE 0.276 against 0.500 /
0.349, for the same bars.) On the self-training study's data (share 0.3, seed 0, 57 images, all
three folds out of fold) the same rule scored AUC 0.793 / MAE 0.290 against the inherited
labels' 0.500 / 0.435.
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


def test_out_of_fold_pseudo_labels_beat_the_inherited_image_labels(learning_data, learning_base, tmp_path):
    from common import shard_folder
    from common.run_folder import read_config
    from infer_gpu.config import PredictConfig
    from infer_gpu.engine import run_predict
    from infer_gpu.pseudo_label import PseudoLabelRule

    syn, shards, run = learning_data["train"], learning_data["cell"], learning_base
    val_fold = read_config(str(run))["val_fold"]

    manifest = shard_folder.read_manifest(str(shards))
    rows = [line for line in (syn / "train.csv").read_text().splitlines()[1:]
            if manifest["images"][line.split(",")[0]]["fold"] == val_fold]
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
