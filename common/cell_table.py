"""The per-cell results table (`predict --cells PATH`): the one module that writes and reads it,
and the compact form each image's cells take in predict's resume parts.

One row per segmented cell of every image that did not fail, images in the order of the ID
list (sample submission or label list), each image's cells in label-map id order. Columns:

    ID                 the image ID
    width, height      the image's size in px: the frame that `mask` is encoded for
    cell               the cell's id in the image's cell label map (1, 2, ...)
    y0, x0, y1, x1     the cell's bounding box, half-open, full-resolution px
    area               the cell's area in px
    touches_border     the cell touches the image border (the rule's --border-weight)
    has_nucleus        the cell holds a nucleus (else the rule's --no-nucleus-weight)
    c_00 .. c_18       per class (two digits = the class index, common.labels), the cell score c
    i_00 .. i_18       the image score i (the same on every cell of an image)
    s_00 .. s_18       the final score s, the one the submission ranks (infer_gpu.combine)
    mask               the cell's mask, the submission's string (common.masks) for height x width

The score letters are the combine rule's (`infer_gpu.combine`). A score is null (NaN once read)
where its kind is absent: `c` without cell-level runs (`--model`), `i` without image runs
(`--image-model`, a bag run's image head) unless `--image-from-cells`. The submission's
detections are exactly each row's classes with `s >= min_score`, best first, with its mask.

Formats, by the path's extension (`FORMATS`):
- `.parquet` (pyarrow, zstd): scores float32 with nulls, ids and box int32, flags bool. The
  provenance is JSON in the schema metadata under the key `hpa_cell_table` (`read(...).meta`).
- `.csv`: the same columns; scores in the shortest text that reads back to the same float32,
  empty for null; flags `true`/`false`. The provenance is the sidecar `PATH.meta.json`.

Provenance (`meta`): `{"format": "hpa-cell-table", "version": 1, ...}` with what the writer
passes: for predict the runs (`models`, `image_models`: path, weights fingerprint, tile spec),
the `segmentation` spec, the combine `rule` and `tta`, and the image counts (`images`,
`failed` IDs, which have no rows). Both files are written atomically (`common.storage`).
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from common import storage
from common.labels import NUM_CLASSES

FORMAT_NAME = "hpa-cell-table"
VERSION = 1
META_KEY = b"hpa_cell_table"  # Parquet schema metadata key of the provenance JSON
CSV_META_SUFFIX = ".meta.json"  # the CSV's provenance sidecar: PATH + this
FORMATS = {".parquet": "parquet", ".csv": "csv"}
SCORE_KINDS = ("c", "i", "s")  # cell, image, final (infer_gpu.combine's letters)
ROW_GROUP = 65536  # Parquet rows per row group (whole images; deterministic)


def score_columns(kind: str) -> list[str]:
    """`c` -> `['c_00', ..., 'c_18']`."""
    if kind not in SCORE_KINDS:
        raise ValueError(f"score kind {kind!r}, expected one of {SCORE_KINDS}")
    return [f"{kind}_{k:02d}" for k in range(NUM_CLASSES)]


INT_COLUMNS = ("width", "height", "cell", "y0", "x0", "y1", "x1", "area")
BOOL_COLUMNS = ("touches_border", "has_nucleus")
COLUMNS: tuple[str, ...] = ("ID", *INT_COLUMNS, *BOOL_COLUMNS,
                            *(c for kind in SCORE_KINDS for c in score_columns(kind)), "mask")


class CellTableError(ValueError):
    """A cell table (or a part's cells) that does not follow the format; names the file."""


def format_of(path: str) -> str:
    """`'parquet'` or `'csv'` from the path's extension; ValueError naming the path otherwise."""
    ext = os.path.splitext(str(path).rstrip("/"))[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"--cells {path}: unsupported extension {ext or '(none)'!r}; "
                         f"the cell table is written as {' or '.join(FORMATS)}")
    return FORMATS[ext]


@dataclass
class CellTable:
    """Rows as column arrays (K rows): see the module docstring for each column.

    `scores[kind]` is `Kx19 float32` for kind in `c`, `i`, `s` (NaN = null); `box` is `Kx4`
    `(y0, x0, y1, x1)`; `meta` the provenance (read back from the file)."""

    ids: list = field(default_factory=list)
    width: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    height: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    cell: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    box: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))
    area: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    touches_border: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    has_nucleus: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    scores: dict = field(default_factory=lambda: {k: np.zeros((0, NUM_CLASSES), np.float32) for k in SCORE_KINDS})
    masks: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def columns(self) -> dict[str, object]:
        """`{column name: array or list}` in COLUMNS order."""
        out: dict[str, object] = {"ID": list(self.ids), "width": self.width, "height": self.height,
                                  "cell": self.cell}
        for j, name in enumerate(("y0", "x0", "y1", "x1")):
            out[name] = self.box[:, j]
        out.update(area=self.area, touches_border=self.touches_border, has_nucleus=self.has_nucleus)
        for kind in SCORE_KINDS:
            for k, name in enumerate(score_columns(kind)):
                out[name] = self.scores[kind][:, k]
        out["mask"] = list(self.masks)
        return out

    def rows(self) -> list[dict]:
        """One dict per row, keyed by COLUMNS (scores as floats, NaN for null)."""
        cols = self.columns()
        return [{name: (values[r].item() if isinstance(values, np.ndarray) else values[r])
                 for name, values in cols.items()} for r in range(len(self))]

    @staticmethod
    def concat(tables: Sequence["CellTable"], meta: dict | None = None) -> "CellTable":
        tables = list(tables)
        if not tables:
            return CellTable(meta=dict(meta or {}))
        cat = np.concatenate
        return CellTable(
            ids=[i for t in tables for i in t.ids], width=cat([t.width for t in tables]),
            height=cat([t.height for t in tables]), cell=cat([t.cell for t in tables]),
            box=cat([t.box for t in tables]), area=cat([t.area for t in tables]),
            touches_border=cat([t.touches_border for t in tables]),
            has_nucleus=cat([t.has_nucleus for t in tables]),
            scores={k: cat([t.scores[k] for t in tables]) for k in SCORE_KINDS},
            masks=[m for t in tables for m in t.masks], meta=dict(meta or tables[0].meta))


# --- one image's cells, as stored in predict's parts (JSON) --------------------------------------
def _pack(values: np.ndarray | None) -> str | None:
    if values is None:
        return None
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


def _unpack(text: str | None, shape: tuple) -> np.ndarray:
    if text is None:
        return np.full(shape, np.nan, np.float32)
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(shape).astype(np.float32)


def part_entry(cell_ids, boxes, areas, touches_border, has_nucleus, masks,
               cell: np.ndarray | None, image: np.ndarray | None, final: np.ndarray | None) -> dict:
    """One image's cells as a compact JSON-ready dict (a part's `cells`): ints as lists, the
    scores as base64 little-endian float32 (exact; `c` and `s` Kx19, `i` the image's 19 once),
    None for an absent kind."""
    k = len(cell_ids)
    if k and final is None:
        raise ValueError("part_entry: cells without final scores")
    return {"cell": [int(c) for c in cell_ids],
            "box": [int(v) for v in np.asarray(boxes, dtype=np.int64).reshape(-1)],
            "area": [int(a) for a in areas],
            "border": "".join("1" if b else "0" for b in touches_border),
            "nucleus": "".join("1" if b else "0" for b in has_nucleus),
            "mask": [str(m) for m in masks],
            "c": _pack(cell) if k else None, "i": _pack(image) if k else None, "s": _pack(final) if k else None}


def from_part(image_id: str, width: int, height: int, entry: dict) -> CellTable:
    """The rows of one image from its part's `cells` (`part_entry`)."""
    try:
        k = len(entry["cell"])
        i = _unpack(entry["i"], (NUM_CLASSES,))
        return CellTable(
            ids=[image_id] * k, width=np.full(k, width, np.int32), height=np.full(k, height, np.int32),
            cell=np.asarray(entry["cell"], np.int32), box=np.asarray(entry["box"], np.int32).reshape(k, 4),
            area=np.asarray(entry["area"], np.int32),
            touches_border=np.array([ch == "1" for ch in entry["border"]], bool).reshape(k),
            has_nucleus=np.array([ch == "1" for ch in entry["nucleus"]], bool).reshape(k),
            scores={"c": _unpack(entry["c"], (k, NUM_CLASSES)), "i": np.repeat(i[None], k, axis=0),
                    "s": _unpack(entry["s"], (k, NUM_CLASSES))},
            masks=list(entry["mask"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CellTableError(f"image {image_id}: unreadable cells in its part ({type(err).__name__}: {err})") from err


# --- the file ---------------------------------------------------------------------------------
def _meta(meta: dict | None) -> dict:
    return {"format": FORMAT_NAME, "version": VERSION, **(meta or {})}


def _meta_json(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, default=str)


def write(path: str, tables: CellTable | Iterable[CellTable], meta: dict | None = None) -> int:
    """Write the table (one CellTable, or chunks of it in order, e.g. one per image) to `path`
    (local or `gs://`) in the format its extension names; atomically. Returns the row count."""
    kind = format_of(path)
    chunks = [tables] if isinstance(tables, CellTable) else tables
    meta = _meta(meta)
    if kind == "parquet":
        data, n = _parquet_bytes(chunks, meta)
        storage.write_bytes(path, data)
        return n
    text, n = _csv_text(chunks)
    storage.write_text(path + CSV_META_SUFFIX, json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    storage.write_text(path, text)
    return n


def _schema(meta: dict):
    import pyarrow as pa

    types = {"ID": pa.string(), "mask": pa.string(), **{c: pa.int32() for c in INT_COLUMNS},
             **{c: pa.bool_() for c in BOOL_COLUMNS}}
    return pa.schema([pa.field(c, types.get(c, pa.float32())) for c in COLUMNS],
                     metadata={META_KEY: _meta_json(meta).encode("utf-8")})


def _arrow(table: CellTable, schema):
    import pyarrow as pa

    arrays = []
    for name, values in table.columns().items():
        typ = schema.field(name).type
        if pa.types.is_floating(typ):
            values = np.asarray(values, np.float32)
            arrays.append(pa.array(values, type=typ, mask=np.isnan(values)))
        else:
            arrays.append(pa.array(values, type=typ))
    return pa.Table.from_arrays(arrays, schema=schema)


def _parquet_bytes(chunks: Iterable[CellTable], meta: dict) -> tuple[bytes, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema(meta)
    sink = pa.BufferOutputStream()
    n, pending, size = 0, [], 0
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        def flush():
            nonlocal pending, size
            if pending:
                writer.write_table(_arrow(CellTable.concat(pending), schema), row_group_size=max(size, 1))
            pending, size = [], 0

        for chunk in chunks:
            if not len(chunk):
                continue
            pending.append(chunk)
            size += len(chunk)
            n += len(chunk)
            if size >= ROW_GROUP:
                flush()
        flush()
    return sink.getvalue().to_pybytes(), n


def _float_text(v: float) -> str:
    return "" if np.isnan(v) else np.format_float_positional(np.float32(v), unique=True, trim="-")


def _csv_text(chunks: Iterable[CellTable]) -> tuple[str, int]:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    n = 0
    for chunk in chunks:
        cols = chunk.columns()
        for r in range(len(chunk)):
            row = []
            for name, values in cols.items():
                v = values[r]
                if name in BOOL_COLUMNS:
                    row.append("true" if v else "false")
                elif name in INT_COLUMNS:
                    row.append(str(int(v)))
                elif name in ("ID", "mask"):
                    row.append(v)
                else:
                    row.append(_float_text(v))
            writer.writerow(row)
        n += len(chunk)
    return buf.getvalue(), n


def read(path: str) -> CellTable:
    """Read a table that `write` wrote (local or `gs://`), with its provenance in `.meta`.
    Raises CellTableError naming the file when columns are missing or a value is bad."""
    kind = format_of(path)
    return _read_parquet(path) if kind == "parquet" else _read_csv(path)


def _check_columns(path: str, names: Sequence[str]) -> None:
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise CellTableError(f"{path}: not a cell table, missing column(s) {', '.join(missing)}")


def _from_columns(cols: dict, meta: dict) -> CellTable:
    k = len(cols["ID"])
    return CellTable(
        ids=list(cols["ID"]), width=np.asarray(cols["width"], np.int32), height=np.asarray(cols["height"], np.int32),
        cell=np.asarray(cols["cell"], np.int32),
        box=np.stack([np.asarray(cols[c], np.int32) for c in ("y0", "x0", "y1", "x1")], axis=1).reshape(k, 4),
        area=np.asarray(cols["area"], np.int32), touches_border=np.asarray(cols["touches_border"], bool),
        has_nucleus=np.asarray(cols["has_nucleus"], bool),
        scores={kind: np.stack([np.asarray(cols[c], np.float32) for c in score_columns(kind)], axis=1)
                .reshape(k, NUM_CLASSES) for kind in SCORE_KINDS},
        masks=list(cols["mask"]), meta=meta)


def _read_parquet(path: str) -> CellTable:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(storage.read_bytes(path)))
    except pa.ArrowInvalid as err:
        raise CellTableError(f"{path}: not a readable Parquet file ({err})") from err
    _check_columns(path, table.column_names)
    raw = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw.decode("utf-8")) if raw else {}
    cols = {}
    for name in COLUMNS:
        column = table.column(name)
        if name in ("ID", "mask"):
            cols[name] = column.to_pylist()
        elif name in INT_COLUMNS or name in BOOL_COLUMNS:
            cols[name] = column.to_numpy()
        else:
            cols[name] = column.to_numpy(zero_copy_only=False)  # nulls -> NaN
    return _from_columns(cols, meta)


def _read_csv(path: str) -> CellTable:
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(storage.read_text(path), newline=""))
    header = next(reader, None) or []
    _check_columns(path, header)
    index = {name: header.index(name) for name in COLUMNS}
    cols: dict[str, list] = {name: [] for name in COLUMNS}
    for r, fields in enumerate(reader, start=1):
        if not fields:
            continue
        try:
            for name, j in index.items():
                v = fields[j]
                if name in BOOL_COLUMNS:
                    if v not in ("true", "false"):
                        raise ValueError(f"{name} {v!r} is not true/false")
                    cols[name].append(v == "true")
                elif name in INT_COLUMNS:
                    cols[name].append(int(v))
                elif name in ("ID", "mask"):
                    cols[name].append(v)
                else:
                    cols[name].append(float(v) if v else np.nan)
        except (IndexError, ValueError) as err:
            raise CellTableError(f"{path} row {r}: {err}") from err
    meta_path = path + CSV_META_SUFFIX
    meta = json.loads(storage.read_text(meta_path)) if storage.exists(meta_path) else {}
    return _from_columns(cols, meta)
