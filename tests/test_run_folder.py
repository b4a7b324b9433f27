"""common.run_folder: the trainer's writer and inference's reader of a run folder."""
from __future__ import annotations

import os

import numpy as np
import pytest

from common import models, run_folder
from common.preprocess import Preprocess, TileSpec
from train_tpu.config import make_config

SIZE = 32


@pytest.fixture(scope="module")
def tiny_model():
    return models.build_model("efficientnet_b0", SIZE, dropout=0.0, drop_connect_rate=0.0)


def test_written_folder_reads_back_the_same(tmp_path, tiny_model):
    run = str(tmp_path / "run")
    cfg = make_config("smoke", data="/d", out=run)
    spec = Preprocess(TileSpec(size=SIZE, mode="image", margin=0.1))
    os.makedirs(run)
    run_folder.write_config(run, cfg)
    run_folder.write_spec(run, spec)
    run_folder.write_model(run, tiny_model)
    assert sorted(os.listdir(run)) == sorted([run_folder.MODEL_FILE, run_folder.CONFIG_FILE,
                                              "preprocess.json"])
    got = run_folder.load(run + "/")
    assert got.path == run and got.spec == spec
    assert got.config["out"] == run and got.config["size"] == cfg.size
    assert got.config["backbone"] == cfg.backbone
    assert got.model_file == os.path.join(run, run_folder.MODEL_FILE)
    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 4)).astype("float32")
    np.testing.assert_allclose(run_folder.load_model(got).predict(x, verbose=0),
                               tiny_model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_missing_files_are_named(tmp_path, tiny_model):
    run = str(tmp_path / "run")
    os.makedirs(run)
    with pytest.raises(FileNotFoundError, match=r"preprocess\.json: missing"):
        run_folder.load(run)
    run_folder.write_spec(run, Preprocess(TileSpec(size=SIZE)))
    with pytest.raises(FileNotFoundError, match=r"run/model\.keras: missing"):
        run_folder.load(run)
    with pytest.raises(FileNotFoundError, match=r"run/config\.json: missing"):
        run_folder.read_config(run)
    run_folder.write_model(run, tiny_model)
    assert run_folder.load(run).config == {}  # a hand-made folder needs no config.json
    with open(os.path.join(run, "preprocess.json"), "w") as fh:
        fh.write('{"size": 2}')
    with pytest.raises(ValueError, match=r"preprocess\.json: not a valid tile spec"):
        run_folder.load(run)
    with open(os.path.join(run, run_folder.CONFIG_FILE), "w") as fh:
        fh.write("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object"):
        run_folder.read_config(run)


def test_model_path_takes_a_folder_or_the_file():
    assert run_folder.model_path("gs://b/run") == "gs://b/run/model.keras"
    assert run_folder.model_path("/x/other.keras") == "/x/other.keras"
