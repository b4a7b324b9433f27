"""The TFRecord schema: feature keys, `serialize` (writer) and `parse` (reader) in one place.

One `tf.train.Example` per tile. Whole-image tiles have `cell_index = -1` and the full frame as
their box. Pixels are stored as one lossless 4-channel PNG (R, G, B, Y in the PNG's RGBA).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

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
    """`bytes` -> Feature{bytes_list}; a sequence of ints -> Feature{int64_list} (packed)."""
    if isinstance(value, (bytes, bytearray)):
        return _field(1, _field(1, bytes(value)))  # Feature.bytes_list = 1, BytesList.value = 1
    packed = b"".join(_varint(int(v)) for v in value)
    inner = _field(1, packed) if packed else b""  # Int64List.value = 1, packed
    return _field(3, inner)  # Feature.int64_list = 3


def encode_example(feature: dict) -> bytes:
    """`{key: bytes | [int, ...]}` -> serialized `tf.train.Example`, keys in sorted order.

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
) -> bytes:
    """One tile and its facts -> a serialized `tf.train.Example` (no TensorFlow needed).

    tile: `NxNx4 uint8`; source_size: full image `(height, width)`; bbox `(y0, x0, y1, x1)`
    in full-resolution pixels, default the full frame.
    """
    if tile.ndim != 3 or tile.shape[0] != tile.shape[1]:
        raise ValueError(f"{image_id}: tiles are square, got {tile.shape}")
    for v in labels:
        if not 0 <= int(v) < NUM_CLASSES:
            raise ValueError(f"{image_id}: label {v} outside 0-{NUM_CLASSES - 1}")
    h, w = int(source_size[0]), int(source_size[1])
    bbox = (0, 0, h, w) if bbox is None else tuple(int(v) for v in bbox)
    return encode_example({
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


def feature_spec() -> dict:
    import tensorflow as tf

    scalar = tf.io.FixedLenFeature([], tf.int64)
    return {
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


def parse(serialized, tile_size: int | None = None) -> dict:
    """Serialized example (scalar string tensor) -> dict of tensors; usable inside `tf.data`.

    `image` is `uint8 [N, N, 4]` (static shape when `tile_size` is given, as TPUs need);
    `labels` is the `float32 [19]` multi-hot vector; the other keys keep their names.
    """
    import tensorflow as tf

    ex = tf.io.parse_single_example(serialized, feature_spec())
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


def multi_hot_ids(label_ids):
    """Parsed label ids (a sparse int64 tensor) -> `float32 [19]` multi-hot."""
    import tensorflow as tf

    ids = tf.sparse.to_dense(label_ids)
    # sum-then-clip: an empty label list gives zeros (reduce_max would give -inf)
    hot = tf.minimum(tf.reduce_sum(tf.one_hot(ids, NUM_CLASSES, dtype=tf.float32), axis=0), 1.0)
    return tf.ensure_shape(hot, [NUM_CLASSES])

