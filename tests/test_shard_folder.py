"""common.shard_folder: shard names with their fold, and the manifest the trainer reads back."""
from __future__ import annotations

import fnmatch

import pytest

from common import shard_folder as S
from common.preprocess import Preprocess, TileSpec


def test_shard_names_round_trip_and_match_the_glob():
    for fold, index, count in ((0, 0, 1), (3, 7, 12), (11, 99999, 100000)):
        name = S.shard_name(fold, index, count)
        assert fnmatch.fnmatch(name, S.SHARD_GLOB)
        assert S.parse_shard_name(name) == (fold, index, count)
        for path in (f"/data/shards/{name}", f"gs://bucket/p/{name}"):
            assert S.parse_shard_name(path) == S.ShardName(fold, index, count)
            assert S.fold_of(path) == fold
    assert S.shard_name(2, 3, 4) == "fold2-00003-of-00004.tfrec"


def test_bad_shard_names_are_errors_naming_the_path():
    for bad in ("fold-00000-of-00001.tfrec", "foldx-00000-of-00001.tfrec", "fold1-0-of-1.tfrec",
                "fold1-00000-of-00001.tfrecord", "val-00000-of-00001.tfrec"):
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            S.parse_shard_name(f"/d/{bad}")
    with pytest.raises(ValueError, match="out of range"):
        S.shard_name(0, 2, 2)


def test_manifest_written_is_read_back_and_counts_reach_the_trainer(tmp_path):
    out = str(tmp_path)
    shards = [S.shard_entry(S.shard_name(0, 0, 1), 0, 5, [1] * 19, bytes=100, crc32c="x"),
              S.shard_entry(S.shard_name(1, 0, 1), 1, 7, None, bytes=50)]
    manifest = S.make_manifest(shards=shards, folds=[], images={"a": {}}, skipped=[{"id": "b"}],
                               config={"size": 32})
    assert S.read_manifest(out) is None and S.shard_counts(out) == {}
    S.write_manifest(out, manifest)
    back = S.read_manifest(out)
    assert back == manifest and back["format"] == S.MANIFEST_FORMAT
    assert back["totals"] == {"images": 1, "examples": 12, "shards": 2, "bytes": 150, "skipped": 1}
    assert S.shard_names(back) == [s["name"] for s in shards]
    counts = S.shard_counts(out)
    assert counts == {"fold0-00000-of-00001.tfrec": S.ShardCounts(5, (1,) * 19),
                      "fold1-00000-of-00001.tfrec": S.ShardCounts(7, None)}
    (tmp_path / S.MANIFEST_FILE).write_text("{not json")
    assert S.shard_counts(out) == {}  # unreadable: the trainer counts records itself


def test_spec_round_trip_and_a_missing_spec_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"preprocess\.json: missing"):
        S.read_spec(str(tmp_path))
    spec = Preprocess(TileSpec(size=48, mode="image"))
    S.write_spec(str(tmp_path), spec)
    assert S.read_spec(str(tmp_path)) == spec
