"""The benchmark scripts import and their cheap configurations run (never timed here).

Each script's `main` is run on its smallest inputs where that takes a second or two; the
others (TensorFlow models, 2048 px segmentation) are only imported, so a renamed function they
call still shows up as an import or attribute error in `test_every_benchmark_imports`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCH.glob("bench_*.py"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_imports(name):
    module = _load(name)
    assert callable(module.main)


@pytest.mark.parametrize("name, argv", [
    ("bench_codec", ["--cells", "3", "--repeat", "1", "--size", "512"]),
    ("bench_builder", ["--n", "10", "--size", "64", "--tile", "32", "--workers", "0", "--repeats", "1",
                       "--no-breakdown"]),
    ("bench_images", ["--repeat", "1", "--synthetic", "1", "--size", "64"]),
    ("bench_download", ["--images", "6", "--workers", "2", "--latency", "0.01", "--size", "64"]),
])
def test_smallest_configuration_runs_and_prints_its_ratio(name, argv, capsys):
    assert _load(name).main(argv) == 0
    out = capsys.readouterr().out
    assert "RATIO" in out, out
