"""`python -m tfrecords_builder download` against a real HTTP server on 127.0.0.1 that injects faults.

The server (`testkit.http_faults.FaultServer`) serves real HPA files from ../shared/data (the
website's JPEGs of 57_F11_1, the 16-bit `.tif.gz` of 383_D2_1's blue channel) and synthetic
ones, with faults per file: 500s, 429 with Retry-After, a stalled response, a truncated body,
bytes that are no image, 404. Nothing is mocked: the downloader speaks HTTP to the server.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import storage
from common.images import CHANNELS, decode_channel
from testkit.http_faults import FaultServer, synthetic_channel
from tfrecords_builder import public_list
from tfrecords_builder.download import (EXIT_FAILURES, EXIT_OK, LABELS_FILE, REPORT_FILE, DownloadConfig,
                                        download, retry_after_seconds)

ROOT = Path(__file__).resolve().parents[1]
HOST = "https://images.proteinatlas.org"
HEADER = "Image,Label,Label_idx,Cellline,in_trainset\n"


def _files_for(images, size=64, formats=("jpg", "tif")) -> dict[str, bytes]:
    """Server paths -> bytes for synthetic images given as (antibody, plate_well_field)."""
    ext = {"jpg": ".jpg", "tif": ".tif.gz"}
    return {f"/{ab}/{name}_{c}{ext[f]}": synthetic_channel(f"{ab}_{name}", c, size, f)
            for ab, name in images for c in CHANNELS for f in formats}


def _write_list(path: Path, rows) -> str:
    """rows: (antibody, plate_well_field, Label names, Label_idx, Cellline, in_trainset)."""
    text = HEADER + "".join(f'{HOST}/{ab}/{name},"{names}",{idx},{line},{tr}\n'
                            for ab, name, names, idx, line, tr in rows)
    path.write_text(text)
    return str(path)


def _cfg(lst, out, server, **kw) -> DownloadConfig:
    base = dict(image_list=str(lst), out=str(out), base_url=server.url, timeout=1.0, tries=3,
                backoff=0.02, workers=4, per_host=4)
    return DownloadConfig(**(base | kw))


def _quiet(_msg):
    pass


# ---------------------------------------------------------------- the list and the selection

def test_hosts_list_ids_labels_and_every_filter_counted(tmp_path):
    lst = _write_list(tmp_path / "kaggle_2021.tsv", [
        ("10005", "921_B9_1", "Nucleoplasm,Cytosol", "0|16", "U-2 OS", "False"),
        ("10005", "921_B9_2", "Nucleoplasm", "0", "U-2 OS", "True"),  # in the train set
        ("10006", "921_C1_1", "Midbody", "", "U-2 OS", "False"),  # no competition class
        ("10007", "921_D1_1", "Vesicles", "17", "MCF7", "False"),  # not a competition line
        ("10005", "921_B9_1", "Nucleoplasm", "0", "U-2 OS", "False"),  # duplicate ID
        ("10008", "921_E1_1", "Nucleoplasm", "0|42", "A-431", "False"),  # bad Label_idx
        ("10009", "921_F1_1", "Golgi apparatus", "7", "a-431", "False"),  # case of the cell line
    ])
    sel = public_list.select(lst)
    assert [i.image_id for i in sel.items] == ["10005_921_B9_1", "10009_921_F1_1"]
    assert sel.items[0].labels == (0, 16) and sel.items[0].url == f"{HOST}/10005/921_B9_1"
    assert sel.dropped == {"bad_row": 1, "duplicate": 1, "in_trainset": 1, "no_label": 1,
                           "cellline": 1, "limit": 0}
    bad = {b["reason"].split(":")[0] for b in sel.bad_rows}
    assert any("duplicate ID 10005_921_B9_1" in b["reason"] for b in sel.bad_rows), sel.bad_rows
    assert any("row 6" in b["origin"] and "42" in b["reason"] for b in sel.bad_rows), bad
    # Each filter is a switch; --limit keeps the first N selected.
    every = public_list.select(lst, include_trainset=True, keep_unlabelled=True, celllines=("all",))
    assert len(every.items) == 5 and every.dropped["cellline"] == 0
    assert [i.image_id for i in public_list.select(lst, limit=1).items] == ["10005_921_B9_1"]
    one_line = public_list.select(lst, celllines=("MCF7",), base_url="http://127.0.0.1:9")
    assert [i.image_id for i in one_line.items] == ["10007_921_D1_1"]
    assert one_line.items[0].url == "http://127.0.0.1:9/10007/921_D1_1"


def test_names_map_to_classes_with_the_merged_locations(tmp_path):
    from common.labels import labels_from_names

    assert labels_from_names("Nucleoplasm,Peroxisomes,Lipid droplets,Midbody,cytosol") == (
        [0, 17, 16], ["Midbody"])
    assert labels_from_names("Focal adhesion sites|Cell Junctions|Centriolar satellite") == ([9, 13, 12], [])
    # Without a Label_idx column the names decide; a row whose names are all outside is unlabelled.
    p = tmp_path / "names.csv"
    p.write_text("Image,Label,Cellline,in_trainset\n"
                 f'{HOST}/1/1_A1_1,"Endosomes,Nucleoli",U-2 OS,False\n'
                 f'{HOST}/1/1_A1_2,"Kinetochore",U-2 OS,False\n')
    sel = public_list.select(str(p))
    assert [(i.image_id, i.labels) for i in sel.items] == [("1_1_A1_1", (17, 2))]
    assert sel.dropped["no_label"] == 1


def test_plain_list_and_unreadable_lists(tmp_path):
    p = tmp_path / "plain.csv"
    p.write_text("ID,Label,Image\n"
                 f"57_F11_1,13|16,{HOST}/1/57_F11_1\n"
                 f"../evil,0,{HOST}/1/x\n"
                 f"383_D2_1,2|5,not-a-url\n")
    sel = public_list.select(str(p))
    assert sel.layout == "plain" and [(i.image_id, i.labels) for i in sel.items] == [("57_F11_1", (13, 16))]
    assert sel.dropped["bad_row"] == 2 and sel.filters["in_trainset"] == "no column"
    q = tmp_path / "train.csv"
    q.write_text("ID,Label\nabc,0\n")
    with pytest.raises(public_list.ListError, match=r"train\.csv.*ID,Label,Image"):
        public_list.select(str(q))


def test_retry_after_header_in_seconds_or_as_a_date():
    import email.utils

    assert retry_after_seconds("3") == 3.0 and retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    later = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= retry_after_seconds(later) <= 61


# ---------------------------------------------------------------- faults, resume, output

@pytest.fixture(scope="module")
def real_jpegs(shared_data) -> dict[str, bytes]:
    """The website's JPEGs of 57_F11_1 (behind .png names in ../shared), served as `.jpg`."""
    folder = shared_data / "hpa_images" / "jpeg_named_png"
    return {f"/1/57_F11_1_{c}.jpg": (folder / f"57_F11_1_{c}.png").read_bytes() for c in CHANNELS}


SYNTH = [("100", "1_A1_1"), ("100", "1_A1_2"), ("200", "2_B3_1"), ("300", "3_C1_1"),
         ("300", "3_C1_2"), ("400", "4_D1_1"), ("500", "5_E1_1"), ("600", "6_F1_1")]
FAULTS = {
    "/100/1_A1_1_red.jpg": ["500", "503"],  # two 5xx, then fine
    "/100/1_A1_2_green.jpg": ["429:1"],  # 429 with Retry-After: 1
    "/200/2_B3_1_blue.jpg": ["stall:3"],  # no answer within the 1 s timeout, once
    "/300/3_C1_1_yellow.jpg": ["truncate"],  # half the body, once
    "/300/3_C1_2_red.jpg": "garbage*",  # never an image as JPEG: the .tif.gz is taken
    "/400/4_D1_1_red.jpg": "404*", "/400/4_D1_1_red.tif.gz": "404*",  # gone in both formats
    "/500/5_E1_1_green.jpg": "500*", "/500/5_E1_1_green.tif.gz": "500*",  # down for good
    "/600/6_F1_1_blue.jpg": ["reset"],  # connection closed without an answer, once
}


def _fault_list(tmp_path) -> str:
    rows = [("1", "57_F11_1", "Plasma membrane,Cytosol", "13|16", "A-431", "False")]
    rows += [(ab, name, "Nucleoplasm", "0", "U-2 OS", "False") for ab, name in SYNTH]
    return _write_list(tmp_path / "list.csv", rows)


def test_every_fault_class_ends_as_the_report_says_and_a_rerun_fetches_only_the_rest(tmp_path, real_jpegs):
    files = _files_for(SYNTH) | real_jpegs
    lst, out = _fault_list(tmp_path), tmp_path / "dest"
    with FaultServer(files, FAULTS) as server:
        result = download(_cfg(lst, out, server), progress=False, log=_quiet)
        log = list(server.log)
        # Retry-After obeyed: the second request for the 429 file came >= 1 s after the first.
        times = [t for t, p, _ in log if p == "/100/1_A1_2_green.jpg"]
        assert len(times) == 2 and times[1] - times[0] >= 0.95, times
        assert server.requests_for("/100/1_A1_1_red.jpg") == 3
        assert server.requests_for("/400/4_D1_1_red.jpg") == 1  # permanent: asked once
        assert server.requests_for("/500/5_E1_1_green.jpg") == 3  # transient: every try

        r = result.report
        assert result.exit_code == EXIT_FAILURES == 3
        failed = {f["id"]: f["files"] for f in result.failed}
        assert set(failed) == {"400_4_D1_1", "500_5_E1_1"}
        assert failed["400_4_D1_1"] == {"red": "jpg: HTTP 404 Not Found; tif: HTTP 404 Not Found"}
        assert "HTTP 500" in failed["500_5_E1_1"]["green"] and "after 3 tries" in failed["500_5_E1_1"]["green"]
        assert r["images"] == {"selected": 9, "whole": 7, "whole_before": 0, "failed": 2}
        assert r["fallback_files"] == ["300_3_C1_2_red.tif.gz"]
        assert r["retries"] >= 2 + 1 + 1 + 1 + 1 + 4  # 5xx, 429, stall, truncate, reset, lasting 500s
        assert r["files"]["fetched"] == 34 and r["files"]["failed"] == 2
        summary = result.summary()
        assert "400_4_D1_1: red: jpg: HTTP 404" in summary and "500_5_E1_1: green:" in summary

        # Every file under a final name is the server's bytes, and decodes; no temporary file.
        names = sorted(os.listdir(out))
        assert not [n for n in names if n.startswith(".tmp-")]
        for name in names:
            if name in (LABELS_FILE, REPORT_FILE):
                continue
            image_id, rest = name.split("_", 1)[0], name.split("_", 1)[1]
            served = files["/" + image_id + "/" + rest]
            assert (out / name).read_bytes() == served, name
            decode_channel(served, name)
        assert "400_4_D1_1_red.jpg" not in names and "500_5_E1_1_green.jpg" not in names
        labels = (out / LABELS_FILE).read_text().splitlines()
        assert labels[0] == "ID,Label,Cellline" and labels[1] == "1_57_F11_1,13|16,A-431"
        assert len(labels) == 1 + 7 and not any(line.startswith(("400_", "500_")) for line in labels)
        assert json.loads((out / REPORT_FILE).read_text())["images"]["whole"] == 7

        # The second run sends no request for a verified file; the server works again now.
        server.set_fault("/400/4_D1_1_red.jpg", None)
        server.set_fault("/500/5_E1_1_green.jpg", None)
        before = len(server.log)
        again = download(_cfg(lst, out, server), progress=False, log=_quiet)
        asked = {p for _, p, _ in server.log[before:]}
        assert asked == {"/400/4_D1_1_red.jpg", "/500/5_E1_1_green.jpg"}, asked
        assert again.exit_code == EXIT_OK and not again.failed
        assert again.report["images"] == {"selected": 9, "whole": 9, "whole_before": 7, "failed": 0}
        assert len((out / LABELS_FILE).read_text().splitlines()) == 1 + 9


def test_tif_format_keeps_the_16_bit_originals(tmp_path, shared_data):
    """--format tif: the real 16-bit .tif.gz of 383_D2_1 (blue) with synthetic other channels."""
    import numpy as np

    real = (shared_data / "hpa_images" / "383_D2_1_blue.tif.gz").read_bytes()
    files = {f"/7/383_D2_1_{c}.tif.gz": synthetic_channel("383_D2_1", c, 64, "tif") for c in CHANNELS}
    files["/7/383_D2_1_blue.tif.gz"] = real
    lst = _write_list(tmp_path / "l.csv", [("7", "383_D2_1", "Nucleoli", "2|5", "U-251 MG", "False")])
    out = tmp_path / "tif"
    with FaultServer(files) as server:
        result = download(_cfg(lst, out, server, format="tif"), progress=False, log=_quiet)
    assert result.exit_code == 0 and (out / "7_383_D2_1_blue.tif.gz").read_bytes() == real
    assert decode_channel(real, "blue.tif.gz").dtype == np.uint16


def test_sigkilled_download_resumes_to_the_same_files_byte_for_byte(tmp_path):
    images = [(str(100 + i), f"9_A{i}_1") for i in range(10)]
    files = _files_for(images, size=96, formats=("jpg",))
    lst = _write_list(tmp_path / "l.csv", [(ab, n, "Nucleoplasm", "0", "U-2 OS", "False") for ab, n in images])
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with FaultServer(files, latency=0.15) as server:
        cmd = [sys.executable, "-m", "tfrecords_builder", "download", "--list", lst, "--out", str(out),
               "--base-url", server.url, "--workers", "2", "--no-progress"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len([n for n in os.listdir(out) if n.endswith(".jpg")]
                                                   if out.exists() else []) < 8:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        have = {n for n in os.listdir(out) if n.endswith(".jpg")}
        assert 8 <= len(have) < 40, f"killed too early or too late: {len(have)} files"
        assert not (out / LABELS_FILE).exists()  # written at the end only
        (out / ".tmp-abcd9_A0_1_red.jpg").write_bytes(b"half a file")  # as a kill mid-write leaves
        temporary = len([n for n in os.listdir(out) if n.startswith(".tmp-")])  # the kill may have left one too
        before = len(server.log)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        asked = {p.rsplit("/", 1)[1] for _, p, _ in server.log[before:]}
    assert done.returncode == 0, done.stderr + done.stdout
    assert f"removed {temporary} temporary file" in done.stdout
    assert not asked & {n.split("_", 1)[1] for n in have}  # nothing asked twice
    names = sorted(n for n in os.listdir(out) if n.endswith(".jpg"))
    assert len(names) == 40 and not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    for n in names:
        ab, rest = n.split("_", 1)
        assert (out / n).read_bytes() == files[f"/{ab}/{rest}"], n
    assert len((out / LABELS_FILE).read_text().splitlines()) == 11


def test_gcs_output_on_the_storage_emulator(tmp_path, gcs_bucket):
    images = SYNTH[:3]
    files = _files_for(images, formats=("jpg",))
    lst = _write_list(tmp_path / "l.csv", [(ab, n, "Nucleoplasm", "0", "U-2 OS", "False") for ab, n in images])
    dest = f"gs://{gcs_bucket}/public"
    with FaultServer(files, {"/100/1_A1_1_red.jpg": ["500"]}) as server:
        result = download(_cfg(lst, dest, server), progress=False, log=_quiet)
        assert result.exit_code == 0
        names = storage.listdir(dest)
        assert LABELS_FILE in names and REPORT_FILE in names
        for ab, n in images:
            for c in CHANNELS:
                assert storage.read_bytes(f"{dest}/{ab}_{n}_{c}.jpg") == files[f"/{ab}/{n}_{c}.jpg"]
        before = len(server.log)
        again = download(_cfg(lst, dest, server), progress=False, log=_quiet)
        assert len(server.log) == before and again.report["images"]["whole_before"] == 3


def test_cli_exit_status_summary_and_a_downloaded_folder_builds_into_shards(tmp_path, real_jpegs, capsys):
    from tfrecords_builder.__main__ import main

    images = SYNTH[:3]
    files = _files_for(images, size=96, formats=("jpg",)) | real_jpegs
    rows = [("1", "57_F11_1", "Plasma membrane,Cytosol", "13|16", "A-431", "False")]
    rows += [(ab, n, "Nucleoplasm", "0", "U-2 OS", "False") for ab, n in images]
    rows += [("999", "9_Z9_9", "Nucleoplasm", "0", "U-2 OS", "False")]  # not on the server
    lst = _write_list(tmp_path / "l.csv", rows)
    dest = tmp_path / "public"
    with FaultServer(files) as server:
        code = main(["download", "--list", lst, "--out", str(dest), "--base-url", server.url,
                     "--tries", "2", "--backoff", "0.01", "--no-progress"])
    out = capsys.readouterr().out
    assert code == EXIT_FAILURES, out
    assert "4 of 5 images whole" in out and "999_9_Z9_9: red: jpg: HTTP 404 Not Found; tif: HTTP 404" in out
    assert main(["download", "--list", str(tmp_path / "missing.csv"), "--out", str(dest)]) == 1
    assert "missing.csv" in capsys.readouterr().err

    shards = tmp_path / "shards"
    assert main(["--images", str(dest), "--labels", str(dest / LABELS_FILE), "--out", str(shards),
                 "--preset", "smoke", "--limit", "0", "--no-progress"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert sorted(manifest["images"]) == sorted(["1_57_F11_1"] + [f"{ab}_{n}" for ab, n in images])
    assert manifest["images"]["1_57_F11_1"]["labels"] == [13, 16]


def test_help_names_the_selection_the_outputs_and_the_licence():
    out = subprocess.run([sys.executable, "-m", "tfrecords_builder", "download", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for words in ("--list", "--base-url", "--per-host", "--rate", "labels.csv", "download_report.json",
                  "CC BY-SA 3.0", "Exit status: 0"):
        assert words in out.stdout, words
