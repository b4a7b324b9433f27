"""What went into a build, assembled from the plan and each shard's record: the content of
`manifest.json` (its layout, writer and reader: `common.shard_folder`)."""
from __future__ import annotations

from common import config as cfglib
from common import shard_folder
from common.labels import CLASS_NAMES, NUM_CLASSES
from tfrecords_builder.config import BuildConfig
from tfrecords_builder.plan import Plan


def shard_record(shard: dict, plan_ids: dict, examples_per_image: dict, skipped: list[dict],
                 nbytes: int, crc32c: str) -> dict:
    """What one finished shard holds; saved beside the build state, folded into the manifest."""
    class_examples = [0] * NUM_CLASSES
    for image_id, n in examples_per_image.items():
        for c in plan_ids[image_id].labels:
            class_examples[c] += n
    return {
        "name": shard["name"],
        "fold": shard["fold"],
        "examples": int(sum(examples_per_image.values())),
        "bytes": int(nbytes),
        "crc32c": crc32c,
        "images": examples_per_image,  # {id: examples}, written images only, in shard order
        "class_examples": class_examples,
        "skipped": skipped,
    }


def build_manifest(cfg: BuildConfig, plan: Plan, shard_records: dict[str, dict]) -> dict:
    """The manifest dict: config, tile spec, per-image fold and shard, per-shard and per-fold counts
    (examples and images per class), every skipped image with its reason. No timestamps, so an
    interrupted-and-resumed build writes the same manifest as an uninterrupted one."""
    by_id = plan.by_id()
    images: dict[str, dict] = {}
    skipped = list(plan.skipped)
    shards = []
    folds = {}
    for shard in plan.shards:
        rec = shard_records[shard["name"]]
        shards.append(shard_folder.shard_entry(
            rec["name"], rec["fold"], rec["examples"], rec["class_examples"], bytes=rec["bytes"],
            crc32c=rec["crc32c"], images=len(rec["images"])))
        f = folds.setdefault(shard["fold"], {
            "fold": shard["fold"], "images": 0, "examples": 0, "shards": [],
            "class_images": [0] * NUM_CLASSES, "class_examples": [0] * NUM_CLASSES})
        f["shards"].append(shard["name"])
        f["images"] += len(rec["images"])
        f["examples"] += rec["examples"]
        for image_id, n in rec["images"].items():
            e = by_id[image_id]
            images[image_id] = {"fold": e.fold, "shard": shard["name"], "examples": n,
                                "labels": e.labels, "origin": e.origin}
            for c in e.labels:
                f["class_images"][c] += 1
                f["class_examples"][c] += n
        for s in rec["skipped"]:
            skipped.append(s | {"fold": shard["fold"]})
    return shard_folder.make_manifest(
        config=cfglib.to_dict(cfg), preprocess=cfglib.to_dict(cfg.tile_spec()),
        classes=list(CLASS_NAMES), bytes_per_image_estimate=plan.bytes_per_image,
        estimate=plan.estimate, folds=[folds[k] for k in sorted(folds)], shards=shards,
        images=images, skipped=skipped)
