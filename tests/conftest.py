"""Shared fixtures: the real HPA data in ../shared (skipped when absent) and synthetic data."""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One TensorFlow thread per op and one op at a time in every test process (the xdist workers and
# the CLIs they start inherit it): three workers on two cores with TensorFlow's default pools
# (one thread per core each) waited on each other's descheduled threads, the shared demo
# training took 444 s in the suite against 155 s alone; alone on one thread it takes 162 s.
# It also makes the --deterministic runs' numbers independent of the machine's core count
# (Eigen splits an op's work by its thread count, and so its float rounding).
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# `make test` runs `pytest -n 3 --dist loadgroup` (pytest-xdist): a unit of work is a group,
# run whole on one worker, so a module- or session-scoped fixture is built once per worker. A
# test's group is its module (as --dist loadfile), except the groups below that span modules:
# "jax" (one JAX compilation cache). What several workers need is made once
# for all of them (`made_once`): the learning tests' data and their shared demo training, which
# test_learning[tensorflow], test_learning_mil and test_learning_pseudo_label start from.
# xdist's own `xdist_group` marks do not reach its scheduler under pytest 9 (it renames
# `item._nodeid`, which pytest 9 no longer reads), so the groups are named here by node id and
# the scheduler below reads them. The scheduler keeps SLOW_FIRST's order (xdist's default
# --loadscope-reorder sorts the groups by their number of tests, and the heaviest, with few
# tests, started after most of the short modules and ended alone: 28:00 on the AMD machine of
# 2026-12-03, the last 10 minutes on one worker). The learning tests and the JAX group start
# first; the tests that wait for the shared training hold no core while they wait.
# Three workers on the 2-core machine: much of a smoke training is single-threaded Python
# (tracing the step functions), so a third worker fills the cores the others leave idle
# (measured: 16 min 38 s against 20 min 18 s on two, with TensorFlow's default threads; not
# measured again since each process runs on one thread: the cores were ~90% busy on three).
GROUPS = {  # node id prefix -> group
    "tests/test_learning.py::test_demo_preset_learns_cell_labels_from_image_labels[jax]": "jax",
    "tests/test_train_jax.py": "jax",
}
# The three tests of the shared demo run first (the first to start trains it, the others wait
# for it: the 200-step run and then the MIL module's 240 steps are the suite's longest chain),
# then the groups by their measured seconds (`--durations`, the AMD 2-core machine), slowest
# first; the groups not named follow in collection order.
SLOW_FIRST = ("tests/test_learning.py", "jax", "tests/test_learning_mil.py", "tests/test_learning_pseudo_label.py",
              "tests/test_train.py",
              "tests/test_accel_check.py", "tests/test_train_bag.py", "tests/test_predict_e2e.py",
              "tests/test_self_train.py", "tests/test_predict_beam.py", "tests/test_train_targets.py",
              "tests/test_predict_bags.py", "tests/test_models.py", "tests/test_builder_beam.py",
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

def made_once(tmp_path_factory, name: str, make) -> Path:
    """The folder `name`, made by `make(folder)` once per test session: the first xdist worker
    to ask makes it while the others wait on a file lock, then all use it (a worker waiting
    holds no core: the others use both). A failed `make` is recorded, and a worker that asks
    later fails at once with its reason instead of making it again."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, under xdist
    out, done, failed = root / name, root / f"{name}.done", root / f"{name}.failed"
    with open(root / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if failed.exists():
            pytest.fail(f"making {name} failed on another worker: {failed.read_text()[-2000:]}")
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            try:
                make(out)
            except Exception as err:  # a skip or a ^C is not recorded: the next worker tries
                failed.write_text(f"{type(err).__name__}: {err}")
                raise
            done.touch()
    return out


@pytest.fixture(scope="session")
def learning_data(tmp_path_factory) -> dict:
    """The learning tests' synthetic data and shards (tests/learning_runs.py), made once per
    session for all workers."""
    from tests.learning_runs import learning_paths, make_learning_data

    return learning_paths(made_once(tmp_path_factory, "learning", make_learning_data))


@pytest.fixture(scope="session")
def learning_base(learning_data, tmp_path_factory) -> Path:
    """The deterministic `demo` cell-tile run on `learning_data` (tests/learning_runs.py),
    trained once per session: the first worker to need it trains it, the others wait."""
    from tests.learning_runs import train_base

    return made_once(tmp_path_factory, "learning_base", lambda out: train_base(learning_data, out))


from tests.gcs_emulator import gcs_bucket, gcs_emulator  # noqa: E402,F401  real GCS emulator fixtures
