"""The Apache Beam engine (DirectRunner, in-memory and multi_processing with 2 workers) against
the local engine on the same synthetic data: the same shards byte for byte, the same manifest,
the same skips, the same resume; gs:// in and out on the real emulator; the trainer reads it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common import storage
from common.labels import read_labels_csv
from tests.test_builder import SHARD_RE, _cli, _cli_killed, check_shard_names, read_examples, shard_files, without_paths
from tests.test_builder_gcs import download_shards, upload_tree
from tfrecords_builder import beam_engine
from tfrecords_builder import build as buildlib
from tfrecords_builder import core
from tfrecords_builder.__main__ import main as cli_main
from tfrecords_builder.config import make_config

ROOT = Path(__file__).resolve().parents[1]
MULTI = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]


def comparable(manifest: dict) -> dict:
    """A manifest without paths and without the runtime-only fields (engine, workers)."""
    m = without_paths(manifest)
    for key in ("engine", "workers"):
        m["config"].pop(key)
    return m


def records(folder) -> list[tuple[str, int, int]]:
    """(image id, fold, cell index) of every example in the folder's shards, sorted."""
    return sorted((ex["image_id"].decode(), int(ex["fold"]), int(ex["cell_index"]))
                  for ex in read_examples(shard_files(Path(folder))))


def _decode_skips(folder: Path) -> bool:
    done = folder / buildlib.STATE_DIR / buildlib.DONE_DIR
    return any(json.loads(p.read_text())["skipped"] for p in done.glob("*.json")) if done.exists() else False


def assert_same_build(beam_out: Path, local_out: Path) -> dict:
    names = [p.name for p in shard_files(beam_out)]
    assert names == [p.name for p in shard_files(local_out)] and names
    for a, b in zip(shard_files(beam_out), shard_files(local_out)):
        assert a.read_bytes() == b.read_bytes(), a.name
    beam_m = json.loads((beam_out / "manifest.json").read_text())
    local_m = json.loads((local_out / "manifest.json").read_text())
    assert beam_m["config"]["engine"] == "beam" and local_m["config"]["engine"] == "local"
    assert comparable(beam_m) == comparable(local_m)
    def others(folder):
        return sorted(p.name for p in folder.iterdir() if not SHARD_RE.match(p.name))

    # no temporary names; `_build/` only where skipped images keep it for a retry, as locally
    assert others(beam_out) == others(local_out)
    assert set(others(beam_out)) <= {"manifest.json", "preprocess.json", "_build"}
    assert ("_build" in others(beam_out)) == _decode_skips(beam_out)
    return beam_m


@pytest.fixture(scope="module")
def syn10(tmp_path_factory) -> Path:
    from testkit import synthetic

    out = tmp_path_factory.mktemp("syn10")
    synthetic.generate(str(out), n=10, size=160, seed=5)
    return out


def test_cell_mode_on_two_beam_worker_processes_equals_the_local_engine(syn10, tmp_path):
    data = syn10
    args = ["--images", str(data / "images"), "--labels", str(data / "train.csv"), "--mode", "cell",
            "--masks", str(data / "masks"), "--size", "32", "--folds", "2", "--shard-mb", "0.05"]
    local = _cli([*args, "--out", str(tmp_path / "local"), "--workers", "0"])
    assert local.returncode == 0, local.stderr
    beam = _cli([*args, "--out", str(tmp_path / "beam"), "--engine", "beam", *MULTI], timeout=300)
    assert beam.returncode == 0, beam.stderr[-3000:]
    manifest = assert_same_build(tmp_path / "beam", tmp_path / "local")
    assert len(manifest["shards"]) > 2
    got = records(tmp_path / "beam")
    assert got == records(tmp_path / "local")
    assert {i for i, _, _ in got} == {i for i, _ in read_labels_csv(str(data / "train.csv"))}
    assert all(c >= 1 for _, _, c in got)  # cell records
    # the counters are printed, and count what the manifest says was written
    t = manifest["totals"]
    assert (f"beam counters: images={t['images']}, cells={t['examples']}, records={t['examples']}, "
            f"skipped=0, shards={t['shards']}, bytes={t['bytes']}") in beam.stdout


def test_image_mode_in_memory_equals_the_local_engine(synthetic_small, tmp_path):
    data = synthetic_small
    kw = dict(images=str(data / "images"), labels=str(data / "train.csv"), mode="image", size=40, folds=3,
              shard_mb=0.01, workers=0)
    buildlib.build(make_config(out=str(tmp_path / "local"), **kw), progress=False, log=lambda s: None)
    logs = []
    result = beam_engine.build_beam(make_config(out=str(tmp_path / "beam"), engine="beam", **kw),
                                    log=logs.append)
    assert result.exit_code == 0 and result.shards_built == len(result.manifest["shards"])
    assert_same_build(tmp_path / "beam", tmp_path / "local")
    check_shard_names([p.name for p in shard_files(tmp_path / "beam")], 3)
    got = records(tmp_path / "beam")
    assert got == records(tmp_path / "local") and all(c == -1 for _, _, c in got)
    assert any(line.startswith("beam counters: images=6, cells=0, records=6, skipped=0") for line in logs)


def test_bad_inputs_go_to_the_skip_list_as_in_the_local_engine(synthetic_small, tmp_path, capsys):
    imgs = tmp_path / "images"
    shutil.copytree(synthetic_small / "images", imgs)
    ids = [i for i, _ in read_labels_csv(str(synthetic_small / "train.csv"))]
    png = imgs / f"{ids[1]}_green.png"
    png.write_bytes(png.read_bytes()[:200])  # truncated PNG
    (imgs / f"{ids[2]}_yellow.png").unlink()
    labels = tmp_path / "labels.csv"
    labels.write_text(f"ID,Label\n{ids[0]},0|5\n{ids[1]},1\n{ids[2]},2\nno_such_image,3\n{ids[3]},4|19\n"
                      f"{ids[0]},6\n{ids[4]},x\n{ids[5]},7\n")
    args = ["--images", str(imgs), "--labels", str(labels), "--mode", "image", "--size", "32", "--folds", "2",
            "--shard-mb", "0.003", "--no-progress"]
    assert cli_main([*args, "--out", str(tmp_path / "local"), "--workers", "0"]) == 2
    capsys.readouterr()
    assert cli_main([*args, "--out", str(tmp_path / "beam"), "--engine", "beam"]) == 2
    printed = capsys.readouterr().out
    assert "6 skipped" in printed and "skipped=3" in printed  # 3 at decode time, 3 rows by the plan
    manifest = assert_same_build(tmp_path / "beam", tmp_path / "local")
    reasons = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert "corrupt or truncated PNG" in reasons[ids[1]]
    assert "missing channel file(s) yellow" in reasons[ids[2]]
    assert reasons["no_such_image"].startswith("no image files for ID no_such_image")
    assert "label 19 outside 0-18" in reasons[ids[3]] and "malformed label" in reasons[ids[4]]
    assert any("duplicate ID" in s["reason"] for s in manifest["skipped"])
    assert sorted(manifest["images"]) == sorted([ids[0], ids[5]])


def test_a_bug_in_our_code_fails_the_pipeline_and_is_not_a_skip(synthetic_small, tmp_path, monkeypatch):
    def broken(task):
        raise ZeroDivisionError("a bug, not bad input")

    monkeypatch.setattr(beam_engine.worker, "process", broken)  # in-memory runner: this process
    cfg = make_config(images=str(synthetic_small / "images"), labels=str(synthetic_small / "train.csv"),
                      out=str(tmp_path / "out"), mode="image", size=32, folds=2, limit=4, engine="beam")
    monkeypatch.setattr(core, "PILOT_IMAGES", 0)  # the pilot would decode through the real function
    with pytest.raises(Exception, match="a bug, not bad input"):
        beam_engine.build_beam(cfg, log=lambda s: None)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not shard_files(tmp_path / "out")


def test_killed_beam_build_resumes_and_reruns_like_the_local_engine(syn10, tmp_path):
    data = syn10
    args = ["--images", str(data / "images"), "--labels", str(data / "train.csv"), "--mode", "image",
            "--size", "32", "--folds", "2", "--shard-mb", "0.004"]
    ref = _cli([*args, "--out", str(tmp_path / "ref"), "--workers", "0"])
    assert ref.returncode == 0, ref.stderr
    n_shards = len(shard_files(tmp_path / "ref"))
    assert n_shards >= 4
    out = tmp_path / "out"
    beam = [*args, "--out", str(out), "--engine", "beam"]
    done_dir = out / buildlib.STATE_DIR / buildlib.DONE_DIR

    def records():  # finished `done` records (a kill mid-write leaves a `.tmp-*` file)
        return sorted(p.stem for p in done_dir.glob("*.json") if not p.name.startswith(".tmp-"))

    killed = _cli_killed(beam, lambda: len(records()) >= 1)  # SIGKILL from outside
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    k = len(records())
    assert 1 <= k < n_shards

    resumed = _cli(beam)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming: {k} of {n_shards} shards already done" in resumed.stdout
    assert f"{n_shards - k} shards built now, {k} reused" in resumed.stdout
    assert_same_build(out, tmp_path / "ref")

    again = _cli(beam)
    assert again.returncode == 0 and "already complete" in again.stdout
    other = _cli([*beam[:-2], "--size", "40", "--out", str(out), "--engine", "beam"])
    assert other.returncode == 1 and "another config" in other.stderr and "size" in other.stderr
    stray = _cli([*args, "--out", str(tmp_path / "ref2"), "--engine", "local", "--runner", "DirectRunner"])
    assert stray.returncode == 2 and "unrecognized arguments: --runner" in stray.stderr


def test_beam_build_from_and_to_the_emulator(synthetic_small, gcs_bucket, tmp_path):
    remote = f"gs://{gcs_bucket}/data"
    upload_tree(synthetic_small, remote)
    out = f"gs://{gcs_bucket}/beam"
    kw = dict(mode="cell", size=32, folds=2, shard_mb=0.1)
    cfg = make_config(images=f"{remote}/images", labels=f"{remote}/train.csv", masks=f"{remote}/masks",
                      out=out, engine="beam", **kw)
    result = beam_engine.build_beam(cfg, ["--direct_num_workers", "1"], log=lambda s: None)
    assert result.exit_code == 0
    names = storage.listdir(out)
    shards = [n for n in names if SHARD_RE.match(n)]
    assert sorted(set(names) - set(shards)) == ["manifest.json", "preprocess.json"] and shards
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    for shard in manifest["shards"]:  # the stored object is the one the builder wrote
        blob = storage.client().bucket(gcs_bucket).get_blob(f"beam/{shard['name']}")
        assert blob.size == shard["bytes"] and blob.crc32c == shard["crc32c"]
    local = make_config(images=str(synthetic_small / "images"), labels=str(synthetic_small / "train.csv"),
                        masks=str(synthetic_small / "masks"), out=str(tmp_path / "local"), workers=0, **kw)
    buildlib.build(local, progress=False, log=lambda s: None)
    download_shards(out, shards, tmp_path / "fetched")
    (tmp_path / "fetched" / "manifest.json").write_text(storage.read_text(f"{out}/manifest.json"))
    (tmp_path / "fetched" / "preprocess.json").write_text(storage.read_text(f"{out}/preprocess.json"))
    assert_same_build(tmp_path / "fetched", tmp_path / "local")


def test_smoke_training_on_beam_built_shards(syn10, tmp_path):
    data = syn10
    out = tmp_path / "shards"
    built = _cli(["--images", str(data / "images"), "--labels", str(data / "train.csv"), "--mode", "cell",
                  "--masks", str(data / "masks"), "--preset", "smoke", "--size", "32", "--limit", "10",
                  "--out", str(out), "--engine", "beam"])
    assert built.returncode == 0, built.stderr[-2000:]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-m", "train_tpu", "--data", str(out), "--mode", "cell", "--out", str(tmp_path / "run"),
         "--preset", "smoke", "--backbone", "test_cnn", "--strategy", "cpu", "--val-steps", "0", "--epochs", "1",
         "--steps-per-epoch", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {"model.keras", "config.json", "preprocess.json"} <= set(os.listdir(tmp_path / "run"))
    assert "val_macro_auc" in run.stdout
    # the head bias comes from the manifest's per-shard class counts, which the Beam engine wrote
    assert "head bias from the training class frequencies" in run.stderr


def test_the_package_beam_stages_for_setup_file_holds_the_project_and_its_requirements(tmp_path):
    """`--setup_file ./setup.py`: Beam builds this sdist and Dataflow workers pip-install it."""
    import tarfile

    from apache_beam.runners.portability.stager import Stager

    tarball = Stager._build_setup_package(str(ROOT / "setup.py"), str(tmp_path), None)
    with tarfile.open(tarball) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        requires = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("egg-info/requires.txt")))
        requires = requires.read().decode()
    assert {"tfrecords_builder/beam_engine.py", "tfrecords_builder/worker.py", "common/images.py",
            "requirements.txt", "requirements-beam.txt"} <= names
    assert "numpy==" in requires and "[beam]\napache-beam==2.77.0" in requires


def test_a_remote_runner_needs_gs_paths(synthetic_small, tmp_path):
    cfg = make_config(images=str(synthetic_small / "images"), labels=str(synthetic_small / "train.csv"),
                      out=str(tmp_path / "out"), engine="beam")
    with pytest.raises(buildlib.BuildError, match="DataflowRunner workers cannot see this machine's files"):
        beam_engine.build_beam(cfg, ["--runner", "DataflowRunner", "--project", "p", "--region", "r"])
    assert not (tmp_path / "out").exists()  # refused before planning


def test_both_engines_use_the_build_core_through_public_names():
    """The plan/resume/finish core is `tfrecords_builder.core`; neither engine reaches into the
    other or into a private name of the core."""
    import ast

    root = Path(__file__).resolve().parents[1] / "tfrecords_builder"
    for engine, other in (("beam_engine", "build"), ("build", "beam_engine")):
        tree = ast.parse((root / f"{engine}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and n.module == "tfrecords_builder" for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "core" in imported and other not in imported and f"tfrecords_builder.{other}" not in imported
        private = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                   and isinstance(n.value, ast.Name) and n.value.id == "core" and n.attr.startswith("_")]
        assert private == [], engine
