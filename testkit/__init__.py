"""Helpers for tests, benchmarks and the demo (synthetic data, segmentation agreement); no
stage imports this package."""
