"""`predict --engine beam` (issue #23) against the local engine on synthetic images: the same
CSV and cell table (DirectRunner in memory and with two worker processes), the same failed list
and exit status for bad images, a SIGKILLed Beam run resumed to the same rows, gs:// images and
output on the storage emulator; a bug fails the pipeline; remote runners refuse local paths.

The runs are small untrained CNNs saved as run folders (cell mode, and image mode for the
combine rule's image term): equality between the engines needs real Keras models, not a
classifier that has learnt anything.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from common import storage, submission  # noqa: E402
from common.preprocess import Preprocess, TileSpec  # noqa: E402
from infer_gpu import beam_engine, engine  # noqa: E402
from infer_gpu.combine import CombineRule  # noqa: E402
from infer_gpu.cli import main as cli_main  # noqa: E402
from infer_gpu.config import PredictConfig  # noqa: E402
from infer_gpu.report import EXIT_FAILED_IMAGES, RunStopped  # noqa: E402
from tests.test_builder_gcs import upload_tree  # noqa: E402
from tests.test_predict_e2e import (TILE, _assert_same_cells, _assert_same_rows, _copy_images,  # noqa: E402
                                    _finished_parts, _many_images, _save_run, _tiny_cnn, _write_sample,
                                    stand_in_run)

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TILE = Preprocess(TileSpec(size=64, mode="image"))
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """A cell-mode and an image-mode run folder (untrained tiny CNNs, seeded)."""
    base = tmp_path_factory.mktemp("beam_runs")
    return {"cell": str(_save_run(_tiny_cnn(0), base / "cell")),
            "image": str(_save_run(_tiny_cnn(1, size=IMAGE_TILE.size), base / "image", spec=IMAGE_TILE))}


@pytest.fixture(scope="module")
def bad_images(synthetic_small, tmp_path_factory) -> Path:
    """The 6 synthetic images with a corrupt channel (syn_0001), a missing one (syn_0002) and a
    sample row with another size than the files (syn_0004)."""
    d = tmp_path_factory.mktemp("beam_bad")
    ids = [f"syn_{i:04d}" for i in range(6)]
    _copy_images(Path(synthetic_small) / "images", d / "images", ids)
    (d / "images" / "syn_0001_green.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    os.remove(d / "images" / "syn_0002_yellow.png")
    rows = [(i, 256, 256) for i in ids]
    rows[4] = ("syn_0004", 300, 256)
    _write_sample(d / "sample.csv", rows)
    return d


def _config(data: Path, out: Path, models: dict, sample: Path | None = None, **options) -> PredictConfig:
    return PredictConfig(**{"images": str(data / "images"),
                            "sample_submission": str(sample or data / "sample_submission.csv"),
                            "models": (models["cell"],), "image_models": tuple(filter(None, [models.get("image")])),
                            "out": str(out),
                            "progress": False, "batch_size": 16, "workers": 1, **options})


def _cli(*args, timeout=600) -> subprocess.CompletedProcess:
    """The CLI in its own process group (Beam's worker processes included)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, "-m", "infer_gpu", "predict", *map(str, args), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_in_memory_beam_equals_the_local_engine_with_tta_image_runs_and_the_cell_table(synthetic_small, models,
                                                                                        tmp_path):
    data = Path(synthetic_small)
    opts = dict(tta=2, rule=CombineRule(image_from_cells=True))
    local = engine.predict(_config(data, tmp_path / "local.csv", models, cells=str(tmp_path / "local.parquet"),
                                   workers=2, **opts))
    beam = engine.predict(_config(data, tmp_path / "beam.csv", models, cells=str(tmp_path / "beam.parquet"),
                                  engine="beam", overlays=str(tmp_path / "overlays"), **opts))
    assert sorted(p.stem for p in (tmp_path / "overlays").glob("*.png")) == [f"syn_{i:04d}" for i in range(6)]
    assert beam.complete and local.complete and beam.processed == local.processed == 6
    assert (beam.cells, beam.detections) == (local.cells, local.detections) and beam.cells > 50
    assert beam.device.startswith("Beam DirectRunner")
    _assert_same_rows(tmp_path / "beam.csv", tmp_path / "local.csv")
    _assert_same_cells(tmp_path / "beam.parquet", tmp_path / "local.parquet")
    report = json.loads(Path(str(tmp_path / "beam.csv") + ".report.json").read_text())
    assert report["options"]["engine"] == "beam" and report["processed"] == 6
    assert not Path(str(tmp_path / "beam.csv") + ".parts").exists()  # removed once the CSV is written


def test_a_bag_run_with_tta_gives_the_local_rows_in_memory_and_on_worker_threads(synthetic_small, tmp_path):
    """In memory, and with two worker threads in this process (`--direct_running_mode
    multi_threading`), which score with the runs this process loaded."""
    from tests.test_predict_bags import SIZE, _bag_model, _write_bag_run

    run = _write_bag_run(tmp_path / "bag4", _bag_model(4, 1, "attention"), Preprocess(TileSpec(size=SIZE), bag=4))
    data = Path(synthetic_small)
    threads = {"engine": "beam", "workers": 2, "beam_args": ("--direct_running_mode", "multi_threading")}
    summaries = {}
    for name, extra in (("local", {"workers": 2}), ("beam", {"engine": "beam"}), ("threads", threads)):
        config = _config(data, tmp_path / f"{name}.csv", {"cell": str(run)}, cells=str(tmp_path / f"{name}.parquet"),
                         image_models=(), tta=2, **extra)
        summaries[name] = engine.predict(config)
        assert summaries[name].complete and summaries[name].processed == 6
    assert summaries["threads"].device == f"Beam DirectRunner ({summaries['local'].device})"  # this process's runs
    for name in ("beam", "threads"):
        _assert_same_rows(tmp_path / f"{name}.csv", tmp_path / "local.csv")
        _assert_same_cells(tmp_path / f"{name}.parquet", tmp_path / "local.parquet")


def test_two_worker_processes_give_the_local_rows_and_the_same_failures_and_exit_status(bad_images, models,
                                                                                         tmp_path):
    common = ["--images", bad_images / "images", "--sample-submission", bad_images / "sample.csv",
              "--model", models["cell"], "--image-model", models["image"], "--batch-size", "16"]
    local = _cli(*common, "--out", tmp_path / "local.csv", "--workers", "2",
                 "--cells", tmp_path / "local.csv.cells.csv")
    beam = _cli(*common, "--out", tmp_path / "beam.csv", "--workers", "2", "--cells", tmp_path / "beam.cells.csv",
                "--engine", "beam")
    assert local.returncode == beam.returncode == EXIT_FAILED_IMAGES, beam.stderr[-3000:]
    assert "Beam DirectRunner workers" in beam.stdout
    assert "oneDNN" not in beam.stderr and "cuInit" not in beam.stderr  # the workers are quiet too
    assert "INFO:apache_beam.runners.worker" not in beam.stderr  # their harness logs at WARNING
    _assert_same_rows(tmp_path / "beam.csv", tmp_path / "local.csv")
    reports = [json.loads(Path(f"{tmp_path / name}.report.json").read_text()) for name in ("local.csv", "beam.csv")]
    assert [sorted(e["id"] for e in r["errors"]) for r in reports] == [["syn_0001", "syn_0002", "syn_0004"]] * 2
    assert reports[0]["errors"] == reports[1]["errors"]  # the same messages
    assert Path(str(tmp_path / "beam.csv") + ".parts").is_dir()  # kept, for --resume to retry the failed
    from common import cell_table

    a, b = cell_table.read(str(tmp_path / "beam.cells.csv")), cell_table.read(str(tmp_path / "local.csv.cells.csv"))
    assert a.ids == b.ids and a.masks == b.masks and len(a.ids) > 20
    assert a.meta["failed"] == b.meta["failed"] == ["syn_0001", "syn_0002", "syn_0004"]


def test_a_sigkilled_beam_run_resumes_to_the_same_rows(synthetic_small, models, tmp_path):
    data = _many_images(Path(synthetic_small), tmp_path / "data", copies=5)  # 30 images
    common = ["--images", data / "images", "--sample-submission", data / "sample.csv", "--model", models["cell"],
              "--batch-size", "8", "--workers", "1", "--engine", "beam"]
    full = tmp_path / "full.csv"
    engine.predict(_config(data, full, models, sample=data / "sample.csv", image_models=(), batch_size=8, workers=2))

    killed = tmp_path / "killed.csv"
    parts = Path(str(killed) + ".parts")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, "-m", "infer_gpu", "predict", *map(str, common), "--out", str(killed),
                             "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _finished_parts(parts) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    n_done = _finished_parts(parts)
    assert 3 <= n_done < 30 and not killed.exists()
    resumed = _cli(*common, "--out", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"({n_done} from an earlier run)" in resumed.stdout
    assert f"{30 - n_done} images this run" in resumed.stdout
    _assert_same_rows(killed, full)


def test_gs_images_and_output_on_the_emulator(synthetic_small, models, gcs_bucket, tmp_path):
    data = Path(synthetic_small)
    remote = f"gs://{gcs_bucket}/beam_predict"
    upload_tree(data / "images", f"{remote}/images")
    local = tmp_path / "local.csv"
    engine.predict(_config(data, local, models, image_models=()))
    config = PredictConfig(images=f"{remote}/images", sample_submission=str(data / "sample_submission.csv"),
                           models=(models["cell"],), out=f"{remote}/out/submission.csv", progress=False,
                           batch_size=16, workers=1, engine="beam")
    summary = engine.predict(config)
    assert summary.complete and summary.processed == 6
    got = tmp_path / "from_gcs.csv"
    got.write_text(storage.read_text(config.out))
    _assert_same_rows(got, local)
    assert json.loads(storage.read_text(config.out + ".report.json"))["processed"] == 6


def test_a_bug_fails_the_pipeline_and_keeps_the_parts(synthetic_small, tmp_path):
    """A model that returns the wrong shape is our error, not an image's: RunStopped."""
    def wrong(x, training=False):
        import tensorflow as tf

        return tf.zeros([tf.shape(x)[0], 7])

    config = PredictConfig(images=str(Path(synthetic_small) / "images"),
                           sample_submission=str(Path(synthetic_small) / "sample_submission.csv"),
                           out=str(tmp_path / "s.csv"), progress=False, workers=1, engine="beam")
    with pytest.raises(RunStopped, match="the Beam pipeline failed"):
        engine.predict(config, runs=[stand_in_run(wrong, TILE)])
    assert not (tmp_path / "s.csv").exists()
    assert (tmp_path / "s.csv.parts" / "settings.json").exists()


def test_remote_runners_refuse_local_paths_and_beam_flags_need_the_beam_engine(synthetic_small, models, tmp_path,
                                                                                capsys):
    data = Path(synthetic_small)
    config = _config(data, tmp_path / "s.csv", models, engine="beam",
                     beam_args=("--runner", "DataflowRunner", "--project", "p", "--region", "r"))
    with pytest.raises(ValueError, match="DataflowRunner workers cannot see this machine's files: give --images, "
                                         "--out, --model, --image-model as gs:// paths"):
        beam_engine.predict_beam(config)
    assert not (tmp_path / "s.csv.parts").exists()  # refused before any work
    with pytest.raises(ValueError, match="loaded objects"):
        beam_engine.predict_beam(_config(data, tmp_path / "t.csv", models, engine="beam", workers=2),
                                 runs=[stand_in_run(lambda x, training=False: x, TILE)])
    code = cli_main(["predict", "--images", str(data / "images"), "--sample-submission",
                     str(data / "sample_submission.csv"), "--model", models["cell"], "--out", str(tmp_path / "u.csv"),
                     "--runner", "DirectRunner"])
    assert code == 2 and "unrecognized arguments: --runner DirectRunner" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["segment", "--runner", "DirectRunner"])


def test_predict_help_names_the_beam_engine(capsys):
    with pytest.raises(SystemExit):
        cli_main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--engine {local,beam}" in text and "go to Beam's pipeline options" in text
    assert "docs/predict.md" in text and "DataflowRunner" in text


def test_the_dataflow_worker_image_pins_the_projects_versions():
    """scripts/dataflow/predict-gpu.Dockerfile: Beam's SDK image of the pinned Beam and this
    Python, and TensorFlow's CUDA wheels at the pinned TensorFlow (Beam refuses other versions
    on its workers; another TensorFlow could load model.keras otherwise)."""
    import re

    text = (ROOT / "scripts" / "dataflow" / "predict-gpu.Dockerfile").read_text()
    pins = {}
    for name in ("requirements.txt", "requirements-beam.txt"):
        for line in (ROOT / name).read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
            if m:
                pins[m.group(1).lower()] = m.group(2)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"FROM apache/beam_python{py}_sdk:{pins['apache-beam']}" in text
    assert f'"tensorflow[and-cuda]=={pins["tensorflow"]}"' in text


def test_pipeline_options_keep_a_given_running_mode_and_worker_threads_run_in_this_process():
    from apache_beam.options.pipeline_options import DirectOptions

    from common import beam as beamlib

    default = beamlib.pipeline_options(2, [])
    threads = beamlib.pipeline_options(2, ["--direct_running_mode", "multi_threading"])
    assert (default.view_as(DirectOptions).direct_running_mode, default.view_as(DirectOptions).direct_num_workers) \
        == ("multi_processing", 2)
    assert (threads.view_as(DirectOptions).direct_running_mode, threads.view_as(DirectOptions).direct_num_workers) \
        == ("multi_threading", 2)
    assert beamlib.in_this_process(threads) and not beamlib.in_this_process(default)
    assert beamlib.in_this_process(beamlib.pipeline_options(1, []))
    assert not beamlib.in_this_process(beamlib.pipeline_options(2, ["--runner", "DataflowRunner"]))
