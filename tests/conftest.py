"""Shared fixtures: the real HPA data in ../shared (skipped when absent) and synthetic data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# `make test` runs `pytest -n 3 --dist loadgroup` (pytest-xdist): a unit of work is a group,
# run whole on one worker, so a module- or session-scoped fixture is built once. A test's group
# is its module (as --dist loadfile), except the groups below that span modules: "learning_base"
# (the tests of tests/learning_runs.py's base run) and "jax" (one JAX compilation cache).
# xdist's own `xdist_group` marks do not reach its scheduler under pytest 9 (it renames
# `item._nodeid`, which pytest 9 no longer reads), so the groups are named here by node id and
# the scheduler below reads them. The scheduler keeps SLOW_FIRST's order (xdist's default
# --loadscope-reorder would sort the groups by their number of tests, so the two heaviest, the
# learning tests' base-run group and the JAX group, of 3 and 7 tests, started after most of the
# short modules and ended alone: 28:00 on the AMD machine of 2026-12-03, the last 10 minutes on
# one worker). Once the trainer's own rules trained the test backbone (test_cnn) those two
# groups are most of the suite's work, so they start first and the short modules fill in.
# (Before that, three EfficientNet trainings at once measured no better in this order: 19:43
# against 15:55.)
# Three workers on the 2-core machine: much of a smoke training is single-threaded Python
# (tracing the step functions), so a third worker fills the cores the others leave idle
# (measured: 16 min 38 s against 20 min 18 s on two).
GROUPS = {  # node id prefix -> group
    "tests/test_learning_mil.py": "learning_base",
    "tests/test_learning.py::test_demo_preset_learns_cell_labels_from_image_labels[tensorflow]": "learning_base",
    "tests/test_learning.py::test_demo_preset_learns_cell_labels_from_image_labels[jax]": "jax",
    "tests/test_train_jax.py": "jax",
    # test_train.py's module alone was the longest unit (~640 s on the loaded machine): its two
    # resume tests run as a unit of their own (each worker builds the module's small shards)
    "tests/test_train.py::test_sigkilled_run_resumes_with_the_data_order_of_an_uninterrupted_run": "train_resume",
    "tests/test_train.py::test_interrupted_run_resumes_from_the_last_epoch": "train_resume",
}
# Groups by their measured seconds (`--durations`, main at ed3c99a on the AMD 2-core machine),
# slowest first; the groups not named follow in collection order.
SLOW_FIRST = ("learning_base", "jax", "tests/test_learning_pseudo_label.py", "tests/test_train.py",
              "tests/test_accel_check.py", "tests/test_train_bag.py", "tests/test_predict_e2e.py",
              "tests/test_self_train.py", "tests/test_predict_beam.py", "tests/test_train_targets.py",
              "tests/test_predict_bags.py", "tests/test_models.py", "train_resume", "tests/test_builder_beam.py",
              "tests/test_predict_threads.py", "tests/test_strategy.py", "tests/test_quiet.py")


def group_of(nodeid: str) -> str:
    """The xdist work unit of the test `nodeid`: its GROUPS entry, else its module file."""
    for prefix, group in GROUPS.items():
        if nodeid == prefix or nodeid.startswith(prefix + "::"):
            return group
    return nodeid.split("::", 1)[0]


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # keep SLOW_FIRST's order (above)

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(group_of(item.nodeid), len(rank)))


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

@pytest.fixture(scope="session")
def learning_data(tmp_path_factory) -> dict:
    """The learning tests' synthetic data and shards (tests/learning_runs.py), made once."""
    from tests.learning_runs import make_learning_data

    return make_learning_data(tmp_path_factory.mktemp("learning"))


@pytest.fixture(scope="session")
def learning_base(learning_data, tmp_path_factory) -> Path:
    """The deterministic `demo` cell-tile run on `learning_data` (tests/learning_runs.py),
    trained once: its tests share one xdist group (GROUPS) so one worker trains it."""
    from tests.learning_runs import train_base

    return train_base(learning_data, tmp_path_factory.mktemp("learning_base") / "base")


from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: E402,F401  real GCS emulator fixtures
