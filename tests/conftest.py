"""Shared fixtures: the real HPA data in ../shared (skipped when absent) and synthetic data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


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
