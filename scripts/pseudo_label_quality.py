"""How close `infer_gpu pseudo-label`'s targets come to the true cell labels, without training.

    python scripts/pseudo_label_quality.py --data DIR [--cells T]            # one table
    python scripts/pseudo_label_quality.py --share 0.3 0.9 --noise 0 0.2 0.4 --tau 0.3 0.5 1.0

DIR is a synthetic data set (`python -m testkit.synthetic`, which writes the true cell labels);
without --data, one is generated per --share (--n images of --size px, in a temporary folder).
The cells table is --cells (predict's, matched to the true cells by mask: the true cell that
holds most of a table cell's pixels, at IoU >= 0.5; other cells are left out), or else made
from the truth plus noise (`testkit.noisy_cells`: c = clip(a * y + N(0, noise), 0, 1), a ~
U(1 - spread, 1) per image and class), one per --noise. Each table goes through the command's
own `make`, once per rule setting (--tau x --negative-min x --floor), and is scored against

    baseline: every cell inherits its image's labels (what training on image labels does).

Printed per setting: AUC = per class the ROC AUC of the targets t_kj against the truth over the
cells of images labelled j, averaged over the classes where both kinds of cell occur (the
baseline's constant targets give 0.5); negAUC = the same for Negative over the cells of
positive images; MAE = mean |t - y| over cells and the image's classes plus Negative (the
classes the image lacks are 0 in both); kept% / lost% = true (cell, class) pairs with t >= 0.5,
false ones with t < 0.5.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import cell_labels, cell_table, masks, storage  # noqa: E402
from common.labels import NEGATIVE, NUM_CLASSES, multi_hot, read_labels_csv  # noqa: E402


def _auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC with ties counted half (Mann-Whitney); NaN when one kind is missing."""
    from scipy.stats import rankdata

    pos, n = int(truth.sum()), len(truth)
    if pos == 0 or pos == n:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[truth > 0].sum() - pos * (pos + 1) / 2) / (pos * (n - pos)))


def match_cells(table: cell_table.CellTable, data_dir: str, min_iou: float = 0.5) -> dict:
    """`{(ID, table cell): true cell id}` for the table cells that overlap one true cell at
    IoU >= min_iou (the true cell holding most of their pixels)."""
    from common.segmentation import load_labels

    out, maps = {}, {}
    for r, image_id in enumerate(table.ids):
        if image_id not in maps:
            maps[image_id] = load_labels(storage.join(data_dir, "masks", f"{image_id}_cells.png"))
        truth = maps[image_id]
        mask = masks.decode(table.masks[r], int(table.height[r]), int(table.width[r]))
        if mask.shape != truth.shape:
            continue
        ids, counts = np.unique(truth[mask], return_counts=True)
        counts[ids == 0] = 0
        if not counts.any():
            continue
        best = int(ids[np.argmax(counts)])
        inter = counts.max()
        if inter / (mask.sum() + (truth == best).sum() - inter) >= min_iou:
            out[(image_id, int(table.cell[r]))] = best
    return out


def score(targets: dict, truth: dict, image_labels: dict, matched: dict) -> dict:
    """The metrics (module docstring) of `targets[(ID, cell)]` against the true labels."""
    keys = [k for k in targets if k in matched]
    t = np.stack([targets[k] for k in keys]).astype(np.float64)
    y = np.stack([multi_hot(truth[(k[0], matched[k])]) for k in keys]).astype(np.float64)
    labels = [image_labels[k[0]] for k in keys]
    aucs = []
    for j in range(NEGATIVE):
        rows = [i for i, lab in enumerate(labels) if j in lab]
        if rows:
            a = _auc(t[rows, j], y[rows, j])
            if not np.isnan(a):
                aucs.append(a)
    positive = [i for i, lab in enumerate(labels) if lab != [NEGATIVE]]
    scope = np.stack([multi_hot(lab) for lab in labels]) > 0
    scope[:, NEGATIVE] = True
    err = np.abs(t - y)[scope]
    true, false = (y > 0) & scope, (y == 0) & scope
    return {"AUC": float(np.mean(aucs)) if aucs else float("nan"),
            "negAUC": _auc(t[positive, NEGATIVE], y[positive, NEGATIVE]) if positive else float("nan"),
            "MAE": float(err.mean()), "kept%": 100.0 * float((t[true] >= 0.5).mean()),
            "lost%": 100.0 * float((t[false] < 0.5).mean()), "cells": len(keys)}


def baseline(keys, image_labels: dict) -> dict:
    return {k: multi_hot(image_labels[k[0]]) for k in keys}


def evaluate(cells_path: str, data_dir: str, rules, work: str) -> list[tuple[str, dict]]:
    """[(setting, metrics)] for the baseline and each rule on one cells table."""
    from infer_gpu.pseudo_label import make
    from testkit.synthetic import read_cell_labels

    table = cell_table.read(cells_path)
    truth = read_cell_labels(data_dir)
    image_labels = dict(read_labels_csv(storage.join(data_dir, "train.csv")))
    matched = match_cells(table, data_dir)
    out = [("baseline (inherit)", score(baseline(matched, image_labels), truth, image_labels, matched))]
    for rule in rules:
        path = os.path.join(work, "cell_labels.csv")
        make(cells_path, storage.join(data_dir, "train.csv"), path, rule)
        targets = cell_labels.read(path).targets
        name = f"tau {rule.tau:g} neg-min {rule.negative_min:g} floor {rule.floor:g}"
        name += "" if rule.negative else " no-neg"
        out.append((name, score(targets, truth, image_labels, matched)))
    return out


def main(argv=None) -> int:
    from infer_gpu.pseudo_label import PseudoLabelRule

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a synthetic data set; none = generate one per --share")
    p.add_argument("--cells", help="a cells table (predict --cells) of --data's images; none = noisy truth")
    p.add_argument("--share", type=float, nargs="+", default=[0.3, 0.9], help="generator's share (without --data)")
    p.add_argument("--negative-cells", type=float, default=0.2, help="generator's negative (without --data)")
    p.add_argument("--n", type=int, default=60, help="images to generate")
    p.add_argument("--size", type=int, default=96, help="image side to generate, px")
    p.add_argument("--seed", type=int, default=0, help="data and noise seed")
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3], help="noise sd of the truth table")
    p.add_argument("--spread", type=float, default=0.5, help="per image and class factor a ~ U(1 - spread, 1)")
    default = PseudoLabelRule()
    p.add_argument("--tau", type=float, nargs="+", default=[default.tau], help="rule taus")
    p.add_argument("--negative-min", type=float, nargs="+", default=[default.negative_min], help="rule negative-mins")
    p.add_argument("--floor", type=float, nargs="+", default=[default.floor], help="rule floors")
    args = p.parse_args(argv)
    if args.cells and not args.data:
        p.error("--cells needs --data (the true cell labels of its images)")
    rules = [PseudoLabelRule(tau=t, negative_min=m, floor=f)
             for t, m, f in itertools.product(args.tau, args.negative_min, args.floor)]
    from testkit import noisy_cells, synthetic

    with tempfile.TemporaryDirectory() as work:
        datasets = [(f"--data {args.data}", args.data)] if args.data else []
        for share in ([] if args.data else args.share):
            d = os.path.join(work, f"share{share}")
            synthetic.generate(d, n=args.n, size=args.size, seed=args.seed, share=share, negative=args.negative_cells)
            datasets.append((f"share {share:g} negative {args.negative_cells:g} ({args.n} images)", d))
        for title, d in datasets:
            if args.cells:
                tables = [(f"--cells {args.cells}", args.cells)]
            else:
                tables = []
                for noise in args.noise:
                    path = os.path.join(work, f"cells_{len(tables)}.parquet")
                    noisy_cells.write_truth_table(path, d, noise=noise, spread=args.spread if noise else 0.0,
                                                  seed=args.seed)
                    tables.append((f"noise {noise:g} spread {args.spread if noise else 0.0:g}", path))
            for table_title, path in tables:
                results = evaluate(path, d, rules, work)
                print(f"\n{title}; {table_title}; {results[0][1]['cells']} cells matched")
                print(f"  {'setting':<34} {'AUC':>6} {'negAUC':>6} {'MAE':>6} {'kept%':>6} {'lost%':>6}")
                for name, m in results:
                    print(f"  {name:<34} {m['AUC']:6.3f} {m['negAUC']:6.3f} {m['MAE']:6.3f} "
                          f"{m['kept%']:6.1f} {m['lost%']:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
