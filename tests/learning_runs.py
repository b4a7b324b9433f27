"""Test helper: the learning tests' data and their shared base run, made once per test session
for all pytest-xdist workers (tests/conftest.py `made_once`: the first worker to ask makes it,
the others wait for it).

The CLIs run in this process (`cli`): the same argument parsing and code as a user's command,
without a fresh interpreter importing TensorFlow for each of the ~20 commands. Each CLI is still
run once as a subprocess by its own tests (test_train, test_builder_cli, test_predict_e2e,
test_validate_evaluate, test_synthetic).

- `make_learning_data(root)`: 57 synthetic training images (seed 31, every class the primary of
  3) and 19 held-out test images (seed 32), cut by the builder into 48 px cell shards and bag
  shards from the synthetic label maps (`--masks`), 3 folds.
- `train_base(data, out)`: the `demo` preset's cell-tile model, 5 of its 12 epochs (200 steps),
  `--strategy cpu --deterministic`: the base of the MIL recipe (tests/test_learning_mil.py), the
  TensorFlow run of tests/test_learning.py and the model whose out-of-fold predictions
  tests/test_learning_pseudo_label.py turns into cell labels.
"""
from __future__ import annotations

import contextlib
import importlib
import io
from pathlib import Path

DETERMINISTIC = ("--strategy", "cpu", "--deterministic")  # the same numbers on every run here

_MAINS = {"testkit.synthetic": "testkit.synthetic", "tfrecords_builder": "tfrecords_builder.__main__",
          "train_tpu": "train_tpu.cli", "infer_gpu": "infer_gpu.cli"}


def cli(module: str, *args) -> str:
    """Run `python -m MODULE ARGS` in this process; returns its stdout; fails on a nonzero exit."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = importlib.import_module(_MAINS[module]).main(argv)
    assert status == 0, (module, argv, status, out.getvalue()[-2000:], err.getvalue()[-4000:])
    return out.getvalue()


def learning_paths(root: Path) -> dict:
    """{"train", "test": synthetic folders; "cell", "bag": shard folders} under `root`."""
    return {"train": root / "train", "test": root / "test", "cell": root / "cell", "bag": root / "bag"}


def make_learning_data(root: Path) -> dict:
    """Generates and cuts the learning data under `root`; returns `learning_paths(root)`."""
    root.mkdir(parents=True, exist_ok=True)
    paths = learning_paths(root)
    train, test = paths["train"], paths["test"]
    cli("testkit.synthetic", "--out", train, "--n", 57, "--size", 256, "--seed", 31)
    cli("testkit.synthetic", "--out", test, "--n", 19, "--size", 256, "--seed", 32)
    for mode in ("cell", "bag"):
        cli("tfrecords_builder", "--images", train / "images", "--labels", train / "train.csv",
            "--out", paths[mode], "--mode", mode, "--masks", train / "masks", "--size", 48,
            "--folds", 3, "--workers", 2, "--no-progress")
    return paths


def train_base(data: dict, out: Path) -> Path:
    """The deterministic `demo` cell-tile run (5 epochs) on `data["cell"]`, written to `out`."""
    cli("train_tpu", "--data", data["cell"], "--mode", "cell", "--out", out, "--preset", "demo",
        "--epochs", 5, *DETERMINISTIC)
    return out
