"""Shared fixtures: the real HPA data in ../shared (skipped when absent) and synthetic data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# `make test` runs `pytest -n 2 --dist loadgroup` (pytest-xdist): a unit of work is an
# `xdist_group`, run whole on one worker, so a module- or session-scoped fixture is built once.
# A test without its own group is grouped with its module (as --dist loadfile would); a group
# that spans modules (tests/learning_runs.py's LEARNING_GROUP, "jax": one JAX compilation cache)
# is marked in the tests. The slowest groups are collected first, so that the two workers
# start on them and the many short modules fill in behind (measured: `--durations`).
SLOW_FIRST = ("test_learning_mil", "test_learning", "test_train_jax", "test_learning_pseudo_label",
              "test_self_train", "test_train", "test_train_bag", "test_predict_e2e")


def _module(item) -> str:
    return item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(_module(item)))
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(_module(item), len(rank)))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real HPA images, masks, train.csv); skip when a fresh clone lacks it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real HPA data not found at {SHARED_DATA} (only present beside the project in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory) -> Path:
    """A small synthetic dataset (6 images, 256 px, seed 0), generated once per session."""
    from testkit import synthetic

    out = tmp_path_factory.mktemp("synthetic_small")
    synthetic.generate(str(out), n=6, size=256, seed=0)
    return out

from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: E402,F401  real GCS emulator fixtures
