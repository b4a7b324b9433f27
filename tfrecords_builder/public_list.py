"""The public HPA image list: read it, and choose the images to download as the hosts did.

Two layouts are read (local file or `gs://`):

- **the hosts' list** (`kaggle_2021.tsv`, comma-separated despite its name): columns `Image`
  (a URL base, `https://images.proteinatlas.org/10005/921_B9_1`), `Label` (location names,
  comma-separated), `Label_idx` (the competition's class indices; empty when none of the
  image's locations is a competition class), `Cellline`, `in_trainset` (True/False). The image
  ID is the last two parts of `Image` joined by `_`: `10005_921_B9_1` (antibody, plate, well,
  field).
- **a plain list**: `ID,Label,Image` (Label as `8|5|0`, or location names), `Cellline` optional.

The selection follows the hosts' download notebook, one filter at a time, each one a switch of
`DownloadConfig`: images already in the competition's train set are dropped (`in_trainset`),
so are images with no competition class, and images of cell lines the competition did not use
(its 17 lines). Every dropped row is counted under its first reason.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from urllib.parse import urlsplit

from common import labels as labellib
from common import storage

# The competition's 17 cell lines (the hosts' notebook keeps public images of these only).
COMPETITION_CELLLINES: tuple[str, ...] = (
    "A-431", "A549", "EFO-21", "HAP1", "HEK 293", "HUVEC TERT2", "HaCaT", "HeLa", "PC-3", "RH-30",
    "RPTEC TERT1", "SH-SY5Y", "SK-MEL-30", "SiHa", "U-2 OS", "U-251 MG", "hTCEpi",
)
ALL = "all"  # --cellline all: no cell-line filter
COMPETITION = "competition"  # --cellline competition: the 17 lines above

# Reasons a row is dropped, in the order they are tested (the report counts each).
BAD_ROW, DUPLICATE, IN_TRAINSET, NO_LABEL, CELLLINE, LIMIT = (
    "bad_row", "duplicate", "in_trainset", "no_label", "cellline", "limit")
REASONS = (BAD_ROW, DUPLICATE, IN_TRAINSET, NO_LABEL, CELLLINE, LIMIT)


class ListError(ValueError):
    """A list that cannot be read at all (missing columns, not a CSV); names the file."""


@dataclass(frozen=True)
class Item:
    """One image to fetch: its ID, its URL base (`..._{color}.jpg` is appended), its classes."""

    image_id: str
    url: str
    labels: tuple[int, ...]
    cellline: str
    origin: str  # "LIST row 12"


@dataclass
class Selection:
    items: list[Item]
    rows: int
    layout: str  # "hosts" or "plain"
    dropped: dict[str, int]  # reason -> rows
    bad_rows: list[dict]  # {"origin", "reason"} for BAD_ROW and DUPLICATE, in file order
    filters: dict  # what was applied, for the report

    def summary(self) -> str:
        parts = [f"{n} {reason}" for reason, n in self.dropped.items() if n]
        return (f"{self.rows} rows ({self.layout} layout): {len(self.items)} images selected"
                + (f", dropped {', '.join(parts)}" if parts else ""))


def image_id_from_url(url: str) -> str:
    """`https://images.proteinatlas.org/10005/921_B9_1` -> `10005_921_B9_1` (the hosts' rule)."""
    path = urlsplit(url).path.strip("/").split("/")
    if len(path) < 2 or not path[-1] or not path[-2]:
        raise ValueError(f"Image URL {url!r} has no '<antibody>/<plate>_<well>_<field>' path")
    return f"{path[-2]}_{path[-1]}"


def rebase(url: str, base_url: str) -> str:
    """Replace the scheme and host of `url` with `base_url`'s (which may add a path prefix)."""
    if not base_url:
        return url
    return base_url.rstrip("/") + "/" + urlsplit(url).path.lstrip("/")


def _parse_idx(text: str, where: str) -> list[int]:
    """`Label_idx` as written by the hosts ('0|16', '0,16', '0 16' or empty) -> class indices."""
    text = (text or "").strip()
    if not text or text.lower() == "nan":
        return []
    for sep in (",", " ", ";"):
        text = text.replace(sep, "|")
    parts = [p for p in text.split("|") if p]
    out: list[int] = []
    for p in parts:
        try:
            value = int(float(p))  # pandas wrote some lists as '0.0'
        except ValueError:
            raise labellib.LabelError(f"{where}: Label_idx {text!r}: {p!r} is not a class index") from None
        if not 0 <= value < labellib.NUM_CLASSES:
            raise labellib.LabelError(f"{where}: Label_idx {value} outside 0-{labellib.NUM_CLASSES - 1}")
        if value not in out:
            out.append(value)
    return out


def _plain_labels(text: str, where: str) -> list[int]:
    """A plain list's Label: `8|5|0` indices, or location names."""
    text = (text or "").strip()
    if not text:
        return []
    if all(p.strip().isdigit() for p in text.split("|")):
        return labellib.parse_labels(text, where=where)
    classes, _ = labellib.labels_from_names(text)
    return classes


def _truthy(text: str) -> bool:
    return str(text).strip().lower() in ("true", "1", "yes", "t")


def read_rows(path: str) -> tuple[str, list[dict]]:
    """(`layout`, rows) of a list; each row has `_row` (1 = first data row)."""
    try:
        text = storage.read_text(path)
    except UnicodeDecodeError as err:
        raise ListError(f"{path}: not a text file ({err})") from None
    sample = text[:4096]
    delimiter = "\t" if sample.count("\t") > sample.count(",") else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    names = reader.fieldnames or []
    if "Image" not in names:
        raise ListError(f"{path}: expected the hosts' columns (Image, Label, Label_idx, Cellline, "
                        f"in_trainset) or ID,Label,Image; got {names}")
    layout = "plain" if "ID" in names else "hosts"
    if "Label" not in names and "Label_idx" not in names:
        raise ListError(f"{path}: no Label or Label_idx column (columns: {names})")
    rows = []
    for i, row in enumerate(reader, start=1):
        if None in row:  # more cells than the header: a broken row
            row = {k: v for k, v in row.items() if k is not None} | {"_extra": True}
        row = {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
        row["_row"] = i
        rows.append(row)
    return layout, rows


def select(path: str, *, base_url: str = "", include_trainset: bool = False,
           keep_unlabelled: bool = False, celllines: tuple[str, ...] = (COMPETITION,),
           limit: int = 0) -> Selection:
    """The images of list `path` to download, with every dropped row counted by reason."""
    from common.images import ImageLoadError, check_image_id

    layout, rows = read_rows(path)
    lines = None if ALL in celllines else {c.strip().lower() for c in celllines if c != COMPETITION}
    if lines is not None and COMPETITION in celllines:
        lines |= {c.lower() for c in COMPETITION_CELLLINES}
    has_trainset = bool(rows) and "in_trainset" in rows[0]
    has_cellline = bool(rows) and "Cellline" in rows[0]
    dropped = {r: 0 for r in REASONS}
    bad: list[dict] = []
    items: list[Item] = []
    seen: dict[str, str] = {}
    for row in rows:
        origin = f"{path} row {row['_row']}"

        def reject(reason: str, why: str) -> None:
            dropped[reason] += 1
            bad.append({"origin": origin, "id": image_id, "reason": why})

        image_id = row.get("ID") or ""
        url = row.get("Image") or ""
        if row.get("_extra"):
            reject(BAD_ROW, "more cells than the header has columns")
            continue
        if not url:
            reject(BAD_ROW, "empty Image URL")
            continue
        try:
            if layout == "hosts":
                image_id = image_id_from_url(url)
            check_image_id(image_id)
            if layout == "hosts" and "Label_idx" in row:
                labels = _parse_idx(row.get("Label_idx"), origin)
            elif layout == "hosts":
                labels = labellib.labels_from_names(row.get("Label"))[0]
            else:
                labels = _plain_labels(row.get("Label"), origin)
            if not urlsplit(url).scheme:
                raise ValueError(f"Image {url!r} is not a URL (no http:// or https://)")
        except (ValueError, ImageLoadError) as err:  # LabelError is a ValueError
            reject(BAD_ROW, str(err))
            continue
        if image_id in seen:
            reject(DUPLICATE, f"duplicate ID {image_id} (first at {seen[image_id]})")
            continue
        seen[image_id] = origin
        if has_trainset and not include_trainset and _truthy(row.get("in_trainset", "")):
            dropped[IN_TRAINSET] += 1
            continue
        if not labels and not keep_unlabelled:
            dropped[NO_LABEL] += 1
            continue
        cellline = row.get("Cellline") or ""
        if lines is not None and has_cellline and cellline.lower() not in lines:
            dropped[CELLLINE] += 1
            continue
        if limit and len(items) >= limit:
            dropped[LIMIT] += 1
            continue
        items.append(Item(image_id, rebase(url, base_url), tuple(labels), cellline, origin))
    filters = {
        "in_trainset": "kept" if include_trainset else ("dropped" if has_trainset else "no column"),
        "unlabelled": "kept" if keep_unlabelled else "dropped",
        "celllines": "all" if lines is None else (sorted(lines) if has_cellline else "no column"),
        "limit": limit,
    }
    return Selection(items, len(rows), layout, dropped, bad, filters)
