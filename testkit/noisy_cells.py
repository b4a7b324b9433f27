"""Per-cell tables (`common.cell_table`) of a synthetic data set whose cell scores are its true
cell labels plus noise: a model-free stand-in for `predict --cells`, to check and tune
`infer_gpu pseudo-label` without training (tests, scripts/pseudo_label_quality.py).

The cells are the data set's own label maps (`DIR/masks/{ID}_cells.png`, ids as in
`DIR/cell_labels.csv`), so the table's segmentation is `masks` (precomputed label maps).
"""
from __future__ import annotations

import numpy as np

from common import cell_table, masks, storage
from common.labels import NUM_CLASSES, multi_hot, read_labels_csv


def truth_table(data_dir: str, noise: float = 0.0, spread: float = 0.0, seed: int = 0) -> cell_table.CellTable:
    """The cells of every image of `DIR/train.csv`, with cell scores
    `c = clip(a * y + N(0, noise), 0, 1)`: y the cell's true multi-hot labels, a ~ U(1 - spread, 1)
    one factor per image and class (a model more or less sure of a class on an image). `s` = c,
    `i` null. noise = spread = 0: c is exactly the truth."""
    from common.segmentation import cell_info, load_labels, spec_for
    from testkit.synthetic import read_cell_labels

    rng = np.random.default_rng(seed)
    truth = read_cell_labels(data_dir)
    chunks = []
    for image_id, _ in read_labels_csv(storage.join(data_dir, "train.csv")):
        cells = load_labels(storage.join(data_dir, "masks", f"{image_id}_cells.png")).astype(np.int32)
        nuclei = load_labels(storage.join(data_dir, "masks", f"{image_id}_nuclei.png")).astype(np.int32)
        info = cell_info(cells, nuclei)
        h, w = cells.shape
        k = len(info)
        if not k:
            continue
        y = np.stack([multi_hot(truth[(image_id, c.id)]) for c in info]).astype(np.float64)
        factor = rng.uniform(1.0 - spread, 1.0, size=(1, NUM_CLASSES))
        c = np.clip(factor * y + rng.normal(0.0, noise, size=y.shape), 0.0, 1.0).astype(np.float32)
        crops = [cells[c_.bbox[0]:c_.bbox[2], c_.bbox[1]:c_.bbox[3]] == c_.id for c_ in info]
        chunks.append(cell_table.CellTable(
            ids=[image_id] * k, width=np.full(k, w, np.int32), height=np.full(k, h, np.int32),
            cell=np.array([c_.id for c_ in info], np.int32), box=np.array([c_.bbox for c_ in info], np.int32),
            area=np.array([c_.area for c_ in info], np.int32),
            touches_border=np.array([c_.touches_border for c_ in info], bool),
            has_nucleus=np.array([c_.has_nucleus for c_ in info], bool),
            scores={"c": c, "i": np.full_like(c, np.nan), "s": c.copy()},
            masks=[masks.encode_cell(m, c_.bbox, (h, w)) for m, c_ in zip(crops, info)]))
    meta = {"segmentation": spec_for(masks=True).to_dict(),
            "source": {"data": data_dir, "noise": noise, "spread": spread, "seed": seed,
                       "made_by": "testkit.noisy_cells.truth_table"}}
    return cell_table.CellTable.concat(chunks, meta=meta)


def write_truth_table(path: str, data_dir: str, **kwargs) -> int:
    """`truth_table(data_dir, **kwargs)` written to `path` (.parquet or .csv); returns the rows."""
    table = truth_table(data_dir, **kwargs)
    return cell_table.write(path, table, table.meta)
