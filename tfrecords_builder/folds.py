"""Multilabel-stratified K folds: iterative stratification (Sechidis, Tsoumakas, Vlahavas 2011),
over groups of images.

Folds are assigned per group, so the images of one group (and the cells of one image) never
straddle folds: the fields of one well, or every image of one antibody, show the same protein
with the same labels, and a fold split that separated them would leak between training and
validation. `group_of` is the rule that finds an image's group from its ID.

The algorithm serves the rarest label first: every group carrying it goes to the fold that still
wants that label most, so a class in 34 groups still lands in every one of 5 folds. Counts are
images: a group weighs, for each label, the number of its images with that label, and "rarest"
and the folds' wanted counts are in images. Ties are broken by the fold that wants the most
images overall, then at random from the seed: the same labels, groups and seed always give the
same folds. With one image per group this is exactly the per-image algorithm.
"""
from __future__ import annotations

import re
from typing import Hashable, Sequence

import numpy as np

from common.labels import NUM_CLASSES

# Group key kinds: the prefix keeps keys of different kinds apart (`group_of`).
WELL, ANTIBODY, IMAGE = "well", "antibody", "image"
_WELL_FIELD = re.compile(r"^(\d+_[A-Za-z]{1,2}\d+)_\d+$")  # {plate}_{well}_{field}
_ANTIBODY_WELL_FIELD = re.compile(r"^(\d+)_\d+_[A-Za-z]{1,2}\d+_\d+$")  # {antibody}_{plate}_{well}_{field}


def image_group(image_id: str) -> str:
    """The group key of an image that is a group by itself: `image:<id>`."""
    return f"{IMAGE}:{image_id}"


def group_of(image_id: str) -> str:
    """The fold group of an image, from its ID alone (the builder's `--group-by auto`).

    - `{plate}_{well}_{field}` (digits, letter(s)+digits, digits; the public HPA list, e.g.
      `1000_A2_1`) -> the well, `well:1000_A2`: the fields of one well are the same cells
      stained for the same protein;
    - `{antibody}_{plate}_{well}_{field}` (e.g. `10005_921_B9_1`) -> the antibody,
      `antibody:10005`: every image of one antibody shows the same protein pattern, whatever
      the plate or cell line;
    - anything else (the competition's UUIDs, synthetic IDs) -> the image itself, `image:<id>`.

    The kind prefix (`well:`, `antibody:`, `image:`) keeps keys of different kinds apart.
    """
    m = _WELL_FIELD.match(image_id)
    if m:
        return f"{WELL}:{m[1]}"
    m = _ANTIBODY_WELL_FIELD.match(image_id)
    if m:
        return f"{ANTIBODY}:{m[1]}"
    return image_group(image_id)


def stratified_folds(label_sets: Sequence[Sequence[int]], k: int, seed: int = 0) -> np.ndarray:
    """Assign each item (an image with its label indices) to one of `k` folds, each item its own
    group: `stratified_group_folds` with one group per item.

    Returns `(N,) int64` fold indices in `0..k-1`. Deterministic from `seed`. Items without labels
    go to the folds that want the most items. Runs in O(N x (k + labels per item)), about a second
    for 100k images.
    """
    return stratified_group_folds(label_sets, None, k, seed)


def stratified_group_folds(label_sets: Sequence[Sequence[int]], groups: Sequence[Hashable] | None,
                           k: int, seed: int = 0) -> np.ndarray:
    """Assign each item (an image with its label indices) to one of `k` folds, all items of a
    group to the same fold.

    groups: one hashable key per item (None: every item its own group). Returns `(N,) int64`
    fold indices per item in `0..k-1`. Deterministic from `seed` (and the order of the items).
    A group weighs, per label, the number of its items with that label; groups without any
    label go to the folds that want the most items. With one item per group the result is that
    of per-item iterative stratification. O(N x labels per item + G x k), a few seconds at most
    for 100k images.
    """
    if k < 1:
        raise ValueError(f"folds must be >= 1, got {k}")
    n = len(label_sets)
    if groups is not None and len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} items")
    folds = np.full(n, -1, dtype=np.int64)
    if k == 1 or n == 0:
        folds[:] = 0
        return folds

    # Groups in order of their first item, so one-item groups keep the items' order.
    if groups is None:
        group_index = np.arange(n, dtype=np.int64)
        n_groups = n
    else:
        index: dict = {}
        group_index = np.fromiter((index.setdefault(g, len(index)) for g in groups), dtype=np.int64, count=n)
        n_groups = len(index)
    size = np.bincount(group_index, minlength=n_groups).tolist()
    weights: list[dict[int, int]] = [{} for _ in range(n_groups)]  # per group: label -> items
    for i, ls in enumerate(label_sets):
        w = weights[group_index[i]]
        for v in {int(x) for x in ls}:
            if not 0 <= v < NUM_CLASSES:
                raise ValueError(f"item {i}: label {v} outside 0-{NUM_CLASSES - 1}")
            w[v] = w.get(v, 0) + 1
    weights_sorted = [sorted(w.items()) for w in weights]

    rng = np.random.default_rng(seed)
    group_fold = [-1] * n_groups
    members: list[list[int]] = [[] for _ in range(NUM_CLASSES)]  # groups carrying each label
    remaining = np.zeros(NUM_CLASSES, dtype=np.int64)  # unassigned items per label
    for g, w in enumerate(weights_sorted):
        for v, c in w:
            members[v].append(g)
            remaining[v] += c

    # Desired counts: equal folds (r_j = 1/k). Floats, as in the paper, so the rounding of
    # N/k never favours one fold; plain Python lists because the inner loop touches k numbers.
    want_total = [n / k] * k
    want = [[remaining[v] / k] * k for v in range(NUM_CLASSES)]

    def _assign(g: int, label: int | None) -> None:
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
        group_fold[g] = j
        want_total[j] -= size[g]
        for v, c in weights_sorted[g]:
            want[v][j] -= c
            remaining[v] -= c

    while remaining.sum() > 0:
        # The label with the fewest unassigned items (ties: at random, as in the paper).
        live = np.flatnonzero(remaining > 0)
        fewest = remaining[live].min()
        ties = live[remaining[live] == fewest]
        label = int(ties[0] if len(ties) == 1 else ties[rng.integers(len(ties))])
        todo = np.array([g for g in members[label] if group_fold[g] < 0], dtype=np.int64)
        rng.shuffle(todo)
        for g in todo:
            _assign(int(g), label)

    unlabelled = np.array([g for g in range(n_groups) if group_fold[g] < 0], dtype=np.int64)
    rng.shuffle(unlabelled)
    for g in unlabelled:
        _assign(int(g), None)
    folds[:] = np.asarray(group_fold, dtype=np.int64)[group_index]
    return folds


def fold_class_counts(label_sets: Sequence[Sequence[int]], folds: np.ndarray, k: int) -> np.ndarray:
    """`(k, 19) int64`: images of each class in each fold."""
    counts = np.zeros((k, NUM_CLASSES), dtype=np.int64)
    for ls, f in zip(label_sets, folds):
        for v in set(ls):
            counts[int(f), int(v)] += 1
    return counts
