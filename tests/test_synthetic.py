"""testkit.synthetic: the embedded default data, checked through the files it writes."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from common import images, masks
from testkit import synthetic
from common.labels import NEGATIVE, NUM_CLASSES, parse_labels

ROOT = Path(__file__).resolve().parents[1]


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _maps(out: Path, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    cells = cv2.imread(str(out / "masks" / f"{image_id}_cells.png"), cv2.IMREAD_UNCHANGED)
    nuclei = cv2.imread(str(out / "masks" / f"{image_id}_nuclei.png"), cv2.IMREAD_UNCHANGED)
    assert cells is not None and nuclei is not None
    return cells, nuclei


def _cell_labels(out: Path) -> dict[str, dict[int, list[int]]]:
    table: dict[str, dict[int, list[int]]] = {}
    for row in _rows(out / "cell_labels.csv"):
        table.setdefault(row["ID"], {})[int(row["cell"])] = parse_labels(row["Label"])
    return table


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_of_the_output(synthetic_small):
    out = synthetic_small
    ids = [r["ID"] for r in _rows(out / "train.csv")]
    assert len(ids) == 6 and len(set(ids)) == 6
    for image_id in ids:
        for ch in images.CHANNELS:
            assert (out / "images" / f"{image_id}_{ch}.png").is_file()
        cells, nuclei = _maps(out, image_id)
        assert cells.dtype == np.uint16 and nuclei.dtype == np.uint16 and cells.shape == (256, 256)
    sample = _rows(out / "sample_submission.csv")
    assert list(sample[0]) == ["ID", "ImageWidth", "ImageHeight", "PredictionString"]
    assert [r["ID"] for r in sample] == ids
    assert all(r["ImageWidth"] == "256" and r["ImageHeight"] == "256" and r["PredictionString"] == "" for r in sample)
    assert [r["ID"] for r in _rows(out / "truth.csv")] == ids


def test_images_load_with_the_loader(synthetic_small):
    for row in _rows(synthetic_small / "train.csv"):
        img = images.load_image(str(synthetic_small / "images"), row["ID"])
        assert img.shape == (256, 256, 4) and img.dtype == np.uint8
        cells, nuclei = _maps(synthetic_small, row["ID"])
        blue = img[..., 2].astype(float)
        # nuclei are bright in blue, background is dark
        assert blue[nuclei > 0].mean() > 3 * blue[cells == 0].mean() + 20
        # red (microtubules) and yellow (ER) fill the cytoplasm, not the background
        cyto = (cells > 0) & (nuclei == 0)
        for k in (0, 3):
            assert img[..., k][cyto].mean() > 2 * img[..., k][cells == 0].mean() + 10


def test_truth_decodes_to_the_label_maps(synthetic_small):
    out = synthetic_small
    cell_labels = _cell_labels(out)
    for row in _rows(out / "truth.csv"):
        h, w = int(row["ImageHeight"]), int(row["ImageWidth"])
        cells, _ = _maps(out, row["ID"])
        tokens = row["PredictionString"].split()
        assert len(tokens) % 3 == 0 and tokens
        seen: dict[int, list[int]] = {}
        for label, conf, mask_str in zip(tokens[0::3], tokens[1::3], tokens[2::3]):
            assert conf == "1"
            mask = masks.decode(mask_str, h, w)
            ids = np.unique(cells[mask])
            assert len(ids) == 1 and ids[0] > 0
            cid = int(ids[0])
            np.testing.assert_array_equal(mask, cells == cid)  # exactly that cell
            assert mask_str == masks.reference_encode(cells == cid)  # the competition's bytes
            seen.setdefault(cid, []).append(int(label))
        assert sorted(seen) == list(range(1, int(cells.max()) + 1))  # every cell, ids 1..K
        assert {k: sorted(v) for k, v in seen.items()} == {k: sorted(v) for k, v in cell_labels[row["ID"]].items()}


def test_image_labels_are_the_union_of_cell_labels(synthetic_small):
    cell_labels = _cell_labels(synthetic_small)
    heterogeneous = 0
    for row in _rows(synthetic_small / "train.csv"):
        image = parse_labels(row["Label"])
        per_cell = list(cell_labels[row["ID"]].values())
        positive = {c for labels in per_cell for c in labels if c != NEGATIVE}
        assert set(image) == (positive or {NEGATIVE})
        assert NEGATIVE not in image or image == [NEGATIVE]
        heterogeneous += len({tuple(sorted(x)) for x in per_cell}) > 1
    assert heterogeneous >= 3  # image labels are weak for single cells


def test_every_class_appears_across_19_images(tmp_path):
    summary = synthetic.generate(str(tmp_path), n=19, size=128, seed=4)
    seen = {c for labels in summary["labels"].values() for c in labels}
    assert seen == set(range(NUM_CLASSES))
    assert summary["ids"] == [r["ID"] for r in _rows(tmp_path / "train.csv")]


def test_one_nucleus_per_cell_inside_it(synthetic_small):
    for row in _rows(synthetic_small / "train.csv"):
        cells, nuclei = _maps(synthetic_small, row["ID"])
        ids = set(np.unique(cells)) - {0}
        assert set(np.unique(nuclei)) - {0} == ids
        inside = nuclei > 0
        np.testing.assert_array_equal(cells[inside], nuclei[inside])  # a nucleus lies in its cell
        for cid in ids:
            n_comp, _ = cv2.connectedComponents((nuclei == cid).astype(np.uint8), connectivity=8)
            c_comp, _ = cv2.connectedComponents((cells == cid).astype(np.uint8), connectivity=8)
            assert n_comp == 2 and c_comp == 2, (row["ID"], cid)  # one piece each (plus background)
            assert (nuclei == cid).sum() < 0.7 * (cells == cid).sum()


def test_cells_touch_vary_in_size_and_meet_the_border(synthetic_small):
    touching = border = 0
    diameters = []
    for row in _rows(synthetic_small / "train.csv"):
        cells, _ = _maps(synthetic_small, row["ID"])
        assert 6 <= cells.max() <= 30
        a, b = cells[:, :-1], cells[:, 1:]
        touching += np.count_nonzero((a > 0) & (b > 0) & (a != b))
        edge = np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]])
        border += len(set(edge) - {0})
        areas = np.bincount(cells.ravel())[1:]
        diameters += list(2 * np.sqrt(areas / np.pi))
    assert touching > 0 and border > 0
    d = np.asarray(diameters)
    # targeted diameters 256/6 .. 256/3 = 43 .. 85 px (border cells are smaller)
    assert 35 < np.median(d) < 90 and d.max() / d.min() > 1.5


def test_negative_cells_have_no_green_signal(synthetic_small):
    cell_labels = _cell_labels(synthetic_small)
    neg, pos = [], []
    for row in _rows(synthetic_small / "train.csv"):
        cells, _ = _maps(synthetic_small, row["ID"])
        green = images.load_channel(str(synthetic_small / "images" / f"{row['ID']}_green.png")).astype(float)
        for cid, labels in cell_labels[row["ID"]].items():
            (neg if labels == [NEGATIVE] else pos).append(green[cells == cid].mean())
    assert neg and pos
    assert np.median(neg) < 0.25 * np.median(pos)


# Which compartment each class's green pattern lives in.
_NUCLEAR = (0, 1, 2, 3, 4, 5)
_CYTOPLASMIC = (6, 7, 8, 12, 14, 15, 16, 17)


def _one_cell(size=256, seed=0):
    render = synthetic.render_image(seed, 0, size, size)
    cells, nuclei = render["cells"], render["nuclei"]
    # the largest cell that does not touch the border
    edge = set(np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]]))
    areas = np.bincount(cells.ravel())
    areas[0] = 0
    for e in edge:
        areas[e] = 0
    cid = int(np.argmax(areas))
    ys, xs = np.nonzero(cells == cid)
    ny, nx = np.nonzero(nuclei == cid)
    c = synthetic._Cell(id=cid, cy=ny.mean(), cx=nx.mean(), r=np.sqrt(len(ys) / np.pi), rn=np.sqrt(len(ny) / np.pi))
    c.y0, c.y1, c.x0, c.x1 = ys.min() - 4, ys.max() + 5, xs.min() - 4, xs.max() + 5
    c.cell = cells[c.y0:c.y1, c.x0:c.x1] == cid
    c.nucleus = nuclei[c.y0:c.y1, c.x0:c.x1] == cid
    rad = max(2, int(round(0.16 * c.rn)))
    c.nucleoli = [(int(c.ly), int(c.lx), rad), (int(c.ly) + 2 * rad, int(c.lx) - 2 * rad, rad)]
    rng = np.random.default_rng(1)
    ctx = synthetic._Ctx(rng, 0.5, synthetic._smooth_noise(rng, size, size, 5), synthetic._smooth_noise(rng, size, size, 2))
    return ctx, c


def test_class_patterns_sit_in_their_compartment_and_differ():
    ctx, c = _one_cell()
    rim = synthetic._rim(c.cell, 2)
    patterns = {}
    for label, fn in synthetic._PATTERNS.items():
        p = fn(ctx, c).astype(np.float64)
        assert p.shape == c.cell.shape and np.isfinite(p).all() and p.min() >= 0
        total = p.sum()
        assert total > 0, label
        assert p[~c.cell].sum() == 0, label  # never outside its cell
        in_nucleus = p[c.nucleus].sum() / total
        if label in _NUCLEAR:
            assert in_nucleus == 1.0, label
        if label in _CYTOPLASMIC:
            assert in_nucleus == 0.0, label
        patterns[label] = p
    assert patterns[13][rim].sum() / patterns[13].sum() > 0.5  # plasma membrane: the cell rim
    nrim = synthetic._rim(c.nucleus, 2)
    assert patterns[1][nrim].sum() / patterns[1].sum() > 0.5  # nuclear membrane: the nucleus rim
    # spot-like classes are sparse, filled ones dense
    filled = {k: np.count_nonzero(patterns[k] > 0.3) for k in patterns}
    assert filled[16] > 3 * filled[17] and filled[0] > 3 * filled[5]
    # all 18 patterns are different pictures: they differ on at least a third of their signal
    labels = sorted(patterns)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            pa, pb = patterns[a] / patterns[a].max(), patterns[b] / patterns[b].max()
            assert np.abs(pa - pb).sum() > 0.33 * np.maximum(pa, pb).sum(), (a, b)


def test_deterministic_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synthetic.generate(str(a), n=2, size=128, seed=7)
    synthetic.generate(str(b), n=2, size=128, seed=7)
    fa, fb = _files(a), _files(b)
    assert len(fa) == 2 * 6 + 4 and fa.keys() == fb.keys()
    for name in fa:
        assert fa[name] == fb[name], name


def test_image_depends_only_on_seed_and_index(tmp_path):
    synthetic.generate(str(tmp_path / "two"), n=2, size=128, seed=7)
    synthetic.generate(str(tmp_path / "three"), n=3, size=128, seed=7)
    synthetic.generate(str(tmp_path / "other"), n=2, size=128, seed=8)
    two, three, other = (_files(tmp_path / d) for d in ("two", "three", "other"))
    for name in two:
        if name.startswith(("images/", "masks/")):
            assert two[name] == three[name], name
            assert two[name] != other[name], name


def test_non_square_and_cli(tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "testkit.synthetic", "--out", str(out), "--n", "2", "--size", "160",
         "--height", "96", "--seed", "3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 images (96x160 px" in proc.stdout
    img = images.load_image(str(out / "images"), "syn_0001")
    assert img.shape == (96, 160, 4)
    row = _rows(out / "truth.csv")[1]
    assert (row["ImageWidth"], row["ImageHeight"]) == ("160", "96")
    cells, _ = _maps(out, "syn_0001")
    tokens = row["PredictionString"].split()
    np.testing.assert_array_equal(masks.decode(tokens[2], 96, 160), cells == 1)
    help_text = subprocess.run([sys.executable, "-m", "testkit.synthetic", "--help"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=60).stdout
    for option in ("--out", "--n", "--size", "--height", "--seed"):
        assert option in help_text


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        synthetic.generate(str(tmp_path), n=0)
    with pytest.raises(ValueError, match="at least 32x32"):
        synthetic.generate(str(tmp_path), n=1, size=16)


def test_generate_to_gcs_writes_the_same_bytes(tmp_path, gcs_bucket):
    from common import storage

    prefix = f"gs://{gcs_bucket}/synthetic"
    synthetic.generate(prefix, n=1, size=64, seed=2)
    synthetic.generate(str(tmp_path), n=1, size=64, seed=2)
    local = _files(tmp_path)
    remote = {p[len(prefix) + 1:]: storage.read_bytes(p) for p in storage.iter_files(prefix)}
    assert remote == local and len(local) == 6 + 4
    img = images.load_image(storage.join(prefix, "images"), "syn_0000")
    np.testing.assert_array_equal(img, images.load_image(str(tmp_path / "images"), "syn_0000"))


# sha256 of train.csv + cell_labels.csv of generate(n=3, size=64, seed=5), made before `share` and
# `negative` were parameters: their defaults must keep every dataset's labels (and the random
# stream behind them) as they were.
_LABELS_SHA256 = "3f21e8f98df703f816ab91d81ba52b63fb7a6e4e339b7628dface48678300381"


def _labels_digest(folder: Path) -> str:
    import hashlib

    return hashlib.sha256((folder / "train.csv").read_bytes() + (folder / "cell_labels.csv").read_bytes()).hexdigest()


def test_share_and_negative_defaults_keep_the_bytes_and_change_the_cells(tmp_path):
    synthetic.generate(str(tmp_path / "default"), n=3, size=64, seed=5)
    assert _labels_digest(tmp_path / "default") == _LABELS_SHA256
    synthetic.generate(str(tmp_path / "explicit"), n=3, size=64, seed=5, share=synthetic.SHARE,
                       negative=synthetic.NEGATIVE_CELLS)
    assert _files(tmp_path / "explicit") == _files(tmp_path / "default")

    def shares(share, negative):
        out = tmp_path / f"s{share}_{negative}"
        synthetic.generate(str(out), n=12, size=96, seed=1, share=share, negative=negative)
        table = _cell_labels(out)
        shown = had = negatives = 0
        for row in _rows(out / "train.csv"):
            image = parse_labels(row["Label"])
            if image == [NEGATIVE]:
                continue
            for labels in table[row["ID"]].values():
                assert set(labels) <= set(image) | {NEGATIVE}  # still a subset of the image's
                assert NEGATIVE not in labels or labels == [NEGATIVE]
                negatives += labels == [NEGATIVE]
                had += len(image)
                shown += sum(c in labels for c in image)
        return shown / had, negatives

    low, high = shares(0.3, 0.2), shares(0.9, 0.2)
    assert low[0] + 0.2 < high[0]  # share x (1 - negative), plus one class for a cell that drew none
    assert shares(0.6, 0.0)[1] == 0 and shares(0.6, 0.6)[1] > 2 * low[1]
    for bad in (dict(share=1.5), dict(negative=-0.1)):
        with pytest.raises(ValueError, match="probability"):
            synthetic.generate(str(tmp_path / "bad"), n=1, size=64, **bad)
