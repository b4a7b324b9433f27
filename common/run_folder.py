"""The run folder: what training writes and inference reads, local or `gs://`.

    model.keras       the trained model (float32, no optimizer): `float32 [B, N, N, 4]` -> `[B, 19]`
    preprocess.json   the Preprocess the model was trained on: its TileSpec (inference cuts tiles
                      with it), bag size, and how the training data's cells were segmented
                      (`Preprocess.segmentation`)
    config.json       the training config that made the run (a rerun reads it back)

The trainer also keeps `history.csv`/`history.png` and `checkpoints/` there (train_tpu's own
files: only the trainer reads them). This module names these files, except `model.keras`,
whose name `common.models` holds (its `load_model` takes a run folder too).
A folder made by hand (tests, a model from elsewhere) needs `model.keras` and `preprocess.json`;
`config.json` is optional for inference.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from common import config as cfglib
from common import storage
from common.models import MODEL_FILE, model_path  # noqa: F401 - part of this module's interface
from common.preprocess import PREPROCESS_FILE, Preprocess

CONFIG_FILE = "config.json"
_NEEDS = f"a run folder needs {MODEL_FILE} and {PREPROCESS_FILE}"


@dataclass(frozen=True)
class RunFolder:
    """One trained run as inference sees it: where it is, its tile spec and its config."""

    path: str
    spec: Preprocess
    config: Mapping[str, Any] = field(default_factory=dict)  # {} when there is no config.json

    @property
    def model_file(self) -> str:
        return model_path(self.path)


def config_path(run_dir: str) -> str:
    return storage.join(run_dir, CONFIG_FILE)


def spec_path(run_dir: str) -> str:
    return storage.join(run_dir, PREPROCESS_FILE)


# -- writing (the trainer) ---------------------------------------------------------------

def write_config(run_dir: str, cfg) -> str:
    """Write `cfg` (a config dataclass) as `RUN_DIR/config.json`, atomically; returns the path."""
    path = config_path(run_dir)
    cfglib.save(cfg, path)
    return path


def write_spec(run_dir: str, spec: Preprocess) -> str:
    """Write the Preprocess the model takes as `RUN_DIR/preprocess.json`; returns the path."""
    path = spec_path(run_dir)
    spec.save(path)
    return path


def write_model(run_dir: str, model) -> str:
    """Save the inference model as `RUN_DIR/model.keras`, atomically; returns the path."""
    from common import models

    path = model_path(run_dir)
    models.save_model(model, path)
    return path


# -- reading (inference, and the trainer's resume check) -----------------------------------

def has_config(run_dir: str) -> bool:
    return storage.exists(config_path(run_dir))


def read_config(run_dir: str) -> dict:
    """`RUN_DIR/config.json` as a plain dict; errors name the file."""
    path = config_path(run_dir)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: missing; the trainer writes it into every run folder")
    try:
        data = json.loads(storage.read_text(path))
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_spec(run_dir: str) -> Preprocess:
    """The Preprocess a run was trained with (`RUN_DIR/preprocess.json`); errors name the file."""
    path = spec_path(run_dir)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: missing; {_NEEDS}")
    try:
        return Preprocess.load(path)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a valid tile spec: {err}") from err


def load(run_dir: str) -> RunFolder:
    """Read a run folder (not its model): its spec, and its config when it has one.
    Raises FileNotFoundError naming `model.keras` or `preprocess.json` when one is missing."""
    run_dir = str(run_dir).rstrip("/") or str(run_dir)
    spec = read_spec(run_dir)
    if not storage.exists(model_path(run_dir)):
        raise FileNotFoundError(f"{model_path(run_dir)}: missing; {_NEEDS}")
    config = read_config(run_dir) if has_config(run_dir) else {}
    return RunFolder(path=run_dir, spec=spec, config=config)


def load_model(run: RunFolder | str, compile: bool = False, data: bytes | None = None):
    """The run's Keras model (`common.models.load_model` on its `model.keras`).
    data: the file's bytes when the caller has read them already (e.g. to fingerprint them)."""
    from common import models

    path = run.model_file if isinstance(run, RunFolder) else model_path(run)
    return models.load_model(path, compile=compile, data=data)
