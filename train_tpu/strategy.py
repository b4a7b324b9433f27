"""The distribution strategy, chosen in ONE function that never silently falls back.

`get_strategy("auto")` picks TPU > several GPUs (MirroredStrategy) > one GPU > CPU and logs its
choice and replica count; asking for hardware that is not there raises `HardwareNotFoundError`.
On Keras' JAX backend the same names give a `JaxStrategy`: `keras.distribution.DataParallel`
over `jax.devices()` (TPU cores, GPUs or CPU devices), with the same replica and global-batch
rules.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys

log = logging.getLogger("train_tpu")

NAMES = ("auto", "tpu", "gpu", "cpu")


class HardwareNotFoundError(RuntimeError):
    """The strategy asked for (TPU, GPU) has no device on this machine."""


def configure_cpu_replicas(n: int) -> None:
    """Split the CPU into `n` logical devices so `get_strategy("cpu")` mirrors over them.

    For testing the multi-replica path without accelerators. Must run before TensorFlow
    initialises its devices (before any op runs); on the JAX backend, before JAX is imported
    (it reads `--xla_force_host_platform_device_count` from `XLA_FLAGS` once).
    """
    if n <= 1:
        return
    if _keras_backend() == "jax":
        flag = f"--xla_force_host_platform_device_count={n}"
        if "jax" not in sys.modules:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
            return
        import jax

        if len(jax.devices("cpu")) != n:
            raise RuntimeError(f"cpu_replicas={n}: JAX is already initialised with "
                               f"{len(jax.devices('cpu'))} CPU devices; set XLA_FLAGS={flag} "
                               f"before it is imported")
        return
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError as err:
        if len(tf.config.list_logical_devices("CPU")) == n:
            return  # already split this way
        raise RuntimeError(f"cpu_replicas={n}: TensorFlow is already initialised; split the CPU "
                           f"before anything else runs ({err})") from err


def _on_tpu_vm() -> bool:
    """TPU VMs (Kaggle's, Cloud TPU VMs) expose the chips as local devices: /dev/accel* (v2-v4)
    or /dev/vfio/N (v5e and later, which also have the `libtpu` package installed)."""
    if glob.glob("/dev/accel*") or "TPU_ACCELERATOR_TYPE" in os.environ:
        return True
    return bool(glob.glob("/dev/vfio/[0-9]*")) and importlib.util.find_spec("libtpu") is not None


def _tpu_resolver(tpu: str = ""):
    """A TPUClusterResolver when a TPU is present, else None.

    tpu: "" = from the environment (Colab's COLAB_TPU_ADDR, Kaggle's/Cloud's TPU_NAME), then a
    local TPU VM; "local" or a name/grpc address = that one.
    """
    import tensorflow as tf

    if tpu:
        return tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    if os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"):
        return tf.distribute.cluster_resolver.TPUClusterResolver()
    if _on_tpu_vm():
        return tf.distribute.cluster_resolver.TPUClusterResolver(tpu="local")
    return None


def _tpu_strategy(resolver):
    import tensorflow as tf

    # both remote (Colab's TPU node) and local (TPU VM) TPUs need these two calls
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def _keras_backend() -> str:
    """The Keras backend of this process (without importing Keras when it is not loaded yet)."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    return os.environ.get("KERAS_BACKEND", "tensorflow")


class JaxStrategy:
    """What training needs from a strategy on the JAX backend: a `keras.distribution`
    (`DataParallel` over `devices`, made the process's distribution), its replica count and a
    `scope()` (the distribution's) under which models are built."""

    def __init__(self, devices, kind: str):
        import keras

        self.devices = list(devices)
        self.kind = kind
        self.num_replicas_in_sync = len(self.devices)
        self.distribution = keras.distribution.DataParallel(devices=self.devices)
        # fit/predict outside `scope()` shard their batches too (as TPUStrategy's model does)
        keras.distribution.set_distribution(self.distribution)

    def scope(self):
        return self.distribution.scope()

    def __repr__(self):
        return f"DataParallel over {self.num_replicas_in_sync} {self.kind} devices"


def _multi_host_tpu() -> bool:
    """A TPU slice spread over several hosts (Cloud TPU VMs list every worker)."""
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1


def _jax_devices(platform: str):
    """`jax.devices(platform)`, or [] when JAX has no such backend here."""
    import jax

    try:
        return jax.devices(platform)
    except RuntimeError:  # "Unknown backend" / "Backend 'tpu' failed to initialize"
        return []


def _jax_strategy(name: str) -> JaxStrategy:
    """`get_strategy` on the JAX backend: same names, same errors, DataParallel over devices."""
    if name in ("auto", "tpu") and _on_tpu_vm() and _multi_host_tpu():
        import jax

        # every host runs this same command; JAX finds its peers from the TPU metadata
        jax.distributed.initialize()
    if importlib.util.find_spec("tensorflow") is not None:
        # tf.data feeds JAX here: keep TensorFlow off the GPUs (it would reserve the memory
        # JAX needs), as JAX's own tf.data guide does
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError as err:  # TensorFlow already initialised: say so, go on
                log.warning("TensorFlow already holds the GPUs (%s); JAX may run short of "
                            "GPU memory", err)
    for kind in ("tpu", "gpu", "cpu"):
        if name not in ("auto", kind):
            continue
        devices = _jax_devices(kind)
        if devices:
            strategy = JaxStrategy(devices, kind)
            log.info("strategy: %r, %d replicas (JAX backend)", strategy,
                     strategy.num_replicas_in_sync)
            return strategy
        if name == "tpu":
            raise HardwareNotFoundError(
                "--strategy tpu: no TPU found (JAX sees no TPU devices: on a TPU VM install "
                "jax[tpu]). On Colab or Kaggle choose a TPU runtime, or use --strategy "
                "auto|gpu|cpu.")
        if name == "gpu":
            raise HardwareNotFoundError(
                "--strategy gpu: JAX sees no GPU (check `nvidia-smi` and install jax[cuda12] or "
                "jax[cuda13]), or use --strategy auto|cpu.")
    raise HardwareNotFoundError("JAX sees no devices at all")


def get_strategy(name: str = "auto", tpu: str = ""):
    """The `tf.distribute.Strategy` for `name` in auto|tpu|gpu|cpu (a `JaxStrategy` on the JAX
    backend, where `tpu` is unused: JAX finds the local TPU itself).

    tpu: the TPU name or address for `name` tpu/auto (see `_tpu_resolver`).
    cpu: MirroredStrategy over the logical CPU devices when `configure_cpu_replicas(n>1)` ran,
    else OneDeviceStrategy('/cpu:0').
    Raises HardwareNotFoundError when the named hardware is absent.
    """
    if name not in NAMES:
        raise ValueError(f"--strategy must be one of {', '.join(NAMES)}, got {name!r}")
    if _keras_backend() == "jax":
        return _jax_strategy(name)
    import tensorflow as tf

    if name in ("auto", "tpu"):
        resolver = _tpu_resolver(tpu)
        if resolver is not None:
            strategy = _tpu_strategy(resolver)
            log.info("strategy: TPUStrategy, %d replicas", strategy.num_replicas_in_sync)
            return strategy
        if name == "tpu":
            raise HardwareNotFoundError(
                "--strategy tpu: no TPU found (no TPU_NAME or COLAB_TPU_ADDR in the environment, "
                "no /dev/accel* TPU VM devices). On Colab or Kaggle choose a TPU runtime, on a "
                "Cloud TPU pass its name with --tpu, or use --strategy auto|gpu|cpu.")
    gpus = tf.config.list_logical_devices("GPU")
    if name in ("auto", "gpu"):
        if len(gpus) > 1:
            strategy = tf.distribute.MirroredStrategy([g.name for g in gpus])
            log.info("strategy: MirroredStrategy over %d GPUs, %d replicas", len(gpus),
                     strategy.num_replicas_in_sync)
            return strategy
        if len(gpus) == 1:
            log.info("strategy: OneDeviceStrategy('/gpu:0'), 1 replica")
            return tf.distribute.OneDeviceStrategy("/gpu:0")
        if name == "gpu":
            raise HardwareNotFoundError(
                "--strategy gpu: TensorFlow sees no GPU (check `nvidia-smi` and that the "
                "installed TensorFlow has CUDA support), or use --strategy auto|cpu.")
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) > 1:
        strategy = tf.distribute.MirroredStrategy([c.name for c in cpus])
        log.info("strategy: MirroredStrategy over %d logical CPUs, %d replicas", len(cpus),
                 strategy.num_replicas_in_sync)
        return strategy
    log.info("strategy: OneDeviceStrategy('/cpu:0'), 1 replica%s",
             " (auto: no TPU or GPU found)" if name == "auto" else "")
    return tf.distribute.OneDeviceStrategy("/cpu:0")


def device_kind(strategy) -> str:
    """"tpu", "gpu" or "cpu": what the strategy runs on (for precision and steps_per_execution)."""
    if isinstance(strategy, JaxStrategy):
        return strategy.kind
    import tensorflow as tf

    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    devices = getattr(strategy.extended, "worker_devices", ()) or ()
    return "gpu" if any("GPU" in d.upper() for d in devices) else "cpu"
