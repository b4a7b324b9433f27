"""The Keras backend (TensorFlow or JAX), chosen before Keras is imported.

Keras reads `KERAS_BACKEND` once, when it is first imported, so the choice must come first: the
CLI calls `select` right after parsing its arguments. No Keras, TensorFlow or JAX at import time.

`auto` picks:
- `KERAS_BACKEND` when the environment sets it (the user's explicit choice);
- `jax` on a TPU VM (Kaggle's, Colab's v5e/v6e, Cloud TPU VMs) when JAX is installed: these
  runtimes are documented for JAX, and TensorFlow's TPU support stops at the `tensorflow-tpu`
  2.20 wheel (older than the TensorFlow this project pins);
- `tensorflow` everywhere else (GPUs, the CPU, and Colab's legacy remote TPU nodes, which
  only `TPUStrategy` can reach).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys

log = logging.getLogger("train_tpu")

NAMES = ("auto", "tensorflow", "jax")


def resolve(name: str = "auto") -> tuple[str, str]:
    """`(backend, why)` for `name` in auto|tensorflow|jax, without importing anything."""
    from train_tpu.strategy import _on_tpu_vm

    if name not in NAMES:
        raise ValueError(f"--backend must be one of {', '.join(NAMES)}, got {name!r}")
    if name != "auto":
        return name, "asked for"
    env = os.environ.get("KERAS_BACKEND", "")
    if env:
        return env, "KERAS_BACKEND is set"
    remote_tpu = os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME", "").startswith("grpc")
    if _on_tpu_vm() and not remote_tpu and importlib.util.find_spec("jax") is not None:
        return "jax", "a TPU VM with JAX installed"
    return "tensorflow", "no TPU VM with JAX here"


def select(name: str = "auto") -> str:
    """Make `name`'s backend the one Keras uses in this process; returns it.

    Before Keras is imported, this sets `KERAS_BACKEND`. Once it is imported the backend is
    fixed: `auto` then takes it, and asking for another one is a ValueError.
    """
    if name not in NAMES:
        raise ValueError(f"--backend must be one of {', '.join(NAMES)}, got {name!r}")
    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if name not in ("auto", current):
            raise ValueError(f"--backend {name}: Keras is already running on {current} in this "
                             f"process (the backend is fixed when Keras is first imported; set "
                             f"KERAS_BACKEND={name} or pass --backend before anything imports it)")
        if name == "auto":
            log.info("backend: %s (auto: Keras was already imported with it)", current)
        return current
    chosen, why = resolve(name)
    if chosen not in NAMES[1:]:
        raise ValueError(f"KERAS_BACKEND={chosen!r}: this trainer runs on tensorflow or jax")
    os.environ["KERAS_BACKEND"] = chosen
    if name == "auto":
        log.info("backend: %s (auto: %s)", chosen, why)
    return chosen
