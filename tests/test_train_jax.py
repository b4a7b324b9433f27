"""The trainer on Keras' JAX backend (issue #15), on the CPU.

JAX runs in subprocesses (the backend is fixed per process): the real CLI, killed with SIGKILL
after its first checkpoint; then ONE script process over two host CPU devices that resumes it
(the CLI's `main`, the same arguments plus --resume) and runs the other JAX checks, writing
their results to JSON, read here under TensorFlow (a second JAX process of its own for the
resume cost 12 s more, 151 s against 139 s for both fixtures alone on the idle machine):
- the smoke preset's loss falls on JAX;
- DataParallel over two CPU devices makes the same loss and the same update as one device;
- the 3-to-4 channel weight transfer reproduces the 3-channel model on RGB input;
- a JAX-trained model.keras predicts, under TensorFlow, what it predicts under JAX;
- asking for a TPU that is not there is an error on JAX too.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from common import models, run_folder
from tests.jax_env import ROOT, jax_env
from tests.train_shards import make_shards
from train_tpu import history
from train_tpu import config as cfgmod

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.timeout(1800)  # xdist: one worker with test_learning[jax] (tests/conftest.py)

_CHECKS = r"""
import contextlib, io, json, sys
from common import quiet
quiet.quiet()  # as `python -m train_tpu` does, before anything imports TensorFlow

# the killed run resumed by the CLI, its console captured (first: a clean process)
from train_tpu.cli import main as train_main
resume_argv = json.loads(sys.argv[6])
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = train_main(resume_argv)
resumed = {"returncode": status, "stdout": out.getvalue(), "stderr": err.getvalue()}

import numpy as np
import jax, keras
import tensorflow as tf
from common import models
from train_tpu import model as trainmodel
from train_tpu import data, strategy as S, train as T
from train_tpu.config import make_config
from tests.test_models import SIZE, _features, _source_model

shards, run, x_path, out_path, weights_path = sys.argv[1:6]
res = {"backend": keras.backend.backend(), "devices": len(jax.devices()), "resumed": resumed}
keras.distribution.set_distribution(None)

# asking for missing hardware is an error on JAX too
try:
    S.get_strategy("tpu")
    res["tpu_error"] = None
except S.HardwareNotFoundError as err:
    res["tpu_error"] = str(err)

# the smoke preset's loss falls: one fixed batch from the real pipeline, seen 8 times (the
# test backbone, as in tests/test_train.py: the trainer's rules do not depend on the backbone;
# the JAX learning test, tests/test_learning.py, too; tests/test_accel_check.py's JAX section
# trains EfficientNet-B0)
cfg = make_config("smoke", data=shards, learning_rate=3e-2, warmup_epochs=0.0, min_lr_ratio=1.0,
                  backbone=models.TEST_BACKBONE)
split = data.find_split(shards, 0)
ds = data.train_dataset(split.train_files, cfg, 32, 32, 8).take(1).cache().repeat()
m = models.build_model(cfg.backbone, 32, dropout=0.0, drop_connect_rate=0.0)
T.compile_model(m, cfg, T.make_optimizer(cfg, 8))
res["losses"] = [float(v) for v in m.fit(ds, epochs=8, steps_per_epoch=1, verbose=0).history["loss"]]

# one SGD step on the same global batch over 2 devices and over 1 (tests/replica_step.py)
from tests import replica_step as R
sgd = R.sgd_config()
bx, by = R.doubled_batch((4, 32, 32, 4))
two = S.get_strategy("cpu")
res["kind"] = S.device_kind(two)
res.update(R.compare(two, S.JaxStrategy(jax.devices("cpu")[:1], "cpu"),
                     lambda: models.build_model(models.TEST_BACKBONE, 32, dropout=0.0, drop_connect_rate=0.0),
                     lambda m: T.compile_model(m, sgd, T.make_optimizer(sgd, 1)), bx, by))
keras.distribution.set_distribution(None)

# the 3-to-4 channel transfer reproduces the 3-channel model on RGB input
rng = np.random.default_rng(0)
src = _source_model("efficientnet_b0", rng)
src.save_weights(weights_path)
grown = trainmodel.build_model("efficientnet_b0", SIZE, weights=weights_path, drop_connect_rate=0.0)
xt = rng.uniform(0, 255, (3, SIZE, SIZE, 4)).astype("float32")
want = np.asarray(src(xt[..., :3], training=False))
got = np.asarray(_features(grown)(xt, training=False))
res["transfer_max_abs"] = float(np.abs(want).max())
res["transfer_err"] = float(np.abs(got - want).max())

# the CLI-trained run's model, for the TensorFlow side to compare with
x = np.load(x_path)
np.save(out_path, np.asarray(models.load_model(run).predict(x, verbose=0)))
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def shards(synthetic_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("jax_shards")
    make_shards(synthetic_small, out, size=32, folds=2)
    return str(out)


@pytest.fixture(scope="module")
def jax_run(shards, tmp_path_factory):
    """The CLI on JAX: started, SIGKILLed after its first checkpoint; then the script (_CHECKS)
    resumes it to the end over two CPU devices and runs its checks. Returns `(run folder,
    killed CompletedProcess-like, resumed: the same, the script's other results)`."""
    env = jax_env(tmp_path_factory)
    run = tmp_path_factory.mktemp("jax_run") / "run"
    args = ["--backend", "jax", "--data", shards, "--mode", "cell", "--out", str(run), "--preset", "smoke",
            "--backbone", models.TEST_BACKBONE, "--epochs", "4", "--steps-per-epoch", "2", "--cpu-replicas", "2"]
    logs = run.parent / "killed.log"
    with open(logs, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "train_tpu", *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        first = run / "checkpoints" / "epoch_001.keras"
        deadline = time.time() + 1200
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # a real kill from outside: no cleanup runs
        proc.wait()
    killed = {"returncode": proc.returncode, "log": logs.read_text(),
              "checkpoints": sorted(os.listdir(run / "checkpoints")) if run.exists() else [],
              "model": (run / run_folder.MODEL_FILE).exists()}

    work = tmp_path_factory.mktemp("jax_checks")
    x = np.random.default_rng(1).uniform(0, 255, (6, 32, 32, 4)).astype("float32")
    np.save(work / "x.npy", x)
    res = subprocess.run(
        [sys.executable, "-c", _CHECKS, shards, str(run), str(work / "x.npy"), str(work / "probs.npy"),
         str(work / "src.weights.h5"), json.dumps(args + ["--resume"])],
        cwd=ROOT, env=jax_env(tmp_path_factory, cpu_devices=2), capture_output=True, text=True,
        timeout=1500)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["x"], out["probs"] = x, np.load(work / "probs.npy")
    return run, killed, types.SimpleNamespace(**out.pop("resumed")), out


@pytest.fixture(scope="module")
def checks(jax_run):
    """The script's results (one JAX process over two CPU devices) and the inputs it scored."""
    return jax_run[3]


def test_cli_on_jax_resumes_after_sigkill_over_two_devices(jax_run):
    run, killed, resumed, _ = jax_run
    assert killed["returncode"] == -signal.SIGKILL, "the run ended before it could be killed: " \
        + killed["log"][-2000:]
    assert "epoch_001.keras" in killed["checkpoints"] and not killed["model"]
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stderr
    assert "DataParallel over 2 cpu devices, 2 replicas (JAX backend)" in resumed.stderr
    assert "jax backend" in resumed.stdout
    cfg = cfgmod.load(str(run / "config.json"))
    assert cfg.backend == "jax" and cfg.cpu_replicas == 2
    assert sorted(os.listdir(run / "checkpoints")) == [f"epoch_00{i}.keras" for i in (1, 2, 3, 4)]
    rows = history.read_history(str(run / "history.csv"))
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and 0 <= r["val_macro_auc"] <= 1 for r in rows)
    assert rows[3]["lr"] < rows[1]["lr"] < rows[0]["lr"]  # the schedule went on where it stopped
    # the optimizer state came back: its step count went on (a fresh optimizer would be at 6)
    assert int(models.load_model(str(run / "checkpoints" / "epoch_004.keras"),
                                 compile=True).optimizer.iterations) == 4 * 2
    assert {"model.keras", "config.json", "preprocess.json", "history.csv",
            "history.png"} <= set(os.listdir(run))


def test_smoke_loss_falls_on_jax(checks):
    assert checks["backend"] == "jax"
    losses = checks["losses"]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_data_parallel_two_cpu_devices_match_one(checks):
    assert checks["devices"] == 2 and checks["replicas"] == 2 and checks["kind"] == "cpu"
    np.testing.assert_allclose(checks["loss2"], checks["loss1"], rtol=1e-4)
    assert checks["norm1"] > 0  # the step did move the weights
    # a loss scaled by the per-device batch would give twice the update
    assert checks["diff"] <= 1e-2 * checks["norm1"], checks


def test_tpu_requested_without_tpu_is_an_error_on_jax(checks):
    assert checks["tpu_error"] and "--strategy tpu: no TPU found" in checks["tpu_error"]


def test_weight_transfer_reproduces_the_3_channel_model_on_jax(checks):
    assert checks["transfer_max_abs"] > 1e-3  # not zeros against zeros
    assert checks["transfer_err"] <= 1e-5 + 1e-4 * checks["transfer_max_abs"], checks


def test_jax_trained_model_predicts_the_same_under_tensorflow(checks, jax_run):
    """The loader infer_gpu uses (common.models.load_model), on this TensorFlow process."""
    assert keras.backend.backend() == "tensorflow"
    model = models.load_model(str(jax_run[0]))
    got = model.predict(checks["x"], verbose=0)
    assert got.shape == (6, 19) and np.ptp(got) > 1e-4  # varied outputs, not a constant
    np.testing.assert_allclose(got, checks["probs"], rtol=1e-4, atol=1e-5)
