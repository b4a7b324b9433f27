"""The 19 HPA single-cell classes and the `8|5|0` label format (the one table)."""
from __future__ import annotations

import csv
from typing import Iterable, Sequence

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Intermediate filaments",
    "Actin filaments",
    "Microtubules",
    "Mitotic spindle",
    "Centrosome",
    "Plasma membrane",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Vesicles and punctate cytosolic patterns",
    "Negative",
)
NUM_CLASSES = len(CLASS_NAMES)
NEGATIVE = 18


class LabelError(ValueError):
    """A label cell that is not a `|`-separated list of integers 0-18."""


def parse_labels(text: str, where: str = "") -> list[int]:
    """`'8|5|0'` -> `[8, 5, 0]` (order kept, duplicates dropped).

    `where` names the row (e.g. `train.csv row 12 (ID abc)`) in the error message.
    """
    ctx = f"{where}: " if where else ""
    if text is None:
        raise LabelError(f"{ctx}missing label")
    text = str(text).strip()
    if not text:
        raise LabelError(f"{ctx}empty label")
    out: list[int] = []
    for part in text.split("|"):
        part = part.strip()
        if not part.lstrip("-").isdigit():
            raise LabelError(f"{ctx}malformed label {text!r}: {part!r} is not an integer")
        value = int(part)
        if not 0 <= value < NUM_CLASSES:
            raise LabelError(f"{ctx}label {value} outside 0-{NUM_CLASSES - 1} in {text!r}")
        if value not in out:
            out.append(value)
    return out


def format_labels(labels: Iterable[int]) -> str:
    """`[8, 5, 0]` -> `'8|5|0'`; validates the range."""
    labels = [int(x) for x in labels]
    for value in labels:
        if not 0 <= value < NUM_CLASSES:
            raise LabelError(f"label {value} outside 0-{NUM_CLASSES - 1}")
    return "|".join(str(x) for x in labels)


def multi_hot(labels: Sequence[int], dtype=np.float32) -> np.ndarray:
    """Label indices -> `(19,)` multi-hot vector."""
    vec = np.zeros(NUM_CLASSES, dtype=dtype)
    for value in labels:
        if not 0 <= int(value) < NUM_CLASSES:
            raise LabelError(f"label {value} outside 0-{NUM_CLASSES - 1}")
        vec[int(value)] = 1
    return vec


def from_multi_hot(vec: Sequence[float], threshold: float = 0.5) -> list[int]:
    """`(19,)` vector -> sorted label indices whose value is >= threshold."""
    return [i for i, v in enumerate(vec) if v >= threshold]


def read_label_rows(path: str) -> list[dict]:
    """Raw rows of an `ID,Label[,...]` CSV (local or `gs://`), each with `_row` (1 = first data row).

    For callers that want to record bad rows instead of stopping (the TFRecord builder).
    """
    from common import storage

    text = storage.read_text(path)
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or "ID" not in reader.fieldnames or "Label" not in reader.fieldnames:
        raise LabelError(f"{path}: expected a header with ID and Label columns, got {reader.fieldnames}")
    rows = []
    for i, row in enumerate(reader, start=1):
        row = {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
        row["_row"] = i
        rows.append(row)
    return rows


def read_labels_csv(path: str) -> list[tuple[str, list[int]]]:
    """Read an `ID,Label` CSV (competition `train.csv` or public-HPA lists with more columns).

    Returns `[(image_id, labels), ...]` in file order. A bad label raises `LabelError`
    naming the file, the row number (1 = first data row) and the ID.
    """
    return [
        (row["ID"], parse_labels(row["Label"], where=f"{path} row {row['_row']} (ID {row['ID']})"))
        for row in read_label_rows(path)
    ]



def format_label_rows(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A label list's text: `header` then `rows` (`ID,Label[,...]`; a Label cell as
    `format_labels` writes it), CSV-quoted where a cell holds a comma or a quote, `\\n` endings.
    The one writer of label lists (the downloader's `labels.csv`, self-training's fold lists);
    `read_label_rows` reads them back."""
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()

# HPA subcellular location names that the competition folded into one of its 19 classes (its
# data page: "Vesicles and punctate cytosolic patterns" covers vesicles, peroxisomes, endosomes,
# lysosomes, lipid droplets and cytoplasmic bodies; focal adhesion sites count as actin
# filaments, cell junctions as plasma membrane, centriolar satellites as centrosome). Names not
# here and not in CLASS_NAMES (kinetochore, midbody, cleavage furrow, ...) map to no class.
MERGED_NAMES: dict[str, int] = {
    "vesicles": 17, "peroxisomes": 17, "endosomes": 17, "lysosomes": 17, "lipid droplets": 17,
    "cytoplasmic bodies": 17, "focal adhesion sites": 9, "cell junctions": 13,
    "centriolar satellite": 12,
}


def class_of_name(name: str) -> int | None:
    """An HPA location name -> its class index (case-insensitive, merged names included), or
    None for a location the competition does not score."""
    key = " ".join(str(name).split()).lower()
    for i, cls in enumerate(CLASS_NAMES):
        if cls.lower() == key:
            return i
    return MERGED_NAMES.get(key)


def labels_from_names(text: str) -> tuple[list[int], list[str]]:
    """`'Nucleoplasm,Vesicles,Midbody'` -> `([0, 17], ['Midbody'])`: the classes (order kept,
    duplicates dropped) and the names that map to none. Comma- or `|`-separated."""
    classes: list[int] = []
    unknown: list[str] = []
    for part in str(text or "").replace("|", ",").split(","):
        part = part.strip()
        if not part:
            continue
        c = class_of_name(part)
        if c is None:
            unknown.append(part)
        elif c not in classes:
            classes.append(c)
    return classes, unknown
