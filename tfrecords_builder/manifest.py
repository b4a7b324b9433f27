"""What went into a build, assembled from the plan and each shard's record: the content of
`manifest.json` (its layout, writer and reader: `common.shard_folder`)."""
from __future__ import annotations

from collections import Counter

from common import config as cfglib
from common import shard_folder
from common.labels import CLASS_NAMES, NUM_CLASSES
from tfrecords_builder import cell_targets
from tfrecords_builder.config import BuildConfig
from tfrecords_builder.plan import Plan


def shard_record(shard: dict, plan_ids: dict, examples_per_image: dict, skipped: list[dict],
                 nbytes: int, crc32c: str, cell_labels: dict | None = None) -> dict:
    """What one finished shard holds; saved beside the build state, folded into the manifest.
    cell_labels (builds with --cell-labels): `{id: worker.Result.cell_labels}` of its images."""
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
        **({} if cell_labels is None else {"cell_labels": cell_labels}),
    }


def build_manifest(cfg: BuildConfig, plan: Plan, shard_records: dict[str, dict], table=None) -> dict:
    """The manifest dict: config, tile spec, per-image fold, shard and group, the fold groups
    (`group_summary`), per-shard and per-fold counts (examples and images per class), every
    skipped image with its reason; with --cell-labels, `cell_labels` (the table's path,
    fingerprint and counts: `cell_targets.summary`), the fingerprint also in `config` (what a
    resume compares). No timestamps, so an
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
                                "labels": e.labels, "group": e.group_key, "origin": e.origin}
            for c in e.labels:
                f["class_images"][c] += 1
                f["class_examples"][c] += n
        for s in rec["skipped"]:
            skipped.append(s | {"fold": shard["fold"]})
    extra = {} if table is None else {"cell_labels": cell_targets.summary(
        table, by_id, (shard_records[s["name"]] for s in plan.shards))}
    return shard_folder.make_manifest(
        config=cell_targets.settings(cfglib.to_dict(cfg), table), preprocess=cfg.preprocess().to_dict(), **extra,
        classes=list(CLASS_NAMES), bytes_per_image_estimate=plan.bytes_per_image,
        estimate=plan.estimate, groups=group_summary(plan, cfg), folds=[folds[k] for k in sorted(folds)],
        shards=shards, images=images, skipped=skipped)


def group_summary(plan: Plan, cfg: BuildConfig) -> dict:
    """The fold groups of the planned images (`--group-by`): how many, the largest, how many in
    each fold, and every class in fewer groups than folds (present, yet unable to reach every
    fold: a validation fold without it cannot score it)."""
    k = cfg.folds
    sizes = Counter(e.group_key for e in plan.entries)
    fold_of = {e.group_key: e.fold for e in plan.entries}
    per_fold = [0] * k
    for f in fold_of.values():
        per_fold[f] += 1
    class_groups: list[set] = [set() for _ in range(NUM_CLASSES)]
    class_images = [0] * NUM_CLASSES
    for e in plan.entries:
        for c in e.labels:
            class_groups[c].add(e.group_key)
            class_images[c] += 1
    thin = [{"class": c, "name": CLASS_NAMES[c], "groups": len(g), "images": class_images[c],
             "folds": len({fold_of[key] for key in g})}
            for c, g in enumerate(class_groups) if 0 < len(g) < k]
    # the first largest in plan order (Counter keeps insertion order, max the first maximum)
    largest, largest_size = max(sizes.items(), key=lambda kv: kv[1], default=("", 0))
    return {"by": cfg.group_by, "count": len(sizes), "largest": largest_size, "largest_group": largest,
            "per_fold": per_fold, "thin_classes": thin}


def thin_classes_text(thin: list[dict], k: int) -> str:
    """One line on the classes of `group_summary(...)["thin_classes"]`."""
    names = ", ".join(f"{t['class']} {t['name']} ({t['groups']} groups, {t['images']} images)" for t in thin)
    return (f"{len(thin)} class(es) in fewer fold groups than the {k} folds cannot reach every fold: "
            f"{names}")
