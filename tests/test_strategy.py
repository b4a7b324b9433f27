"""train_tpu.strategy: missing hardware is an error; the multi-replica path scales the loss by
the GLOBAL batch (MirroredStrategy over two logical CPUs, in a separate process because the CPU
must be split before TensorFlow initialises)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train_tpu import strategy as strategy_lib

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    for var in ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE"):
        env.pop(var, None)
    return env


def test_tpu_requested_without_tpu_is_a_clear_error(monkeypatch):
    for var in ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(var, raising=False)
    if strategy_lib._on_tpu_vm():
        pytest.skip("this machine has TPU devices")
    with pytest.raises(strategy_lib.HardwareNotFoundError, match="--strategy tpu: no TPU found"):
        strategy_lib.get_strategy("tpu")


def test_gpu_requested_without_gpu_is_a_clear_error():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(strategy_lib.HardwareNotFoundError, match="--strategy gpu: .*no GPU"):
        strategy_lib.get_strategy("gpu")


def test_backend_choice(monkeypatch):
    """auto: KERAS_BACKEND when set, else jax only on a TPU VM with JAX, else tensorflow; once
    Keras runs (here on TensorFlow), asking for the other backend is an error, not ignored."""
    import keras

    from train_tpu import backend as backend_lib

    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert backend_lib.resolve("auto") == ("jax", "KERAS_BACKEND is set")
    monkeypatch.delenv("KERAS_BACKEND")
    for var in ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(var, raising=False)
    if not strategy_lib._on_tpu_vm():
        assert backend_lib.resolve("auto")[0] == "tensorflow"
    assert backend_lib.resolve("jax") == ("jax", "asked for")
    with pytest.raises(ValueError, match="auto, tensorflow, jax"):
        backend_lib.resolve("torch")
    current = keras.backend.backend()
    assert backend_lib.select("auto") == current
    other = "jax" if current == "tensorflow" else "tensorflow"
    with pytest.raises(ValueError, match=f"--backend {other}: Keras is already running on {current}"):
        backend_lib.select(other)


def test_unknown_strategy_name():
    with pytest.raises(ValueError, match="auto, tpu, gpu, cpu"):
        strategy_lib.get_strategy("quantum")


def test_auto_on_this_machine_logs_its_choice(caplog):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU") or strategy_lib._on_tpu_vm():
        pytest.skip("accelerator present")
    with caplog.at_level("INFO", logger="train_tpu"):
        strategy = strategy_lib.get_strategy("auto")
    assert strategy.num_replicas_in_sync == 1
    assert strategy_lib.device_kind(strategy) == "cpu"
    assert "OneDeviceStrategy('/cpu:0'), 1 replica" in caplog.text


def test_cli_strategy_tpu_without_tpu_fails_clearly(tmp_path):
    if strategy_lib._on_tpu_vm():
        pytest.skip("this machine has TPU devices")
    res = subprocess.run(
        [sys.executable, "-m", "train_tpu", "--data", str(tmp_path), "--mode", "cell",
         "--out", str(tmp_path / "run"), "--strategy", "tpu"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "train_tpu: error: --strategy tpu: no TPU found" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()  # nothing written before the hardware check


# One SGD step on the same global batch, on 2 mirrored replicas and on 1 (tests/replica_step.py).
_MULTI_REPLICA = r"""
import json
from train_tpu import strategy as S
S.configure_cpu_replicas(2)
import tensorflow as tf
from common import models
from train_tpu import train as T
from tests import replica_step as R

cfg = R.sgd_config()
x, y = R.doubled_batch((4, 32, 32, 4))  # one GLOBAL batch of 8
build = lambda: models.build_model(models.TEST_BACKBONE, 32, dropout=0.0, drop_connect_rate=0.0)
print(json.dumps(R.compare(S.get_strategy("cpu"), tf.distribute.OneDeviceStrategy("/cpu:0"), build,
                           lambda m: T.compile_model(m, cfg, T.make_optimizer(cfg, 1)), x, y)))
"""


def test_mirrored_two_cpu_replicas_match_one_replica():
    res = subprocess.run([sys.executable, "-c", _MULTI_REPLICA], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    np.testing.assert_allclose(out["loss2"], out["loss1"], rtol=1e-4)
    assert out["norm1"] > 0  # the step did move the weights
    # same update: a loss scaled by the per-replica batch would give norm2 = 2 x norm1
    assert out["diff"] <= 1e-2 * out["norm1"], out  # float32 reduction order: ~1e-3
