"""`scripts/self_train.sh`: a self-training round end to end on small synthetic data (smoke-sized
trainings, real predict, pseudo-label, builder and trainer), SIGKILLed and resumed: the resumed
round does only what was missing and ends with the labels its cell table gives."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common import cell_labels, cell_table, run_folder, shard_folder
from common.labels import NEGATIVE, read_labels_csv

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "self_train.sh"
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """8 synthetic images, cell shards cut by the default segmenter (2 folds), a smoke base run
    of the test backbone (the round's runs train like it) validated on fold 0, trained
    deterministically."""
    from testkit import synthetic
    from tfrecords_builder.__main__ import main as build_main
    from train_tpu.config import make_config
    from train_tpu.train import train

    d = tmp_path_factory.mktemp("self_train")
    synthetic.generate(str(d / "data"), n=8, size=128, seed=3)
    assert build_main(["--images", str(d / "data" / "images"), "--labels", str(d / "data" / "train.csv"),
                       "--out", str(d / "shards"), "--mode", "cell", "--size", "32", "--folds", "2",
                       "--shard-mb", "0.05", "--workers", "0", "--no-progress"]) == 0
    from common.models import TEST_BACKBONE

    train(make_config("smoke", data=str(d / "shards"), out=str(d / "base"), mode="cell", deterministic=True,
                      backbone=TEST_BACKBONE))
    return d


def _round(base: Path, out: Path, *extra, **popen):
    cmd = ["bash", str(SCRIPT), "--images", str(base / "data" / "images"), "--labels",
           str(base / "data" / "train.csv"), "--base", str(base / "base"), "--out", str(out),
           "--workers", "0", *extra]
    env = dict(os.environ, PY=sys.executable)
    if popen:
        return subprocess.Popen(cmd, env=env, **popen)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def one_round(base) -> dict:
    """One round, SIGKILLed once its joined cell table is on disk (the driver and whatever stage
    it runs), then run again to the end: every check of the round is on a resumed one.
    {"out": OUT, "before": (fold model mtime, cell table bytes) at the kill, "resumed": the
    second call's stdout}."""
    out = base / "st"
    proc = _round(base, out, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "round1" / "cells.parquet"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not target.exists() and proc.poll() is None:
        time.sleep(0.2)
    assert target.exists(), "the round never got as far as its cell table"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the round ended before it could be killed"
    fold_model = out / "round1" / "fold1" / "model.keras"
    before = (fold_model.stat().st_mtime_ns, target.read_bytes())
    done = _round(base, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"out": out, "before": before, "resumed": done.stdout}


def test_a_round_scores_out_of_fold_and_leaves_a_run_trained_on_the_cell_labels(base, one_round):
    out = one_round["out"]
    rd = out / "round1"
    manifest = shard_folder.read_manifest(str(base / "shards"))
    # Out of fold: fold 0 was scored by the base (it validated on fold 0), fold 1 by a run that
    # validated on fold 1, so never by a model that trained on the image.
    assert not (rd / "fold0").exists()
    assert run_folder.read_config(str(rd / "fold1"))["val_fold"] == 1
    for f in (0, 1):
        table = cell_table.read(str(rd / f"cells_fold{f}.parquet"))
        in_fold = {i for i, e in manifest["images"].items() if e["fold"] == f}
        assert set(table.ids) == in_fold and in_fold
    joined = cell_table.read(str(rd / "cells.parquet"))
    assert set(joined.ids) == set(manifest["images"])

    # The pseudo-labels: one row per scored cell, never a class the image lacks but Negative.
    table = cell_labels.read(str(rd / "cell_labels.csv"))
    assert set(table.targets) == {(i, int(c)) for i, c in zip(joined.ids, joined.cell)}
    labels = dict(read_labels_csv(str(base / "data" / "train.csv")))
    for (image_id, _), t in table.targets.items():
        extra = set(np.flatnonzero(t > 0)) - set(labels[image_id]) - {NEGATIVE}
        assert not extra, (image_id, extra)
    # Shards with them, the manifest naming the table; the run trained on them, from the base.
    shards = shard_folder.read_manifest(str(rd / "shards"))
    assert json.dumps(shards).count(table.fingerprint) >= 1
    assert shards["config"]["size"] == manifest["config"]["size"]
    cfg = run_folder.read_config(str(rd / "run"))
    assert cfg["weights"] == str(base / "base") and cfg["data"] == str(rd / "shards")
    assert json.dumps(cfg).count(table.fingerprint) >= 1  # config.json records its targets
    # OUT/run is that run, usable by predict as any run.
    assert os.path.realpath(out / "run") == os.path.realpath(rd / "run")
    sub = out / "check.csv"
    done = subprocess.run([sys.executable, "-m", "infer_gpu", "predict", "--images", str(base / "data" / "images"),
                           "--sample-submission", str(base / "data" / "sample_submission.csv"), "--model",
                           str(out / "run"), "--out", str(sub), "--no-progress"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(sub.read_text().splitlines()) == 1 + 8


def test_a_killed_round_resumes_to_the_same_cell_labels(base, one_round):
    """The second call does only what was missing: no fold model scored or trained again, the
    cell table kept byte for byte, and the pseudo-labels are those the rule makes from it.
    (One killed-and-resumed round serves every test here: an uninterrupted round as well
    cost a whole round more, ~100 s, for what this checks against the table itself.)"""
    from infer_gpu.cli import main as infer_main

    out, rd = one_round["out"], one_round["out"] / "round1"
    assert "scoring fold" not in one_round["resumed"] and "training" in one_round["resumed"]
    fold_model, target = rd / "fold1" / "model.keras", rd / "cells.parquet"
    assert (fold_model.stat().st_mtime_ns, target.read_bytes()) == one_round["before"]
    again = base / "cell_labels_again.csv"
    assert infer_main(["pseudo-label", "--cells", str(target), "--labels", str(base / "data" / "train.csv"),
                       "--out", str(again)]) == 0
    same = again.read_text()
    assert (rd / "cell_labels.csv").read_text().split("\n", 1)[1] == same.split("\n", 1)[1]
    assert len(same.splitlines()) > 8  # a row per cell, not an empty table
    assert os.path.realpath(out / "run") == os.path.realpath(rd / "run")


def test_a_base_cut_from_precomputed_masks_is_refused_with_the_reason(tmp_path, base):
    from tfrecords_builder.__main__ import main as build_main

    shards = tmp_path / "masked"
    assert build_main(["--images", str(base / "data" / "images"), "--labels", str(base / "data" / "train.csv"),
                       "--out", str(shards), "--mode", "cell", "--size", "32", "--folds", "2",
                       "--masks", str(base / "data" / "masks"), "--shard-mb", "0.05", "--workers", "0",
                       "--no-progress"]) == 0
    run = tmp_path / "run"
    run.mkdir()
    cfg = run_folder.read_config(str(base / "base"))
    (run / "config.json").write_text(json.dumps({**cfg, "data": str(shards)}))
    done = subprocess.run(["bash", str(SCRIPT), "--images", "x", "--labels", "y", "--base", str(run),
                           "--out", str(tmp_path / "o")], env=dict(os.environ, PY=sys.executable),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "precomputed label maps" in done.stderr
