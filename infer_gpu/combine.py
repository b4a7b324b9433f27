"""THE combine rule, and the one place where scores become a submission row.

The combine rule (also in `python -m infer_gpu predict --help`), per cell and class, in order:

1. Cell score `c`: the mean sigmoid probability over the `--model` runs and the TTA transforms;
   a bag run (`infer_gpu.bags`) adds its cell head. Image score `i`: the same over the
   `--image-model` runs, one tile of the whole image; a bag run adds its image head (the
   maximum over the image's bags of cells). Every model counts once in its mean.
   With `--image-from-cells`, the image's own cells also say what the image shows: `m` = the
   highest `c` of any of its cells, per class (an image shows a class where one of its cells
   does, the multiple-instance assumption); `i = m` without image runs, else `i = sqrt(i * m)`.
   No training needed: it lowers the cells of images whose best cell for the class is weak.
   On held-out synthetic data it lifted the strict mAP of cell-tile runs by +0.026 to +0.075
   (five data seeds, mean +0.043), the Open Images mAP by +0.004 to +0.019 (README, "3.
   Segmentation and prediction" and "MIL against cell tiles").
2. Combined `s = c**a * i**(1 - a)`, `a = --cell-weight` (default 0.5: the geometric mean,
   i.e. the square root of the product, which ranks each class's cells exactly as the product
   `c * i` of red.ai's dual-head recipe does). A cell can only score high for a class when both
   the cell and its image show it: the image model sees context that a lone cell lacks, the
   cell model separates the heterogeneous cells of one image. Only cell runs: `s = c`; only
   image runs: every cell inherits `s = i`.
3. Negative (class 18): `s_neg = max(s_neg, prod_k (1 - s_k))` over the 18 other classes, the
   chance that the cell shows none of them if they were independent; never below the model's
   own Negative score.
4. Down-weighting (every class of the cell, after 3): x `--border-weight` (default 0.8) for a
   cell that touches the image border (cut cells, whose masks and annotations agree less), and
   x `--no-nucleus-weight` (default 0.5) for a cell without a nucleus (often debris or a
   fragment). Lower confidence moves them down each class's ranking without dropping them.
5. Every (cell, class) with `s >= --min-score` (default 0.01) becomes a detection: mAP only
   gains from extra detections at low confidence (recall), the floor just bounds the file size.

Then each cell's detections, best first, share the cell's one encoded mask: the row's
PredictionString is `label confidence mask ...` (common.submission formats it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.labels import NEGATIVE, NUM_CLASSES


@dataclass(frozen=True)
class CombineRule:
    """Parameters of the combine rule (see the module docstring)."""

    cell_weight: float = 0.5  # a in c**a * i**(1-a) when both cell and image scores are given (0.5 ranks as the product c*i)
    border_weight: float = 0.8  # confidence factor for cells touching the image border
    no_nucleus_weight: float = 0.5  # confidence factor for cells without a nucleus
    min_score: float = 0.01  # lowest confidence written as a detection
    image_from_cells: bool = False  # the image score also takes the image's best cell per class (rule step 1)

    def __post_init__(self):
        for name in ("cell_weight", "border_weight", "no_nucleus_weight", "min_score"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


def combine(cell: np.ndarray | None, image: np.ndarray | None, touches_border, has_nucleus,
            rule: CombineRule = CombineRule()) -> np.ndarray:
    """Final per-cell scores, the documented rule.

    cell: `Kx19` cell-model probabilities or None; image: `(19,)` image-model probabilities or
    None; touches_border, has_nucleus: `(K,)` bools. Returns `Kx19 float32` in [0, 1].
    """
    return combine_terms(cell, image, touches_border, has_nucleus, rule)[0]


def combine_terms(cell: np.ndarray | None, image: np.ndarray | None, touches_border, has_nucleus,
                  rule: CombineRule = CombineRule()) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """`combine`, also returning the rule's `c` (`Kx19`, clipped) and `i` (`(19,)`, after
    `--image-from-cells`) as it used them (None where absent): `(s, c, i)`, the cell table's."""
    touches_border = np.asarray(touches_border, dtype=bool).reshape(-1)
    has_nucleus = np.asarray(has_nucleus, dtype=bool).reshape(-1)
    k = len(touches_border)
    if len(has_nucleus) != k:
        raise ValueError(f"{k} border flags but {len(has_nucleus)} nucleus flags")
    if cell is None and image is None:
        raise ValueError("combine needs cell scores, image scores or both")
    if cell is not None:
        cell = np.clip(np.asarray(cell, dtype=np.float64).reshape(-1, NUM_CLASSES), 0.0, 1.0)
        if len(cell) != k:
            raise ValueError(f"{len(cell)} cell score rows for {k} cells")
    if image is not None:
        image = np.clip(np.asarray(image, dtype=np.float64).reshape(NUM_CLASSES), 0.0, 1.0)
    if rule.image_from_cells and cell is not None and k:
        best = cell.max(axis=0)  # [19]: what the image shows, by its best cell
        image = best if image is None else np.sqrt(image * best)
    if cell is None:
        s = np.repeat(image[None, :], k, axis=0)
    elif image is None:
        s = cell
    else:
        a = rule.cell_weight
        s = cell ** a * image[None, :] ** (1.0 - a)
    others = np.delete(s, NEGATIVE, axis=1)
    s = s.copy()
    s[:, NEGATIVE] = np.maximum(s[:, NEGATIVE], np.prod(1.0 - others, axis=1))
    weight = np.where(touches_border, rule.border_weight, 1.0) * np.where(has_nucleus, 1.0, rule.no_nucleus_weight)
    return (s * weight[:, None]).astype(np.float32), cell, image


def detections(scores: np.ndarray, min_score: float) -> list[list[tuple[int, float]]]:
    """`Kx19` scores -> per cell, `[(label, confidence), ...]` above the floor, best first."""
    out = []
    for row in np.asarray(scores):
        order = np.argsort(-row, kind="stable")
        out.append([(int(c), float(row[c])) for c in order if row[c] >= min_score])
    return out


def cell_scores(job, roles: dict, weights: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The rule's `c` and `i`: the spec groups averaged, each model counting once.

    job: anything with `scores` `{spec index: scores}` and `prepared.n_cells` (a
    `batching.Job`); roles: `{spec index: 'cell'|'image'|'bag'}` (`scorer.role`): a cell
    group's scores are `Kx19`, an image group's `1x19`, a bag group's its bags' outputs, which
    `bags.unchunk` turns into both (`Kx19` cells and `(19,)` image); weights: `{spec index:
    number of models}`. Returns `(cell Kx19 or None, image (19,) or None)`.
    """
    from infer_gpu.bags import unchunk

    terms: dict = {"cell": [], "image": []}
    for k, scores in job.scores.items():
        if roles[k] == "bag":
            cell, image = unchunk(scores, job.prepared.n_cells)
            terms["cell"].append((cell, weights[k]))
            terms["image"].append((image, weights[k]))
        else:
            terms[roles[k]].append((scores if roles[k] == "cell" else scores[0], weights[k]))
    out = {}
    for role, parts in terms.items():
        if parts:
            total = sum(w for _, w in parts)
            out[role] = sum(s * (w / total) for s, w in parts)
    return out.get("cell"), out.get("image")


def finite_scores(cell, image) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """Scores with non-finite model outputs set to 0 (a model that overflowed), and a note
    saying how many there were (None when all were finite)."""
    bad = sum(int(np.size(a) - np.isfinite(a).sum()) for a in (cell, image) if a is not None)
    if not bad:
        return cell, image, None
    fix = lambda a: None if a is None else np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)  # noqa: E731
    return fix(cell), fix(image), f"score: {bad} non-finite model outputs, scored 0"


def prediction_triples(prepared, scores: np.ndarray, min_score: float) -> list[tuple]:
    """`[(label, confidence, mask), ...]`: per cell (id order), its classes best first.
    prepared: anything with `masks`, one encoded mask string per cell (a `reading.Prepared`)."""
    triples = []
    for mask, dets in zip(prepared.masks, detections(scores, min_score)):
        triples.extend((label, conf, mask) for label, conf in dets)
    return triples


@dataclass
class ImageResult:
    """One image's outcome: its row (the part `parts.PartStore` keeps) and what the run counts."""

    record: dict  # {"id", "width", "height", "prediction", "error", "failed"}
    scores: np.ndarray | None = None  # Kx19 combined (the rule's s): overlay, cell table; None without cells
    detections: int = 0
    note: str | None = None  # an error to report: the image's failure, or non-finite scores
    # the rule's c (Kx19) and i ((19,)) as combined, for the cell table; None where absent
    cell: np.ndarray | None = None
    image: np.ndarray | None = None

    @property
    def failed(self) -> bool:
        return bool(self.record["failed"])


def image_result(job, roles: dict, weights: dict, rule: CombineRule) -> ImageResult:
    """A scored image (`batching.Job`) -> its submission row: combine, detect, format."""
    from common.submission import format_prediction_string

    p = job.prepared
    record = {"id": p.image_id, "width": p.width, "height": p.height,
              "prediction": "", "error": p.error, "failed": bool(p.error)}
    if p.error or not p.n_cells:
        return ImageResult(record, note=p.error)
    cell, image, note = finite_scores(*cell_scores(job, roles, weights))
    scores, cell, image = combine_terms(cell, image, p.touches_border, p.has_nucleus, rule)
    triples = prediction_triples(p, scores, rule.min_score)
    record.update(prediction=format_prediction_string(triples), error=note)
    return ImageResult(record, scores=scores, detections=len(triples), note=note, cell=cell, image=image)
