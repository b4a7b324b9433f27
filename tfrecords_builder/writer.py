"""Shard files: written locally under a temporary name, then moved or uploaded whole."""
from __future__ import annotations

import base64
import os

from common import storage
from tfrecords_builder import records


class ShardWriter:
    """Appends framed records to a local temporary file; `publish` puts it under its final name.

    The final name (local folder or gs://) only ever holds a complete shard:
    `common.storage.put_file` moves it atomically or uploads it with a CRC32C check.
    """

    def __init__(self, tmp_path: str):
        import google_crc32c

        self.tmp_path = tmp_path
        os.makedirs(os.path.dirname(os.path.abspath(tmp_path)), exist_ok=True)
        self._fh = open(tmp_path, "wb")
        self._crc = google_crc32c.Checksum()
        self.examples = 0
        self.nbytes = 0

    def write(self, record: bytes) -> None:
        data = records.frame(record)
        self._fh.write(data)
        self._crc.update(data)
        self.examples += 1
        self.nbytes += len(data)

    @property
    def crc32c(self) -> str:
        """Base64 CRC32C of the whole file (the form GCS reports)."""
        return base64.b64encode(self._crc.digest()).decode("ascii")

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def publish(self, dest: str) -> None:
        """Close, then move/upload to `dest` and remove the temporary file."""
        self.close()
        storage.put_file(self.tmp_path, dest)
        if os.path.exists(self.tmp_path):
            os.unlink(self.tmp_path)

    def discard(self) -> None:
        self.close()
        if os.path.exists(self.tmp_path):
            os.unlink(self.tmp_path)
