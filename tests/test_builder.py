"""TFRecord builder end to end on real files: round trips, resume after SIGKILL, bad input."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common import features, images, preprocess
from common.labels import multi_hot, read_labels_csv
from tfrecords_builder import build as buildlib
from tfrecords_builder.__main__ import main as cli_main
from tfrecords_builder.config import make_config

ROOT = Path(__file__).resolve().parents[1]
SHARD_RE = re.compile(r"^fold(\d+)-(\d{5})-of-(\d{5})\.tfrec$")


def read_examples(paths) -> list[dict]:
    """Every example of the given local shard files through tf.data and common.features.parse."""
    import tensorflow as tf

    ds = tf.data.TFRecordDataset([str(p) for p in paths]).map(features.parse)
    return [{k: v.numpy() for k, v in ex.items()} for ex in ds]


def shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if SHARD_RE.match(p.name))


def check_shard_names(names: list[str], folds: int) -> None:
    """`fold{K}-{i}-of-{n}`: i = 0..n-1 for every fold, n the number of shards of that fold."""
    by_fold: dict[int, list[tuple[int, int]]] = {}
    for name in names:
        m = SHARD_RE.match(name)
        assert m, name
        by_fold.setdefault(int(m[1]), []).append((int(m[2]), int(m[3])))
    assert sorted(by_fold) == list(range(folds))
    for pairs in by_fold.values():
        n = len(pairs)
        assert sorted(pairs) == [(i, n) for i in range(n)]


def without_paths(manifest: dict) -> dict:
    """A manifest minus the fields that name where the build was written or read from."""
    m = json.loads(json.dumps(manifest))
    for key in ("out", "images", "labels", "masks"):
        m["config"].pop(key)
    for info in m["images"].values():
        info.pop("origin")
    for s in m["skipped"]:
        s.pop("origin")
    return m


@pytest.fixture(scope="module")
def syn12(tmp_path_factory) -> Path:
    """12 synthetic images of 192 px with masks (more shards than the session's 6-image set)."""
    from testkit import synthetic

    out = tmp_path_factory.mktemp("syn12")
    synthetic.generate(str(out), n=12, size=192, seed=3)
    return out


def test_image_mode_round_trip(synthetic_small, tmp_path):
    data = synthetic_small
    cfg = make_config(images=str(data / "images"), labels=str(data / "train.csv"), out=str(tmp_path / "out"),
                      mode="image", size=48, folds=3, shard_mb=0.02, workers=0)
    result = buildlib.build(cfg, progress=False, log=lambda s: None)
    assert result.exit_code == 0 and not result.skipped
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if not SHARD_RE.match(p.name)) == ["manifest.json", "preprocess.json"]
    assert preprocess.Preprocess.load(str(out / "preprocess.json")) == cfg.preprocess()
    assert cfg.preprocess().segmentation is None  # image mode: no segmentation to record
    assert cfg.preprocess().tile == cfg.tile_spec() and cfg.preprocess().bag == 0
    check_shard_names([p.name for p in shard_files(out)], 3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == result.manifest

    truth = dict(read_labels_csv(str(data / "train.csv")))
    examples = read_examples(shard_files(out))
    assert sorted(ex["image_id"].decode() for ex in examples) == sorted(truth)
    for ex in examples:
        image_id = ex["image_id"].decode()
        image = images.load_image(str(data / "images"), image_id)
        np.testing.assert_array_equal(ex["image"], preprocess.image_tile(image, cfg.tile_spec()))
        np.testing.assert_array_equal(ex["labels"], multi_hot(truth[image_id]))
        assert ex["cell_index"] == -1 and tuple(ex["bbox"]) == (0, 0, 256, 256)
        assert ex["fold"] == manifest["images"][image_id]["fold"]
    # per-shard counts in the manifest match the files
    for shard in manifest["shards"]:
        assert len(read_examples([out / shard["name"]])) == shard["examples"]
        assert (out / shard["name"]).stat().st_size == shard["bytes"]
    assert sum(f["images"] for f in manifest["folds"]) == len(truth)
    for f in manifest["folds"]:
        expected = np.zeros(19, int)
        for image_id, info in manifest["images"].items():
            if info["fold"] == f["fold"]:
                expected += multi_hot(truth[image_id]).astype(int)
        assert f["class_images"] == expected.tolist() == f["class_examples"]


def test_cell_mode_round_trip_with_masks_and_workers(syn12, tmp_path):
    from common.segmentation import Segmentation, load_labels

    data = syn12
    cfg = make_config(images=str(data / "images"), labels=str(data / "train.csv"), out=str(tmp_path / "out"),
                      mode="cell", size=32, folds=2, shard_mb=0.1, workers=2, masks=str(data / "masks"))
    result = buildlib.build(cfg, progress=False, log=lambda s: None)
    assert result.exit_code == 0
    out = tmp_path / "out"
    # the label maps were read, not made: the dataset says so (inference cannot redo them)
    seg_spec = preprocess.Preprocess.load(str(out / "preprocess.json")).segmentation
    assert seg_spec.backend == "masks" and seg_spec.work_size is None
    check_shard_names([p.name for p in shard_files(out)], 2)
    assert len(shard_files(out)) > 2
    examples = read_examples(shard_files(out))
    truth = dict(read_labels_csv(str(data / "train.csv")))
    by_image: dict[str, dict[int, dict]] = {}
    for ex in examples:
        by_image.setdefault(ex["image_id"].decode(), {})[int(ex["cell_index"])] = ex
    assert sorted(by_image) == sorted(truth)
    total = 0
    for image_id, cells_seen in by_image.items():
        image = images.load_image(str(data / "images"), image_id)
        cells = load_labels(str(data / "masks" / f"{image_id}_cells.png"))
        nuclei = load_labels(str(data / "masks" / f"{image_id}_nuclei.png"))
        tiles, ids, boxes = preprocess.cell_tiles(image, cells, cfg.tile_spec())
        info = {c.id: c for c in Segmentation(cells, nuclei).cell_info()}
        assert sorted(cells_seen) == ids.tolist()
        for tile, cid, box in zip(tiles, ids, boxes):
            ex = cells_seen[int(cid)]
            np.testing.assert_array_equal(ex["image"], tile)
            np.testing.assert_array_equal(ex["labels"], multi_hot(truth[image_id]))  # weak labels
            assert tuple(ex["bbox"]) == tuple(box) == info[cid].bbox
            assert ex["cell_area"] == info[cid].area == int((cells == cid).sum())
            assert bool(ex["touches_border"]) == info[cid].touches_border
            assert bool(ex["has_nucleus"]) == info[cid].has_nucleus
        total += len(ids)
        assert result.manifest["images"][image_id]["examples"] == len(ids)
    assert result.manifest["totals"]["examples"] == total == len(examples)
    # folds hold whole images
    folds_of = {}
    for ex in examples:
        folds_of.setdefault(ex["image_id"], set()).add(int(ex["fold"]))
    assert all(len(f) == 1 for f in folds_of.values())


@pytest.mark.parametrize("work_size", [None, 256])
def test_cell_mode_segments_when_no_masks_are_given(synthetic_small, tmp_path, work_size):
    """Segmented at the default working size or at --work-size, recorded in preprocess.json;
    a resume at another working size is refused, and a build saved before --work-size
    existed (no work_size in its config) resumes at the default."""
    from common import segmentation
    from common.resume import ResumeError

    data = synthetic_small
    cfg = make_config(images=str(data / "images"), labels=str(data / "train.csv"), out=str(tmp_path / "out"),
                      mode="cell", size=32, folds=2, limit=2, workers=0, work_size=work_size)
    assert cfg.work_size == (work_size or segmentation.WORK_SIZE) and segmentation.WORK_SIZE == 512
    result = buildlib.build(cfg, progress=False, log=lambda s: None)
    assert result.exit_code == 0
    # how the cells were segmented is recorded with the tiles
    spec = preprocess.Preprocess.load(str(tmp_path / "out" / "preprocess.json"))
    assert spec.segmentation == segmentation.SegmentationSpec(backend="default", work_size=cfg.work_size)
    assert spec.replace(segmentation=None) == cfg.preprocess() and spec.tile == cfg.tile_spec()
    examples = read_examples(shard_files(tmp_path / "out"))
    for image_id in result.manifest["images"]:
        seg = segmentation.segment(images.load_image(str(data / "images"), image_id),
                                   work_size=spec.segmentation.work_size)
        got = sorted(int(ex["cell_index"]) for ex in examples if ex["image_id"].decode() == image_id)
        assert got == [c.id for c in seg.cell_info()] and got
    if work_size:
        with pytest.raises(ResumeError, match="work_size: 256 then, 512 now"):
            buildlib.build(dataclasses.replace(cfg, work_size=512), progress=False, log=lambda s: None)
    else:
        path = tmp_path / "out" / "manifest.json"
        manifest = json.loads(path.read_text())
        del manifest["config"]["work_size"]  # as written before --work-size
        path.write_text(json.dumps(manifest))
        said = []
        assert buildlib.build(cfg, progress=False, log=said.append).shards_reused == len(manifest["shards"])
        assert said == [f"{cfg.out}: already complete"]


def _cli(args, env_extra=None, timeout=120) -> subprocess.CompletedProcess:
    """Run the CLI in its own process group. Output pipes reach EOF only when the build AND its
    worker processes have exited, so a killed build whose workers linger fails by timeout."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env_extra or {}))
    cmd = [sys.executable, "-m", "tfrecords_builder", *args, "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own group: the CLI and the workers it spawned
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _cli_killed(args, killed_when, timeout=120) -> subprocess.CompletedProcess:
    """Start the CLI and SIGKILL its process group (the build and its workers) from outside as
    soon as `killed_when()` sees enough progress on disk."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, "-m", "tfrecords_builder", *args, "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not killed_when():
        time.sleep(0.005)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_cli_killed_build_resumes_to_the_uninterrupted_result(syn12, tmp_path):
    data = syn12
    common_args = ["--images", str(data / "images"), "--labels", str(data / "train.csv"), "--mode", "cell",
                   "--masks", str(data / "masks"), "--size", "32", "--folds", "3", "--shard-mb", "0.06",
                   "--workers", "2"]
    ref = tmp_path / "ref"
    run = _cli([*common_args, "--out", str(ref)])
    assert run.returncode == 0, run.stderr
    assert "0 skipped" in run.stdout
    n_shards = len(shard_files(ref))
    assert n_shards >= 5

    out = tmp_path / "resumed"
    done_dir = out / buildlib.STATE_DIR / buildlib.DONE_DIR
    def records():  # finished `done` records (a kill mid-write leaves a `.tmp-*` file)
        return sorted(p.stem for p in done_dir.glob("*.json") if not p.name.startswith(".tmp-"))

    killed = _cli_killed([*common_args, "--out", str(out)], lambda: done_dir.is_dir() and len(records()) >= 2)
    assert killed.returncode == -9, "the build ended before it could be killed"
    assert not (out / "manifest.json").exists()
    first = {p.name: p.stat().st_mtime_ns for p in shard_files(out)}
    done = records()
    assert 2 <= len(done) < n_shards and set(done) <= set(first)

    resumed = _cli([*common_args, "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(done)} of {n_shards} shards already done" in resumed.stdout
    assert f"{n_shards - len(done)} shards built now, {len(done)} reused" in resumed.stdout
    for name in done:  # finished shards were not rewritten
        assert (out / name).stat().st_mtime_ns == first[name]
    assert [p.name for p in shard_files(out)] == [p.name for p in shard_files(ref)]
    for a, b in zip(shard_files(out), shard_files(ref)):
        assert a.read_bytes() == b.read_bytes(), a.name
    m_out = json.loads((out / "manifest.json").read_text())
    m_ref = json.loads((ref / "manifest.json").read_text())
    assert m_out["config"].pop("out") == str(out) and m_ref["config"].pop("out") == str(ref)
    assert m_out == m_ref
    assert not (out / buildlib.STATE_DIR).exists()

    again = _cli([*common_args, "--out", str(out)])  # a finished build is left alone
    assert again.returncode == 0 and "already complete" in again.stdout
    other = _cli([*common_args[:-2], "--workers", "1", "--size", "40", "--out", str(out)])
    assert other.returncode == 1 and "another config" in other.stderr and "size" in other.stderr


def test_bad_inputs_are_skipped_with_reasons_and_the_build_goes_on(synthetic_small, tmp_path, capsys):
    src = synthetic_small / "images"
    imgs = tmp_path / "images"
    shutil.copytree(src, imgs)
    ids = [i for i, _ in read_labels_csv(str(synthetic_small / "train.csv"))]
    good, corrupt, missing_channel = ids[0], ids[1], ids[2]
    png = imgs / f"{corrupt}_green.png"
    png.write_bytes(png.read_bytes()[:200])  # truncated PNG
    (imgs / f"{missing_channel}_yellow.png").unlink()
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "ID,Label\n"
        f"{good},0|5\n"
        f"{corrupt},1\n"
        f"{missing_channel},2\n"
        "no_such_image,3\n"
        f"{ids[3]},4|19\n"
        f"{good},6\n"
        f"{ids[4]},x\n"
        f"{ids[5]},7\n"
    )
    out = tmp_path / "out"
    rc = cli_main(["--images", str(imgs), "--labels", str(labels), "--out", str(out), "--mode", "image",
                   "--size", "32", "--folds", "2", "--workers", "0", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 2
    assert "6 skipped" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["images"]) == sorted([good, ids[5]])
    reasons = {(s["id"], s["origin"].rsplit(" ", 1)[-1]): s["reason"] for s in manifest["skipped"]}
    assert len(reasons) == 6
    assert "corrupt or truncated PNG" in reasons[(corrupt, "2")] and f"{corrupt}_green.png" in reasons[(corrupt, "2")]
    assert "missing channel file(s) yellow" in reasons[(missing_channel, "3")]
    assert reasons[("no_such_image", "4")] == f"no image files for ID no_such_image in {imgs}"
    assert "label 19 outside 0-18" in reasons[(ids[3], "5")]
    assert "duplicate ID" in reasons[(good, "6")]
    assert "malformed label" in reasons[(ids[4], "7")]
    # images that fail at decode time are listed with the fold they were planned into
    assert all("fold" in s for s in manifest["skipped"] if s["id"] in (corrupt, missing_channel, "no_such_image"))
    examples = read_examples(shard_files(out))
    assert sorted(ex["image_id"].decode() for ex in examples) == sorted([good, ids[5]])


def test_bad_mask_and_unusable_config_are_reported(synthetic_small, tmp_path, capsys):
    data = synthetic_small
    masks = tmp_path / "masks"
    shutil.copytree(data / "masks", masks)
    ids = [i for i, _ in read_labels_csv(str(data / "train.csv"))]
    (masks / f"{ids[0]}_cells.png").unlink()
    (masks / f"{ids[1]}_cells.png").write_bytes(b"not a png")
    rc = cli_main(["--images", str(data / "images"), "--labels", str(data / "train.csv"), "--out",
                   str(tmp_path / "out"), "--mode", "cell", "--masks", str(masks), "--size", "32",
                   "--folds", "2", "--workers", "0", "--no-progress"])
    assert rc == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert "cell mask not found" in reasons[ids[0]] and f"{ids[0]}_cells.png" in reasons[ids[0]]
    assert "corrupt or unreadable label map" in reasons[ids[1]]
    assert len(manifest["images"]) == len(ids) - 2

    empty = tmp_path / "empty.csv"
    empty.write_text("ID,Label\nabc,99\n")
    rc = cli_main(["--images", str(data / "images"), "--labels", str(empty), "--out", str(tmp_path / "o2"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "no usable images" in err and "label 99 outside" in err


def test_cli_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "tfrecords_builder", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout
    for option in ("--images", "--labels", "--out", "--mode", "--size", "--folds", "--shard-mb", "--workers",
                   "--segmenter", "--masks", "--limit", "--seed", "Exit status"):
        assert option in out


def test_real_hpa_image_as_png_and_as_public_tif_gz(shared_data, tmp_path):
    """Two label lists, two image folders: the Kaggle-style 8-bit PNGs of a real HPA image and the
    same image as the public HPA's 16-bit `.tif.gz` (values x 257, which the one 16->8-bit rule
    maps back exactly). Both must give the same tile."""
    import gzip
    import io

    import tifffile

    src = shared_data / "hpa_images"
    kaggle, public = tmp_path / "kaggle", tmp_path / "public"
    kaggle.mkdir()
    public.mkdir()
    for channel in images.CHANNELS:
        shutil.copy(src / f"57_F11_1_{channel}.png", kaggle / f"57_F11_1_{channel}.png")
        plane = images.load_channel(str(src / f"57_F11_1_{channel}.png")).astype(np.uint16) * 257
        buf = io.BytesIO()
        tifffile.imwrite(buf, plane)
        (public / f"1_A1_1_{channel}.tif.gz").write_bytes(gzip.compress(buf.getvalue(), compresslevel=1))
    (tmp_path / "train.csv").write_text("ID,Label\n57_F11_1,13|16\n")
    (tmp_path / "public.csv").write_text("ID,Label,Cellline,ImageWidth\n1_A1_1,13|16,A-431,1728\n")
    cfg = make_config(images=(str(kaggle), str(public)), labels=(str(tmp_path / "train.csv"), str(tmp_path / "public.csv")),
                      out=str(tmp_path / "out"), mode="image", size=128, folds=1, workers=0)
    result = buildlib.build(cfg, progress=False, log=lambda s: None)
    assert result.exit_code == 0, result.skipped
    examples = {ex["image_id"].decode(): ex for ex in read_examples(shard_files(tmp_path / "out"))}
    assert sorted(examples) == ["1_A1_1", "57_F11_1"]
    expected = preprocess.image_tile(images.load_image(str(src), "57_F11_1"), cfg.tile_spec())
    for ex in examples.values():
        np.testing.assert_array_equal(ex["image"], expected)
        assert tuple(ex["bbox"]) == (0, 0, 1728, 1728)
        np.testing.assert_array_equal(ex["labels"], multi_hot([13, 16]))
    assert result.manifest["images"]["1_A1_1"]["origin"].endswith("public.csv row 1")


def _image_build(images_dir, labels, out, **overrides):
    args = dict(images=str(images_dir), labels=str(labels), out=str(out), mode="image", size=32, folds=2,
                shard_mb=0.005, workers=0)
    return make_config(**{**args, **overrides})


def test_skipped_images_are_tried_again_until_the_build_equals_a_clean_one(synthetic_small, tmp_path, monkeypatch):
    """A corrupt file (later replaced) and a read that keeps failing with EIO (a flaky disk,
    later fine) are skips; the same command again retries them, and once they read, the
    shards equal a build that never failed."""
    import errno

    from common import retry, storage

    monkeypatch.setenv(retry.BACKOFF_ENV, "0")
    monkeypatch.setenv(retry.TRIES_ENV, "2")
    imgs = tmp_path / "images"
    shutil.copytree(synthetic_small / "images", imgs)
    labels = synthetic_small / "train.csv"
    ids = [i for i, _ in read_labels_csv(str(labels))]
    ref = buildlib.build(_image_build(imgs, labels, tmp_path / "ref"), progress=False, log=lambda s: None)
    assert ref.exit_code == 0 and len(shard_files(tmp_path / "ref")) >= 3

    corrupt = imgs / f"{ids[1]}_green.png"
    good = corrupt.read_bytes()
    corrupt.write_bytes(good[:200])
    real_read, calls = storage.read_bytes, []

    def read_bytes(path):
        if Path(path).name == f"{ids[4]}_red.png":
            calls.append(path)
            raise OSError(errno.EIO, "Input/output error", path)
        return real_read(path)

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    out = tmp_path / "out"
    cfg = _image_build(imgs, labels, out)
    logs: list[str] = []
    first = buildlib.build(cfg, progress=False, log=logs.append)
    assert first.exit_code == 2 and len(calls) == 2  # HPA_IO_TRIES reads, then a skip
    reasons = {s["id"]: s["reason"] for s in first.skipped}
    assert set(reasons) == {ids[1], ids[4]} and "Input/output error" in reasons[ids[4]]
    assert (out / buildlib.STATE_DIR / buildlib.PLAN_FILE).exists()  # kept for the retry

    monkeypatch.setattr(storage, "read_bytes", real_read)  # the disk is fine again
    still = buildlib.build(cfg, progress=False, log=logs.append)  # the file is still corrupt
    assert "trying again 2 image(s) skipped by an earlier run" in "\n".join(logs)
    assert [s["id"] for s in still.skipped] == [ids[1]] and still.exit_code == 2

    corrupt.write_bytes(good)
    last = buildlib.build(cfg, progress=False, log=logs.append)
    assert last.exit_code == 0 and last.shards_reused >= 1
    assert [p.name for p in shard_files(out)] == [p.name for p in shard_files(tmp_path / "ref")]
    for a, b in zip(shard_files(out), shard_files(tmp_path / "ref")):
        assert a.read_bytes() == b.read_bytes(), a.name
    # The shard plan is fixed by the first run's pilot (8 images decoded to estimate sizes),
    # which here lacked the two failed images: only that estimate differs from the clean build.
    got, want = without_paths(last.manifest), without_paths(ref.manifest)
    assert (got.pop("estimate"), want.pop("estimate")) == ("mean of 4 pilot images", "mean of 6 pilot images")
    got.pop("bytes_per_image_estimate"), want.pop("bytes_per_image_estimate")
    assert got == want
    assert not (out / buildlib.STATE_DIR).exists()
    logs.clear()
    buildlib.build(cfg, progress=False, log=logs.append)
    assert logs == [f"{out}: already complete"]


def test_an_error_in_the_code_stops_the_build_instead_of_skipping_images(synthetic_small, tmp_path, monkeypatch):
    from common import preprocess as preprocesslib
    from tfrecords_builder.worker import ImageCodeError

    def broken(image, spec):
        raise TypeError("a bug in image_tile")

    monkeypatch.setattr(preprocesslib, "image_tile", broken)
    out = tmp_path / "out"
    with pytest.raises(ImageCodeError, match="syn_0000.*TypeError: a bug in image_tile") as info:
        buildlib.build(_image_build(synthetic_small / "images", synthetic_small / "train.csv", out),
                       progress=False, log=lambda s: None)
    assert isinstance(info.value.__cause__, TypeError)
    assert not (out / "manifest.json").exists()


def test_hpa_segmenter_refuses_at_once_naming_what_is_missing(synthetic_small, tmp_path, capsys):
    import importlib.util

    base = ["--images", str(synthetic_small / "images"), "--labels", str(synthetic_small / "train.csv"),
            "--mode", "cell", "--segmenter", "hpa", "--size", "32", "--no-progress"]
    rc = cli_main([*base, "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 1 and "--nuclei-model and --cell-model" in err
    assert not (tmp_path / "a").exists()  # refused before any image (no plan, no pilot)

    nuc, cell = tmp_path / "nuclei.pth", tmp_path / "cell.pth"
    nuc.write_bytes(b"x")
    rc = cli_main([*base, "--out", str(tmp_path / "b"), "--nuclei-model", str(nuc), "--cell-model", str(cell)])
    err = capsys.readouterr().err
    assert rc == 1 and f"not found: {cell}" in err
    cell.write_bytes(b"x")
    rc = cli_main([*base, "--out", str(tmp_path / "c"), "--nuclei-model", str(nuc), "--cell-model", str(cell)])
    assert rc == 1 and "--trust-model-files" in capsys.readouterr().err
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("hpacellseg") is None:
        rc = cli_main([*base, "--out", str(tmp_path / "d"), "--nuclei-model", str(nuc), "--cell-model", str(cell),
                       "--trust-model-files"])
        err = capsys.readouterr().err
        assert rc == 1 and "needs" in err and ("torch" in err or "hpacellseg" in err)
    assert not any((tmp_path / d).exists() for d in "bcd")
