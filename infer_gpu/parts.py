"""The resume sidecar of `predict`: one small JSON file per finished image, written atomically.

`OUT.parts/` (beside `OUT`, local or `gs://`) holds `settings.json` (what decides the results:
models, combine rule, TTA, segmentation) and `{ID}.json` per image with its row, or its error.
A part is a success, or a failure (`"failed": true`, an empty row: bad data, a transient I/O
error that outlasted the retries). A kill leaves at most a `.tmp-*` file behind, which is
ignored; `--resume` skips every image with a successful part, tries the failed ones again, and
refuses parts made with other settings. The final CSV is assembled from the
parts in the sample submission's order, so a resumed run writes the same file as an
uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import re

from common import storage
from common.resume import ResumeError, check_same_settings


SETTINGS_FILE = "settings.json"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,150}$")


def part_failed(record: dict) -> bool:
    """True for the part of an image that failed (to be tried again on `--resume`). Parts
    written before the flag existed count as failed when they carry an error and no row."""
    if "failed" in record:
        return bool(record["failed"])
    return bool(record.get("error")) and not record.get("prediction")


def part_name(image_id: str) -> str:
    """File name of an image's part: the ID itself when it is a plain name, else a hash."""
    if _SAFE_ID.match(image_id) and f"{image_id}.json" != SETTINGS_FILE:
        return f"{image_id}.json"
    return "h-" + hashlib.sha1(image_id.encode("utf-8")).hexdigest() + ".json"


class PartStore:
    """Per-image results of one `predict` output, in `{out}.parts/`."""

    def __init__(self, out_path: str):
        self.out_path = str(out_path)
        self.dir = self.out_path.rstrip("/") + ".parts"

    def _path(self, name: str) -> str:
        return storage.join(self.dir, name)

    def _part_files(self) -> list[str]:
        # `.tmp-*` are writes a kill interrupted: never a finished part.
        return [n for n in storage.listdir(self.dir)
                if n.endswith(".json") and n != SETTINGS_FILE and not n.startswith(".tmp-")]

    def finished_names(self) -> set[str]:
        """File names of the finished parts (`part_name(ID)`), listed, not read."""
        return set(self._part_files())

    def start(self, settings: dict, resume: bool) -> dict[str, dict]:
        """Prepare the folder; return the finished parts `{image_id: record}` (empty unless resume).

        Without `resume`, old parts are deleted. With it, parts made under other settings
        raise ResumeError naming what changed.
        """
        settings = json.loads(json.dumps(settings))
        settings_path = self._path(SETTINGS_FILE)
        if resume and storage.exists(settings_path):
            check_same_settings(json.loads(storage.read_text(settings_path)), settings, where=self.dir,
                                what="these parts were made with other settings",
                                advice="rerun with the same options, or without --resume")
            return self.read_all()
        self.clear()
        storage.makedirs(self.dir)
        storage.write_text(settings_path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
        return {}

    def put(self, record: dict) -> None:
        """Store one image's record (`id`, `width`, `height`, `prediction`, `error`, `failed`) atomically."""
        storage.write_text(self._path(part_name(record["id"])), json.dumps(record, sort_keys=True))

    def read_all(self) -> dict[str, dict]:
        out = {}
        for name in self._part_files():
            path = self._path(name)
            try:
                record = json.loads(storage.read_text(path))
                out[record["id"]] = record
            except (ValueError, KeyError, TypeError) as err:
                raise ResumeError(f"{path}: unreadable part ({err}); delete it to redo that image") from err
        return out

    def clear(self) -> None:
        """Delete the parts and the settings (the folder itself stays when local)."""
        for name in storage.listdir(self.dir):
            storage.delete(self._path(name))

    def remove(self) -> None:
        """Delete the whole sidecar (after the final CSV is written)."""
        import os

        self.clear()
        if not storage.is_gcs(self.dir) and os.path.isdir(self.dir):
            os.rmdir(self.dir)
