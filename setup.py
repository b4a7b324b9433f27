"""Shim for Apache Beam's `--setup_file ./setup.py` (Dataflow workers install the project from the
sdist that Beam builds with it). Everything is declared in pyproject.toml."""
from setuptools import setup

setup()
