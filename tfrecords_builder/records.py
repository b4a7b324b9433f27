"""TensorFlow-free TFRecord framing (workers build Examples with `common.features.serialize`,
which needs no TensorFlow either).

TFRecord framing per record: `uint64 length | uint32 masked_crc32c(length) | data |
uint32 masked_crc32c(data)`, all little-endian (TensorFlow's `record_writer.cc`).
"""
from __future__ import annotations

import struct
from typing import BinaryIO, Iterator


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
