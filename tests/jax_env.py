"""Test helper: the environment of a subprocess that runs Keras on the JAX backend.

The backend is fixed per process (Keras reads KERAS_BACKEND when first imported), so JAX runs in
subprocesses of the TensorFlow test process. They share one persistent JAX compilation cache
per test session: building an EfficientNet on JAX compiles one small XLA program per weight
shape, which the first process pays for and the others read back.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def jax_env(tmp_path_factory, cpu_devices: int = 1) -> dict:
    """os.environ for a JAX-backend subprocess with `cpu_devices` host CPU devices; skips the
    test when JAX is not installed."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install -r requirements-dev.txt)")
    cache = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT),
               JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    for var in ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE", "XLA_FLAGS"):
        env.pop(var, None)
    if cpu_devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={cpu_devices}"
    return env
