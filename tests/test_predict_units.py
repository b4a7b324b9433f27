"""predict's pieces on small real arrays: the combine rule, TTA transforms, the cross-image
batcher, the ordered bounded prefetch, the resume sidecar and the command line."""
from __future__ import annotations

import argparse
import operator
import threading
import time

import numpy as np
import pytest

from common.labels import NEGATIVE, NUM_CLASSES
from common import pool
from infer_gpu import batching, combine, reading, runs, scorer, writing
from infer_gpu import parts as partlib


# --- combine rule ------------------------------------------------------------------------------
def _flags(k, border=False, nucleus=True):
    return np.full(k, border), np.full(k, nucleus)


def test_combine_is_the_weighted_geometric_mean_of_cell_and_image():
    cell = np.full((2, NUM_CLASSES), 0.64)
    image = np.full(NUM_CLASSES, 0.25)
    s = combine.combine(cell, image, *_flags(2), combine.CombineRule(cell_weight=0.5))
    assert np.allclose(s[:, 0], 0.4)  # sqrt(0.64 * 0.25)
    s = combine.combine(cell, image, *_flags(2), combine.CombineRule(cell_weight=1.0))
    assert np.allclose(s[:, 0], 0.64)  # a = 1: the image does not count
    s = combine.combine(cell, image, *_flags(2), combine.CombineRule(cell_weight=0.25))
    assert np.allclose(s[:, 3], 0.64 ** 0.25 * 0.25 ** 0.75)


def test_combine_with_one_side_only():
    cell = np.random.default_rng(0).uniform(0.3, 0.9, (3, NUM_CLASSES))
    s = combine.combine(cell, None, *_flags(3))
    assert np.allclose(s[:, :NEGATIVE], cell[:, :NEGATIVE], atol=1e-6)
    image = np.linspace(0.05, 0.95, NUM_CLASSES)
    s = combine.combine(None, image, *_flags(4))
    assert s.shape == (4, NUM_CLASSES)
    assert np.allclose(s[:, :NEGATIVE], image[None, :NEGATIVE], atol=1e-6)  # every cell inherits
    with pytest.raises(ValueError, match="cell scores, image scores or both"):
        combine.combine(None, None, *_flags(1))
    with pytest.raises(ValueError, match="2 cell score rows for 3 cells"):
        combine.combine(cell[:2], None, *_flags(3))


def test_image_from_cells_takes_the_images_best_cell_per_class():
    cell = np.full((3, NUM_CLASSES), 0.04)
    cell[:, 2] = [0.9, 0.2, 0.4]  # class 2: one clear cell, so the image shows it
    cell[:, 5] = [0.3, 0.2, 0.1]  # class 5: no cell sure of it
    rule = combine.CombineRule(image_from_cells=True)
    s = combine.combine(cell, None, *_flags(3), rule)
    assert np.allclose(s[:, 2], np.sqrt(cell[:, 2] * 0.9))  # i = m = 0.9
    assert np.allclose(s[:, 5], np.sqrt(cell[:, 5] * 0.3))
    # the order of an image's cells for a class is kept; a weak image's cells sink: the 0.3 cell
    # of class 5 now ranks below the 0.2 cell of class 2, which it was above
    assert s[0, 5] < s[1, 2] and cell[0, 5] > cell[1, 2]
    assert np.allclose(combine.combine(cell, None, *_flags(3)), combine.combine(
        cell, None, *_flags(3), combine.CombineRule(image_from_cells=False)))  # off by default
    image = np.full(NUM_CLASSES, 0.25)  # with an image run: i = sqrt(i_run * m)
    s = combine.combine(cell, image, *_flags(3), rule)
    assert np.allclose(s[:, 2], np.sqrt(cell[:, 2] * np.sqrt(0.25 * 0.9)))
    # only an image run: no cells' scores to take, the rule is unchanged
    assert np.allclose(combine.combine(None, image, *_flags(2), rule),
                       combine.combine(None, image, *_flags(2)))


def test_negative_is_at_least_the_chance_of_no_other_class():
    cell = np.zeros((3, NUM_CLASSES))
    cell[0, NEGATIVE] = 0.1  # nothing else at all: Negative must become 1
    cell[1, :NEGATIVE] = 0.5  # everything half-likely: 0.5**18 is tiny, the model's 0.3 stays
    cell[1, NEGATIVE] = 0.3
    cell[2, 4] = 0.9  # one clear class: at most 0.1 left for Negative
    s = combine.combine(cell, None, *_flags(3))
    assert s[0, NEGATIVE] == pytest.approx(1.0)
    assert s[1, NEGATIVE] == pytest.approx(0.3)
    assert s[2, NEGATIVE] == pytest.approx(0.1)


def test_border_and_nucleusless_cells_are_down_weighted():
    cell = np.full((4, NUM_CLASSES), 0.5)
    border = np.array([False, True, False, True])
    nucleus = np.array([True, True, False, False])
    rule = combine.CombineRule(border_weight=0.8, no_nucleus_weight=0.5)
    s = combine.combine(cell, None, border, nucleus, rule)
    assert np.allclose(s[:, 0], [0.5, 0.4, 0.25, 0.2])
    assert np.allclose(s[:, 7] / s[:, 0], 1.0)  # the same factor for every class of a cell


def test_rule_rejects_values_outside_unit_interval():
    with pytest.raises(ValueError, match="border_weight"):
        combine.CombineRule(border_weight=1.5)


def test_detections_floor_and_order():
    scores = np.zeros((2, NUM_CLASSES), np.float32)
    scores[0, [3, 16, 0]] = [0.2, 0.9, 0.005]
    dets = combine.detections(scores, min_score=0.01)
    assert [c for c, _ in dets[0]] == [16, 3]
    assert dets[1] == []
    assert len(combine.detections(scores, min_score=0.0)[1]) == NUM_CLASSES  # floor 0: every class


# --- TTA ---------------------------------------------------------------------------------------
def test_dihedral_gives_the_eight_distinct_symmetries_in_numpy_and_tf():
    import tensorflow as tf

    x = np.arange(2 * 5 * 5 * 4, dtype=np.uint8).reshape(2, 5, 5, 4)
    outs = [scorer.dihedral(x, k) for k in range(8)]
    assert len({o.tobytes() for o in outs}) == 8
    for o in outs:  # each is a permutation of the pixels of each tile
        assert sorted(o[0].reshape(-1, 4).tolist()) == sorted(x[0].reshape(-1, 4).tolist())
    assert np.array_equal(outs[5], np.rot90(x, 1, axes=(1, 2)))
    assert np.array_equal(outs[6], np.rot90(x, -1, axes=(1, 2)))
    for k in range(8):
        assert np.array_equal(scorer.dihedral(tf.constant(x), k).numpy(), outs[k]), scorer.TTA_NAMES[k]
    with pytest.raises(ValueError):
        scorer.dihedral(x, 8)


# --- batching across images --------------------------------------------------------------------
def _prepared(image_id, k, value, spec=0):
    tiles = np.zeros((k, 4, 4, 4), np.uint8)
    for i in range(k):
        tiles[i] = value + i  # each tile is identifiable by its pixel value
    p = reading.Prepared(image_id=image_id, width=8, height=8, cell_ids=np.arange(1, k + 1))
    if k:
        p.tiles = {spec: tiles}
    return p


class _Recorder:
    """A predictor whose output is each tile's pixel value (every class), recording batches."""

    def __init__(self):
        self.batches = []

    def __call__(self, tiles):
        self.batches.append(tiles[:, 0, 0, 0].tolist())
        return np.repeat(tiles[:, 0, 0, 0].astype(np.float32)[:, None], NUM_CLASSES, axis=1)


def test_batches_span_images_and_scores_return_to_their_cells():
    rec = _Recorder()
    b = batching.CrossImageBatcher({0: rec}, batch_size=4)
    b.add(_prepared("a", 3, 10))
    assert b.step() == []  # 3 tiles: not a full batch yet
    b.add(_prepared("b", 0, 0))  # no cells
    b.add(_prepared("c", 5, 50))
    done = b.step()
    assert rec.batches == [[10, 11, 12, 50], [51, 52, 53, 54]]  # the first batch spans a and c
    assert [j.prepared.image_id for j in done] == ["a", "b", "c"]
    assert done[0].scores[0][:, 0].tolist() == [10, 11, 12]
    assert done[2].scores[0][:, 5].tolist() == [50, 51, 52, 53, 54]
    assert 0 not in done[1].scores


def test_partial_batch_waits_until_forced_and_order_is_kept():
    rec = _Recorder()
    b = batching.CrossImageBatcher({0: rec}, batch_size=8)
    b.add(_prepared("a", 2, 10))
    b.add(_prepared("b", 0, 0))  # finished at once, but must not overtake "a"
    assert b.step() == [] and b.pending == 2
    done = b.step(force=True)
    assert [j.prepared.image_id for j in done] == ["a", "b"]
    assert rec.batches == [[10, 11]]


def test_two_tile_specs_are_batched_separately():
    cell_rec, image_rec = _Recorder(), _Recorder()
    b = batching.CrossImageBatcher({0: cell_rec, 1: image_rec}, batch_size=2)
    for name, value in (("a", 10), ("b", 20)):
        p = _prepared(name, 2, value)
        p.tiles[1] = np.full((1, 4, 4, 4), value + 5, np.uint8)
        b.add(p)
    done = b.step()
    assert cell_rec.batches == [[10, 11], [20, 21]] and image_rec.batches == [[15, 25]]
    assert [j.scores[1][0, 0] for j in done] == [15, 25]


def test_cell_scores_average_groups_by_model_count():
    job = batching.Job(_prepared("a", 2, 0))
    job.scores = {0: np.full((2, NUM_CLASSES), 0.2, np.float32), 1: np.full((2, NUM_CLASSES), 0.8, np.float32),
                  2: np.full((1, NUM_CLASSES), 0.6, np.float32)}
    cell, image = combine.cell_scores(job, roles={0: "cell", 1: "cell", 2: "image"}, weights={0: 3, 1: 1, 2: 1})
    assert np.allclose(cell, 0.35)  # (3 * 0.2 + 0.8) / 4: every model counts once
    assert image.shape == (NUM_CLASSES,) and np.allclose(image, 0.6)


def test_prediction_triples_repeat_each_cell_mask_per_label():
    p = _prepared("a", 2, 0)
    p.masks = ["MASK1", "MASK2"]
    scores = np.zeros((2, NUM_CLASSES), np.float32)
    scores[0, [2, 5]] = [0.3, 0.7]
    scores[1, 9] = 0.5
    assert combine.prediction_triples(p, scores, 0.01) == [
        (5, pytest.approx(0.7), "MASK1"), (2, pytest.approx(0.3), "MASK1"), (9, 0.5, "MASK2")]


def _orientation_sensitive_model(size: int, seed: int = 0):
    """A tiny real Keras model whose output changes under every flip and rotation (a dense
    layer over the flattened feature map sees where things are)."""
    import keras

    keras.utils.set_random_seed(seed)
    L = keras.layers
    inputs = keras.Input((size, size, 4))
    x = L.Rescaling(1 / 255.0)(inputs)
    x = L.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = L.Flatten()(x)
    return keras.Model(inputs, L.Dense(NUM_CLASSES, activation="sigmoid")(x))


def test_tta_8_is_the_mean_of_the_8_transformed_predictions():
    from common.preprocess import Preprocess, TileSpec

    n = 12
    model = _orientation_sensitive_model(n)
    tiles = np.random.default_rng(0).integers(0, 256, (5, n, n, 4), dtype=np.uint8)
    x = tiles.astype(np.float32)
    by_hand = [x, x[:, :, ::-1], x[:, ::-1], np.rot90(x, 2, axes=(1, 2)),  # the 8 symmetries,
               np.transpose(x, (0, 2, 1, 3)), np.rot90(x, 1, axes=(1, 2)),  # written out with numpy
               np.rot90(x, 3, axes=(1, 2)), np.rot90(np.transpose(x, (0, 2, 1, 3)), 2, axes=(1, 2))]
    preds = [np.asarray(model(np.ascontiguousarray(v), training=False)) for v in by_hand]
    assert len({p.tobytes() for p in preds}) == 8  # every transform changes the output
    spec = Preprocess(TileSpec(size=n, mode="cell"))
    got = scorer.ModelGroup(spec, [model], tta=8, batch_size=4).predict(tiles)  # 2 batches, one padded
    np.testing.assert_allclose(got, np.mean(preds, axis=0), rtol=1e-5, atol=1e-6)
    one = scorer.ModelGroup(spec, [model], tta=1, batch_size=4).predict(tiles)
    np.testing.assert_allclose(one, preds[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(one, got, atol=1e-4)


def test_overlay_texts_name_the_top_classes():
    scores = np.zeros((2, NUM_CLASSES), np.float32)
    scores[0, 16], scores[0, 0], scores[1, 3], scores[1, 4] = 0.81, 0.4, 0.3, 0.2
    assert writing.overlay_texts([7, 9], scores) == {7: [(16, pytest.approx(0.81)), (0, pytest.approx(0.4))],
                                               9: [(3, pytest.approx(0.3))]}  # 0.2 < min_score


# --- prefetch ----------------------------------------------------------------------------------
def test_prefetch_keeps_order_and_bounds_work_in_flight():
    started, lock = [], threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        time.sleep(0.01 * ((7 * i) % 3))  # finish out of order
        return i * i

    out = []
    for i, value in enumerate(pool.ordered_map(work, range(20), workers=3, depth=4)):
        with lock:
            assert len(started) <= i + 1 + 4  # never more than `depth` ahead of the consumer
        out.append(value)
    assert out == [i * i for i in range(20)]
    assert list(pool.ordered_map(work, range(5), workers=0)) == [0, 1, 4, 9, 16]


def test_prefetch_with_processes_and_errors_propagate():
    assert list(pool.ordered_map(operator.neg, range(6), workers=2, processes=True)) == [0, -1, -2, -3, -4, -5]

    def bad(i):
        if i == 3:
            raise RuntimeError("boom at 3")
        return i

    with pytest.raises(RuntimeError, match="boom at 3"):
        list(pool.ordered_map(bad, range(6), workers=2))


# --- resume sidecar ----------------------------------------------------------------------------
def test_part_store_round_trip_ignores_torn_writes_and_checks_settings(tmp_path):
    out = str(tmp_path / "sub.csv")
    store = partlib.PartStore(out)
    assert store.start({"tta": 1}, resume=False) == {}
    store.put({"id": "abc", "width": 8, "height": 8, "prediction": "0 0.5 xyz", "error": None})
    store.put({"id": "a/b", "width": 8, "height": 8, "prediction": "", "error": "decode: bad"})
    (tmp_path / "sub.csv.parts" / ".tmp-1234abc.json").write_text('{"id": "half')  # a kill mid-write
    again = partlib.PartStore(out).start({"tta": 1}, resume=True)
    assert set(again) == {"abc", "a/b"} and again["abc"]["prediction"] == "0 0.5 xyz"
    with pytest.raises(partlib.ResumeError, match=r"tta: 1 then, 2 now"):
        partlib.PartStore(out).start({"tta": 2}, resume=True)
    assert partlib.PartStore(out).start({"tta": 2}, resume=False) == {}  # a fresh start clears
    assert partlib.PartStore(out).read_all() == {}
    (tmp_path / "sub.csv.parts" / "zz.json").write_text("not json")
    with pytest.raises(partlib.ResumeError, match="zz.json: unreadable part"):
        partlib.PartStore(out).read_all()
    partlib.PartStore(out).remove()
    assert not (tmp_path / "sub.csv.parts").exists()


def test_part_names_are_safe():
    assert partlib.part_name("5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0") == "5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0.json"
    for bad in ("../x", "a/b", "settings", ".hidden"):
        name = partlib.part_name(bad)
        assert name.startswith("h-") and "/" not in name


# --- command line ------------------------------------------------------------------------------
def _parser():
    from infer_gpu import predict

    p = argparse.ArgumentParser(prog="predict")
    predict.add_arguments(p)
    return p


def test_cli_help_explains_options_and_the_rule():
    text = _parser().format_help()
    for flag in ("--images", "--sample-submission", "--model", "--image-model", "--out", "--backend", "--tta",
                 "--batch-size", "--overlays", "--resume", "--limit", "--border-weight", "--min-score"):
        assert flag in text
    assert "c**a * i**(1-a)" in text and "(default: 0.8)" in text


def test_cli_rejects_bad_values():
    p = _parser()
    base = ["--images", "i", "--sample-submission", "s", "--out", "o", "--model", "m"]
    args = p.parse_args(base + ["--model", "m2", "--tta", "8", "--work-size", "256"])
    assert args.models == ["m", "m2"] and args.tta == 8 and args.work_size == 256
    for bad in (["--tta", "9"], ["--batch-size", "0"], ["--border-weight", "1.2"], ["--backend", "x"]):
        with pytest.raises(SystemExit):
            p.parse_args(base + bad)


def test_paths_are_config_fields_checked_as_the_other_stages_check_theirs(tmp_path):
    import dataclasses

    from infer_gpu import predict
    from infer_gpu.config import PRESETS, PredictConfig

    assert not any(p.has_paths() for p in PRESETS.values())  # presets: no paths
    args = _parser().parse_args(["--images", "i", "--labels", "l.csv", "--out", "o.csv", "--model", "m",
                                 "--model", "m2", "--image-model", "im", "--cells", "c.parquet"])
    cfg = predict.config_from_args(args)
    assert (cfg.images, cfg.sample_submission, cfg.labels, cfg.out, cfg.cells) == ("i", "", "l.csv", "o.csv", "c.parquet")
    assert cfg.models == ("m", "m2") and cfg.image_models == ("im",)
    assert cfg.inputs() == {"images": "i", "sample_submission": None, "labels": "l.csv"}
    ok = dict(images="i", sample_submission="s.csv", out="o.csv", models=("m",))
    assert PredictConfig(**{**ok, "images": tmp_path}).images == str(tmp_path)  # os.PathLike -> str
    assert PredictConfig(**{**ok, "models": [tmp_path]}).models == (str(tmp_path),)
    for bad, match in ((dict(images=""), r"--images"), (dict(out=""), r"--out"),
                       (dict(labels="l.csv"), "exactly one of --sample-submission and --labels"),
                       (dict(sample_submission=""), "exactly one of"),
                       (dict(cells="c.xlsx"), "unsupported extension"), (dict(cells="o.csv"), "is also --out")):
        with pytest.raises(ValueError, match=match):
            PredictConfig(**{**ok, **bad})
    with pytest.raises(ValueError, match="at least one --model or --image-model"):
        dataclasses.replace(PredictConfig(**ok), models=()).require_models()
    PredictConfig(**{**ok, "models": ()}).require_models(loaded=True)  # runs passed already loaded
    with pytest.raises(ValueError, match=r"--images"):
        PredictConfig(out="o.csv")  # any path makes it a run's config: the others are required


# --- run directories and device --------------------------------------------------------------
def test_bad_run_directories_are_named_in_the_error(tmp_path):
    from common.preprocess import TileSpec

    with pytest.raises(FileNotFoundError, match=r"empty[/\\]preprocess.json: missing"):
        runs.load_run(str(tmp_path / "empty"))
    image_run = tmp_path / "image_run"
    image_run.mkdir()
    TileSpec(size=64, mode="image").save(str(image_run / "preprocess.json"))
    with pytest.raises(ValueError, match="pass this run with --image-model"):
        runs.load_run(str(image_run), expect_mode="cell")
    with pytest.raises(FileNotFoundError, match="model.keras: missing"):
        runs.load_run(str(image_run), expect_mode="image")
    (image_run / "preprocess.json").write_text('{"size": 64, "colour": "red"}')
    with pytest.raises(ValueError, match="not a valid tile spec"):
        runs.read_spec(str(image_run))


def test_asking_for_a_missing_gpu_is_an_error_not_a_fallback():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="--device gpu: TensorFlow lists no GPU"):
        scorer.setup_device("gpu")
    assert scorer.setup_device("auto") == "CPU"
