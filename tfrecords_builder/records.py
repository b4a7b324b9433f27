"""TensorFlow-free record writing: `tf.train.Example` wire format and TFRecord framing.

Worker processes must not import TensorFlow (5 s and ~0.5 GB each, and TF does not mix with
fork), yet `common.features.serialize` builds its Example with TF's classes. `tile_example` is
the same schema, written straight in protobuf wire format from the keys in `common.features`;
a test checks that its bytes parse to the very Example `common.features.serialize` builds, so
the schema still has one definition. Keys are written in sorted order, which makes the bytes
deterministic: a resumed build writes byte-identical shards.

TFRecord framing per record: `uint64 length | uint32 masked_crc32c(length) | data |
uint32 masked_crc32c(data)`, all little-endian (TensorFlow's `record_writer.cc`).
"""
from __future__ import annotations

import struct
from typing import BinaryIO, Iterator, Mapping, Sequence

import numpy as np

from common import features as F
from common.labels import NUM_CLASSES

_MASK_DELTA = 0xA282EAD8


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return google_crc32c.value(data)


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of `data`."""
    crc = _crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
    """One record with its TFRecord length and CRC framing."""
    header = struct.pack("<Q", len(record))
    return header + struct.pack("<I", masked_crc32c(header)) + record + struct.pack("<I", masked_crc32c(record))


def read_records(fh: BinaryIO, name: str = "<stream>") -> Iterator[bytes]:
    """Records of a TFRecord stream, CRCs checked; raises ValueError naming `name` on damage."""
    offset = 0
    while True:
        header = fh.read(12)
        if not header:
            return
        if len(header) < 12:
            raise ValueError(f"{name}: truncated record header at byte {offset}")
        (length,) = struct.unpack("<Q", header[:8])
        if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
            raise ValueError(f"{name}: bad length CRC at byte {offset}")
        data = fh.read(length)
        footer = fh.read(4)
        if len(data) < length or len(footer) < 4:
            raise ValueError(f"{name}: truncated record at byte {offset}")
        if struct.unpack("<I", footer)[0] != masked_crc32c(data):
            raise ValueError(f"{name}: bad data CRC at byte {offset}")
        offset += 16 + length
        yield data


# --- protobuf wire format ---------------------------------------------------------------------

def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # int64 negatives are 10-byte two's complement varints
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(value) -> bytes:
    """`bytes` -> Feature{bytes_list}; a sequence of ints -> Feature{int64_list} (packed)."""
    if isinstance(value, (bytes, bytearray)):
        return _field(1, _field(1, bytes(value)))  # Feature.bytes_list = 1, BytesList.value = 1
    packed = b"".join(_varint(int(v)) for v in value)
    inner = _field(1, packed) if packed else b""  # Int64List.value = 1, packed
    return _field(3, inner)  # Feature.int64_list = 3


def encode_example(feature: Mapping[str, object]) -> bytes:
    """`{key: bytes | [int, ...]}` -> serialized `tf.train.Example`, keys in sorted order."""
    entries = b"".join(
        _field(1, _field(1, key.encode("utf-8")) + _field(2, _feature(feature[key])))
        for key in sorted(feature)
    )  # Features.feature = 1 (map entry: key = 1, value = 2)
    return _field(1, entries)  # Example.features = 1


def tile_example(
    tile: np.ndarray,
    *,
    image_id: str,
    labels: Sequence[int],
    source_size: tuple[int, int],
    fold: int = -1,
    cell_index: int = F.WHOLE_IMAGE,
    bbox: Sequence[int] | None = None,
    touches_border: bool = False,
    has_nucleus: bool = True,
    cell_area: int = 0,
) -> bytes:
    """`common.features.serialize` without TensorFlow: same arguments, same Example.

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
        F.IMAGE: F.encode_tile(tile),
        F.TILE_SIZE: [tile.shape[0]],
        F.LABELS: [int(v) for v in labels],
        F.IMAGE_ID: image_id.encode("utf-8"),
        F.CELL_INDEX: [int(cell_index)],
        F.FOLD: [int(fold)],
        F.SOURCE_HEIGHT: [h],
        F.SOURCE_WIDTH: [w],
        F.BBOX: list(bbox),
        F.TOUCHES_BORDER: [int(bool(touches_border))],
        F.HAS_NUCLEUS: [int(bool(has_nucleus))],
        F.CELL_AREA: [int(cell_area)],
    })
