"""`python -m infer_gpu pseudo-label`: soft cell targets from a model's own cell scores.

Image labels are weak for single cells: every cell inherits all of its image's labels, but only
some of an image's cells show each class. This command turns predict's per-cell table
(`predict --labels train.csv --cells T`, best out of fold) and the image labels into soft
targets per cell (`common.cell_labels`), for the builder's `--cell-labels` and a retrained model.

RULE (`relative-max`), per image and cell k; c = the table's cell score (`c_00..c_18`; a table
without cell scores, from image runs only, falls back to the final score `s`, and the file's
rule says so):
  1. Only the image's classes, never another; the one exception is Negative (18), for a cell
     that shows none of them. An image labelled Negative only: every cell gets Negative = 1.
  2. For each image class j (not 18): r_kj = c_kj / (the image's highest c_kj over its cells):
     the image shows j in at least one cell, so its best cell keeps j fully. Then
     t_kj = max(--floor, min(1, r_kj / --tau)). An image whose best c_kj is 0 gives no evidence:
     every cell keeps t_kj = 1.
  3. Negative (--negative, on by default): t_k18 = 1 - max_j t_kj where that is at least
     --negative-min, else 0.
With scores that are exactly the true cell labels (1 where a cell shows a class, 0 elsewhere)
and --floor 0, the targets are exactly the true cell labels. The defaults were chosen on
synthetic data (share 0.3 and 0.9) with the truth plus noise as scores
(scripts/pseudo_label_quality.py): tau 0.6 and negative-min 0.3 gave the lowest error against
the true cell labels (tau 0.5 within 0.01; 0.3 and 1.0 worse), a floor above 0 only added error.

Bad input stops the command with exit status 1 and a message naming the file (and row): a
cell table or label list that is missing, truncated or unreadable, a score outside [0, 1] or
NaN, the same cell twice, the same ID twice in the labels, a table that does not say how its
cells were segmented. Image IDs of the table that the labels lack are skipped and counted;
labelled IDs without cells are counted. The output is written atomically, only when all is well.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from dataclasses import dataclass, field

import numpy as np

from common import config as cfglib

HELP = ("Soft cell targets (cell_labels.csv) from predict's per-cell table and the image labels: "
        "never a class the image lacks, except Negative")
RULE_NAME = "relative-max"
KEPT = 0.5  # the summary counts a cell as keeping a class when its target is at least this


def _rule_text() -> str:
    doc = __doc__ or ""
    start = doc.index("RULE")
    return doc[start:doc.index("\nBad input")].strip()


@dataclass(frozen=True)
class PseudoLabelRule:
    """The rule's parameters (see the module docstring)."""

    # a cell keeps an image class fully when its score is at least this fraction of the image's
    # best cell's score for it; below, its target falls linearly to 0
    tau: float = 0.6
    floor: float = 0.0  # the lowest target of an image class (0: a cell can lose a class entirely)
    # give a cell that shows none of its image's classes Negative = 1 - its highest image-class target
    negative: bool = True
    negative_min: float = 0.3  # Negative only where that is at least this, else 0

    def __post_init__(self):
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        for name in ("floor", "negative_min"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def cell_targets(scores: np.ndarray, labels, rule: PseudoLabelRule = PseudoLabelRule()) -> np.ndarray:
    """One image's targets, `Kx19 float64` in [0, 1], from its cells' scores (`Kx19`, in [0, 1];
    only the image's classes are read) and its labels (class indices)."""
    from common.labels import NEGATIVE, NUM_CLASSES

    scores = np.asarray(scores, dtype=np.float64).reshape(-1, NUM_CLASSES)
    out = np.zeros_like(scores)
    classes = sorted({int(j) for j in labels} - {NEGATIVE})
    if not classes:  # Negative only
        out[:, NEGATIVE] = 1.0
        return out
    for j in classes:
        best = scores[:, j].max(initial=0.0)
        t = np.ones(len(scores)) if best <= 0 else np.minimum(1.0, scores[:, j] / best / rule.tau)
        out[:, j] = np.maximum(t, rule.floor)
    if rule.negative:
        neg = 1.0 - out[:, classes].max(axis=1)
        out[:, NEGATIVE] = np.where(neg >= rule.negative_min, neg, 0.0)
    return out


@dataclass
class Summary:
    """What `make` did: counts for the report (see `lines`)."""

    images: int = 0  # labelled images with cells, targets written
    cells: int = 0
    score: str = "c"  # the score kind the rule read ("c", or "s" as the fallback)
    skipped_images: list = field(default_factory=list)  # table IDs the labels lack
    skipped_cells: int = 0
    no_cells: list = field(default_factory=list)  # labelled IDs without rows in the table
    had: np.ndarray = field(default_factory=lambda: np.zeros(19, np.int64))  # cells of images with class j
    kept: np.ndarray = field(default_factory=lambda: np.zeros(19, np.int64))  # ... whose target >= KEPT
    negatives: int = 0  # cells of positive images given Negative > 0
    negative_images: int = 0  # images labelled Negative only
    negative_image_cells: int = 0

    def lines(self) -> list[str]:
        from common.labels import CLASS_NAMES, NEGATIVE

        def few(ids):
            return ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")

        out = [f"{self.images} images, {self.cells} cells; scores read: {self.score}"
               + (" (the table has no cell scores c: the final score s instead)" if self.score == "s" else "")]
        if self.skipped_images:
            out.append(f"skipped {len(self.skipped_images)} image(s) of the cell table that the labels "
                       f"lack ({self.skipped_cells} cells): {few(self.skipped_images)}")
        if self.no_cells:
            out.append(f"{len(self.no_cells)} labelled image(s) with no cells in the table: {few(self.no_cells)}")
        out.append(f"per class: cells kept (target >= {KEPT}) / cells whose image has the class")
        for j in range(NEGATIVE):
            if self.had[j]:
                out.append(f"  {j:2d} {CLASS_NAMES[j]:<42} {self.kept[j]:6d} / {self.had[j]:6d}")
        out.append(f"negatives made: {self.negatives} cells of positive images; plus "
                   f"{self.negative_image_cells} cells of {self.negative_images} image(s) labelled Negative only")
        return out


class PseudoLabelError(ValueError):
    """Bad input; the message names the file (and row)."""


def _read_inputs(cells: str, labels: str):
    from common import cell_table
    from common.labels import LabelError, read_labels_csv

    try:
        table = cell_table.read(cells)
    except FileNotFoundError:
        raise PseudoLabelError(f"--cells {cells}: no such file") from None
    except (cell_table.CellTableError, OSError, UnicodeDecodeError, ValueError) as err:
        text = str(err) if str(cells) in str(err) else f"{cells}: {err}"
        raise PseudoLabelError(f"--cells {text}") from None
    try:
        rows = read_labels_csv(labels)
    except FileNotFoundError:
        raise PseudoLabelError(f"--labels {labels}: no such file") from None
    except (LabelError, OSError, UnicodeDecodeError, ValueError) as err:
        raise PseudoLabelError(f"--labels {err}") from None
    by_id: dict[str, list[int]] = {}
    for r, (image_id, classes) in enumerate(rows, start=1):
        if image_id in by_id:
            raise PseudoLabelError(f"--labels {labels} row {r}: ID {image_id} appears twice")
        by_id[image_id] = classes
    return table, by_id


def _segmentation(table, cells: str) -> dict:
    from common.segmentation import SegmentationSpec

    spec = table.meta.get("segmentation")
    if not isinstance(spec, dict):
        raise PseudoLabelError(f"--cells {cells}: its provenance does not say how the cells were segmented "
                               "(no 'segmentation'), so a build could not check the cell labels against its own")
    names = {f.name for f in dataclasses.fields(SegmentationSpec)}
    try:  # predict adds the model files' paths beside the spec's fields
        return SegmentationSpec.from_dict({k: v for k, v in spec.items() if k in names}).to_dict()
    except (TypeError, ValueError) as err:
        raise PseudoLabelError(f"--cells {cells}: unreadable segmentation in its provenance ({err})") from None


def make(cells: str, labels: str, out: str, rule: PseudoLabelRule = PseudoLabelRule()) -> Summary:
    """Read the cell table and the labels, write the targets to `out` (`common.cell_labels`,
    atomically, only when every input row is good). Raises PseudoLabelError naming the file."""
    from common import cell_labels, storage
    from common.labels import NEGATIVE

    table, by_id = _read_inputs(cells, labels)
    segmentation = _segmentation(table, cells)
    summary = Summary()
    c = table.scores["c"]
    summary.score = "c" if len(table) and np.isfinite(c).any() else "s"
    scores = table.scores[summary.score]

    rows_of: dict[str, list[int]] = {}
    seen: dict[tuple[str, int], int] = {}
    for r, (image_id, cell) in enumerate(zip(table.ids, table.cell.tolist())):
        where = f"--cells {cells} row {r + 1} (ID {image_id} cell {cell})"
        if image_id not in by_id:
            if image_id not in summary.skipped_images:
                summary.skipped_images.append(image_id)
            summary.skipped_cells += 1
            continue
        if cell < 1:
            raise PseudoLabelError(f"{where}: the cell id is not a label-map id (an integer >= 1)")
        if (image_id, cell) in seen:
            raise PseudoLabelError(f"{where}: the cell appears twice (first at row {seen[(image_id, cell)] + 1})")
        seen[(image_id, cell)] = r
        bad = [k for k, v in enumerate(scores[r]) if not 0.0 <= v <= 1.0]  # NaN fails both
        if bad:
            shown = ", ".join(f"{summary.score}_{k:02d} = {scores[r, k]}" for k in bad[:3])
            raise PseudoLabelError(f"{where}: score outside [0, 1] or NaN: {shown}")
        rows_of.setdefault(image_id, []).append(r)
    summary.no_cells = [i for i in by_id if i not in rows_of]

    out_rows = []
    for image_id, rows in rows_of.items():
        classes = by_id[image_id]
        t = cell_targets(scores[rows], classes, rule)
        summary.images += 1
        summary.cells += len(rows)
        positive = sorted(set(classes) - {NEGATIVE})
        if not positive:
            summary.negative_images += 1
            summary.negative_image_cells += len(rows)
        else:
            summary.negatives += int(np.count_nonzero(t[:, NEGATIVE] > 0))
            for j in positive:
                summary.had[j] += len(rows)
                summary.kept[j] += int(np.count_nonzero(t[:, j] >= KEPT))
        out_rows += [(image_id, int(table.cell[r]), t[i]) for i, r in enumerate(rows)]

    rule_meta = {"name": RULE_NAME, **dataclasses.asdict(rule), "score": summary.score}
    if summary.score == "s":
        rule_meta["note"] = "the cell table has no cell scores (image runs only): the rule read the final score s"

    def source(path: str) -> dict:
        return {"path": path, "fingerprint": storage.fingerprint(storage.read_bytes(path))}

    meta = {"segmentation": segmentation, "rule": rule_meta,
            "source": {"cells": source(cells), "labels": source(labels)}}
    cell_labels.write(out, out_rows, meta)
    return summary


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = f"{textwrap.fill(HELP + '.', 95)}\n\n{_rule_text()}"
    parser.formatter_class = _Formatter  # keeps the rule's layout
    parser.add_argument("--cells", required=True, metavar="PATH",
                        help="predict's per-cell table (--cells of predict: .parquet or .csv), local or gs://")
    parser.add_argument("--labels", required=True, metavar="CSV",
                        help="the image labels, ID,Label (train.csv), local or gs://")
    parser.add_argument("--out", required=True, metavar="CSV",
                        help="the cell labels to write (common.cell_labels), e.g. cell_labels.csv")
    group = parser.add_argument_group("rule (see above)")
    cfglib.add_arguments(group, PseudoLabelRule, types={"tau": float, "floor": float, "negative_min": float})


def run(args: argparse.Namespace) -> int:
    try:
        rule = cfglib.from_args(PseudoLabelRule, args, base=PseudoLabelRule())
        summary = make(args.cells, args.labels, args.out, rule)
    except (PseudoLabelError, ValueError, OSError) as err:
        print(f"pseudo-label: error: {err}", file=sys.stderr)
        return 1
    for line in summary.lines():
        print(f"pseudo-label: {line}" if not line.startswith("  ") else line)
    print(f"pseudo-label: wrote {args.out}")
    return 0
