import os

import pytest

from common import storage


def test_join_and_split():
    assert storage.join("gs://b/p/", "x", "/y") == "gs://b/p/x/y"
    assert storage.split_gcs("gs://bucket/a/b.png") == ("bucket", "a/b.png")
    assert storage.join("/tmp", "a") == os.path.join("/tmp", "a")
    with pytest.raises(ValueError):
        storage.split_gcs("/local/path")


def test_local_atomic_write_read_list(tmp_path):
    path = str(tmp_path / "sub" / "f.txt")
    storage.write_text(path, "hello")
    assert storage.read_text(path) == "hello"
    assert storage.exists(path)
    assert os.stat(path).st_mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044  # readable by others
    assert storage.listdir(str(tmp_path / "sub")) == ["f.txt"]  # no temp file left behind
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00" * 10)
    storage.put_file(str(src), str(tmp_path / "dst" / "d.bin"))
    assert storage.read_bytes(str(tmp_path / "dst" / "d.bin")) == b"\x00" * 10
    assert list(storage.iter_files(str(tmp_path / "dst"))) == [str(tmp_path / "dst" / "d.bin")]
    storage.delete(path)
    assert not storage.exists(path)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(path)


def test_put_file_uses_its_own_temporary_name_and_syncs_before_the_rename(tmp_path, monkeypatch):
    """Writers of one destination never share a temporary file (a fixed `.partial` name let one
    writer rename or truncate another's); the file is fsynced before the rename, the folder after."""
    import threading

    sources = []
    for k in range(6):
        src = tmp_path / f"src{k}.bin"
        src.write_bytes(bytes([k]) * (200_000 + k))
        sources.append(src.read_bytes())
    dest = tmp_path / "out" / "shard.tfrec"
    errors = []

    def put(k):
        try:
            for _ in range(10):
                storage.put_file(str(tmp_path / f"src{k}.bin"), str(dest))
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=put, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert dest.read_bytes() in sources  # one writer's whole file, never a mix
    assert os.listdir(dest.parent) == ["shard.tfrec"]  # no temporary file left

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b))[1])
    storage.put_file(str(tmp_path / "src0.bin"), str(dest))
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]
    assert dest.read_bytes() == sources[0]


def test_upload_without_a_stored_crc32c_is_reported(gcs_bucket, tmp_path, caplog, monkeypatch):
    """Against the real emulator: when the server's answer carries no CRC32C, the upload cannot
    be checked, and the log says so (once)."""
    import logging

    from google.cloud.storage import Blob

    real_reload = Blob.reload

    def reload_without_hash(self, *args, **kwargs):
        real_reload(self, *args, **kwargs)
        self._properties.pop("crc32c", None)  # as a server that does not send it

    src = tmp_path / "a.bin"
    src.write_bytes(b"hello")
    storage._unchecked_warned.clear()
    with caplog.at_level(logging.WARNING, logger="hpa.storage"):
        storage.put_file(str(src), f"gs://{gcs_bucket}/checked.bin")
        assert not [r for r in caplog.records if "CRC32C" in r.getMessage()]
        monkeypatch.setattr(Blob, "reload", reload_without_hash)
        storage.put_file(str(src), f"gs://{gcs_bucket}/x/a.bin")
        storage.write_bytes(f"gs://{gcs_bucket}/x/b.bin", b"again")
    warnings = [r.getMessage() for r in caplog.records if "CRC32C" in r.getMessage()]
    assert len(warnings) == 1 and "NOT checked" in warnings[0] and "x/a.bin" in warnings[0]
    assert storage.read_bytes(f"gs://{gcs_bucket}/x/a.bin") == b"hello"
