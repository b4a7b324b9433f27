"""The build plan: which images, which fold, which shard. Fixed before any shard is written.

Planning shards up front (by an estimated size per image) is what makes names and resume exact:
a shard's name `fold{K}-{i:05d}-of-{n:05d}.tfrec` is known before its first record, each shard is
a fixed list of images, and a resumed build rebuilds exactly the shards that are missing.
The plan is saved in the output's state folder, so a resume never re-plans.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field

import numpy as np

from common import labels as labellib
from common import shard_folder
from tfrecords_builder.config import BuildConfig
from tfrecords_builder.folds import group_of, image_group, stratified_group_folds

AUTO, PER_IMAGE = "auto", "image"  # --group-by values that are not a column


@dataclass
class Entry:
    """One usable image: its ID, labels, where its files are, where its labels came from and
    the group that goes to one fold with it (`group_key`)."""

    image_id: str
    labels: list[int]
    source: str  # image folder or gs:// prefix
    origin: str  # "path/train.csv row 12"
    fold: int = -1
    shard: str = ""
    group: str = ""  # "" = the image by itself (image:<id>)

    @property
    def group_key(self) -> str:
        return self.group or image_group(self.image_id)


@dataclass
class Plan:
    config: dict  # BuildConfig.content_dict() the plan was made for
    entries: list[Entry]
    skipped: list[dict]  # {"id", "reason", "origin"}: rows rejected before any image is read
    shards: list[dict] = field(default_factory=list)  # {"name", "fold", "images": [ids]}
    bytes_per_image: float = 0.0
    estimate: str = ""  # how bytes_per_image was found

    def to_json(self) -> str:
        return json.dumps({
            "config": self.config,
            "bytes_per_image": self.bytes_per_image,
            "estimate": self.estimate,
            "skipped": self.skipped,
            "shards": self.shards,
            "entries": [[e.image_id, e.labels, e.source, e.origin, e.fold, e.shard, e.group_key]
                        for e in self.entries],
        }, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        # A plan from before --group-by has 6 fields per entry: its folds were per image.
        entries = [Entry(i, list(ls), s, o, f, sh, g[0] if g else image_group(i))
                   for i, ls, s, o, f, sh, *g in d["entries"]]
        return cls(d["config"], entries, d["skipped"], d["shards"], d["bytes_per_image"], d["estimate"])

    def by_id(self) -> dict[str, Entry]:
        return {e.image_id: e for e in self.entries}


def group_column(group_by: str) -> str | None:
    """The label-list column that `--group-by` names; None for `auto` and `image`."""
    return None if group_by in (AUTO, PER_IMAGE) else group_by


def group_key(image_id: str, group_by: str, value: str = "") -> str:
    """An image's fold group under `--group-by` (`value`: its row's group column, if any)."""
    if group_by == PER_IMAGE:
        return image_group(image_id)
    if group_by == AUTO:
        return group_of(image_id)
    return f"{group_by}:{value}"


def _columns(path: str, rows: list[dict]) -> list[str]:
    if rows:
        return [c for c in rows[0] if isinstance(c, str) and c != "_row"]
    from common import storage

    first = storage.read_text(path).splitlines()[:1]
    return next(csv.reader(first), []) if first else []


def read_entries(cfg: BuildConfig) -> tuple[list[Entry], list[dict]]:
    """Rows of all label lists -> usable entries (file order) and rejected rows with reasons.

    Rejected: a bad label (outside 0-18, malformed, empty), an empty or unsafe ID, an ID already
    seen (the first row wins), an empty value in the `--group-by` column. `cfg.limit` keeps the
    first N usable entries. A label list without the `--group-by` column is an error.
    """
    from common.images import ImageLoadError, check_image_id

    column = group_column(cfg.group_by)
    lists = [labellib.read_label_rows(path) for path in cfg.labels]
    if column is not None:
        for path, rows in zip(cfg.labels, lists):
            columns = _columns(path, rows)
            if column not in columns:
                raise ValueError(f"--group-by {column}: {path} has no column {column!r} "
                                 f"(its columns: {', '.join(columns)})")
    entries: list[Entry] = []
    skipped: list[dict] = []
    seen: dict[str, str] = {}
    for li, (path, rows) in enumerate(zip(cfg.labels, lists)):
        source = cfg.image_source(li)
        for row in rows:
            image_id = row.get("ID") or ""
            origin = f"{path} row {row['_row']}"
            if cfg.limit and len(entries) >= cfg.limit:
                break
            try:
                check_image_id(image_id)
            except ImageLoadError as err:
                skipped.append({"id": image_id, "reason": str(err), "origin": origin})
                continue
            if image_id in seen:
                skipped.append({"id": image_id, "reason": f"duplicate ID (first at {seen[image_id]})",
                                "origin": origin})
                continue
            try:
                labels = labellib.parse_labels(row.get("Label"), where=f"{origin} (ID {image_id})")
            except labellib.LabelError as err:
                skipped.append({"id": image_id, "reason": str(err), "origin": origin})
                continue
            value = ""
            if column is not None:
                value = row.get(column) or ""
                if not value:
                    skipped.append({"id": image_id, "origin": origin,
                                    "reason": f"empty {column} (the --group-by column): no fold group"})
                    continue
            seen[image_id] = origin
            entries.append(Entry(image_id, labels, source, origin, group=group_key(image_id, cfg.group_by, value)))
    return entries, skipped


def assign_folds(entries: list[Entry], k: int, seed: int) -> None:
    """Each entry's fold: multilabel-stratified over the entries' groups (a group, one fold)."""
    folds = stratified_group_folds([e.labels for e in entries], [e.group_key for e in entries], k, seed)
    for e, f in zip(entries, folds):
        e.fold = int(f)


def assign_shards(entries: list[Entry], k: int, bytes_per_image: float, shard_bytes: float,
                  seed: int) -> list[dict]:
    """Split each fold into `n = round(fold bytes / shard bytes)` (>= 1) shards of equal image count.

    Images are shuffled within a fold (seeded) so every shard mixes classes and sources.
    """
    rng = np.random.default_rng([seed, 1])  # a stream apart from the fold assignment's
    shards = []
    for fold in range(k):
        members = [e for e in entries if e.fold == fold]
        if not members:
            continue
        order = rng.permutation(len(members))
        n = int(round(len(members) * bytes_per_image / shard_bytes))
        n = min(max(n, 1), len(members))
        for i, chunk in enumerate(np.array_split(order, n)):
            name = shard_folder.shard_name(fold, i, n)
            ids = []
            for j in chunk:
                members[j].shard = name
                ids.append(members[j].image_id)
            shards.append({"name": name, "fold": fold, "images": ids})
    return shards
