"""Test helper: TFRecord shards in the builder's layout, made from `testkit.synthetic` data with
the common parts only (images, cell masks, cell_tiles, features.serialize), so the trainer's
tests do not depend on the TFRecord builder stage."""
from __future__ import annotations

import os

import cv2
import numpy as np

from common import features, images, shard_folder
from common.labels import multi_hot, read_labels_csv
from common.preprocess import PREPROCESS_FILE, Preprocess, TileSpec, cell_tiles, image_tile


def make_shards(synthetic_dir, out_dir, size: int = 32, folds: int = 2, mode: str = "cell",
                shards_per_fold: int = 1, bag: int = 0, targets: dict | None = None) -> dict:
    """Cut every synthetic image into tiles (cells, or the whole image) and write
    `fold{K}-{i:05d}-of-{n:05d}.tfrec` (image j goes to fold j % folds) plus `preprocess.json`.
    bag N > 0 (cell mode): one bag record per image holding its first N cells.
    targets `{(ID, cell): (19,)}`: every cell record carries `cell_targets` (a cell missing
    from it, its image's labels), as the builder's --cell-labels writes them.

    Returns `{"spec": Preprocess, "counts": {fold: examples}, "files": [paths]}`.
    """
    import tensorflow as tf

    synthetic_dir, out_dir = str(synthetic_dir), str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    spec = Preprocess(TileSpec(size=size, mode=mode), bag=bag)
    rows = read_labels_csv(os.path.join(synthetic_dir, "train.csv"))
    per_fold: dict[int, list[bytes]] = {k: [] for k in range(folds)}
    for j, (image_id, labels) in enumerate(rows):
        fold = j % folds
        image = images.load_image(os.path.join(synthetic_dir, "images"), image_id)
        h, w = image.shape[:2]
        if mode == "image":
            per_fold[fold].append(features.serialize(
                image_tile(image, spec.tile), image_id=image_id, labels=labels, source_size=(h, w),
                fold=fold))
            continue
        cells = cv2.imread(os.path.join(synthetic_dir, "masks", f"{image_id}_cells.png"),
                           cv2.IMREAD_UNCHANGED).astype(np.int32)
        tiles, ids, boxes = cell_tiles(image, cells, spec.tile)
        soft = None if targets is None else [
            targets.get((image_id, int(c)), multi_hot(labels)) for c in ids]
        if bag:
            k = min(bag, len(ids))
            per_fold[fold].append(features.serialize_bag(
                tiles[:k], image_id=image_id, labels=labels, source_size=(h, w), fold=fold,
                cell_ids=ids[:k].tolist(), bboxes=boxes[:k].tolist(), touches_border=[False] * k,
                has_nucleus=[True] * k, cell_areas=[int((cells == c).sum()) for c in ids[:k]],
                cell_count=len(ids), cell_targets=None if soft is None else np.stack(soft[:k])))
            continue
        for j, (tile, cid, box) in enumerate(zip(tiles, ids, boxes)):
            per_fold[fold].append(features.serialize(
                tile, image_id=image_id, labels=labels, source_size=(h, w), fold=fold,
                cell_index=int(cid), bbox=box.tolist(), cell_area=int((cells == cid).sum()),
                cell_targets=None if soft is None else soft[j]))
    files = []
    for fold, records in per_fold.items():
        for i in range(shards_per_fold):
            path = os.path.join(out_dir, shard_folder.shard_name(fold, i, shards_per_fold))
            with tf.io.TFRecordWriter(path) as writer:
                for rec in records[i::shards_per_fold]:
                    writer.write(rec)
            files.append(path)
    spec.save(os.path.join(out_dir, PREPROCESS_FILE))
    return {"spec": spec, "counts": {k: len(v) for k, v in per_fold.items()}, "files": files}


def write_manifest(out_dir, files, class_counts: bool = True, cell_labels: dict | None = None) -> None:
    """A builder-style `manifest.json` for `files` (in `out_dir`), with each shard's own
    counts: examples and, unless `class_counts=False`, positives per class; `cell_labels`: the
    builder's section of that name (e.g. `{"fingerprint": ...}`)."""
    from train_tpu import data

    rows = []
    for f in files:
        labels = data.eval_labels([str(f)], -1)  # -1: every record, in one pass
        rows.append(shard_folder.shard_entry(
            shard_folder.base_name(f), shard_folder.fold_of(f), len(labels),
            labels.sum(0).astype(int).tolist() if class_counts else None))
    shard_folder.write_manifest(str(out_dir), shard_folder.make_manifest(
        shards=rows, folds=[], images={}, skipped=[],
        **({} if cell_labels is None else {"cell_labels": cell_labels})))
