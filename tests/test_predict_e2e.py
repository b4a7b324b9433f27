"""`predict` end to end on synthetic data: real images, real segmentation, real Keras models,
the real mask codec, submission writer, validator and metric.

Two stand-in "models" sit at the model boundary only (callables that TensorFlow runs inside
the same compiled scoring function as a Keras model):
- the oracle returns each segmented cell's TRUE labels (matched to the truth label map by
  IoU), so its mAP measures everything but the classifier: segmentation, tiles, batching,
  mask placement, the combine rule, the writer. Its floor is high;
- the random model returns seeded uniform scores per tile: the baseline a trained model must beat.
A small CNN trained here on cell tiles of another synthetic set is the trained model.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from common import metrics, submission
from testkit import synthetic
from common.labels import NEGATIVE, NUM_CLASSES, multi_hot
from common.preprocess import PREPROCESS_FILE, Preprocess, TileSpec
from infer_gpu import combine, engine, reading, report, runs
from infer_gpu.config import PredictConfig
from tests.notebooks import read_notebook

ROOT = Path(__file__).resolve().parents[1]
TILE = Preprocess(TileSpec(size=32))
pytestmark = pytest.mark.timeout(900)


# --- helpers -------------------------------------------------------------------------------------
def _cell_labels(data: Path) -> dict[tuple[str, int], list[int]]:
    return synthetic.read_cell_labels(str(data))


def _segment(image):
    """Exactly the segmentation call predict makes with default options."""
    from common.segmentation import segment

    return segment(image, backend="default", **reading.segmentation_options(PredictConfig()))


def _key(tile: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(tile, dtype=np.uint8).tobytes())


class TableModel:
    """A stand-in model: tile -> scores from a table keyed by the tile's bytes (else `fallback`)."""

    def __init__(self, table: dict[int, np.ndarray], fallback=None):
        self.table, self.fallback = table, fallback
        self.calls = 0

    def _lookup(self, x):
        self.calls += 1
        tiles = np.asarray(x).astype(np.uint8)  # exact: to_model_input is a plain cast to float
        out = np.zeros((len(tiles), NUM_CLASSES), np.float32)
        for i, tile in enumerate(tiles):
            key = _key(tile)
            if key in self.table:
                out[i] = self.table[key]
            elif self.fallback is not None:
                out[i] = self.fallback(tile)
        return out

    def __call__(self, x, training=False):
        import tensorflow as tf

        y = tf.py_function(lambda t: self._lookup(t.numpy()), [x], tf.float32)
        y.set_shape([None, NUM_CLASSES])
        return y


def _random_scores(tile: np.ndarray) -> np.ndarray:
    return np.random.default_rng(_key(tile)).uniform(0, 1, NUM_CLASSES).astype(np.float32)


def oracle_model(data: Path, spec: Preprocess = TILE) -> TableModel:
    """Each segmented cell's tile -> its true labels (multi-hot), via the best-IoU truth cell."""
    from common.images import load_image
    from common.preprocess import cell_tiles
    from common.segmentation import load_labels

    labels = _cell_labels(data)
    table = {}
    for image_id in sorted({k[0] for k in labels}):
        image = load_image(str(data / "images"), image_id)
        seg = _segment(image)
        truth = load_labels(str(data / "masks" / f"{image_id}_cells.png"))
        tiles, ids, _ = cell_tiles(image, seg.cells, spec.tile)
        for tile, cid in zip(tiles, ids):
            mine = seg.cells == cid
            overlap = np.bincount(truth[mine], minlength=truth.max() + 1)
            overlap[0] = 0
            best = int(np.argmax(overlap))
            iou = overlap[best] / float((mine | (truth == best)).sum())
            table[_key(tile)] = multi_hot(labels[(image_id, best)]) if iou >= 0.5 else np.zeros(NUM_CLASSES, np.float32)
    return TableModel(table)


def stand_in_run(model, spec: Preprocess = TILE, name: str = "stand-in") -> runs.RunDir:
    return runs.RunDir(path=name, spec=spec, model=model, fingerprint=name)


def run_predict(images, sample, out, models=(), runs=None, image_runs=None, cells=None, **options) -> report.Summary:
    opts = PredictConfig(**{"progress": False, "workers": 2, "batch_size": 16, **options})
    return engine.run_predict(str(images), str(sample), list(models), str(out), config=opts,
                              runs=runs, image_runs=image_runs, cells=cells)


def check(out, data: Path, sample=None) -> float:
    """Validate the submission against the sample; return its mAP against the truth."""
    problems = submission.validate(str(out), str(sample or data / "sample_submission.csv"))
    assert problems == [], problems
    return metrics.evaluate_files(str(data / "truth.csv"), str(out)).mAP


def _rows(path) -> dict[str, submission.ImageRow]:
    return {r.image_id: r for r in submission.read_submission(str(path))}


def _save_run(model, run_dir: Path, spec: Preprocess = TILE, config: dict | None = None) -> Path:
    from common import models

    run_dir.mkdir(parents=True, exist_ok=True)
    models.save_model(model, str(run_dir / "model.keras"))
    spec.save(str(run_dir / PREPROCESS_FILE))
    (run_dir / "config.json").write_text(json.dumps(config or {"note": "test run"}))
    return run_dir


def _tiny_cnn(seed: int, size: int = TILE.size):
    import keras

    keras.utils.set_random_seed(seed)
    L = keras.layers
    inputs = keras.Input((size, size, 4), name="image")
    x = L.Rescaling(1 / 255.0)(inputs)
    for filters in (16, 32, 64):
        x = L.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = L.MaxPooling2D()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(NUM_CLASSES, activation="sigmoid", name="probs")(x))


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def syn(synthetic_small) -> Path:
    return Path(synthetic_small)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A small CNN trained for a few seconds on the cell tiles of ANOTHER synthetic set (seed 1),
    with the cells' true labels; saved as a run directory (model.keras, preprocess.json, config.json)."""
    import keras

    from testkit import synthetic
    from common.images import load_image
    from common.preprocess import cell_tiles
    from common.segmentation import load_labels

    base = tmp_path_factory.mktemp("trained")
    data = base / "train_data"
    synthetic.generate(str(data), n=24, size=256, seed=1)
    labels = _cell_labels(data)
    xs, ys = [], []
    for image_id in sorted({k[0] for k in labels}):
        image = load_image(str(data / "images"), image_id)
        cells = load_labels(str(data / "masks" / f"{image_id}_cells.png"))
        tiles, ids, _ = cell_tiles(image, cells, TILE.tile)
        xs.append(tiles)
        ys += [multi_hot(labels[(image_id, int(c))]) for c in ids]
    model = _tiny_cnn(seed=0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy")
    model.fit(np.concatenate(xs).astype(np.float32), np.asarray(ys), batch_size=32, epochs=30, verbose=0)
    return _save_run(model, base / "run", config={"model": "tiny cnn", "epochs": 30, "train": "synthetic seed 1"})


@pytest.fixture(scope="module")
def baseline(syn, tmp_path_factory) -> float:
    """mAP of seeded random scores on the same cells: what any classifier must beat."""
    out = tmp_path_factory.mktemp("random") / "submission.csv"
    run_predict(syn / "images", syn / "sample_submission.csv", out, runs=[stand_in_run(TableModel({}, _random_scores))])
    return check(out, syn)


# --- tests ---------------------------------------------------------------------------------------
def test_true_labels_score_high_random_scores_do_not(syn, baseline, tmp_path):
    out = tmp_path / "submission.csv"
    summary = run_predict(syn / "images", syn / "sample_submission.csv", out, runs=[stand_in_run(oracle_model(syn))])
    assert summary.complete and summary.errors == [] and summary.processed == 6
    assert summary.cells > 60 and summary.batches < summary.cells  # batched, not one call per cell
    oracle = check(out, syn)
    # With true labels, only cells the segmentation misses or cuts (IoU < 0.6) and ranking ties
    # can cost AP. The default segmentation matches most synthetic cells, so the floor is high.
    assert oracle >= 0.9, oracle  # 0.990 seen on seed 0, 0.975 on seed 3
    assert oracle > baseline + 0.2, (oracle, baseline)
    assert not Path(str(out) + ".parts").exists()  # the sidecar goes once the CSV is written
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert report["complete"] and report["processed"] == 6 and report["cells"] == summary.cells


def test_trained_model_beats_random_baseline(syn, trained_run, baseline, tmp_path):
    out = tmp_path / "submission.csv"
    summary = run_predict(syn / "images", syn / "sample_submission.csv", out, models=[str(trained_run)])
    assert summary.complete and not summary.errors
    trained = check(out, syn)
    # The random baseline is well above 0 (the metric ignores classes absent from an image);
    # a model that learned patterns on other images must rank true cells above it.
    assert trained > baseline + 0.08, (trained, baseline)  # seen: 0.717 vs 0.598 (seed 0), 0.837 vs 0.608 (seed 3)


def test_two_models_are_averaged(syn, trained_run, tmp_path):
    other = _save_run(_tiny_cnn(seed=7), tmp_path / "untrained")
    sample, images = syn / "sample_submission.csv", syn / "images"
    conf = {}
    for name, models in (("a", [trained_run]), ("b", [other]), ("ab", [trained_run, other])):
        out = tmp_path / f"{name}.csv"
        assert run_predict(images, sample, out, models=[str(m) for m in models],
                           rule=combine.CombineRule(min_score=0.0)).complete
        # (image, mask, label) -> confidence; min_score 0 writes every class of every cell
        conf[name] = {(r.image_id, p.mask, p.label): p.confidence for r in _rows(out).values() for p in r.predictions}
    assert set(conf["a"]) == set(conf["b"]) == set(conf["ab"])
    linear = [k for k in conf["ab"] if k[2] != NEGATIVE]  # Negative is derived (a max), not linear
    assert len(linear) > 1000
    for key in linear:
        assert conf["ab"][key] == pytest.approx((conf["a"][key] + conf["b"][key]) / 2, abs=2e-6)
    assert max(abs(conf["a"][k] - conf["b"][k]) for k in linear) > 0.05  # the two models do differ


def test_image_model_is_combined_as_documented(syn, tmp_path):
    cell = stand_in_run(TableModel({}, lambda t: np.full(NUM_CLASSES, 0.64, np.float32)))
    image_spec = Preprocess(TileSpec(size=48, mode="image"))
    image = stand_in_run(TableModel({}, lambda t: np.full(NUM_CLASSES, 0.25, np.float32)), spec=image_spec)
    out = tmp_path / "submission.csv"
    summary = run_predict(syn / "images", syn / "sample_submission.csv", out, runs=[cell], image_runs=[image],
                          rule=combine.CombineRule(cell_weight=0.5, border_weight=0.8, no_nucleus_weight=0.5),
                          processes=True)  # readers as spawned processes: everything they return pickles
    assert summary.complete and summary.cells > 60
    seen = set()
    for row in _rows(out).values():
        for p in row.predictions:
            if p.label != NEGATIVE:
                seen.add(round(p.confidence, 4))
    # sqrt(0.64 * 0.25) = 0.4, times 0.8 on border cells, 0.5 without nucleus
    assert 0.4 in seen and 0.32 in seen
    assert seen <= {0.4, 0.32, 0.2, 0.16}


def _copy_images(src: Path, dst: Path, ids, rename=None):
    dst.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        for f in src.glob(f"{image_id}_*.png"):
            new = (rename or {}).get(image_id, image_id)
            shutil.copy(f, dst / f.name.replace(image_id, new, 1))


def _write_sample(path: Path, rows):
    submission.write_submission(str(path), [(i, w, h, "") for i, w, h in rows])


def test_corrupt_dark_missing_and_wrong_size_images_keep_every_id(syn, tmp_path):
    ids = [f"syn_{i:04d}" for i in range(6)]
    images = tmp_path / "images"
    _copy_images(syn / "images", images, ids)
    (images / "syn_0001_green.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a real png")  # corrupt
    os.remove(images / "syn_0002_yellow.png")  # a missing channel
    import cv2

    for ch in ("red", "green", "blue", "yellow"):  # an all-dark image: no cells, no error
        cv2.imwrite(str(images / f"syn_0003_{ch}.png"), np.zeros((256, 256), np.uint8))
    sample = tmp_path / "sample.csv"
    rows = [(i, 256, 256) for i in ids]
    rows[4] = ("syn_0004", 300, 256)  # the sample says another size than the files have
    _write_sample(sample, rows)
    out = tmp_path / "submission.csv"
    summary = run_predict(images, sample, out, runs=[stand_in_run(TableModel({}, _random_scores))])
    assert summary.complete
    errors = {e["id"]: e["error"] for e in summary.errors}
    assert set(errors) == {"syn_0001", "syn_0002", "syn_0004"}
    assert errors["syn_0001"].startswith("decode:") and "syn_0001_green.png" in errors["syn_0001"]
    assert "yellow" in errors["syn_0002"]
    assert "300x256" in errors["syn_0004"]
    assert submission.validate(str(out), str(sample)) == []
    got = _rows(out)
    assert list(got) == ids  # every ID, in sample order
    for image_id in ("syn_0001", "syn_0002", "syn_0003", "syn_0004"):
        assert got[image_id].predictions == []
    assert got["syn_0000"].predictions and got["syn_0005"].predictions
    assert (got["syn_0004"].width, got["syn_0004"].height) == (300, 256)
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert {e["id"] for e in report["errors"]} == set(errors)


def test_non_finite_model_outputs_are_reported_and_scored_zero(syn, tmp_path):
    def sometimes_nan(tile):
        scores = _random_scores(tile)
        if _key(tile) % 4 == 0:
            scores[[0, 5]] = np.nan
        return scores

    out = tmp_path / "submission.csv"
    summary = run_predict(syn / "images", syn / "sample_submission.csv", out,
                          runs=[stand_in_run(TableModel({}, sometimes_nan))])
    assert summary.complete
    assert summary.errors and all("non-finite model outputs, scored 0" in e["error"] for e in summary.errors)
    check(out, syn)  # still a valid file with every image's cells

    def sometimes_zero(tile):  # the same scores, with 0 where the other model gave NaN
        return np.nan_to_num(sometimes_nan(tile), nan=0.0)

    zeros = tmp_path / "zeros.csv"
    assert run_predict(syn / "images", syn / "sample_submission.csv", zeros,
                       runs=[stand_in_run(TableModel({}, sometimes_zero))]).errors == []
    assert _rows(out) == _rows(zeros)  # "scored 0" exactly


def _many_images(syn: Path, dst: Path, copies: int) -> Path:
    """`copies` x the 6 synthetic images under new IDs, with a sample submission listing them."""
    rows = []
    for c in range(copies):
        ids = [f"syn_{i:04d}" for i in range(6)]
        rename = {i: f"c{c:02d}_{i}" for i in ids}
        _copy_images(syn / "images", dst / "images", ids, rename)
        rows += [(rename[i], 256, 256) for i in ids]
    _write_sample(dst / "sample.csv", rows)
    return dst


def _finished_parts(folder: Path) -> int:
    """Parts on disk, not counting settings.json and `.tmp-*` files a write has not finished."""
    if not folder.is_dir():
        return 0
    return len([p for p in folder.glob("*.json") if p.name != "settings.json" and not p.name.startswith(".")])


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "infer_gpu", "predict", *map(str, args)]


def _cli_here(*args) -> subprocess.CompletedProcess:
    """`python -m infer_gpu predict ARGS` run in this process (its `main`, console captured):
    the same parsing and code without a fresh interpreter importing TensorFlow."""
    from infer_gpu.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["predict", *map(str, args)])
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def test_resume_after_kill_and_after_limit_gives_the_same_file(syn, trained_run, tmp_path):
    data = _many_images(syn, tmp_path / "data", copies=5)  # 30 images: the kill lands mid-run
    common = ["--images", data / "images", "--sample-submission", data / "sample.csv", "--model", trained_run,
              "--batch-size", "8", "--workers", "2", "--no-progress"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

    full = tmp_path / "full.csv"
    done = subprocess.run(_cli(*common, "--out", full, "--cells", tmp_path / "full.parquet"), cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote" in done.stdout

    # 1) a real kill (SIGKILL) once some images are done
    killed = tmp_path / "killed.csv"
    parts = Path(str(killed) + ".parts")
    killed_cells = ["--cells", tmp_path / "killed.parquet"]
    proc = subprocess.Popen(_cli(*common, "--out", killed, *killed_cells), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if _finished_parts(parts) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not killed.exists()
    n_done = _finished_parts(parts)
    assert 3 <= n_done < 30
    resumed = subprocess.run(_cli(*common, "--out", killed, "--resume", *killed_cells), cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"({n_done} from an earlier run)" in resumed.stdout
    # Same rows; a resumed run batches tiles differently, which can move a TF model's output
    # by a float ulp (and a printed confidence's last digit), so confidences get a tolerance.
    _assert_same_rows(killed, full)
    _assert_same_cells(tmp_path / "killed.parquet", tmp_path / "full.parquet")  # the cell table, likewise

    # 2) --limit stops early without the CSV; --resume with other options is refused
    sliced = tmp_path / "sliced.csv"
    cells = ["--cells", tmp_path / "sliced_cells.csv"]
    # (in this process: the kill and the resume after it above are the CLI in processes of its own)
    first = _cli_here(*common, "--out", sliced, "--limit", "7", *cells)
    assert first.returncode == 0 and "--resume" in first.stdout and not sliced.exists()
    refused = _cli_here(*common, "--out", sliced, "--resume", "--tta", "2", *cells)
    assert refused.returncode == 2 and "tta: 1 then, 2 now" in refused.stderr
    rest = _cli_here(*common, "--out", sliced, "--resume", "--batch-size", "5", *cells)  # batch size: same results
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "(7 from an earlier run)" in rest.stdout
    _assert_same_rows(sliced, full)
    _assert_same_cells(tmp_path / "sliced_cells.csv", tmp_path / "full.parquet")


def _merge(sources: dict[str, Path], dst: Path) -> Path:
    """One synthetic dataset from several one-image ones: `{new_id: source_dir}` (each holds syn_0000)."""
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    truth, sample, cells = [], [], ["ID,cell,Label"]
    for new_id, src in sources.items():
        _copy_images(src / "images", dst / "images", ["syn_0000"], {"syn_0000": new_id})
        for kind in ("cells", "nuclei"):
            shutil.copy(src / "masks" / f"syn_0000_{kind}.png", dst / "masks" / f"{new_id}_{kind}.png")
        row = submission.read_submission(str(src / "truth.csv"))[0]
        truth.append((new_id, row.width, row.height, row.predictions))
        sample.append((new_id, row.width, row.height, ""))
        with open(src / "cell_labels.csv") as fh:
            cells += [f"{new_id},{r['cell']},{r['Label']}" for r in csv.DictReader(fh)]
    submission.write_submission(str(dst / "truth.csv"), truth)
    submission.write_submission(str(dst / "sample_submission.csv"), sample)
    (dst / "cell_labels.csv").write_text("\n".join(cells) + "\n")
    return dst


def test_competition_sizes_and_a_non_square_image_in_one_run(tmp_path):
    from testkit import synthetic

    sizes = {"s1728": (1728, 1728), "s2048": (2048, 2048), "s3072": (3072, 3072), "wide": (2048, 1536)}
    sources = {}
    for name, (w, h) in sizes.items():
        synthetic.generate(str(tmp_path / name), n=1, size=w, height=h, seed=5)
        sources[name] = tmp_path / name
    data = _merge(sources, tmp_path / "all")
    out = tmp_path / "submission.csv"
    summary = run_predict(data / "images", data / "sample_submission.csv", out,
                          runs=[stand_in_run(oracle_model(data))], batch_size=32)
    assert summary.complete and summary.errors == []
    assert summary.batches < len(sizes) * 2  # cells of different images share batches
    rows = _rows(out)
    assert {k: (r.width, r.height) for k, r in rows.items()} == sizes
    # Masks in the right place at every size (a transposed or shifted mask fails IoU 0.6):
    assert check(out, data) >= 0.9


def test_kaggle_notebook_cells_compile_and_its_predict_command_runs(syn, trained_run, tmp_path, monkeypatch,
                                                                   capfd):
    """The notebook's own settings, predict, validate and display cells, run here with local
    paths swapped in (the install cell is skipped: nothing can be installed offline here).
    One image is corrupt: predict exits 3, and the notebook says so and keeps the file."""
    import ast

    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(ROOT)
    code, markdown = read_notebook(ROOT / "notebooks" / "kaggle_inference.ipynb")
    assert "pip wheel . -r requirements.txt -w wheels/" in markdown and "www.proteinatlas.org" in markdown
    install = next(s for s in code if "--no-index" in s)
    assert "--find-links" in install and "hpa-scc" in install

    def sh(*cmd):
        subprocess.run([str(c) for c in cmd], check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})

    images = tmp_path / "images"
    _copy_images(syn / "images", images, [f"syn_{i:04d}" for i in range(6)])
    _corrupt(images / "syn_0005_green.png")
    env = {"sh": sh, "sys": sys, "os": os, "subprocess": subprocess}
    exec(next(s for s in code if s.lstrip().startswith("# --- where things are")), env)
    env.update(TEST_IMAGES=str(images), SAMPLE_SUBMISSION=str(syn / "sample_submission.csv"),
               OUT=str(tmp_path / "submission.csv"), MODELS=[str(trained_run)], OVERLAYS=str(tmp_path / "ov"),
               BATCH_SIZE=16, WORKERS=2)
    for marker in ('"infer_gpu", "predict"', '"infer_gpu", "validate"', "SHOW_OVERLAYS:"):
        exec(next(s for s in code if marker in s), env)
    printed = capfd.readouterr().out
    assert "some images failed" in printed and "is complete and kept" in printed
    assert _rows(tmp_path / "submission.csv")["syn_0005"].predictions == []
    # the notebook's predict is the library's predict with the notebook's settings
    direct = tmp_path / "direct.csv"
    run_predict(images, syn / "sample_submission.csv", direct, models=[str(trained_run)],
                tta=env["TTA"], batch_size=16, workers=2)
    got = {(r.image_id, p.mask, p.label): p.confidence for r in _rows(tmp_path / "submission.csv").values()
           for p in r.predictions}
    want = {(r.image_id, p.mask, p.label): p.confidence for r in _rows(direct).values() for p in r.predictions}
    assert got.keys() == want.keys() and len(got) > 100
    assert max(abs(got[k] - want[k]) for k in got) <= 1e-5
    assert check(tmp_path / "submission.csv", syn) == pytest.approx(check(direct, syn), abs=1e-3)
    pngs = sorted(p.name for p in (tmp_path / "ov").glob("*.png"))
    assert pngs == [f"syn_{i:04d}.png" for i in range(5)]


def test_real_hpa_image_and_an_incomplete_one(shared_data, trained_run, tmp_path):
    """Real HPA files (Human Protein Atlas, www.proteinatlas.org, CC BY-SA 3.0): 57_F11_1 is a
    complete 1728 px image with about a dozen A-431 cells; 383_D2_1 has only blue and green."""
    sample = tmp_path / "sample.csv"
    _write_sample(sample, [("57_F11_1", 1728, 1728), ("383_D2_1", 2048, 2048)])
    out = tmp_path / "submission.csv"
    summary = run_predict(shared_data / "hpa_images", sample, out, models=[str(trained_run)],
                          overlays=str(tmp_path / "ov"))
    assert summary.complete
    assert [e["id"] for e in summary.errors] == ["383_D2_1"] and "red" in summary.errors[0]["error"]
    assert submission.validate(str(out), str(sample)) == []
    rows = _rows(out)
    assert rows["383_D2_1"].predictions == []
    cells = {p.mask for p in rows["57_F11_1"].predictions}
    assert 8 <= len(cells) <= 18, len(cells)  # about a dozen cells, some cut by the border
    assert (tmp_path / "ov" / "57_F11_1.png").is_file() and not (tmp_path / "ov" / "383_D2_1.png").exists()


# --- failures that must not stick --------------------------------------------------------------
def _corrupt(path: Path) -> bytes:
    """Truncate a PNG (as a failed copy would); returns the original bytes to restore it."""
    data = path.read_bytes()
    path.write_bytes(data[:200])
    return data


def _assert_same_rows(a: Path, b: Path, tol: float = 1e-5) -> None:
    """Same IDs, sizes, masks and labels in the same order; confidences equal within `tol`
    (a TensorFlow model's outputs can move by one float ulp with the batch they are in)."""
    ra, rb = submission.read_submission(str(a)), submission.read_submission(str(b))
    assert [(r.image_id, r.width, r.height) for r in ra] == [(r.image_id, r.width, r.height) for r in rb]
    for x, y in zip(ra, rb):
        assert [(p.label, p.mask) for p in x.predictions] == [(p.label, p.mask) for p in y.predictions], x.image_id
        assert np.allclose([p.confidence for p in x.predictions], [p.confidence for p in y.predictions],
                           atol=tol, rtol=0), x.image_id


def _assert_same_cells(a: Path, b: Path, tol: float = 1e-5) -> None:
    """Two cell tables (`common.cell_table`) with the same rows; scores equal within `tol`."""
    from common import cell_table

    ta, tb = cell_table.read(str(a)), cell_table.read(str(b))
    assert len(ta) > 100 and ta.ids == tb.ids and ta.masks == tb.masks
    assert np.array_equal(ta.box, tb.box) and np.array_equal(ta.cell, tb.cell)
    for kind in cell_table.SCORE_KINDS:
        assert np.allclose(ta.scores[kind], tb.scores[kind], atol=tol, rtol=0, equal_nan=True), kind
    assert ta.meta["models"] == tb.meta["models"] and ta.meta["failed"] == tb.meta["failed"] == []


def test_a_failed_image_is_tried_again_by_resume_cli(syn, trained_run, tmp_path):
    """The issue's reproduction, through the CLI: `--limit 4` with a corrupt channel file,
    then `--resume` (still corrupt: exit 3, every ID written), then the file is restored and
    `--resume` again gives exactly the uninterrupted run's CSV."""
    ids = [f"syn_{i:04d}" for i in range(6)]
    images = tmp_path / "images"
    _copy_images(syn / "images", images, ids)
    sample = syn / "sample_submission.csv"
    ref = tmp_path / "ref.csv"
    assert run_predict(images, sample, ref, models=[str(trained_run)], batch_size=8).failed == 0

    good = _corrupt(images / "syn_0001_green.png")
    out = tmp_path / "submission.csv"
    parts = Path(str(out) + ".parts")
    common = ["--images", images, "--sample-submission", sample, "--model", trained_run, "--out", out,
              "--batch-size", "8", "--workers", "2", "--no-progress"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    first = subprocess.run(_cli(*common, "--limit", "4"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not out.exists() and json.loads((parts / "syn_0001.json").read_text())["failed"] is True
    assert json.loads((parts / "syn_0000.json").read_text())["failed"] is False

    # the resumes in this process (the CLI's main): the first call above was the CLI's own process
    second = _cli_here(*common, "--resume")
    assert second.returncode == report.EXIT_FAILED_IMAGES, second.stderr[-3000:]
    assert "1 of 6 images failed" in second.stderr and "--resume" in second.stderr
    assert "(3 from an earlier run; 1 tried again after failing)" in second.stdout
    rows = _rows(out)
    assert list(rows) == ids and rows["syn_0001"].predictions == []  # every ID, even so
    assert parts.is_dir()  # kept: the failed image can still be tried again

    (images / "syn_0001_green.png").write_bytes(good)
    third = _cli_here(*common, "--resume")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "(5 from an earlier run; 1 tried again after failing)" in third.stdout
    _assert_same_rows(out, ref)  # the retried image is scored in a batch of its own: float noise
    assert not parts.exists()


def test_transient_read_errors_are_retried_then_count_as_failures(syn, tmp_path, monkeypatch):
    """EIO on reads: a single one is retried away; one that persists makes the image fail
    (not the run), and --resume tries it again once the device is back."""
    import errno

    from common import retry, storage

    monkeypatch.setenv(retry.BACKOFF_ENV, "0")
    monkeypatch.setenv(retry.TRIES_ENV, "3")
    real_read = storage.read_bytes
    state = {"flaky": set(), "broken": set(), "calls": 0}

    def read_bytes(path):
        name = Path(path).name
        if name in state["broken"] or (name in state["flaky"] and not state["flaky"].remove(name)):
            state["calls"] += 1
            raise OSError(errno.EIO, "Input/output error", path)
        return real_read(path)

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    model = stand_in_run(TableModel({}, _random_scores))
    sample = syn / "sample_submission.csv"
    ref = tmp_path / "ref.csv"
    assert run_predict(syn / "images", sample, ref, runs=[model]).errors == []

    state["flaky"] = {"syn_0002_red.png", "syn_0004_blue.png"}  # fail once each
    once = tmp_path / "once.csv"
    summary = run_predict(syn / "images", sample, once, runs=[model])
    assert state["calls"] == 2 and not state["flaky"]
    assert summary.errors == [] and once.read_bytes() == ref.read_bytes()

    state["broken"], state["calls"] = {"syn_0003_yellow.png"}, 0  # every try fails
    out = tmp_path / "out.csv"
    summary = run_predict(syn / "images", sample, out, runs=[model])
    assert state["calls"] == 3  # HPA_IO_TRIES
    assert summary.complete and summary.failed == 1
    assert summary.errors[0]["id"] == "syn_0003" and "Input/output error" in summary.errors[0]["error"]
    assert _rows(out)["syn_0003"].predictions == []
    state["broken"] = set()  # the device is back
    summary = run_predict(syn / "images", sample, out, runs=[model], resume=True)
    assert (summary.resumed, summary.retried, summary.processed, summary.failed) == (5, 1, 1, 0)
    assert out.read_bytes() == ref.read_bytes()


def test_errors_that_are_not_the_images_stop_the_run(syn, tmp_path):
    """A bug in the reader, or a model that does not fit the tiles, stops the run with the
    original error; it never becomes a row of empty predictions per image."""
    sample = syn / "sample_submission.csv"
    model = stand_in_run(TableModel({}, _random_scores))
    out = tmp_path / "a.csv"
    with pytest.raises(report.RunStopped, match="syn_0000.*segment") as info:
        run_predict(syn / "images", sample, out, runs=[model], seg_options=(("no_such_option", 1),))
    assert isinstance(info.value.__cause__, TypeError)  # the original error, traceback kept
    assert not out.exists() and _finished_parts(Path(str(out) + ".parts")) == 0

    def five_classes(x, training=False):
        import tensorflow as tf

        return tf.zeros([tf.shape(x)[0], 5])

    out = tmp_path / "b.csv"
    with pytest.raises(report.RunStopped, match="while scoring"):
        run_predict(syn / "images", sample, out, runs=[stand_in_run(five_classes)])
    assert not out.exists() and _finished_parts(Path(str(out) + ".parts")) == 0


def test_a_finished_cli_run_keeps_its_options_models_and_segmentation_in_the_report(syn, trained_run, tmp_path):
    """OUT.report.json traces the submission: the options as run (preset + flags), the paths,
    each model's weights fingerprint and spec, and the segmentation settings; OUT.parts/
    (with its settings.json) is gone."""
    from common import run_folder
    from infer_gpu.config import PRESETS

    out = tmp_path / "submission.csv"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(_cli("--images", syn / "images", "--sample-submission", syn / "sample_submission.csv",
                               "--model", trained_run, "--out", out, "--preset", "smoke", "--tta", "2",
                               "--border-weight", "0.7", "--work-size", "320", "--workers", "2"),
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.exists() and not Path(str(out) + ".parts").exists()
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert report["complete"] and report["processed"] == 6 and report["failed"] == 0
    options = report["options"]
    smoke = PRESETS["smoke"]
    assert (options["tta"], options["work_size"], options["workers"]) == (2, 320, 2)  # the flags
    assert options["rule"]["border_weight"] == 0.7 and options["rule"]["cell_weight"] == smoke.rule.cell_weight
    assert (options["batch_size"], options["device"]) == (smoke.batch_size, smoke.device)  # the preset
    assert report["inputs"] == {"images": str(syn / "images"), "sample_submission": str(syn / "sample_submission.csv")}
    [model] = report["models"]
    crc = zlib.crc32(Path(run_folder.model_path(str(trained_run))).read_bytes()) & 0xFFFFFFFF
    assert model["path"] == str(trained_run) and model["weights"] == f"crc32:{crc:08x}"
    assert Preprocess.from_json(model["spec"]) == TILE
    assert report["image_models"] == []
    # the run records no segmentation (an older run folder): the flags decide, nothing is refused
    assert report["segmentation"] == {"backend": "default", "work_size": 320, "model_files": [], "options": [],
                                      "nuclei_model": None, "cell_model": None}


# --- the training data's segmentation (Preprocess.segmentation in preprocess.json) --------------
def _with_segmentation(run: Path, dst: Path, seg) -> Path:
    """A copy of the run folder `run` whose preprocess.json records the segmentation `seg`."""
    from common import run_folder

    shutil.copytree(run, dst)
    run_folder.write_spec(str(dst), run_folder.read_spec(str(dst)).replace(segmentation=seg))
    return dst


def test_predict_segments_as_the_runs_training_data_and_refuses_otherwise(syn, trained_run, tmp_path, capsys):
    """Without --work-size the run's recorded work size is used; another one is refused (exit 2)
    naming the field, both values and the run, unless --allow-other-segmentation; the report
    records the segmentation used."""
    from common.segmentation import SegmentationSpec

    run256 = _with_segmentation(trained_run, tmp_path / "run256", SegmentationSpec(work_size=256))
    sample, images = syn / "sample_submission.csv", syn / "images"
    out = tmp_path / "same.csv"
    assert run_predict(images, sample, out, models=[str(run256)]).complete
    used = report.read_report(str(out))["segmentation"]
    assert (used["backend"], used["work_size"]) == ("default", 256)  # the run's, not the default 512

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    refused = subprocess.run(_cli("--images", images, "--sample-submission", sample, "--model", run256,
                                  "--out", tmp_path / "other.csv", "--preset", "smoke", "--work-size", "320"),
                             cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "work_size: 256" in refused.stderr and "vs 320" in refused.stderr and str(run256) in refused.stderr
    assert "--allow-other-segmentation" in refused.stderr and not (tmp_path / "other.csv").exists()

    out = tmp_path / "allowed.csv"
    assert run_predict(images, sample, out, models=[str(run256)], work_size=320,
                       allow_other_segmentation=True).complete
    assert "work_size: 256" in capsys.readouterr().err  # said, not refused
    used = report.read_report(str(out))["segmentation"]
    assert (used["backend"], used["work_size"]) == ("default", 320)


def test_runs_that_disagree_are_refused_and_masks_runs_only_warn(syn, trained_run, tmp_path, capsys):
    from common.segmentation import MASKS, SegmentationSpec

    a = _with_segmentation(trained_run, tmp_path / "a", SegmentationSpec(work_size=256))
    b = _with_segmentation(trained_run, tmp_path / "b", SegmentationSpec(work_size=384))
    sample, images = syn / "sample_submission.csv", syn / "images"
    with pytest.raises(ValueError, match="different segmentations") as err:
        run_predict(images, sample, tmp_path / "ab.csv", models=[str(a), str(b)])
    assert str(a) in str(err.value) and str(b) in str(err.value) and "384" in str(err.value)

    # HPA's own masks cannot be made at inference: one warning, then the default segmentation
    masks = _with_segmentation(trained_run, tmp_path / "masks", SegmentationSpec(backend=MASKS, work_size=None))
    out = tmp_path / "masks.csv"
    assert run_predict(images, sample, out, models=[str(masks)]).complete
    warned = capsys.readouterr().err
    assert warned.count("precomputed label maps") == 1 and str(masks) in warned
    used = report.read_report(str(out))["segmentation"]
    assert (used["backend"], used["work_size"]) == ("default", 512)
