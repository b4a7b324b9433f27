"""The trainer end to end on synthetic shards, smoke preset, CPU: the loss falls, an interrupted
run resumes from the right epoch with its optimizer state, the exported model reloads and
predicts what the trained one did, the CLI writes a complete run folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import models, run_folder, storage
from common.preprocess import Preprocess
from tests.notebooks import read_notebook
from tests.train_shards import make_shards, write_manifest
from train_tpu import data, history
from train_tpu import model as trainmodel
from train_tpu import train as trainlib
from train_tpu.config import make_config

keras = pytest.importorskip("keras")

ROOT = Path(__file__).resolve().parents[1]
# The tests of the trainer's own rules (resume, prior, data order, export) train the few-layer
# test backbone: they do not depend on the backbone, and an EfficientNet's build and tracing
# cost most of a minute per run here. The CLI, notebook and determinism tests train the smoke
# preset's EfficientNet-B0, as a user would.
TEST = models.TEST_BACKBONE


@pytest.fixture(scope="module")
def shards(synthetic_small, tmp_path_factory):
    from common.segmentation import MASKS, SegmentationSpec

    out = tmp_path_factory.mktemp("train_shards")
    made = make_shards(synthetic_small, out, size=32, folds=2)
    # the tiles were cut from the synthetic set's label maps, as the builder's --masks records it
    made["spec"].replace(segmentation=SegmentationSpec(backend=MASKS, work_size=None)).save(
        str(out / "preprocess.json"))
    return str(out)


def test_loss_falls_over_a_few_steps(shards):
    # the test backbone at 3e-2 (3e-3 suits an EfficientNet): 8 steps ended at 0.17 of the first
    # loss here, 0.81 at 3e-3
    cfg = make_config("smoke", data=shards, learning_rate=3e-2, warmup_epochs=0.0,
                      min_lr_ratio=1.0, backbone=TEST)
    split = data.find_split(shards, 0)
    # one fixed batch from the real pipeline (cached after augmentation), seen 8 times
    ds = data.train_dataset(split.train_files, cfg, 32, 32, 8).take(1).cache().repeat()
    model = models.build_model(cfg.backbone, 32, dropout=0.0, drop_connect_rate=0.0)
    trainlib.compile_model(model, cfg, trainlib.make_optimizer(cfg, 8))
    losses = model.fit(ds, epochs=8, steps_per_epoch=1, verbose=0).history["loss"]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_run_starts_from_the_class_prior_with_the_configured_bn_momentum(shards, tmp_path):
    """With a manifest, the head's bias starts at the training folds' class frequencies; the
    checkpoint's BatchNorm layers use the configured momentum."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for f in Path(shards).iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    write_manifest(folder, sorted(folder.glob("fold*.tfrec")))
    cfg = make_config("smoke", data=str(folder), out=str(tmp_path / "run"), epochs=1,
                      steps_per_epoch=1, learning_rate=1e-4, bn_momentum=0.9, backbone=TEST)
    trainlib.train(cfg)
    ckpt = models.load_model(str(tmp_path / "run" / "checkpoints" / "epoch_001.keras"))
    split = data.find_split(str(folder), cfg.val_fold)
    prior = data.eval_labels(split.train_files, split.train_examples).mean(0)
    # one AdamW step of 1e-4 moves each bias by about 1e-4
    np.testing.assert_allclose(ckpt.get_layer("logits").bias.numpy(), trainmodel.prior_logits(prior),
                               atol=1e-3)
    assert {layer.momentum for layer in ckpt.layers
            if isinstance(layer, keras.layers.BatchNormalization)} == {0.9}
    # prior_bias off: zero bias (plus one step)
    off = cfg.replace(out=str(tmp_path / "run_off"), prior_bias=False)
    trainlib.train(off)
    bias = models.load_model(str(tmp_path / "run_off" / "checkpoints" / "epoch_001.keras"))
    assert np.abs(bias.get_layer("logits").bias.numpy()).max() < 1e-3


def test_deterministic_runs_repeat_to_the_bit(shards, tmp_path):
    """With the augmentations on (their draws run in tf.data's parallel map) and a dropout
    layer drawing in the step, two `deterministic` runs give the same weights and history; the
    determinism ends with the run. The test backbone: the repeatability is the trainer's (its
    seeds, data order and op determinism), not the backbone's (two EfficientNet-B0 runs cost
    ~100 s more for the same check)."""
    from tensorflow.python.framework import config as tf_config

    cfg = make_config("smoke", data=shards, epochs=2, steps_per_epoch=3, learning_rate=1e-3,
                      deterministic=True, seed=5, backbone=TEST, dropout=0.3)
    runs = []
    for name in ("a", "b"):
        trainlib.train(cfg.replace(out=str(tmp_path / name)))
        assert not tf_config.is_op_determinism_enabled()
        model = models.load_model(str(tmp_path / name / "model.keras"))
        rows = history.read_history(str(tmp_path / name / history.HISTORY_CSV))
        runs.append(([w.numpy() for w in model.weights], [(r["loss"], r["val_loss"]) for r in rows]))
    (wa, ha), (wb, hb) = runs
    assert ha == hb and len(ha) == 2, (ha, hb)
    assert len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb))
    # equal because the run is repeatable, not because nothing moves: epoch 2 changed the
    # weights of epoch 1's checkpoint, and the two epochs' losses differ. (That another seed
    # draws another order is tests/test_train_data.py's; a third training here cost ~40 s.)
    first = models.load_model(str(tmp_path / "a" / trainlib.CHECKPOINTS / trainlib.checkpoint_name(1)))
    moved = [not np.array_equal(w.numpy(), x) for w, x in zip(first.weights, wa)]
    assert sum(moved) > len(wa) // 2, (sum(moved), len(wa))
    assert ha[0] != ha[1]


class _Interrupted(Exception):
    pass


class _CrashAfter(keras.callbacks.Callback):
    """Stands in for a kill (preemption, a lost TPU) right after an epoch's checkpoint."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise _Interrupted(f"killed after epoch {self.epoch}")


def test_interrupted_run_resumes_from_the_last_epoch(shards, gcs_bucket):
    """On gs:// (a real local GCS emulator): every run-folder file goes through common.storage."""
    out = f"gs://{gcs_bucket}/runs/r1"
    ckpts = f"{out}/checkpoints"
    hist = f"{out}/history.csv"
    cfg = make_config("smoke", data=shards, out=out, epochs=3, steps_per_epoch=2, backbone=TEST)
    with pytest.raises(_Interrupted):
        trainlib.train(cfg, callbacks=[_CrashAfter(1)])
    assert storage.listdir(ckpts) == ["epoch_001.keras"]
    assert not storage.exists(f"{out}/{run_folder.MODEL_FILE}")
    assert {"config.json", "preprocess.json", "history.csv", "history.png"} <= set(storage.listdir(out))
    first = history.read_history(hist)
    assert [r["epoch"] for r in first] == [1]
    # a history row written after the last checkpoint (killed in between) must be dropped
    history.write_history(hist, first + [dict(first[0], epoch=2)])

    with pytest.raises(FileExistsError, match="--resume"):
        trainlib.train(cfg)
    with pytest.raises(ValueError, match="backbone: 'test_cnn' then, 'efficientnet_b1' now"):
        trainlib.train(cfg.replace(backbone="efficientnet_b1"), resume=True)

    summary = trainlib.train(cfg, resume=True)
    assert storage.listdir(ckpts) == [f"epoch_00{i}.keras" for i in (1, 2, 3)]
    rows = history.read_history(hist)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0].keys() == first[0].keys()  # the first epoch's record kept as it was
    np.testing.assert_array_equal(list(rows[0].values()), list(first[0].values()))
    assert all(0 <= r["val_macro_auc"] <= 1 for r in rows)
    assert summary["last"]["epoch"] == 3
    # optimizer state restored: the step count continues (a fresh optimizer would be at 4)
    ckpt = models.load_model(f"{ckpts}/epoch_003.keras", compile=True)
    assert int(ckpt.optimizer.iterations) == 3 * 2
    # learning rate continued on the same schedule: epoch 3's LR is the cosine's end
    assert rows[2]["lr"] < rows[1]["lr"] < rows[0]["lr"]

    # the exported model reloads and predicts what the last checkpoint predicts
    split = data.find_split(shards, cfg.val_fold)
    x = next(iter(data.eval_dataset(split.val_files, 32, 32, 8, 8))).numpy()
    exported = models.load_model(out)
    want = ckpt.predict(x, verbose=0)
    np.testing.assert_allclose(exported.predict(x, verbose=0), want, rtol=1e-5, atol=1e-6)
    # the check can fail: the outputs vary far beyond the tolerance, and a model of the same
    # architecture without the run's weights misses them by far more
    assert np.ptp(want) > 1e-2, np.ptp(want)
    fresh = trainmodel.build_model(cfg.backbone, 32, dropout=cfg.dropout, drop_connect_rate=0.0)
    assert np.abs(fresh.predict(x, verbose=0) - want).max() > 1e-3
    assert getattr(exported, "optimizer", None) is None  # inference copy: no optimizer state

    # resuming a finished run only re-exports
    again = trainlib.train(cfg, resume=True)
    assert again["last"]["epoch"] == 3
    assert len(history.read_history(hist)) == 3


def test_cli_smoke_writes_a_complete_run_folder(shards, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-m", "train_tpu", "--data", shards, "--mode", "cell", "--out", str(out),
         "--preset", "smoke", "--strategy", "cpu", "--size", "48", "--val-steps", "0",
         "--set", "weight_decay=1e-4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "strategy: OneDeviceStrategy('/cpu:0'), 1 replica" in res.stderr
    assert "val_macro_auc" in res.stdout
    names = set(os.listdir(out))
    assert {"model.keras", "config.json", "preprocess.json", "history.csv", "history.png",
            "checkpoints"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["size"] == 48 and cfg["weight_decay"] == 1e-4 and cfg["epochs"] == 2
    assert cfg["data"] == shards and cfg["mode"] == "cell"
    # tiles are stored at 32 px and resized to 48 for the model: inference must do the same
    spec = Preprocess.load(str(out / "preprocess.json"))
    assert (spec.size, spec.tile.model_size, spec.input_size, spec.mode) == (32, 48, 48, "cell")
    # how the training data's cells were segmented goes with the model
    assert spec.segmentation == Preprocess.load(os.path.join(shards, "preprocess.json")).segmentation
    assert spec.segmentation.backend == "masks"
    model = models.load_model(str(out))
    assert tuple(model.input.shape[1:]) == (48, 48, 4)
    rows = history.read_history(str(out / "history.csv"))
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"loss", "val_loss", "val_macro_auc", "val_map", "val_auc_00", "val_ap_18"} <= set(rows[0])
    assert 0 <= rows[-1]["val_macro_auc"] <= 1  # the whole fold: several images, defined AUC
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG"


def test_notebook_trains_from_its_settings_cell(shards, tmp_path):
    """notebooks/train_tpu.ipynb: valid cells; the settings + train + history cells run the
    trainer (local shards and the smoke preset stand in for gs:// and a TPU)."""
    code, markdown = read_notebook(ROOT / "notebooks" / "train_tpu.ipynb")
    assert "www.proteinatlas.org" in markdown and "--resume" in markdown

    def sh(*cmd):
        subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)})

    env = {"sh": sh, "sys": sys, "os": os}
    exec(next(s for s in code if s.lstrip().startswith("# --- the project")), env)
    assert env["DATA"].startswith("gs://") and env["PRESET"] in ("b0_cell_224",)
    # JAX on TPU VM runtimes: the install cell adds jax[tpu] there, the trainer gets --backend
    assert env["BACKEND"] == "auto" and any('"jax[tpu]"' in s for s in code)
    out = tmp_path / "nb_run"
    env.update(DATA=shards, OUT=str(out), PRESET="smoke", WEIGHTS="none", STRATEGY="cpu",
               EPOCHS=1, STEPS_PER_EPOCH=1, EXTRA=["--backbone", TEST])  # the CLI smoke test trains B0
    exec(next(s for s in code if '"train_tpu"' in s), env)
    exec(next(s for s in code if "history.png" in s), env)
    assert (out / "model.keras").exists() and run_folder.read_config(str(out))["backbone"] == TEST
    assert [r["epoch"] for r in history.read_history(str(out / "history.csv"))] == [1]


def test_sigkilled_run_resumes_with_the_data_order_of_an_uninterrupted_run(shards, tmp_path):
    """A real SIGKILL from outside once epoch 1's checkpoint is on disk; the resumed run must see
    epochs 2.. in the uninterrupted run's data order (it used to replay epoch 1's). With the
    random augmentations off, CPU training is deterministic, so the per-epoch losses match."""
    import signal
    import time

    args = ["--data", shards, "--mode", "cell", "--preset", "smoke", "--backbone", TEST, "--epochs", "4",
            "--steps-per-epoch", "3", "--seed", "3", "--set", "flip=false", "--set", "rotate=false",
            "--set", "scale=0", "--set", "brightness=0"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

    def cli(*extra):
        return [sys.executable, "-m", "train_tpu", *args, *map(str, extra)]

    ref = tmp_path / "ref"
    done = subprocess.run(cli("--out", ref), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "killed"
    first = out / trainlib.CHECKPOINTS / trainlib.checkpoint_name(1)
    proc = subprocess.Popen(cli("--out", out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not first.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    start, _ = trainlib.last_checkpoint(str(out))
    assert 1 <= start < 4
    resumed = subprocess.run(cli("--out", out, "--resume"), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    want = history.read_history(str(ref / history.HISTORY_CSV))
    got = history.read_history(str(out / history.HISTORY_CSV))
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        for key in ("loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["epoch"], key)
