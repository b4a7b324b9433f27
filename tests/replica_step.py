"""One SGD step on one global batch, under two strategies: the multi-replica checks' shared core.

The global batch is two copies of the same half, so each of 2 replicas (or devices) sees the
examples and the BatchNorm batch statistics that a single replica sees; what remains to differ
is how the gradient is scaled. SGD (unlike Adam) moves the weights in proportion to the
gradient, so a per-replica-batch scaling shows up as a 2x update. Imported by the scripts that
the tests run in subprocesses (the replicas must be set up before TensorFlow starts).
"""
from __future__ import annotations


def sgd_config(**overrides):
    from train_tpu.config import make_config

    return make_config("smoke", optimizer="sgd", learning_rate=0.05, warmup_epochs=0.0,
                       min_lr_ratio=1.0, dropout=0.0, drop_connect_rate=0.0, **overrides)


def one_step(strategy, build, w0, compile_fn, x, y) -> tuple[float, "np.ndarray"]:
    """Build (`build()`), set the weights `w0`, compile (`compile_fn(model)`), take one step on
    `(x, y)` in `strategy`'s scope; returns the loss and the change of the trainable weights."""
    import numpy as np
    import tensorflow as tf

    from train_tpu import model as trainmodel

    with strategy.scope():
        net = build()
        trainmodel.set_weights(net, w0)
        compile_fn(net)
        before = np.concatenate([np.ravel(v) for v in net.trainable_weights])
        loss = net.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, steps_per_epoch=1,
                       verbose=0).history["loss"][0]
        after = np.concatenate([np.ravel(v) for v in net.trainable_weights])
    return float(loss), after - before


def compare(two, one, build, compile_fn, x, y) -> dict:
    """The same step under `two` (2 replicas) and `one`, from the same initial weights."""
    import numpy as np

    w0 = build().get_weights()
    loss2, d2 = one_step(two, build, w0, compile_fn, x, y)
    loss1, d1 = one_step(one, build, w0, compile_fn, x, y)
    return {"replicas": two.num_replicas_in_sync, "loss2": loss2, "loss1": loss1,
            "norm1": float(np.linalg.norm(d1)), "diff": float(np.linalg.norm(d2 - d1))}


def doubled_batch(shape_x, rng_seed: int = 0):
    """`(x, y)`: two copies of the same random half batch of tiles `shape_x` and labels."""
    import numpy as np

    rng = np.random.default_rng(rng_seed)
    half_x = rng.uniform(0, 255, shape_x).astype("float32")
    half_y = (rng.uniform(size=(shape_x[0], 19)) < 0.3).astype("float32")
    return np.concatenate([half_x, half_x]), np.concatenate([half_y, half_y])
