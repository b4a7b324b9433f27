"""`--cell-labels`: the soft targets of a cell-labels table (`common.cell_labels`) into the build.

Read once in the launching process, before any image is read: the table must follow the format
(`cell_labels.CellLabelsError` names the file and line), have been made with the build's
segmentation (else BuildError naming each difference: its cell ids would name other cells), and
give no target > 0 to a class its image lacks, Negative (18) excepted (a cell that shows none
of its image's classes). Each image's rows then travel in its `worker.Task`
(`Task.cell_targets`), so worker processes never hold the table; the worker writes them into the
records (`common.features.CELL_TARGETS`) and counts what it could not match.

Counted in the manifest's `cell_labels` (`summary`): cells written with the table's targets,
cells the table lacks (written with their image's labels as 0/1 targets), the table's rows
whose image is not in the build (e.g. with --limit; ignored), and per image the table cells
that its label map does not have (a table made from other masks).
"""
from __future__ import annotations

from typing import Iterable

from common import cell_labels
from common.labels import NEGATIVE, NUM_CLASSES

FINGERPRINT_KEY = "cell_labels_fingerprint"  # in the plan's and the manifest's config


def read(path: str, spec, where: str = "this build") -> cell_labels.CellLabels:
    """Read and check the table against the build's SegmentationSpec `spec`. Raises
    CellLabelsError (format: file and line) or ValueError (another segmentation)."""
    table = cell_labels.read(path)
    cell_labels.check_segmentation(table, spec, where)
    return table


def per_image(table: cell_labels.CellLabels, entries: Iterable) -> dict[str, tuple]:
    """`{ID: ((cell, (19 floats)), ...)}` for the planned `entries` (`plan.Entry`) the table
    names, in the table's order. Raises ValueError naming the file, ID and cell of a target > 0
    for a class the image's labels lack (other than Negative)."""
    out = {}
    for e in entries:
        cells = table.images.get(e.image_id)
        if not cells:
            continue
        allowed = set(e.labels) | {NEGATIVE}
        rows = []
        for cell in cells:
            t = table.targets[(e.image_id, cell)]
            foreign = [k for k in range(NUM_CLASSES) if t[k] > 0 and k not in allowed]
            if foreign:
                raise ValueError(
                    f"{table.path}: {e.image_id} cell {cell}: target > 0 for class(es) "
                    f"{', '.join(map(str, foreign))}, which the image's labels "
                    f"({'|'.join(map(str, e.labels)) or 'none'}) lack; cell labels may only split "
                    "an image's classes among its cells (or give Negative, 18)")
            rows.append((int(cell), tuple(float(v) for v in t)))
        out[e.image_id] = tuple(rows)
    return out


def settings(config: dict, table: cell_labels.CellLabels | None) -> dict:
    """A build's compared settings with the table's fingerprint (a resume with another table is
    refused); without a table, unchanged (builds before --cell-labels resume as before)."""
    return config if table is None else {**config, FINGERPRINT_KEY: table.fingerprint}


def summary(table: cell_labels.CellLabels, planned: Iterable[str], shard_records: Iterable[dict]) -> dict:
    """The manifest's `cell_labels`: the table (path, fingerprint, rows) and the counts."""
    planned = set(planned)
    outside = [i for i in table.images if i not in planned]
    written = [0, 0]
    unknown: dict[str, int] = {}
    for rec in shard_records:
        for image_id, (from_table, from_labels, not_in_map) in rec.get("cell_labels", {}).items():
            written[0] += from_table
            written[1] += from_labels
            if not_in_map:
                unknown[image_id] = not_in_map
    return {
        "path": table.path,
        "fingerprint": table.fingerprint,
        "rows": len(table.targets),
        "cells_from_table": written[0],
        "cells_from_image_labels": written[1],
        "rows_not_in_build": sum(len(table.images[i]) for i in outside),
        "images_not_in_build": len(outside),
        "cells_not_in_label_map": dict(sorted(unknown.items())),
    }
