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
