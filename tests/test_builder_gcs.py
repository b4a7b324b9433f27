"""The builder against a REAL local Cloud Storage emulator process: images in, shards out, on gs://."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from common import storage
from tests.test_builder import SHARD_RE, _cli, _cli_killed, check_shard_names, read_examples, shard_files, without_paths
from tfrecords_builder import build as buildlib
from tfrecords_builder.config import make_config


def upload_tree(local: Path, dest: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.put_file(str(path), storage.join(dest, path.relative_to(local).as_posix()))


def download_shards(prefix: str, names: list[str], folder: Path) -> list[Path]:
    """Shards fetched through common.storage (TF's gs:// filesystem cannot reach an emulator)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        (folder / name).write_bytes(storage.read_bytes(storage.join(prefix, name)))
        out.append(folder / name)
    return out


@pytest.mark.parametrize("mode", ["image", "cell"])
def test_build_from_and_to_the_emulator_equals_a_local_build(synthetic_small, gcs_bucket, tmp_path, mode):
    data = synthetic_small
    remote = f"gs://{gcs_bucket}/data"
    upload_tree(data, remote)
    args = dict(mode=mode, size=40, folds=2, shard_mb=0.03 if mode == "image" else 0.2, workers=1)
    out = f"gs://{gcs_bucket}/datasets/run1"
    cfg = make_config(images=f"{remote}/images", labels=f"{remote}/train.csv", out=out,
                      masks=f"{remote}/masks" if mode == "cell" else None, **args)
    result = buildlib.build(cfg, progress=False, log=lambda s: None)
    assert result.exit_code == 0

    names = storage.listdir(out)
    shards = [n for n in names if SHARD_RE.match(n)]
    assert sorted(set(names) - set(shards)) == ["manifest.json", "preprocess.json"]  # no _build left
    check_shard_names(shards, 2)
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert [s["name"] for s in manifest["shards"]] == shards
    for shard in manifest["shards"]:  # the stored object is the one the builder wrote
        blob = storage.client().bucket(gcs_bucket).get_blob(f"datasets/run1/{shard['name']}")
        assert blob.size == shard["bytes"] and blob.crc32c == shard["crc32c"]

    local = make_config(images=str(data / "images"), labels=str(data / "train.csv"), out=str(tmp_path / "local"),
                        masks=str(data / "masks") if mode == "cell" else None, **args)
    buildlib.build(local, progress=False, log=lambda s: None)
    fetched = download_shards(out, shards, tmp_path / "fetched")
    assert [p.name for p in fetched] == [p.name for p in shard_files(tmp_path / "local")]
    for a, b in zip(fetched, shard_files(tmp_path / "local")):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert without_paths(manifest) == without_paths(json.loads((tmp_path / "local" / "manifest.json").read_text()))
    examples = read_examples(fetched)
    assert len(examples) == manifest["totals"]["examples"] > 0
    assert {ex["image_id"].decode() for ex in examples} == set(manifest["images"])


def test_killed_build_on_the_emulator_resumes(syn_small_remote, gcs_bucket, tmp_path):
    remote = syn_small_remote(gcs_bucket)
    out = f"gs://{gcs_bucket}/resume"
    args = ["--images", f"{remote}/images", "--labels", f"{remote}/train.csv", "--out", out, "--mode", "image",
            "--size", "40", "--folds", "2", "--shard-mb", "0.01", "--workers", "1"]
    done_prefix = f"{out}/{buildlib.STATE_DIR}/{buildlib.DONE_DIR}"
    killed = _cli_killed(args, lambda: len(storage.listdir(done_prefix)) >= 1)
    assert killed.returncode == -9, "the build ended before it could be killed"
    assert not storage.exists(f"{out}/manifest.json")
    done = len(storage.listdir(done_prefix))
    assert done >= 1
    resumed = _cli(args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {done} of" in resumed.stdout
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    shards = [s["name"] for s in manifest["shards"]]
    assert [n for n in storage.listdir(out) if SHARD_RE.match(n)] == shards
    examples = read_examples(download_shards(out, shards, tmp_path / "fetched"))
    assert sorted(ex["image_id"].decode() for ex in examples) == sorted(manifest["images"])
    assert len(manifest["images"]) == 6


@pytest.fixture
def syn_small_remote(synthetic_small):
    def upload(bucket: str) -> str:
        remote = f"gs://{bucket}/data"
        upload_tree(synthetic_small, remote)
        return remote

    return upload
