"""The shard folder: what the TFRecord builder writes and the trainer reads, local or `gs://`.

    fold{K}-{i:05d}-of-{n:05d}.tfrec   shard i of n of fold K; records per `common.features`
    preprocess.json                     the Preprocess every tile was cut with (written first)
    manifest.json                       what went in: the build's config, counts per shard, per
                                        fold and per class, every image's fold, shard and fold
                                        group, the groups' summary, and every skipped image
                                        with its reason

This module is the only one that spells the shard names and the manifest's layout: the builder
computes the content and the trainer reads the counts back (`shard_counts`).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from common import storage
from common.preprocess import PREPROCESS_FILE, Preprocess

log = logging.getLogger("hpa.shards")

SHARD_GLOB = "fold*-*.tfrec"  # finds every shard of a folder
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "hpa-scc-tfrecords"
MANIFEST_VERSION = 1
_SHARD_RE = re.compile(r"^fold(\d+)-(\d{5,})-of-(\d{5,})\.tfrec$")


# -- shard names ---------------------------------------------------------------------------

class ShardName(NamedTuple):
    fold: int
    index: int  # 0 .. count - 1 within the fold
    count: int  # shards of this fold


def shard_name(fold: int, index: int, count: int) -> str:
    """`fold{K}-{i:05d}-of-{n:05d}.tfrec`: shard `index` of `count` in fold `fold`."""
    if not (fold >= 0 and 0 <= index < count):
        raise ValueError(f"shard {index} of {count} in fold {fold}: out of range")
    return f"fold{fold}-{index:05d}-of-{count:05d}.tfrec"


def base_name(path: str) -> str:
    """The file name of a local path or `gs://` URL."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def parse_shard_name(path: str) -> ShardName:
    """The inverse of `shard_name` (on a name, a path or a URL); errors name the path."""
    m = _SHARD_RE.match(base_name(path))
    if not m:
        raise ValueError(f"{path}: not a shard name (expected fold<K>-<i>-of-<n>.tfrec)")
    return ShardName(int(m[1]), int(m[2]), int(m[3]))


def fold_of(path: str) -> int:
    return parse_shard_name(path).fold


# -- preprocess.json -------------------------------------------------------------------------

def write_spec(data_dir: str, spec: Preprocess) -> str:
    path = storage.join(data_dir, PREPROCESS_FILE)
    spec.save(path)
    return path


def read_spec(data_dir: str) -> Preprocess:
    """How the folder's tiles were cut, bagged and segmented (`Preprocess`); errors name the file."""
    path = storage.join(data_dir, PREPROCESS_FILE)
    try:
        return Preprocess.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; a shard folder needs the preprocess.json the "
                                f"TFRecord builder writes") from None
    except ValueError as err:
        raise ValueError(f"{path}: not a valid tile spec: {err}") from err


# -- manifest.json ---------------------------------------------------------------------------

def shard_entry(name: str, fold: int, examples: int, class_examples: Iterable[int] | None = None,
                **more) -> dict:
    """One shard's manifest entry: its examples and positives per class (`more`: e.g. bytes,
    crc32c, images)."""
    entry = {"name": name, "fold": int(fold), "examples": int(examples)}
    if class_examples is not None:
        entry["class_examples"] = [int(c) for c in class_examples]
    return entry | more


def make_manifest(*, shards: list[dict], folds: list[dict], images: dict[str, dict],
                  skipped: list[dict], groups: dict | None = None, **header) -> dict:
    """The manifest dict. `shards` from `shard_entry`; `header`: config, preprocess, classes,
    estimates. The totals are derived here. No timestamps: a resumed build writes the same file.

    groups: the fold groups (what never straddles two folds): `by` (the builder's --group-by),
    `count`, `largest` (images in the largest group) and `largest_group`, `per_fold` (groups in
    each fold) and `thin_classes` (classes in fewer groups than folds); each image's entry in
    `images` names its `group`. A manifest written before groups existed has neither (its folds
    were per image); nothing that reads a manifest needs them."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        **header,
        "totals": {
            "images": len(images),
            "examples": sum(s["examples"] for s in shards),
            "shards": len(shards),
            "bytes": sum(s.get("bytes", 0) for s in shards),
            "skipped": len(skipped),
        },
        **({"groups": groups} if groups is not None else {}),
        "folds": folds,
        "shards": shards,
        "images": images,
        "skipped": skipped,
    }


def manifest_path(data_dir: str) -> str:
    return storage.join(data_dir, MANIFEST_FILE)


def write_manifest(data_dir: str, manifest: dict) -> str:
    path = manifest_path(data_dir)
    storage.write_text(path, json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return path


def read_manifest(data_dir: str) -> dict | None:
    """The folder's manifest, or None when it has none (a build not finished yet)."""
    path = manifest_path(data_dir)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def shard_names(manifest: dict) -> list[str]:
    return [s["name"] for s in manifest.get("shards", [])]


@dataclass(frozen=True)
class ShardCounts:
    examples: int
    class_examples: tuple[int, ...] | None  # positives per class; None when not recorded


def shard_counts(data_dir: str) -> dict[str, ShardCounts]:
    """The manifest's counts by shard file name; empty when the folder has no manifest, or an
    unreadable one (with a warning: the trainer then counts records itself)."""
    path = manifest_path(data_dir)
    try:
        manifest = json.loads(storage.read_text(path))
        out = {}
        for s in manifest.get("shards", []):
            if "examples" not in s:
                continue
            cls = s.get("class_examples")
            out[s["name"]] = ShardCounts(int(s["examples"]),
                                         None if cls is None else tuple(int(c) for c in cls))
        return out
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("%s: unreadable (%s); records are counted, the head starts at zero bias",
                    path, err)
        return {}
