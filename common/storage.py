"""One way to read and write paths that are local files or `gs://bucket/key` objects.

GCS goes through the `google-cloud-storage` client, so the same code talks to real Cloud
Storage (Colab, Kaggle, a laptop with `gcloud auth application-default login`) and to a local
emulator (`STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`, anonymous credentials).
TensorFlow's own `gs://` filesystem cannot be pointed at an emulator, so readers that run inside
`tf.data` use `tf.io.gfile` with the same paths; everything else uses this module.
"""
from __future__ import annotations

import base64
import functools
import logging
import os
import shutil
import tempfile
import threading
from typing import Iterator

GCS_PREFIX = "gs://"
PARTIAL_SUFFIX = ".partial"  # ends the temporary name of a local copy in progress (put_file)
log = logging.getLogger("hpa.storage")


def is_gcs(path: str) -> bool:
    return str(path).startswith(GCS_PREFIX)


def join(base: str, *parts: str) -> str:
    """`os.path.join` for local paths; `/`-join for `gs://` URLs."""
    if is_gcs(base):
        out = str(base).rstrip("/")
        for part in parts:
            out += "/" + str(part).strip("/")
        return out
    return os.path.join(str(base), *[str(p) for p in parts])


def split_gcs(url: str) -> tuple[str, str]:
    """`gs://bucket/a/b` -> `('bucket', 'a/b')`."""
    if not is_gcs(url):
        raise ValueError(f"not a gs:// URL: {url}")
    rest = url[len(GCS_PREFIX):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url}")
    return bucket, key


@functools.lru_cache(maxsize=4)
def _client(emulator: str | None):
    from google.cloud import storage as gcs

    if emulator:
        from google.auth.credentials import AnonymousCredentials

        project = os.environ.get("GOOGLE_CLOUD_PROJECT", "hpa-scc-local")
        return gcs.Client(project=project, credentials=AnonymousCredentials())
    return gcs.Client()


def client():
    """The `google.cloud.storage.Client`; anonymous when `STORAGE_EMULATOR_HOST` is set."""
    return _client(os.environ.get("STORAGE_EMULATOR_HOST"))


def _retry():
    from google.api_core import retry as api_retry
    from google.cloud.storage.retry import DEFAULT_RETRY

    del api_retry
    return DEFAULT_RETRY.with_deadline(300.0)


def _blob(url: str):
    bucket, key = split_gcs(url)
    return client().bucket(bucket).blob(key)


def exists(path: str) -> bool:
    if is_gcs(path):
        return _blob(path).exists(retry=_retry())
    return os.path.exists(path)


def read_bytes(path: str) -> bytes:
    """Whole file or object. Raises FileNotFoundError naming the path when it is absent."""
    if is_gcs(path):
        from google.api_core import exceptions

        try:
            return _blob(path).download_as_bytes(retry=_retry(), checksum="crc32c")
        except exceptions.NotFound as err:
            raise FileNotFoundError(f"{path}: no such object") from err
    with open(path, "rb") as fh:
        return fh.read()


def fingerprint(data: bytes) -> str:
    """A short identity of a file's bytes, `crc32:xxxxxxxx` (model weights, segmentation models)."""
    import zlib

    return f"crc32:{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def read_text(path: str, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


def makedirs(path: str) -> None:
    """Create a local folder (no-op on GCS, where folders are prefixes)."""
    if not is_gcs(path):
        os.makedirs(path, exist_ok=True)


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically: a reader sees the old content or the whole new one, never half.

    Local: a temporary file in the same folder, fsync, then `os.replace`.
    GCS: one upload; an object only appears when its upload completes.
    """
    if is_gcs(path):
        _upload(_blob(path), data=data)
        return
    _replace_local(path, lambda fh: fh.write(data), suffix=os.path.basename(path))


def _replace_local(path: str, fill, suffix: str) -> None:
    """Give local `path` new content atomically: `fill(fh)` writes a uniquely named temporary
    file in the same folder (`.tmp-*{suffix}`), fsync, `os.replace`, then fsync of the folder
    so that the new name survives a crash."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, process-wide, and writer threads would
# create files in that window with the wrong permissions.
_UMASK = _umask()


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _crc32c_b64(data: bytes | None = None, filename: str | None = None) -> str:
    import google_crc32c

    checksum = google_crc32c.Checksum()
    if data is not None:
        checksum.update(data)
    else:
        with open(filename, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode("ascii")


def _upload(blob, data: bytes | None = None, filename: str | None = None) -> None:
    """Upload with retries on transient errors, then check the stored CRC32C against ours."""
    expected = _crc32c_b64(data=data, filename=filename)
    if data is not None:
        blob.upload_from_string(data, retry=_retry(), checksum="crc32c")
    else:
        blob.upload_from_filename(filename, retry=_retry(), checksum="crc32c")
    blob.reload(retry=_retry())
    if blob.crc32c is None:
        _warn_unchecked(blob)
    elif blob.crc32c != expected:
        raise IOError(
            f"gs://{blob.bucket.name}/{blob.name}: integrity check failed "
            f"(stored crc32c {blob.crc32c}, local {expected})"
        )


_unchecked_warned = threading.Event()


def _warn_unchecked(blob) -> None:
    """The server stored the object but sent no CRC32C: say once per run that nothing was checked."""
    if not _unchecked_warned.is_set():
        _unchecked_warned.set()
        log.warning("gs://%s/%s: the storage server sent no CRC32C, so this upload (and any later "
                    "one without it in this run) was NOT checked for integrity",
                    blob.bucket.name, blob.name)


def put_file(local_path: str, dest: str) -> None:
    """Copy a finished local file to its final name, atomically (local) or by upload (GCS).

    Local: a uniquely named temporary file in the destination's folder (so two writers never
    share one), fsync, `os.replace`, then fsync of the folder, so the new name survives a crash.
    """
    if is_gcs(dest):
        _upload(_blob(dest), filename=local_path)
        return
    def copy(fh):
        with open(local_path, "rb") as src:
            shutil.copyfileobj(src, fh, 1 << 22)

    _replace_local(dest, copy, suffix="-" + os.path.basename(dest) + PARTIAL_SUFFIX)


def _fsync_dir(folder: str) -> None:
    """Make a rename in `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def listdir(prefix: str) -> list[str]:
    """Names (not full paths) directly under a folder or `gs://` prefix, sorted."""
    if is_gcs(prefix):
        bucket, key = split_gcs(prefix)
        key = key.rstrip("/") + "/" if key else ""
        names = set()
        for blob in client().list_blobs(bucket, prefix=key, retry=_retry()):
            rest = blob.name[len(key):]
            if rest:
                names.add(rest.split("/", 1)[0])
        return sorted(names)
    if not os.path.isdir(prefix):
        return []
    return sorted(os.listdir(prefix))


def iter_files(prefix: str) -> Iterator[str]:
    """Full paths of all files under a folder or `gs://` prefix (recursive)."""
    if is_gcs(prefix):
        bucket, key = split_gcs(prefix)
        key = key.rstrip("/") + "/" if key else ""
        for blob in client().list_blobs(bucket, prefix=key, retry=_retry()):
            yield f"{GCS_PREFIX}{bucket}/{blob.name}"
        return
    for root, _, files in os.walk(prefix):
        for name in sorted(files):
            yield os.path.join(root, name)


def delete(path: str) -> None:
    if is_gcs(path):
        from google.api_core import exceptions

        try:
            _blob(path).delete(retry=_retry())
        except exceptions.NotFound:
            pass
    elif os.path.exists(path):
        os.unlink(path)
