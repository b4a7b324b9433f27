"""The TFRecord schema: feature keys, `serialize` (writer) and `parse` (reader) in one place.

One `tf.train.Example` per tile. Whole-image tiles have `cell_index = -1` and the full frame as
their box. Pixels are stored as one lossless 4-channel PNG (R, G, B, Y in the PNG's RGBA).

Bag datasets (`--mode bag`) hold one example per image instead: the same keys, with one value
per cell in the per-cell keys (`image` holds K PNGs, `bbox` 4K numbers, ...), K <= the bag
size, plus `cell_count`, the number of cells the image had before the builder chose K of them.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from common import bags
from common.labels import NUM_CLASSES

# Feature keys: the only place they are spelled.
IMAGE = "image"  # bytes: PNG, tile_size x tile_size x 4, uint8
TILE_SIZE = "tile_size"  # int64: side of the square tile, px
LABELS = "labels"  # int64 list: class indices (image-level: weak for cells)
IMAGE_ID = "image_id"  # bytes
CELL_INDEX = "cell_index"  # int64: cell id in the image's label map, -1 for whole images
FOLD = "fold"  # int64
SOURCE_HEIGHT = "source_height"  # int64: full-resolution image size
SOURCE_WIDTH = "source_width"
BBOX = "bbox"  # int64 x 4: y0, x0, y1, x1 in full-resolution pixels (half-open)
TOUCHES_BORDER = "touches_border"  # int64 0/1
HAS_NUCLEUS = "has_nucleus"  # int64 0/1
CELL_AREA = "cell_area"  # int64: pixels at full resolution (0 for whole images)
CELL_COUNT = "cell_count"  # int64, bags only: the image's cells before choosing the bag's
# float32 x 19 per cell (x K in a bag), only in builds with --cell-labels: the cell's soft
# targets in [0, 1] (common.cell_labels), or its image's labels as 0/1 where the table has none
CELL_TARGETS = "cell_targets"

WHOLE_IMAGE = -1



def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # int64 negatives are 10-byte two's complement varints
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(value) -> bytes:
    """`bytes` -> Feature{bytes_list}; a float NumPy array -> Feature{float_list} (packed
    float32); a sequence of ints -> Feature{int64_list} (packed)."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        packed = value.astype("<f4").reshape(-1).tobytes()
        return _field(2, _field(1, packed) if packed else b"")  # Feature.float_list = 2, FloatList.value = 1
    if isinstance(value, (bytes, bytearray)):
        return _field(1, _field(1, bytes(value)))  # Feature.bytes_list = 1, BytesList.value = 1
    if value and isinstance(value[0], (bytes, bytearray)):  # several byte strings
        return _field(1, b"".join(_field(1, bytes(v)) for v in value))
    packed = b"".join(_varint(int(v)) for v in value)
    inner = _field(1, packed) if packed else b""  # Int64List.value = 1, packed
    return _field(3, inner)  # Feature.int64_list = 3


def encode_example(feature: dict) -> bytes:
    """`{key: bytes | [int, ...] | float ndarray}` -> serialized `tf.train.Example`, keys in sorted order.

    Written straight in protobuf wire format, so builder worker processes need no TensorFlow
    (5 s and ~0.5 GB each to import, and it does not mix with fork), and the bytes are
    deterministic (a resumed build writes byte-identical shards). A test parses the result
    with TensorFlow's own `tf.train.Example` and compares it with one built by TF's classes.
    """
    entries = b"".join(
        _field(1, _field(1, key.encode("utf-8")) + _field(2, _feature(feature[key])))
        for key in sorted(feature)
    )  # Features.feature = 1 (map entry: key = 1, value = 2)
    return _field(1, entries)  # Example.features = 1


def encode_tile(tile: np.ndarray, compression: int = 1) -> bytes:
    """`NxNx4 uint8` -> PNG bytes with R, G, B, Y as the PNG's R, G, B, A."""
    if tile.ndim != 3 or tile.shape[2] != 4 or tile.dtype != np.uint8:
        raise ValueError(f"a tile must be NxNx4 uint8, got {tile.shape} {tile.dtype}")
    # OpenCV writes its BGRA order as PNG RGBA, so hand it B, G, R, Y.
    ok, buf = cv2.imencode(".png", tile[..., [2, 1, 0, 3]], [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_tile(data: bytes) -> np.ndarray:
    """Inverse of `encode_tile` in NumPy (tests, tools); `parse` decodes inside TensorFlow."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return arr[..., [2, 1, 0, 3]]


def serialize(
    tile: np.ndarray,
    *,
    image_id: str,
    labels: Sequence[int],
    source_size: tuple[int, int],
    fold: int = -1,
    cell_index: int = WHOLE_IMAGE,
    bbox: Sequence[int] | None = None,
    touches_border: bool = False,
    has_nucleus: bool = True,
    cell_area: int = 0,
    cell_targets: Sequence[float] | None = None,
) -> bytes:
    """One tile and its facts -> a serialized `tf.train.Example` (no TensorFlow needed).

    tile: `NxNx4 uint8`; source_size: full image `(height, width)`; bbox `(y0, x0, y1, x1)`
    in full-resolution pixels, default the full frame; cell_targets: the cell's `(19,)` soft
    targets in [0, 1] (builds with cell labels), None = no `cell_targets` key.
    """
    if tile.ndim != 3 or tile.shape[0] != tile.shape[1]:
        raise ValueError(f"{image_id}: tiles are square, got {tile.shape}")
    for v in labels:
        if not 0 <= int(v) < NUM_CLASSES:
            raise ValueError(f"{image_id}: label {v} outside 0-{NUM_CLASSES - 1}")
    h, w = int(source_size[0]), int(source_size[1])
    bbox = (0, 0, h, w) if bbox is None else tuple(int(v) for v in bbox)
    extra = {} if cell_targets is None else {CELL_TARGETS: _targets(cell_targets, 1, image_id)}
    return encode_example(extra | {
        IMAGE: encode_tile(tile),
        TILE_SIZE: [tile.shape[0]],
        LABELS: [int(v) for v in labels],
        IMAGE_ID: image_id.encode("utf-8"),
        CELL_INDEX: [int(cell_index)],
        FOLD: [int(fold)],
        SOURCE_HEIGHT: [h],
        SOURCE_WIDTH: [w],
        BBOX: list(bbox),
        TOUCHES_BORDER: [int(bool(touches_border))],
        HAS_NUCLEUS: [int(bool(has_nucleus))],
        CELL_AREA: [int(cell_area)],
    })


def serialize_bag(
    tiles: np.ndarray,
    *,
    image_id: str,
    labels: Sequence[int],
    source_size: tuple[int, int],
    fold: int,
    cell_ids: Sequence[int],
    bboxes: Sequence[Sequence[int]],
    touches_border: Sequence[bool],
    has_nucleus: Sequence[bool],
    cell_areas: Sequence[int],
    cell_count: int,
    cell_targets: Sequence[Sequence[float]] | None = None,
) -> bytes:
    """An image's chosen cells (`K x N x N x 4 uint8`, K >= 1) and their facts -> one example;
    cell_targets: `(K, 19)` soft targets (builds with cell labels), None = no such key."""
    k = len(tiles)
    if k < 1 or tiles.ndim != 4 or tiles.shape[1] != tiles.shape[2]:
        raise ValueError(f"{image_id}: a bag holds K >= 1 square tiles, got {tiles.shape}")
    for name, seq in (("cell_ids", cell_ids), ("bboxes", bboxes), ("touches_border", touches_border),
                      ("has_nucleus", has_nucleus), ("cell_areas", cell_areas)):
        if len(seq) != k:
            raise ValueError(f"{image_id}: {k} tiles but {len(seq)} {name}")
    for v in labels:
        if not 0 <= int(v) < NUM_CLASSES:
            raise ValueError(f"{image_id}: label {v} outside 0-{NUM_CLASSES - 1}")
    extra = {} if cell_targets is None else {CELL_TARGETS: _targets(cell_targets, k, image_id)}
    return encode_example(extra | {
        IMAGE: [encode_tile(t) for t in tiles],
        TILE_SIZE: [tiles.shape[1]],
        LABELS: [int(v) for v in labels],
        IMAGE_ID: image_id.encode("utf-8"),
        CELL_INDEX: [int(v) for v in cell_ids],
        FOLD: [int(fold)],
        SOURCE_HEIGHT: [int(source_size[0])],
        SOURCE_WIDTH: [int(source_size[1])],
        BBOX: [int(v) for box in bboxes for v in box],
        TOUCHES_BORDER: [int(bool(v)) for v in touches_border],
        HAS_NUCLEUS: [int(bool(v)) for v in has_nucleus],
        CELL_AREA: [int(v) for v in cell_areas],
        CELL_COUNT: [int(cell_count)],
    })


def _targets(values, cells: int, image_id: str) -> np.ndarray:
    """`cells` cells' soft targets -> `float32 [cells * 19]`, checked to lie in [0, 1]."""
    t = np.asarray(values, np.float32).reshape(-1)
    if t.size != cells * NUM_CLASSES:
        raise ValueError(f"{image_id}: {t.size} cell targets for {cells} cell(s), expected "
                         f"{cells * NUM_CLASSES}")
    if not np.all((t >= 0) & (t <= 1)):  # NaN fails too
        raise ValueError(f"{image_id}: cell targets outside [0, 1]")
    return t


def has_targets(serialized: bytes) -> bool:
    """Whether a serialized record carries `cell_targets` (a build with cell labels)."""
    import tensorflow as tf

    return CELL_TARGETS in tf.train.Example.FromString(serialized).features.feature


def bag_feature_spec(targets: bool = False) -> dict:
    import tensorflow as tf

    scalar = tf.io.FixedLenFeature([], tf.int64)
    listed = tf.io.FixedLenSequenceFeature([], tf.int64, allow_missing=True)
    return {
        IMAGE: tf.io.FixedLenSequenceFeature([], tf.string, allow_missing=True),
        TILE_SIZE: scalar,
        LABELS: tf.io.VarLenFeature(tf.int64),
        IMAGE_ID: tf.io.FixedLenFeature([], tf.string),
        CELL_INDEX: listed,
        FOLD: scalar,
        SOURCE_HEIGHT: scalar,
        SOURCE_WIDTH: scalar,
        BBOX: listed,
        TOUCHES_BORDER: listed,
        HAS_NUCLEUS: listed,
        CELL_AREA: listed,
        CELL_COUNT: scalar,
        **({CELL_TARGETS: tf.io.FixedLenSequenceFeature([], tf.float32, allow_missing=True)} if targets else {}),
    }


def parse_bag(serialized, tile_size: int, bag: int, targets: bool = False) -> dict:
    """Serialized bag example -> fixed-shape tensors (TPUs need static shapes).

    `image uint8 [bag, S, S, 4]`: the K stored cells, then the same cells again in order until
    the bag is full (`common.bags.tf_fill_order`); `mask float32 [bag]`: 1 for the first K
    (`common.bags.tf_fill_mask`); `labels float32 [19]`; per-cell keys
    (`cell_index`, `touches_border`, `has_nucleus`, `cell_area`: `[bag]`, `bbox`: `[bag, 4]`)
    padded the same way; `cell_count`: the image's cells before the builder's choice.
    A record with more than `bag` cells keeps its first `bag`. targets: also `cell_targets
    float32 [bag, 19]`, padded the same way (a record without them is an error).
    """
    import tensorflow as tf

    ex = tf.io.parse_single_example(serialized, bag_feature_spec(targets))
    pngs = ex[IMAGE][:bag]
    k = tf.shape(pngs)[0]
    order = bags.tf_fill_order(k, bag)
    images = tf.map_fn(lambda b: tf.ensure_shape(tf.io.decode_png(b, channels=4), [tile_size, tile_size, 4]),
                       tf.gather(pngs, order), fn_output_signature=tf.TensorSpec([tile_size, tile_size, 4], tf.uint8))
    out = {
        IMAGE: tf.ensure_shape(images, [bag, tile_size, tile_size, 4]),
        "mask": bags.tf_fill_mask(k, bag),
        LABELS: multi_hot_ids(ex[LABELS]),
        BBOX: tf.ensure_shape(tf.gather(tf.reshape(ex[BBOX], [-1, 4]), order), [bag, 4]),
    }
    for key in (CELL_INDEX, TOUCHES_BORDER, HAS_NUCLEUS, CELL_AREA):
        out[key] = tf.ensure_shape(tf.gather(ex[key], order), [bag])
    for key in (TILE_SIZE, IMAGE_ID, FOLD, SOURCE_HEIGHT, SOURCE_WIDTH, CELL_COUNT):
        out[key] = ex[key]
    if targets:
        out[CELL_TARGETS] = _bag_targets(ex[CELL_TARGETS], k, order, bag)
    return out


def _bag_targets(flat, k, order, bag: int):
    """A bag's stored `cell_targets` (K * 19 floats) -> `[bag, 19]` in the cells' `order`; a
    record whose count is not 19 per stored cell fails here."""
    import tensorflow as tf

    rows = tf.reshape(flat, [-1, NUM_CLASSES])
    tf.debugging.assert_greater_equal(tf.shape(rows)[0], k, message="cell_targets: fewer rows than cells")
    return tf.ensure_shape(tf.gather(rows, order), [bag, NUM_CLASSES])


def parse_bag_targets(serialized, bag: int):
    """Serialized bag -> `cell_targets float32 [bag, 19]` only (padded as `parse_bag`), without
    decoding the PNGs."""
    import tensorflow as tf

    spec = bag_feature_spec(targets=True)
    ex = tf.io.parse_single_example(serialized, {k: spec[k] for k in (IMAGE, CELL_TARGETS)})
    k = tf.minimum(tf.shape(ex[IMAGE])[0], bag)
    return _bag_targets(ex[CELL_TARGETS], k, bags.tf_fill_order(k, bag), bag)


def feature_spec(targets: bool = False) -> dict:
    import tensorflow as tf

    scalar = tf.io.FixedLenFeature([], tf.int64)
    extra = {CELL_TARGETS: tf.io.FixedLenFeature([NUM_CLASSES], tf.float32)} if targets else {}
    return extra | {
        IMAGE: tf.io.FixedLenFeature([], tf.string),
        TILE_SIZE: scalar,
        LABELS: tf.io.VarLenFeature(tf.int64),
        IMAGE_ID: tf.io.FixedLenFeature([], tf.string),
        CELL_INDEX: scalar,
        FOLD: scalar,
        SOURCE_HEIGHT: scalar,
        SOURCE_WIDTH: scalar,
        BBOX: tf.io.FixedLenFeature([4], tf.int64),
        TOUCHES_BORDER: scalar,
        HAS_NUCLEUS: scalar,
        CELL_AREA: scalar,
    }


def parse(serialized, tile_size: int | None = None, targets: bool = False) -> dict:
    """Serialized example (scalar string tensor) -> dict of tensors; usable inside `tf.data`.

    `image` is `uint8 [N, N, 4]` (static shape when `tile_size` is given, as TPUs need);
    `labels` is the `float32 [19]` multi-hot vector; the other keys keep their names.
    targets: also `cell_targets float32 [19]` (a record without them is an error).
    """
    import tensorflow as tf

    ex = tf.io.parse_single_example(serialized, feature_spec(targets))
    image = tf.io.decode_png(ex[IMAGE], channels=4)
    if tile_size is not None:
        image = tf.ensure_shape(image, [tile_size, tile_size, 4])
    out = {k: v for k, v in ex.items() if k not in (IMAGE, LABELS)}
    out[IMAGE] = image
    out[LABELS] = multi_hot_ids(ex[LABELS])
    return out


def parse_labels(serialized):
    """Serialized example -> `labels float32 [19]` only, without decoding the PNG (cheap)."""
    import tensorflow as tf

    spec = {LABELS: feature_spec()[LABELS]}
    return multi_hot_ids(tf.io.parse_single_example(serialized, spec)[LABELS])


def parse_targets(serialized):
    """Serialized cell example -> `cell_targets float32 [19]` only, without decoding the PNG."""
    import tensorflow as tf

    spec = {CELL_TARGETS: feature_spec(targets=True)[CELL_TARGETS]}
    return tf.io.parse_single_example(serialized, spec)[CELL_TARGETS]


def multi_hot_ids(label_ids):
    """Parsed label ids (a sparse int64 tensor) -> `float32 [19]` multi-hot."""
    import tensorflow as tf

    ids = tf.sparse.to_dense(label_ids)
    # sum-then-clip: an empty label list gives zeros (reduce_max would give -inf)
    hot = tf.minimum(tf.reduce_sum(tf.one_hot(ids, NUM_CLASSES, dtype=tf.float32), axis=0), 1.0)
    return tf.ensure_shape(hot, [NUM_CLASSES])

