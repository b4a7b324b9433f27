"""common.bags: the bag rules (cell choice, fill order, mask, chunking), the NumPy functions
against their TensorFlow twins, and every user of the rules (the bag record parser, the
trainer's smaller bags, predict's chunks) against the rules."""
from __future__ import annotations

import numpy as np
import pytest

from common import bags, features

PAIRS = [(n, bag) for bag in (1, 2, 3, 4, 7, 16) for n in range(0, bag + 4)]  # n < = > bag


def _reference(n: int, bag: int):
    """The rule written out by hand: r = min(n, bag) real places, place j holds cell j % r."""
    r = min(n, bag)
    order = [j % r if r else 0 for j in range(bag)]
    return order, [1.0 if j < r else 0.0 for j in range(bag)]


@pytest.mark.parametrize("n,bag", PAIRS)
def test_fill_order_and_mask_follow_the_rule(n, bag):
    order, mask = bags.fill_order(n, bag), bags.fill_mask(n, bag)
    assert order.dtype == np.int64 and mask.dtype == np.float32
    want_order, want_mask = _reference(n, bag)
    assert order.tolist() == want_order and mask.tolist() == want_mask


def test_the_tf_twins_give_the_numpy_order_and_mask_eager_and_inside_tf_data():
    import tensorflow as tf

    for bag in sorted({b for _, b in PAIRS}):
        ns = [n for n, b in PAIRS if b == bag]
        eager = [(bags.tf_fill_order(tf.constant(n), bag).numpy(), bags.tf_fill_mask(tf.constant(n), bag).numpy())
                 for n in ns]
        ds = tf.data.Dataset.from_tensor_slices(tf.constant(ns, tf.int32)).map(
            lambda k: (bags.tf_fill_order(k, bag), bags.tf_fill_mask(k, bag)))
        graph = [(o.numpy(), m.numpy()) for o, m in ds]
        for n, (eo, em), (go, gm) in zip(ns, eager, graph):
            for order, mask in ((eo, em), (go, gm)):
                assert order.tolist() == bags.fill_order(n, bag).tolist(), (n, bag)
                assert mask.tolist() == bags.fill_mask(n, bag).tolist(), (n, bag)
                assert mask.dtype == np.float32


def test_a_bag_size_below_one_is_refused():
    for fn in (bags.fill_order, bags.fill_mask, bags.chunk_order):
        with pytest.raises(ValueError, match="bag must be >= 1, got 0"):
            fn(3, 0)


def _record(k: int, tile: int = 8):
    tiles = np.stack([np.full((tile, tile, 4), 10 * i, np.uint8) for i in range(k)])
    return features.serialize_bag(
        tiles, image_id="x", labels=[1], source_size=(64, 64), fold=0, cell_ids=[100 + i for i in range(k)],
        bboxes=[(i, i, i + 8, i + 8) for i in range(k)], touches_border=[i % 2 for i in range(k)],
        has_nucleus=[1] * k, cell_areas=[i + 1 for i in range(k)], cell_count=k,
        cell_targets=np.tile(np.arange(k, dtype=np.float32)[:, None] / k, (1, 19)))


@pytest.mark.parametrize("k,bag", [(1, 1), (1, 4), (3, 4), (4, 4), (6, 4), (5, 2)])
def test_the_bag_record_parser_fills_by_the_rules(k, bag):
    """`common.features.parse_bag` (and its targets-only twin): a stored cell i lands where
    `fill_order` puts position i, the mask is `fill_mask`; a record holding more than the bag
    keeps its first `bag` cells."""
    import tensorflow as tf

    rec = tf.constant(_record(k))
    ex = {key: v.numpy() for key, v in features.parse_bag(rec, 8, bag, targets=True).items()}
    order, mask = bags.fill_order(k, bag), bags.fill_mask(k, bag)
    np.testing.assert_array_equal(ex[features.CELL_INDEX], 100 + order)
    np.testing.assert_array_equal(ex["mask"], mask)
    np.testing.assert_array_equal(ex[features.IMAGE][:, 0, 0, 0], 10 * order)
    np.testing.assert_array_equal(ex[features.BBOX][:, 0], order)
    np.testing.assert_array_equal(ex[features.CELL_TARGETS][:, 0], (np.arange(k, dtype=np.float32) / k)[order])
    np.testing.assert_array_equal(features.parse_bag_targets(rec, bag).numpy(), ex[features.CELL_TARGETS])


@pytest.mark.parametrize("k,cells", [(1, 2), (2, 3), (3, 2), (4, 3)])
def test_the_trainers_smaller_bags_fill_by_the_rules(k, cells):
    """`train_tpu.data.parse_bag_example` with 0 < cells < bag and no sampling: the record's
    first cells, filled and masked as a bag of `cells`."""
    import tensorflow as tf

    from train_tpu import data

    (images, mask), labels = data.parse_bag_example(tf.constant(_record(k)), 8, 4, cells=cells)
    np.testing.assert_array_equal(images.numpy()[:, 0, 0, 0], 10 * bags.fill_order(k, cells))
    np.testing.assert_array_equal(mask.numpy(), bags.fill_mask(k, cells))


@pytest.mark.parametrize("n", range(0, 13))
@pytest.mark.parametrize("bag", [1, 3, 4, 5])
def test_chunks_are_consecutive_bags_filled_by_the_rules(n, bag):
    order, mask = bags.chunk_order(n, bag)
    assert order.shape == mask.shape == (-(-n // bag), bag)
    for c in range(len(order)):
        real = min(bag, n - c * bag)
        np.testing.assert_array_equal(order[c], c * bag + bags.fill_order(real, bag))
        np.testing.assert_array_equal(mask[c], bags.fill_mask(real, bag))
    # every cell is real in exactly one place
    assert sorted(order[mask > 0].tolist()) == list(range(n))


def test_chunks_are_consecutive_and_padded_by_repetition():
    order, mask = bags.chunk_order(7, 3)
    assert order.tolist() == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0]]
    order, mask = bags.chunk_order(6, 4)
    assert order.tolist() == [[0, 1, 2, 3], [4, 5, 4, 5]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert bags.chunk_order(0, 4)[0].shape == (0, 4)


def test_choose_cells_is_deterministic_and_depends_on_image_and_seed():
    a = bags.choose_cells(40, 16, "img-a", 0)
    assert a == bags.choose_cells(40, 16, "img-a", 0) and len(a) == 16 and a == sorted(set(a))
    assert a != bags.choose_cells(40, 16, "img-b", 0) and a != bags.choose_cells(40, 16, "img-a", 1)
    assert bags.choose_cells(5, 16, "img-a", 0) == [0, 1, 2, 3, 4]
    assert bags.choose_cells(16, 16, "img-a", 0) == list(range(16))
    assert bags.choose_cells(0, 16, "img-a", 0) == []
    assert all(0 <= i < 40 for i in a)


def test_the_rules_module_imports_no_tensorflow():
    """Builder workers import `common.bags` (choose_cells) and must not pay for TensorFlow."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, common.bags; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
