"""The submission file format, the one place it is spelled: read, write, validate.

`ID,ImageWidth,ImageHeight,PredictionString`, one row per test image. PredictionString is
space-separated triples `label confidence mask`: label 0-18 (common.labels), confidence in
[0, 1] (written with 6 decimals), mask the competition string of common.masks for an
ImageHeight x ImageWidth frame. A cell with several labels repeats its mask once per label.
The cell-level truth files (synthetic `truth.csv`) use the same format; their confidence is
ignored. Row numbers in messages count data rows from 1 (the header is row 0).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence, Union

from common import masks, storage
from common.labels import NUM_CLASSES

HEADER = ("ID", "ImageWidth", "ImageHeight", "PredictionString")
CONFIDENCE_DECIMALS = 6


class SubmissionError(ValueError):
    """A submission, truth or sample-submission file that does not follow the format."""


@dataclass(frozen=True)
class Prediction:
    """One triple: a class index, its confidence in [0, 1] and the cell's mask string."""

    label: int
    confidence: float
    mask: str


@dataclass
class ImageRow:
    """One image: its ID, size in pixels and predictions (`row`: 1 = first data row, 0 = not from a file)."""

    image_id: str
    width: int
    height: int
    predictions: list[Prediction] = field(default_factory=list)
    row: int = 0


@dataclass(frozen=True)
class SampleRow:
    """One row of a sample submission: the image ID and its size in pixels."""

    image_id: str
    width: int
    height: int
    row: int = 0


TripleLike = Union[Prediction, Sequence]


# ------------------------------------------------------------------------------------ writing
def format_confidence(confidence: float) -> str:
    """0.6378329 -> '0.637833' (6 decimals, as in the competition's sample row)."""
    return f"{float(confidence):.{CONFIDENCE_DECIMALS}f}"


def _as_prediction(item: TripleLike) -> Prediction:
    if isinstance(item, Prediction):
        return item
    label, confidence, mask = item
    return Prediction(int(label), float(confidence), str(mask))


def format_prediction_string(triples: Iterable[TripleLike]) -> str:
    """`[(label, confidence, mask), ...]` -> `'label confidence mask label confidence mask ...'`.

    Raises ValueError for a label outside 0-18, a confidence outside [0, 1] (or NaN), or a
    mask that is empty or contains whitespace: the writer never produces an invalid row.
    """
    parts = []
    for i, item in enumerate(triples):
        p = _as_prediction(item)
        if not 0 <= p.label < NUM_CLASSES:
            raise ValueError(f"prediction {i}: label {p.label} outside 0-{NUM_CLASSES - 1}")
        if not (math.isfinite(p.confidence) and 0.0 <= p.confidence <= 1.0):
            raise ValueError(f"prediction {i}: confidence {p.confidence} outside [0, 1]")
        if not p.mask or any(ch.isspace() for ch in p.mask):
            raise ValueError(f"prediction {i}: mask string is empty or contains whitespace")
        parts.append(f"{p.label} {format_confidence(p.confidence)} {p.mask}")
    return " ".join(parts)


def _row_fields(row) -> tuple[str, int, int, str]:
    if isinstance(row, ImageRow):
        image_id, width, height, preds = row.image_id, row.width, row.height, row.predictions
    else:
        image_id, width, height, preds = row
    text = preds if isinstance(preds, str) else format_prediction_string(preds)
    return str(image_id), int(width), int(height), text


def format_submission(rows: Iterable) -> str:
    """The whole CSV text for rows of `ImageRow` or `(id, width, height, triples_or_string)`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    for row in rows:
        writer.writerow(_row_fields(row))
    return buf.getvalue()


def write_submission(path: str, rows: Iterable) -> None:
    """Write a submission (or truth) CSV atomically, local or `gs://` (common.storage)."""
    storage.write_text(path, format_submission(rows))


# ------------------------------------------------------------------------------------ reading
def _parse_triples(text: str, where: str, problems: list[str], numbers: list[int] | None = None) -> list[Prediction]:
    """Parse a PredictionString; every problem is appended to `problems` (well-formed ones kept;
    their 1-based positions in the string go to `numbers` when given)."""
    tokens = (text or "").split()
    if len(tokens) % 3:
        problems.append(
            f"{where}: PredictionString has {len(tokens)} fields, not a multiple of 3 "
            "(label confidence mask triples)"
        )
        return []
    out = []
    for k in range(0, len(tokens), 3):
        label_s, conf_s, mask = tokens[k:k + 3]
        what = f"{where} prediction {k // 3 + 1}"
        ok = True
        try:
            label = int(label_s)
        except ValueError:
            problems.append(f"{what}: label {label_s!r} is not an integer")
            ok = False
        else:
            if not 0 <= label < NUM_CLASSES:
                problems.append(f"{what}: label {label} outside 0-{NUM_CLASSES - 1}")
                ok = False
        try:
            confidence = float(conf_s)
        except ValueError:
            problems.append(f"{what}: confidence {conf_s!r} is not a number")
            ok = False
        else:
            if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0):
                problems.append(f"{what}: confidence {conf_s} outside [0, 1]")
                ok = False
        if ok:
            out.append(Prediction(label, confidence, mask))
            if numbers is not None:
                numbers.append(k // 3 + 1)
    return out


def parse_prediction_string(text: str, where: str = "PredictionString") -> list[Prediction]:
    """`'0 0.637833 eNq...'` -> `[Prediction(0, 0.637833, 'eNq...')]`; SubmissionError naming `where`."""
    problems: list[str] = []
    out = _parse_triples(text, where, problems)
    if problems:
        raise SubmissionError("; ".join(problems))
    return out


def _parse_size(value: str, name: str, where: str, problems: list[str]) -> int | None:
    try:
        size = int(str(value).strip())
    except ValueError:
        problems.append(f"{where}: {name} {value!r} is not an integer")
        return None
    if size <= 0:
        problems.append(f"{where}: {name} {size} is not positive")
        return None
    return size


def _scan(path: str, exact: bool = True) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header problems and the non-blank data rows `(row_number, fields)` of a CSV.

    exact: the header must be `HEADER`; otherwise only its first three names are checked (a
    sample submission's placeholder PredictionString column may be there or not).
    """
    # One image's PredictionString (tens of cells x several labels x a mask each) passes the csv
    # module's default 128 KiB field limit; Kaggle's own reader has none.
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(storage.read_text(path), newline=""))
    header = next(reader, None)
    if header is None:
        return [f"{path}: empty file, expected the header {','.join(HEADER)}"], []
    names = tuple(h.strip() for h in header)
    names = (names[0].lstrip("\ufeff"),) + names[1:] if names else names
    wanted = HEADER if exact else HEADER[:3]
    problems = []
    if (names if exact else names[:3]) != wanted:
        problems.append(f"{path}: header is {','.join(header)!r}, expected {','.join(wanted)!r}")
    return problems, [(i, fields) for i, fields in enumerate(reader, start=1) if fields]


def _read_rows(path: str) -> tuple[list[str], list[tuple[ImageRow | None, list[str], list[int]]]]:
    """Header problems, then each data row parsed: (row, its problems, the 1-based position of
    each kept prediction in its PredictionString), in file order.

    A row whose fields cannot be read (wrong count, empty ID) comes back as `None`.
    """
    header_problems, raw = _scan(path)
    out: list[tuple[ImageRow | None, list[str], list[int]]] = []
    for i, fields in raw:
        problems: list[str] = []
        where = f"{path} row {i}"
        if len(fields) != len(HEADER):
            problems.append(f"{where}: {len(fields)} fields, expected {len(HEADER)} ({','.join(HEADER)})")
            out.append((None, problems, []))
            continue
        image_id = fields[0].strip()
        if not image_id:
            problems.append(f"{where}: empty ID")
            out.append((None, problems, []))
            continue
        where = f"{where} (ID {image_id})"
        width = _parse_size(fields[1], "ImageWidth", where, problems)
        height = _parse_size(fields[2], "ImageHeight", where, problems)
        numbers: list[int] = []
        preds = _parse_triples(fields[3], where, problems, numbers)
        out.append((ImageRow(image_id, width or 0, height or 0, preds, row=i), problems, numbers))
    return header_problems, out


def read_submission(path: str) -> list[ImageRow]:
    """Read a submission or truth CSV (local or `gs://`) into `ImageRow`s, in file order.

    Checks the format only (not mask contents; see `validate` for that). Raises
    SubmissionError listing every problem with its row number.
    """
    problems, parsed = _read_rows(path)
    rows = []
    seen: dict[str, int] = {}
    for r, row_problems, _ in parsed:
        problems.extend(row_problems)
        if r is None:
            continue
        if r.image_id in seen:
            problems.append(f"{path} row {r.row}: ID {r.image_id} appears again (first at row {seen[r.image_id]})")
        else:
            seen[r.image_id] = r.row
        rows.append(r)
    if problems:
        raise SubmissionError(_summarise(problems))
    return rows


def read_sample_submission(path: str) -> list[SampleRow]:
    """Read a sample submission: `[SampleRow(id, width, height, row), ...]` in file order.

    Its PredictionString column (placeholder masks) is ignored. Raises SubmissionError listing
    every bad row.
    """
    header_problems, raw = _scan(path, exact=False)
    problems = list(header_problems)
    out = []
    seen: dict[str, int] = {}
    for i, fields in raw:
        where = f"{path} row {i}"
        if len(fields) < 3:
            problems.append(f"{where}: {len(fields)} fields, expected at least ID,ImageWidth,ImageHeight")
            continue
        image_id = fields[0].strip()
        if not image_id:
            problems.append(f"{where}: empty ID")
            continue
        if image_id in seen:
            problems.append(f"{where}: ID {image_id} appears again (first at row {seen[image_id]})")
            continue
        seen[image_id] = i
        width = _parse_size(fields[1], "ImageWidth", f"{where} (ID {image_id})", problems)
        height = _parse_size(fields[2], "ImageHeight", f"{where} (ID {image_id})", problems)
        if width and height:
            out.append(SampleRow(image_id, width, height, row=i))
    if problems:
        raise SubmissionError(_summarise(problems))
    return out


def _summarise(problems: list[str], limit: int = 20) -> str:
    head = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} problem(s):\n  {head}{more}"


# --------------------------------------------------------------------------------- validating
def validate(submission_path: str, sample_path: str) -> list[str]:
    """Every problem of a submission against its sample submission; `[]` means valid.

    Checks: the header; each row's fields; every sample ID exactly once with the sample's
    ImageWidth and ImageHeight; no ID absent from the sample; well-formed triples; labels
    0-18; confidences in [0, 1]; masks that decode to the row's size and are not empty.
    Each message names the file and the row (1 = first data row) or the sample row.
    """
    sample = read_sample_submission(sample_path)
    expected = {s.image_id: s for s in sample}
    problems, parsed = _read_rows(submission_path)
    seen: dict[str, int] = {}
    for r, row_problems, numbers in parsed:
        problems.extend(row_problems)
        if r is None:
            continue
        where = f"{submission_path} row {r.row} (ID {r.image_id})"
        if r.image_id in seen:
            problems.append(f"{where}: ID appears again (first at row {seen[r.image_id]})")
            continue
        seen[r.image_id] = r.row
        ref = expected.get(r.image_id)
        if ref is None:
            problems.append(f"{where}: ID is not in the sample submission {sample_path}")
        else:
            if r.width and r.width != ref.width:
                problems.append(f"{where}: ImageWidth {r.width}, the sample says {ref.width}")
            if r.height and r.height != ref.height:
                problems.append(f"{where}: ImageHeight {r.height}, the sample says {ref.height}")
        if not (r.width and r.height):
            continue  # size already reported; masks cannot be checked against it
        checked: dict[str, str | None] = {}  # multi-label cells repeat their mask string
        for k, p in zip(numbers, r.predictions):
            if p.mask not in checked:
                checked[p.mask] = _mask_problem(p.mask, r.height, r.width)
            if checked[p.mask]:
                problems.append(f"{where} prediction {k} (label {p.label}): {checked[p.mask]}")
    for s in sample:
        if s.image_id not in seen:
            problems.append(
                f"{submission_path}: ID {s.image_id} (sample row {s.row}) is missing from the submission"
            )
    return problems


def _mask_problem(mask: str, height: int, width: int) -> str | None:
    try:
        if masks.area(mask, height, width) == 0:
            return "mask is empty (no pixel set)"
    except masks.MaskCodecError as err:
        return f"mask does not decode to the {width}x{height} (WxH) image: {err}"
    return None
