"""`predict` with bag runs (dual-head bag models, `infer_gpu.bags`): an image's cells in chunks
of N, padded by repetition; cell head per cell, image head max over chunks; the combine rule.

The references below are computed by hand: segment as predict does, cut the cell tiles, make
the chunks with a plain loop, call the Keras model on one bag at a time, and combine.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import mil, run_folder, submission
from common.labels import NUM_CLASSES
from common.preprocess import Preprocess, TileSpec
from infer_gpu import bags, combine, reading, runs, scorer
from tests.test_predict_e2e import _segment, _save_run, _tiny_cnn, _write_sample, run_predict

keras = pytest.importorskip("keras")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
RULE = combine.CombineRule(min_score=0.0)  # every class of every cell is written
pytestmark = pytest.mark.timeout(600)


def _bag_model(bag: int, seed: int, pooling: str):
    """An untrained bag model (no dropout) whose heads tell cells apart. An untrained backbone's
    features are tiny (about 1e-6) and nearly alike, so the head weights are scaled to turn the
    features' spread over a few random cells into logits of spread about 2, centred at 0."""
    from train_tpu.model import build_bag_model

    keras.utils.set_random_seed(seed)
    model = build_bag_model("efficientnet_b0", SIZE, bag=bag, dropout=0.0, drop_connect_rate=0.0, pooling=pooling)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (2, bag, SIZE, SIZE, 4)).astype("float32") * rng.uniform(0, 1, (2, bag, 1, 1, 1))
    embed = keras.Model(model.inputs, [model.get_layer(n).output for n in ("bags_of_cells", "pool_cells")])
    feats = [np.asarray(f).reshape(-1, np.shape(f)[-1])
             for f in embed({mil.CELLS: x, mil.MASK: np.ones((2, bag), "float32")})]
    for name, f in zip(("cell_logits", "image_logits"), feats):
        kernel = rng.normal(0, 1, (f.shape[1], NUM_CLASSES)) * 2.0 / (f.std(axis=0).mean() * np.sqrt(f.shape[1]))
        model.get_layer(name).set_weights([kernel.astype("float32"), (-f.mean(axis=0) @ kernel).astype("float32")])
    return model


def _write_bag_run(path: Path, model, spec: Preprocess) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    run_folder.write_model(str(path), model)
    run_folder.write_spec(str(path), spec)
    return path


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def syn(synthetic_small) -> Path:
    return Path(synthetic_small)


@pytest.fixture(scope="module")
def bag4(tmp_path_factory) -> Path:
    """A bag run of 4 cells, attention pooling (the mask matters to it)."""
    return _write_bag_run(tmp_path_factory.mktemp("bag4") / "run", _bag_model(4, 1, "attention"),
                          Preprocess(TileSpec(size=SIZE), bag=4))


@pytest.fixture(scope="module")
def bag3(tmp_path_factory) -> Path:
    """Another bag run: 3 cells, max pooling."""
    return _write_bag_run(tmp_path_factory.mktemp("bag3") / "run", _bag_model(3, 2, "max"),
                          Preprocess(TileSpec(size=SIZE), bag=3))


@pytest.fixture(scope="module")
def cell_run(tmp_path_factory) -> Path:
    return _save_run(_tiny_cnn(seed=3, size=SIZE), tmp_path_factory.mktemp("cell") / "run",
                     Preprocess(TileSpec(size=SIZE)))


@pytest.fixture(scope="module")
def loaded(bag4, bag3, cell_run) -> dict:
    """The runs as predict loads them, once: the references call their models, and predict is
    given them (`runs=`) so that each test does not load and trace them again."""
    return {p: runs.load_run(str(p), expect_mode="cell") for p in (bag4, bag3, cell_run)}


@pytest.fixture(scope="module")
def one_image(syn, tmp_path_factory) -> tuple[Path, str]:
    """A sample submission of one image with more cells than either bag holds."""
    image_id = "syn_0000"
    path = tmp_path_factory.mktemp("sample") / "sample.csv"
    _write_sample(path, [(image_id, 256, 256)])
    return path, image_id


# --- the hand-computed reference -----------------------------------------------------------------
def _cells(syn: Path, image_id: str):
    """What predict sees of one image: its cell tiles (id order), masks, border/nucleus flags."""
    from common.images import load_image
    from common.preprocess import cell_tiles

    image = load_image(str(syn / "images"), image_id)
    seg = _segment(image)
    info = seg.cell_info()
    tiles = cell_tiles(image, seg.cells, TileSpec(size=SIZE), cell_ids=[c.id for c in info],
                       boxes=[c.bbox for c in info])[0]
    flags = (np.array([c.touches_border for c in info]), np.array([c.has_nucleus for c in info]))
    return tiles, reading.encode_masks(seg.cells, info), flags


def _flip(tiles: np.ndarray, t: int) -> np.ndarray:
    return tiles if t == 0 else tiles[:, :, ::-1]  # TTA transform 1: flip left-right (each cell)


_REFERENCES: dict = {}


def _bag_reference(model, tiles: np.ndarray, bag: int, tta: int = 1):
    """(cell Kx19, image (19,)) of one bag model, one bag per call: chunks of `bag` cells in
    order, the last filled by repeating its real cells; image = max over chunks of the TTA mean.
    Kept per (model, tiles, tta): the tests reuse each other's references."""
    key = (id(model), tiles.tobytes(), bag, tta)
    if key not in _REFERENCES:
        _REFERENCES[key] = _compute_bag_reference(model, tiles, bag, tta)
    return _REFERENCES[key]


def _compute_bag_reference(model, tiles: np.ndarray, bag: int, tta: int):
    k = len(tiles)
    cell = np.zeros((tta, k, NUM_CLASSES))
    chunk_images = []
    for start in range(0, k, bag):
        real = list(range(start, min(k, start + bag)))
        places = [real[j % len(real)] for j in range(bag)]
        mask = np.array([[1.0 if j < len(real) else 0.0 for j in range(bag)]], np.float32)
        images = []
        for t in range(tta):
            x = _flip(tiles, t)[places][None].astype(np.float32)
            out = model({mil.CELLS: x, mil.MASK: mask}, training=False)
            cell[t, real] = np.asarray(out[mil.CELL])[0, :len(real)]
            images.append(np.asarray(out[mil.IMAGE])[0])
        chunk_images.append(np.mean(images, axis=0))
    assert len(chunk_images) > 1  # the image has more cells than the bag: chunks are exercised
    return cell.mean(axis=0), np.max(chunk_images, axis=0)


def _cell_reference(model, tiles: np.ndarray, tta: int = 1) -> np.ndarray:
    return np.mean([np.asarray(model(_flip(tiles, t).astype(np.float32), training=False)) for t in range(tta)], axis=0)


def _expected(masks, flags, cells: list, images: list) -> dict:
    """{(mask, label): confidence} of the rule on the given cell and image terms (each a list
    of one term per model, averaged)."""
    c = np.mean(cells, axis=0) if cells else None
    i = np.mean(images, axis=0) if images else None
    s = combine.combine(c, i, *flags, RULE)
    return {(m, label): float(s[k, label]) for k, m in enumerate(masks) for label in range(NUM_CLASSES)}


def _written(out: Path) -> dict:
    rows = submission.read_submission(str(out))
    return {(p.mask, p.label): p.confidence for r in rows for p in r.predictions}


def _assert_same(got: dict, want: dict):
    assert set(got) == set(want)
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst < 2e-5, worst
    assert np.std(list(want.values())) > 0.05  # the scores do differ between cells and classes


def _predict(syn, sample, out, runs_, **options):
    summary = run_predict(syn / "images", sample, out, runs=runs_, rule=RULE, **options)
    assert summary.complete and not summary.errors, summary.errors
    assert submission.validate(str(out), str(sample)) == []
    return _written(out)


# --- tests ---------------------------------------------------------------------------------------
def test_chunk_cells_gathers_the_tiles_of_the_chunks():
    # the chunk order itself (common.bags.chunk_order) is tested in tests/test_bags.py
    tiles = np.arange(5)[:, None, None, None] * np.ones((1, 2, 2, 4), np.uint8)
    chunks, mask = bags.chunk_cells(tiles, 4)
    assert chunks.shape == (2, 4, 2, 2, 4) and chunks[:, :, 0, 0, 0].tolist() == [[0, 1, 2, 3], [4, 4, 4, 4]]


def test_unchunk_takes_real_cells_and_the_max_over_chunks_per_model():
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=(3, 2, 1 + 4, NUM_CLASSES)).astype(np.float32)  # 3 chunks, 2 models, bag 4
    cell, image = bags.unchunk(scores, 10)
    want_cell = scores[:, :, 1:].mean(axis=1).reshape(12, NUM_CLASSES)[:10]
    np.testing.assert_allclose(cell, want_cell, rtol=1e-6)
    np.testing.assert_allclose(image, (scores[:, 0, 0].max(0) + scores[:, 1, 0].max(0)) / 2, rtol=1e-6)
    with pytest.raises(ValueError):
        bags.unchunk(scores, 13)


def test_chunking_and_padding_change_nothing_for_the_cell_head(loaded, bag4):
    """7 cells in bags of 4 (the second padded): each cell's probabilities equal those of the
    cell alone in a bag (in other batches, beside other bags); padding content changes nothing."""
    model = loaded[bag4].model
    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 256, (7, SIZE, SIZE, 4)).astype(np.uint8)
    spec = Preprocess(TileSpec(size=SIZE), bag=4)
    chunks, mask = bags.chunk_cells(tiles, 4)
    group = scorer.model_group(spec, [model], batch_size=16)  # the group predict builds (4 bags a call)
    assert isinstance(group, scorer.BagGroup) and group.batch_size == 4
    whole = group.predict((chunks, mask))
    assert whole.shape == (2, 1, 5, NUM_CLASSES)
    cell, image = bags.unchunk(whole, 7)
    singles = [bags.chunk_cells(tiles[k:k + 1], 4) for k in range(7)]  # each cell alone in a bag
    alone = group.predict((np.concatenate([c for c, _ in singles]), np.concatenate([m for _, m in singles])))
    np.testing.assert_allclose(cell, alone[:, 0, 1], atol=1e-5)
    # other padding (a random cell under mask 0): the same real outputs
    other = chunks.copy()
    other[1, 3] = rng.integers(0, 256, (SIZE, SIZE, 4))
    again = group.predict((other, mask))
    np.testing.assert_allclose(bags.unchunk(again, 7)[0], cell, atol=1e-5)
    np.testing.assert_allclose(again[:, 0, 0], whole[:, 0, 0], atol=1e-5)  # the image heads
    np.testing.assert_allclose(image, np.max(whole[:, 0, 0], axis=0), rtol=1e-6)
    # the test could fail: the cells and the two chunks' image heads differ
    assert np.abs(cell[0] - cell[1]).max() > 1e-3 and np.abs(whole[0, 0, 0] - whole[1, 0, 0]).max() > 1e-3


def test_load_run_recognises_a_bag_run_and_checks_its_size(bag4, cell_run, loaded):
    run = loaded[bag4]  # loaded from its folder by runs.load_run
    assert run.spec.bag == 4 and scorer.role(run.spec) == "bag"
    assert runs.checked_spec(run.model, Preprocess(TileSpec(size=SIZE)), "older").bag == 4  # no `bag`: the model says N
    with pytest.raises(ValueError, match="bag model of 4 cells but preprocess.json gives bag 3"):
        runs.checked_spec(run.model, Preprocess(TileSpec(size=SIZE), bag=3), "run")
    with pytest.raises(ValueError, match="model input"):
        runs.checked_spec(run.model, Preprocess(TileSpec(size=2 * SIZE), bag=4), "run")
    with pytest.raises(ValueError, match="not a bag model"):
        runs.checked_spec(loaded[cell_run].model, Preprocess(TileSpec(size=SIZE), bag=4), "run")


def test_a_bag_run_predicts_the_hand_computed_scores(syn, bag4, loaded, one_image, tmp_path):
    sample, image_id = one_image
    got = _predict(syn, sample, tmp_path / "sub.csv", [loaded[bag4]])
    tiles, masks, flags = _cells(syn, image_id)
    cell, image = _bag_reference(loaded[bag4].model, tiles, 4)
    _assert_same(got, _expected(masks, flags, [cell], [image]))


def test_tta_averages_both_heads_over_the_transforms(syn, bag4, loaded, one_image, tmp_path):
    sample, image_id = one_image
    got = _predict(syn, sample, tmp_path / "sub.csv", [loaded[bag4]], tta=2)
    tiles, masks, flags = _cells(syn, image_id)
    cell, image = _bag_reference(loaded[bag4].model, tiles, 4, tta=2)
    _assert_same(got, _expected(masks, flags, [cell], [image]))
    plain = _bag_reference(loaded[bag4].model, tiles, 4, tta=1)
    assert np.abs(plain[0] - cell).max() > 1e-3  # the flip does change the scores


def test_two_bag_runs_are_averaged_and_mix_with_a_cell_run(syn, bag4, bag3, cell_run, loaded, one_image, tmp_path):
    sample, image_id = one_image
    tiles, masks, flags = _cells(syn, image_id)
    c4, i4 = _bag_reference(loaded[bag4].model, tiles, 4)
    c3, i3 = _bag_reference(loaded[bag3].model, tiles, 3)
    both = _predict(syn, sample, tmp_path / "both.csv", [loaded[bag4], loaded[bag3]])
    _assert_same(both, _expected(masks, flags, [c4, c3], [i4, i3]))
    mixed = _predict(syn, sample, tmp_path / "mixed.csv", [loaded[bag4], loaded[cell_run]])
    _assert_same(mixed, _expected(masks, flags, [c4, _cell_reference(loaded[cell_run].model, tiles)], [i4]))


def test_predict_cli_with_a_bag_run(syn, bag4, tmp_path):
    sample = tmp_path / "sample.csv"
    _write_sample(sample, [("syn_0001", 256, 256)])
    out = tmp_path / "sub.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "infer_gpu", "predict", "--images", str(syn / "images"), "--sample-submission",
         str(sample), "--model", str(bag4), "--out", str(out), "--preset", "smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert submission.validate(str(out), str(sample)) == []
    rows = submission.read_submission(str(out))
    assert [r.image_id for r in rows] == ["syn_0001"] and rows[0].predictions
