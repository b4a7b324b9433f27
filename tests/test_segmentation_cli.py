"""`python -m infer_gpu segment` on real files: synthetic images, nuclei-only, missing channels."""
from __future__ import annotations

import shutil
import subprocess
import sys

import cv2
import numpy as np

from common import segmentation as seg
from testkit import segmentation_compare as compare
from infer_gpu import cli
from infer_gpu import segment as segment_cmd

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_segment_command_writes_label_maps_and_overlays(synthetic_small, tmp_path):
    out = tmp_path / "seg"
    ids = ["syn_0000", "syn_0001"]
    assert cli.main(["segment", "--images", str(synthetic_small / "images"), "--ids", *ids, "--out", str(out)]) == 0
    for image_id in ids:
        cells = cv2.imread(str(out / f"{image_id}_cells.png"), cv2.IMREAD_UNCHANGED)
        nuclei = cv2.imread(str(out / f"{image_id}_nuclei.png"), cv2.IMREAD_UNCHANGED)
        assert cells.dtype == nuclei.dtype == np.uint16 and cells.shape == (256, 256)
        assert nuclei.max() > 0 and (nuclei[nuclei > 0] == cells[nuclei > 0]).all()  # shared ids
        truth = seg.load_labels(str(synthetic_small / "masks" / f"{image_id}_cells.png"))
        assert compare.match(truth, cells.astype(np.int32))["matched_fraction"] >= 0.8
        ov = cv2.imread(str(out / f"{image_id}_overlay.png"), cv2.IMREAD_COLOR)
        assert ov.shape == (1024, 1024, 3)  # small images are enlarged 4x so the ids are legible
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{i}_{k}.png" for i in ids for k in ("cells", "nuclei", "overlay"))


def test_ids_default_to_every_image_in_the_folder(synthetic_small):
    ids = segment_cmd.find_ids(str(synthetic_small / "images"))
    assert ids == [f"syn_{i:04d}" for i in range(6)]


def test_bad_images_are_reported_and_the_others_still_written(synthetic_small, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(synthetic_small / "images", folder)
    (folder / "syn_0001_red.png").unlink()  # a missing channel, early in the list
    (folder / "syn_0003_green.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # a corrupt file
    out = tmp_path / "o"
    rc = cli.main(["segment", "--images", str(folder), "--out", str(out), "--no-overlay"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "syn_0001" in err and "red" in err and "syn_0003" in err and "2 of 6 image(s)" in err
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"syn_{i:04d}_{k}.png" for i in (0, 2, 4, 5) for k in ("cells", "nuclei"))


def test_missing_channel_is_a_clear_error_but_nuclei_only_needs_blue(synthetic_small, tmp_path, capsys):
    folder = tmp_path / "blue_only"
    folder.mkdir()
    shutil.copy(synthetic_small / "images" / "syn_0002_blue.png", folder)
    rc = cli.main(["segment", "--images", str(folder), "--out", str(tmp_path / "o1")])
    err = capsys.readouterr().err
    assert rc != 0 and "syn_0002" in err and "red" in err
    assert cli.main(["segment", "--images", str(folder), "--out", str(tmp_path / "o2"), "--nuclei-only"]) == 0
    nuclei = cv2.imread(str(tmp_path / "o2" / "syn_0002_nuclei.png"), cv2.IMREAD_UNCHANGED)
    truth = seg.load_labels(str(synthetic_small / "masks" / "syn_0002_nuclei.png"))
    assert compare.match(truth, nuclei.astype(np.int32))["matched_fraction"] >= 0.9


def test_hpa_backend_refuses_untrusted_model_files(synthetic_small, tmp_path, capsys):
    model = tmp_path / "nuclei.pth"
    model.write_bytes(b"x")
    rc = cli.main(["segment", "--images", str(synthetic_small / "images"), "--ids", "syn_0000",
                   "--out", str(tmp_path / "o"), "--backend", "hpa", "--nuclei-model", str(model),
                   "--cell-model", str(model)])
    assert rc == 2 and "--trust-model-files" in capsys.readouterr().err


def test_help_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "infer_gpu", "segment", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--nuclei-only" in r.stdout and "--trust-model-files" in r.stdout
