"""The cost of one self-training round (scripts/self_train.sh) against the base training it follows.

Both sides run in this script, on the same synthetic images, shards, trainer settings and
threads, each as a user runs it (a fresh process: `python -m train_tpu` for the base,
`bash scripts/self_train.sh --rounds 1` for the round), so both pay TensorFlow's start-up. The
round's steps are timed by the script itself (OUT/round1/round.json): fold models (K - 1
trainings like the base, out of fold; none with --in-sample), scoring the training images
(predict --labels --cells), pseudo-labels, the shards with them, the new run's training.

    .venv/bin/python benchmarks/bench_self_train.py                 # 24 images, 3 folds, OOF
    .venv/bin/python benchmarks/bench_self_train.py --in-sample
    .venv/bin/python benchmarks/bench_self_train.py --n 8 --folds 2 --epochs 1 --steps 2   # seconds
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _run(cmd: list[str], log: str) -> float:
    env = dict(os.environ, PYTHONPATH=ROOT, PY=sys.executable, TF_CPP_MIN_LOG_LEVEL="2")
    start = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.call(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({code}); see {log}")
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=24, help="training images (synthetic, 128 px)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--tile", type=int, default=32, help="cell tile side, px")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="steps per epoch")
    p.add_argument("--in-sample", action="store_true", help="score with the base run (no fold models)")
    p.add_argument("--out", default="", help="work folder (default: a temporary one)")
    a = p.parse_args(argv)
    from testkit import synthetic
    from tfrecords_builder.__main__ import main as build_main

    work = a.out or tempfile.mkdtemp(prefix="bench-self-train-")
    data, shards, base, out = (os.path.join(work, x) for x in ("data", "shards", "base", "st"))
    synthetic.generate(data, n=a.n, size=128, seed=5)
    assert build_main(["--images", f"{data}/images", "--labels", f"{data}/train.csv", "--out", shards,
                       "--mode", "cell", "--size", str(a.tile), "--folds", str(a.folds), "--shard-mb", "0.05",
                       "--workers", "0", "--no-progress"]) in (0, 2)
    base_s = _run([sys.executable, "-m", "train_tpu", "--data", shards, "--mode", "cell", "--out", base,
                   "--preset", "smoke", "--epochs", str(a.epochs), "--steps-per-epoch", str(a.steps),
                   "--strategy", "cpu", "--deterministic"], os.path.join(work, "base.log"))
    round_s = _run(["bash", os.path.join(ROOT, "scripts", "self_train.sh"), "--images", f"{data}/images",
                    "--labels", f"{data}/train.csv", "--base", base, "--out", out, "--workers", "0",
                    *(["--in-sample"] if a.in_sample else [])], os.path.join(work, "round.log"))
    steps = json.load(open(os.path.join(out, "round1", "round.json")))["seconds"]
    print(f"{a.n} synthetic images (128 px), {a.tile} px cell tiles, {a.folds} folds; trainer: smoke preset, "
          f"{a.epochs} epochs x {a.steps} steps, CPU, --deterministic; scoring "
          f"{'in sample (the base run)' if a.in_sample else f'out of fold ({a.folds - 1} fold models)'}")
    print(f"base training (python -m train_tpu, one process): {base_s:7.1f} s")
    print(f"one round (bash scripts/self_train.sh):           {round_s:7.1f} s")
    for step, s in steps.items():
        print(f"  {step:<13} {s:7.1f} s")
    print(f"  {'other':<13} {round_s - sum(steps.values()):7.1f} s (the driver's start-up, reading the base)")
    print(f"RATIO round / base training: {round_s / base_s:.2f}")
    print("what differs: the round trains K - 1 fold models and its new run in ONE process (one "
          "TensorFlow start-up), and starts predict, pseudo-label and the builder as processes of "
          "their own; the base is one trainer process. Real runs are dominated by training: the "
          f"projection for K folds is about K trainings + scoring every training image once per round.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
