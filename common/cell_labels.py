"""Cell labels (`cell_labels.csv`): soft targets per cell, the one module that writes and reads them.

Made by `python -m infer_gpu pseudo-label` from predict's per-cell table and the image labels;
read by the builder (`python -m tfrecords_builder ... --cell-labels PATH`), which puts each
cell's targets into its record (`common.features`), so the trainer learns from them instead
of the image's labels.

The file is one CSV, local or `gs://`, written atomically:

    # hpa-scc cell labels v1 {"segmentation": {...}, "rule": {...}, "source": {...}}
    ID,cell,t_00,t_01,...,t_18
    5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0,1,0.83,0,...,0

- line 1: `#`, the format name and version, then the provenance as one JSON object: the
  `segmentation` spec the cells were cut with (`common.segmentation.SegmentationSpec`; a build
  with another one refuses the table, naming the difference), the `rule` that made the targets
  and its parameters, and the `source` (the cell table and label list, with fingerprints);
- then a header and one row per cell: the image `ID`, `cell` (the cell's id in the image's
  label map), and per class `t_00` .. `t_18` (two digits = the class index) the soft target in
  [0, 1], written with 6 significant digits.

Other readers skip the first line (pandas: `pd.read_csv(path, comment="#")`).
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from common import storage
from common.labels import NUM_CLASSES

FORMAT = "hpa-scc cell labels"
VERSION = 1
TARGET_COLUMNS: tuple[str, ...] = tuple(f"t_{k:02d}" for k in range(NUM_CLASSES))
COLUMNS: tuple[str, ...] = ("ID", "cell", *TARGET_COLUMNS)


class CellLabelsError(ValueError):
    """A cell-labels file that does not follow the format; the message names the file and row."""


@dataclass
class CellLabels:
    """A read table: `targets[(ID, cell)]` is a `(19,) float32` in [0, 1]."""

    targets: dict[tuple[str, int], np.ndarray]
    meta: dict
    fingerprint: str  # common.storage.fingerprint of the file's bytes
    path: str = ""
    images: dict[str, list[int]] = field(default_factory=dict)  # ID -> its cells, file order

    def segmentation(self):
        """The SegmentationSpec the table's cells were cut with (None when it does not say)."""
        from common.segmentation import SegmentationSpec

        spec = self.meta.get("segmentation")
        return None if spec is None else SegmentationSpec.from_dict(spec)


def _number(v: float) -> str:
    text = format(float(v), ".6g")
    return "0" if text in ("0", "-0") else text


def to_text(rows: Iterable[tuple[str, int, np.ndarray]], meta: Mapping) -> str:
    """The file's text: rows are `(ID, cell, (19,) targets)`; `meta` the provenance (JSON)."""
    out = io.StringIO()
    out.write(f"# {FORMAT} v{VERSION} {json.dumps(dict(meta), sort_keys=True, separators=(',', ':'))}\n")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for image_id, cell, targets in rows:
        t = np.asarray(targets, dtype=np.float64).reshape(-1)
        if t.shape != (NUM_CLASSES,):
            raise ValueError(f"{image_id} cell {cell}: {t.size} targets, expected {NUM_CLASSES}")
        if not np.all(np.isfinite(t)) or t.min() < 0 or t.max() > 1:
            raise ValueError(f"{image_id} cell {cell}: targets outside [0, 1] or not finite: {t.tolist()}")
        writer.writerow([image_id, int(cell), *(_number(v) for v in t)])
    return out.getvalue()


def write(path: str, rows: Iterable[tuple[str, int, np.ndarray]], meta: Mapping) -> str:
    """Write the table atomically (a reader never sees half of it); returns its fingerprint."""
    data = to_text(rows, meta).encode("utf-8")
    storage.write_bytes(path, data)
    return storage.fingerprint(data)


def read(path: str) -> CellLabels:
    """Read and check a table. Raises CellLabelsError naming the file (and row) for: a missing
    or foreign first line, a header other than COLUMNS, a row with too few or too many cells
    (a truncated file), a cell id that is not a positive integer, a target that is not a
    number in [0, 1] (NaN included), the same (ID, cell) twice."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise CellLabelsError(f"{path}: no such file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CellLabelsError(f"{path}: not a text file ({err})") from None
    first, _, rest = text.partition("\n")
    prefix = f"# {FORMAT} v"
    if not first.startswith(prefix):
        raise CellLabelsError(f"{path}: not a cell-labels file (its first line should start with "
                              f"{prefix!r}; made by python -m infer_gpu pseudo-label)")
    version, _, meta_text = first[len(prefix):].partition(" ")
    if version != str(VERSION):
        raise CellLabelsError(f"{path}: cell-labels version {version!r}; this toolkit reads {VERSION}")
    try:
        meta = json.loads(meta_text)
    except ValueError as err:
        raise CellLabelsError(f"{path}: line 1: unreadable provenance JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CellLabelsError(f"{path}: line 1: the provenance is not a JSON object")
    reader = csv.reader(io.StringIO(rest))
    header = next(reader, None)
    if header is None or tuple(header) != COLUMNS:
        raise CellLabelsError(f"{path}: line 2: expected the header ID,cell,t_00..t_18, got {header}")
    if rest and not rest.endswith("\n"):
        raise CellLabelsError(f"{path}: the last line has no line end: the file is truncated")
    targets: dict[tuple[str, int], np.ndarray] = {}
    images: dict[str, list[int]] = {}
    for line, row in enumerate(reader, start=3):
        where = f"{path} line {line}"
        if not row:
            continue
        if len(row) != len(COLUMNS):
            raise CellLabelsError(f"{where}: {len(row)} fields, expected {len(COLUMNS)} (a truncated "
                                  "or hand-edited file)")
        image_id, cell_text = row[0], row[1]
        if not image_id:
            raise CellLabelsError(f"{where}: empty ID")
        if not cell_text.isdigit() or int(cell_text) < 1:
            raise CellLabelsError(f"{where}: cell {cell_text!r} is not a label-map id (an integer >= 1)")
        try:
            t = np.array([float(v) for v in row[2:]], dtype=np.float64)
        except ValueError:
            raise CellLabelsError(f"{where}: a target is not a number: {row[2:]}") from None
        bad = [TARGET_COLUMNS[k] for k, v in enumerate(t) if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
        if bad:
            raise CellLabelsError(f"{where}: {', '.join(bad)} outside [0, 1] or NaN")
        key = (image_id, int(cell_text))
        if key in targets:
            raise CellLabelsError(f"{where}: {image_id} cell {cell_text} appears twice")
        targets[key] = t.astype(np.float32)
        images.setdefault(image_id, []).append(int(cell_text))
    return CellLabels(targets, meta, storage.fingerprint(data), path, images)


def check_segmentation(table: CellLabels, spec, where: str) -> None:
    """Refuse a table whose cells were cut with another segmentation than `spec` (a
    `SegmentationSpec`), naming each difference; also one that does not say how."""
    mine = table.segmentation()
    if mine is None:
        raise CellLabelsError(f"{table.path}: the table does not say how its cells were segmented, "
                              f"so it cannot be checked against {where}")
    diff = mine.describe_difference(spec, mine="cell labels", theirs=where)
    if diff:
        raise CellLabelsError(f"{table.path}: made with another segmentation than {where}: "
                              + "; ".join(diff))
