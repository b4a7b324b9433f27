"""The bag rules, in one place: which cells a bag keeps, how a bag is filled, which places are
real, and how predict cuts an image's cells into bags.

A bag holds N places (the bag size). An image's cells enter in id order:

- choice (`choose_cells`, the builder): an image with more than N cells keeps N of them, drawn
  by a generator seeded with (seed, image ID), in id order; one with fewer keeps them all.
- fill order (`fill_order`, and `tf_fill_order` inside `tf.data`): with r real cells (r <= N
  kept), place j holds cell j % r. Padding by repetition keeps BatchNorm's batch statistics
  those of real cells; a record that holds more than N cells keeps its first N.
- mask (`fill_mask`, `tf_fill_mask`): 1 for the r real places, 0 for the padding. A padding
  place's cell targets are `PAD_TARGET` (-1), which the masked cell loss leaves out.
- chunking (`chunk_order`, predict): K cells -> ceil(K/N) consecutive chunks, chunk c holding
  cells cN .. cN+N-1, each filled by the same rule, so predict scores the bags training saw.

The NumPy functions and their TensorFlow twins give the same order and mask (tests/test_bags.py
ties them together); the builder and predict use the NumPy side, training the TF side.
NumPy only at import: builder workers import this module and never TensorFlow.
"""
from __future__ import annotations

import zlib

import numpy as np

PAD_TARGET = -1.0  # a padding place's cell targets (every class): out of the masked cell loss


def _check_bag(bag: int) -> int:
    if int(bag) < 1:
        raise ValueError(f"bag must be >= 1, got {bag}")
    return int(bag)


def fill_order(n_cells: int, bag: int) -> np.ndarray:
    """`int64 [bag]`: which of `n_cells` cells (positions in id order) fills each place; the
    first min(n_cells, bag) are real, the rest repeat them in order. No cells: all zeros (the
    mask marks none of them real)."""
    bag = _check_bag(bag)
    real = min(int(n_cells), bag)
    return np.arange(bag, dtype=np.int64) % max(real, 1)


def fill_mask(n_cells: int, bag: int) -> np.ndarray:
    """`float32 [bag]`: 1 for the places `fill_order` gives a real cell, 0 for padding."""
    bag = _check_bag(bag)
    return (np.arange(bag) < int(n_cells)).astype(np.float32)


def tf_fill_order(n_cells, bag: int):
    """`fill_order` inside TensorFlow: `n_cells` a scalar int32 tensor -> `int32 [bag]`."""
    import tensorflow as tf

    bag = _check_bag(bag)
    real = tf.minimum(tf.cast(n_cells, tf.int32), bag)
    return tf.range(bag) % tf.maximum(real, 1)


def tf_fill_mask(n_cells, bag: int):
    """`fill_mask` inside TensorFlow: `n_cells` a scalar int32 tensor -> `float32 [bag]`."""
    import tensorflow as tf

    bag = _check_bag(bag)
    return tf.cast(tf.range(bag) < tf.cast(n_cells, tf.int32), tf.float32)


def choose_cells(count: int, bag: int, image_id: str, seed: int) -> list[int]:
    """Which of an image's `count` cells (positions in id order) its bag keeps: all of them when
    they fit, else `bag` drawn without replacement by a generator seeded with (seed, image ID),
    in id order. Deterministic: a rebuild or a resumed build keeps the same cells."""
    if count <= bag:
        return list(range(count))
    rng = np.random.default_rng([int(seed), zlib.crc32(image_id.encode("utf-8"))])
    return sorted(int(i) for i in rng.choice(count, size=bag, replace=False))


def chunk_order(n_cells: int, bag: int) -> tuple[np.ndarray, np.ndarray]:
    """Which cell fills each place of each chunk.

    Returns `(order int64 [C, bag], mask float32 [C, bag])`, C = ceil(n_cells / bag) (0 for no
    cells): `order[c, j]` indexes the image's cells (id order), `mask` is 1 for a real place, 0
    for padding, which repeats the chunk's r real cells in order (`fill_order`, `fill_mask`).
    """
    bag = _check_bag(bag)
    chunks = -(-int(n_cells) // bag)
    order = np.zeros((chunks, bag), np.int64)
    mask = np.zeros((chunks, bag), np.float32)
    for c in range(chunks):
        start = c * bag
        real = min(bag, int(n_cells) - start)
        order[c] = start + fill_order(real, bag)
        mask[c] = fill_mask(real, bag)
    return order, mask
