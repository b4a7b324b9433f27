"""Multilabel-stratified K folds: iterative stratification (Sechidis, Tsoumakas, Vlahavas 2011).

Folds are assigned per image, so the cells of one image never straddle folds. The algorithm
serves the rarest label first: every image carrying it goes to the fold that still wants that
label most, so a class with 34 images still lands in every one of 5 folds. Ties are broken by
the fold that wants the most images overall, then at random from the seed: the same labels and
seed always give the same folds.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from common.labels import NUM_CLASSES


def stratified_folds(label_sets: Sequence[Sequence[int]], k: int, seed: int = 0) -> np.ndarray:
    """Assign each item (an image with its label indices) to one of `k` folds.

    Returns `(N,) int64` fold indices in `0..k-1`. Deterministic from `seed`. Items without labels
    go to the folds that want the most items. Runs in O(N x (k + labels per item)), about a second
    for 100k images.
    """
    if k < 1:
        raise ValueError(f"folds must be >= 1, got {k}")
    n = len(label_sets)
    folds = np.full(n, -1, dtype=np.int64)
    if k == 1 or n == 0:
        folds[:] = 0
        return folds
    rng = np.random.default_rng(seed)
    labels = [sorted({int(v) for v in ls}) for ls in label_sets]
    for i, ls in enumerate(labels):
        for v in ls:
            if not 0 <= v < NUM_CLASSES:
                raise ValueError(f"item {i}: label {v} outside 0-{NUM_CLASSES - 1}")

    members: list[list[int]] = [[] for _ in range(NUM_CLASSES)]
    for i, ls in enumerate(labels):
        for v in ls:
            members[v].append(i)
    remaining = np.array([len(m) for m in members], dtype=np.int64)  # unassigned items per label

    # Desired counts: equal folds (r_j = 1/k). Floats, as in the paper, so the rounding of
    # N/k never favours one fold; plain Python lists because the inner loop touches k numbers.
    want_total = [n / k] * k
    want = [[remaining[v] / k] * k for v in range(NUM_CLASSES)]

    def _assign(i: int, label: int | None) -> None:
        if label is None:
            row = want_total
        else:
            row = want[label]
        best = max(row)
        cands = [j for j in range(k) if row[j] == best]
        if len(cands) > 1 and label is not None:
            best_total = max(want_total[j] for j in cands)
            cands = [j for j in cands if want_total[j] == best_total]
        j = cands[0] if len(cands) == 1 else cands[int(rng.integers(len(cands)))]
        folds[i] = j
        want_total[j] -= 1
        for v in labels[i]:
            want[v][j] -= 1
            remaining[v] -= 1

    while remaining.sum() > 0:
        # The label with the fewest unassigned items (ties: at random, as in the paper).
        live = np.flatnonzero(remaining > 0)
        fewest = remaining[live].min()
        ties = live[remaining[live] == fewest]
        label = int(ties[0] if len(ties) == 1 else ties[rng.integers(len(ties))])
        items = np.array([i for i in members[label] if folds[i] < 0], dtype=np.int64)
        rng.shuffle(items)
        for i in items:
            _assign(int(i), label)

    unlabelled = np.flatnonzero(folds < 0)
    rng.shuffle(unlabelled)
    for i in unlabelled:
        _assign(int(i), None)
    return folds


def fold_class_counts(label_sets: Sequence[Sequence[int]], folds: np.ndarray, k: int) -> np.ndarray:
    """`(k, 19) int64`: images of each class in each fold."""
    counts = np.zeros((k, NUM_CLASSES), dtype=np.int64)
    for ls, f in zip(label_sets, folds):
        for v in set(ls):
            counts[int(f), int(v)] += 1
    return counts
