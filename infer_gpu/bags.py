"""Bag runs in predict: an image's cells in chunks of N for a dual-head bag model (`common.mil`),
and the chunks' outputs back to the image's cells and to the image.

A bag run is a `--model` run whose `preprocess.json` has `bag` N > 0 (its model has the
`cells`/`mask` inputs). predict cuts the image's K cell tiles with the run's `Preprocess.tile` and
groups them, in cell-id order, into ceil(K/N) consecutive chunks (`chunk_cells`, by
`common.bags.chunk_order`): chunk c holds cells cN .. cN+N-1. A chunk with r < N real cells is
filled up by repeating those r cells in order, with the mask marking the real ones: the rule
`common.features.parse_bag` applies to a training bag (`common.bags`), so the model sees the
bags it was trained on.

The model returns, per chunk, its cell head `[N, 19]` and its image head `[19]`; per image
(`unchunk`):

- cell: each real cell's row of the cell head. In inference mode the backbone and the cell head
  run on each cell alone, so which chunk a cell lands in and what pads it change nothing.
- image: the image head, maximum over the chunks per class. The image head answers "does this
  bag hold a cell showing class k?"; the image shows k when some chunk of its cells does, so
  the per-class maximum over the chunks answers it for the whole image (and with the max
  pooling, the max over chunks of the chunks' maxima is the maximum over all the cells). With
  one chunk (K <= N) it is exactly the image head.

Averaging: per chunk over the TTA transforms (the same transform on every cell of a bag);
each model's image result is its own maximum over chunks, and then the models are averaged
(so two runs sharing a spec give what they give apart). Only NumPy here: the readers chunk.
"""
from __future__ import annotations

import numpy as np

from common import bags as bag_rules


def chunk_cells(tiles: np.ndarray, bag: int) -> tuple[np.ndarray, np.ndarray]:
    """An image's cell tiles `KxSxSx4 uint8` -> `(chunks CxbagxSxSx4 uint8, mask Cxbag float32)`,
    the chunks of `common.bags.chunk_order`."""
    order, mask = bag_rules.chunk_order(len(tiles), bag)
    return np.asarray(tiles)[order], mask


def unchunk(scores: np.ndarray, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's bag outputs -> `(cell Kx19, image (19,))`, both the mean over the models.

    scores: `C x M x (1 + bag) x 19` (`scorer.BagGroup.predict` for the image's C chunks, M
    models): per model, row 0 the image head, rows 1.. the cell head. Cell k is place k % bag of
    chunk k // bag, i.e. row k once the chunks are laid end to end; the image is each model's
    maximum over the chunks (see the module docstring), averaged over the models.
    """
    scores = np.asarray(scores, np.float32)
    if scores.ndim != 4 or len(scores) * (scores.shape[2] - 1) < n_cells:
        raise ValueError(f"bag scores {scores.shape} do not hold {n_cells} cells")
    image = scores[:, :, 0].max(axis=0).mean(axis=0)
    cells = scores[:, :, 1:].mean(axis=1)  # C x bag x 19
    return cells.reshape(-1, scores.shape[-1])[:n_cells], image
