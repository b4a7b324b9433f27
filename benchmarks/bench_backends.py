"""Training speed of Keras' JAX backend against its TensorFlow backend, on this machine's CPU.

    .venv/bin/python benchmarks/bench_backends.py [--sizes 32,224] [--batch 16] [--steps 4]

Keras fixes its backend when first imported, so each backend runs in its own subprocess of this
script, with the same everything else: the trainer's EfficientNet-B0 (`common.models`), loss,
optimizer and `compile_model`; the same in-memory batch (seeded) fed through `tf.data`, as the
trainer feeds both backends; the same global batch, the same timed steps after the same warm-up
fit (tracing and compilation), and the same CPU cores (`os.sched_setaffinity`). Prints training
examples per second for each backend and size, and JAX / TensorFlow.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "jax")


def examples_per_s(size: int, batch: int, steps: int, warmup: int) -> float:
    """B0 training examples per second on one in-memory batch (input work excluded)."""
    import numpy as np
    import tensorflow as tf

    from common import models
    from train_tpu import train as trainlib
    from train_tpu.config import make_config

    cfg = make_config("smoke", size=size, batch_size=batch, epochs=1)
    model = models.build_model("efficientnet_b0", size, dropout=cfg.dropout,
                               drop_connect_rate=cfg.drop_connect_rate)
    trainlib.compile_model(model, cfg, trainlib.make_optimizer(cfg, steps + warmup))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 4)).astype("float32")
    y = (rng.uniform(size=(batch, 19)) < 0.2).astype("float32")
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(ds, epochs=1, steps_per_epoch=warmup, verbose=0)  # tracing / XLA compilation
    start = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
    return steps * batch / (time.perf_counter() - start)


def worker(args) -> int:
    """One backend, in this process: prints `{"backend": ..., "rates": {size: ex/s}}`."""
    os.environ["KERAS_BACKEND"] = args.worker  # before anything imports Keras
    import keras

    assert keras.backend.backend() == args.worker, keras.backend.backend()
    rates = {s: examples_per_s(s, args.batch, args.steps, args.warmup) for s in args.sizes}
    print(json.dumps({"backend": args.worker, "rates": rates}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="32,224", type=lambda s: [int(v) for v in s.split(",")],
                   help="model input sides, px")
    p.add_argument("--batch", type=int, default=16, help="global batch size")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per size")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    p.add_argument("--cpus", type=int, default=0, help="pin both backends to the first N cores "
                   "(0 = all of this process's cores)")
    p.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if args.cpus:
        cores = cores[:args.cpus]
    os.sched_setaffinity(0, cores)  # inherited by the workers: the same cores for both
    if args.worker:
        return worker(args)

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)  # one device per backend, no forced host-device split
    rates = {}
    for backend in BACKENDS:
        cmd = [sys.executable, __file__, "--worker", backend, "--sizes",
               ",".join(map(str, args.sizes)), "--batch", str(args.batch), "--steps",
               str(args.steps), "--warmup", str(args.warmup)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        rates[backend] = {int(k): v for k, v in
                          json.loads(res.stdout.strip().splitlines()[-1])["rates"].items()}

    print(f"EfficientNet-B0 training on the CPU ({len(cores)} cores), global batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up steps")
    print(f"{'input px':>8} {'TensorFlow ex/s':>16} {'JAX ex/s':>10} {'JAX/TF':>8}")
    for size in args.sizes:
        tf_rate, jax_rate = rates["tensorflow"][size], rates["jax"][size]
        print(f"{size:>8} {tf_rate:>16.1f} {jax_rate:>10.1f} {jax_rate / tf_rate:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
