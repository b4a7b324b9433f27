"""The one mask codec: binary mask <-> the competition's mask string.

Competition format (byte for byte): COCO RLE of the column-major (Fortran-ordered) HxW mask,
as pycocotools writes it in its compressed text form, then `zlib.compress(level 9)`, then
base64. Run lengths start with the background run (0 when the first pixel is set) and
alternate background/foreground down each column, then across columns.

`encode_cell` builds that string from a cell's bounding-box crop and the frame size without
ever allocating the HxW frame, which is what makes per-cell encoding cheap: the reference
path (`reference_encode`) copies the whole frame for every cell.
"""
from __future__ import annotations

import base64
import binascii
import zlib
from typing import Sequence

import numpy as np

ZLIB_LEVEL = 9
_ASCII_OFFSET = 48  # pycocotools adds 48 to each 6-bit chunk to make it printable
_MAX_CHUNKS = 13  # 13 * 5 bits cover any int64 delta
_CHUNK_LIMITS = np.array([1 << (5 * k - 1) for k in range(1, _MAX_CHUNKS)], dtype=np.int64)
_CHUNK_INDEX = np.arange(_MAX_CHUNKS, dtype=np.int64)
_CHUNK_CHARS = (np.arange(64) + _ASCII_OFFSET).astype(np.uint8)  # 6-bit chunk -> ASCII byte


class MaskCodecError(ValueError):
    """A mask string that is not valid base64/zlib/COCO RLE, or does not fit its frame."""


def _check_mask(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{what} must be 2-D (HxW), got shape {mask.shape}")
    if mask.dtype != bool:
        raise ValueError(f"{what} must be a bool array, got dtype {mask.dtype}")
    return mask


def reference_encode(mask: np.ndarray) -> str:
    """The competition's own example encoder (pycocotools on the full frame); the baseline.

    mask: HxW bool. Returns the base64 text of zlib(level 9) of the COCO compressed RLE.
    """
    from pycocotools import mask as coco_mask

    mask = _check_mask(mask)
    to_encode = np.asfortranarray(mask.reshape(mask.shape[0], mask.shape[1], 1).astype(np.uint8))
    counts = coco_mask.encode(to_encode)[0]["counts"]
    return base64.b64encode(zlib.compress(counts, ZLIB_LEVEL)).decode()


# ---------------------------------------------------------------------------- COCO text form
def counts_to_string(counts: Sequence[int]) -> bytes:
    """COCO run lengths -> pycocotools' compressed text (its `rleToString`), vectorised.

    Each value (from index 3 on, the difference to the count two places back) is written in
    little-endian 5-bit chunks, 0x20 marks "more chunks follow", bit 0x10 of the last chunk is
    the sign, each chunk + 48 is one ASCII byte.
    """
    cnts = np.asarray(counts, dtype=np.int64)
    if cnts.size == 0:
        return b""
    x = cnts.copy()
    if x.size > 3:
        x[3:] -= cnts[1:-2]
    # Chunks needed: the smallest k whose 5k-bit two's complement range holds x, i.e. the
    # first k with |x| (one's complement for negatives: x ^ (x >> 63)) below 2**(5k-1).
    nchunks = np.searchsorted(_CHUNK_LIMITS, x ^ (x >> 63), side="right") + 1
    j = _CHUNK_INDEX[: int(nchunks.max())]
    chunk = (x[:, None] >> (5 * j)) & 0x1F
    chunk[j < (nchunks - 1)[:, None]] |= 0x20  # "more chunks follow"
    return _CHUNK_CHARS[chunk[j < nchunks[:, None]]].tobytes()


def counts_from_string(text: bytes) -> np.ndarray:
    """pycocotools' compressed text -> run lengths (its `rleFrString`), vectorised; int64."""
    c = np.frombuffer(bytes(text), dtype=np.uint8).astype(np.int64) - _ASCII_OFFSET
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if c.min() < 0 or c.max() > 63:
        raise MaskCodecError("RLE text has a byte outside the COCO range 48-111")
    last = (c & 0x20) == 0
    if not last[-1]:
        raise MaskCodecError("RLE text ends in the middle of a number")
    group = np.concatenate([[0], np.cumsum(last)[:-1]])
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    k = np.arange(c.size) - starts[group]
    if k.max() >= _MAX_CHUNKS:
        raise MaskCodecError("RLE text has a number too long to be a run length")
    values = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    ends = np.flatnonzero(last)
    negative = (c[ends] & 0x10) != 0
    shift = 5 * (k[ends] + 1)
    values[negative] |= -(np.int64(1) << shift[negative])
    # Delta coding from index 3 on: counts[m] = x[m] + counts[m-2]. Two interleaved running
    # sums, one over indices 1, 3, 5, ... and one over 2, 4, 6, ...; index 0 stands alone.
    out = values.copy()
    out[1::2] = np.cumsum(values[1::2])
    out[2::2] = np.cumsum(values[2::2])
    return out


def pack(coco_text: bytes) -> str:
    """COCO compressed RLE text -> competition string (zlib level 9, then base64)."""
    return base64.b64encode(zlib.compress(coco_text, ZLIB_LEVEL)).decode()


def unpack(s: str) -> bytes:
    """Competition string -> COCO compressed RLE text. Raises MaskCodecError on bad input."""
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as err:
        raise MaskCodecError(f"mask is not valid base64: {err}") from None
    try:
        return zlib.decompress(raw)
    except zlib.error as err:
        raise MaskCodecError(f"mask is not valid zlib data: {err}") from None


def decode_counts(s: str, height: int, width: int) -> np.ndarray:
    """Competition string -> COCO run lengths (int64), checked to cover exactly HxW pixels."""
    counts = counts_from_string(unpack(s))
    total = int(counts.sum()) if counts.size else 0
    if counts.size == 0 or (counts < 0).any() or total != int(height) * int(width):
        raise MaskCodecError(
            f"mask run lengths cover {total} pixels, not the {height}x{width} (HxW) frame "
            f"({int(height) * int(width)} pixels)"
        )
    return counts


def coco_rle(s: str, height: int, width: int) -> dict:
    """Competition string -> pycocotools RLE dict `{'size': [H, W], 'counts': bytes}` (checked)."""
    text = unpack(s)
    counts = counts_from_string(text)
    if counts.size == 0 or (counts < 0).any() or int(counts.sum()) != int(height) * int(width):
        decode_counts(s, height, width)  # raises with the message
    return {"size": [int(height), int(width)], "counts": text}


def decode(s: str, height: int, width: int) -> np.ndarray:
    """Competition string -> HxW bool mask; the exact inverse of `encode`."""
    counts = decode_counts(s, height, width)
    values = np.zeros(counts.size, dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(int(width), int(height)).T


# ---------------------------------------------------------------------------------- encoders
def _runs_to_counts(starts: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """Foreground runs [start, end) in column-major frame order -> COCO run lengths."""
    if starts.size == 0:
        return np.array([n], dtype=np.int64)
    edges = np.empty(2 * starts.size + 2, dtype=np.int64)
    edges[0] = 0
    edges[1:-1:2] = starts
    edges[2:-1:2] = ends
    edges[-1] = n
    counts = np.diff(edges)
    if counts[-1] == 0:  # mask ends with foreground: pycocotools writes no trailing 0
        counts = counts[:-1]
    return counts


def encode_cell(crop: np.ndarray, bbox: Sequence[int], frame: Sequence[int]) -> str:
    """Encode one cell from its bounding-box crop, never touching the full frame.

    crop: hxw bool, the mask inside `bbox` = (y0, x0, y1, x1) (pixels, end exclusive,
    h = y1 - y0, w = x1 - x0); frame: (H, W) of the full image. Returns the same string as
    `reference_encode` of the HxW mask that is `crop` at `bbox` and False elsewhere.
    """
    crop = _check_mask(crop, "crop")
    y0, x0, y1, x1 = (int(v) for v in bbox)
    H, W = (int(v) for v in frame)
    h, w = crop.shape
    if (y1 - y0, x1 - x0) != (h, w):
        raise ValueError(f"crop shape {crop.shape} does not match bbox {tuple(bbox)}")
    if not (0 <= y0 <= y1 <= H and 0 <= x0 <= x1 <= W) or H <= 0 or W <= 0:
        raise ValueError(f"bbox {tuple(bbox)} is not inside the frame {H}x{W}")
    n = H * W
    if h == 0 or w == 0:
        return pack(counts_to_string([n]))
    # Vertical changes between consecutive pixels of each column, with a background row
    # padded above and below so every run starts and ends inside its own column. Found in the
    # row-major crop (no transposed copy) and put in column-major order by one small sort.
    n_changes = (h + 1) * w
    padded = np.zeros((h + 2, w), dtype=bool)
    padded[1:-1] = crop
    changes = np.zeros(-(-n_changes // 8) * 8, dtype=bool)  # whole 8-byte words
    np.not_equal(padded[1:], padded[:-1], out=changes[:n_changes].reshape(h + 1, w))
    # Changes are sparse (about two per column): find the non-zero 8-byte words first, then
    # the bytes inside them, instead of scanning every byte.
    words = np.flatnonzero(changes.view(np.uint64) != 0)
    inside = np.flatnonzero(changes.reshape(-1, 8)[words])
    k = words[inside >> 3] * 8 + (inside & 7)
    row, col = np.divmod(k, w)  # change above crop row `row` (== h: below the last row)
    edges = (x0 + col) * H + (y0 + row)
    edges.sort()  # column-major frame order; then they alternate rise, fall, rise, ...
    starts, ends = edges[0::2], edges[1::2]
    if y0 == 0 and y1 == H and starts.size > 1:
        # A run reaching the bottom of the frame continues at the top of the next column
        # when that pixel is set too: merge runs whose end is the next run's start.
        keep = ends[:-1] != starts[1:]
        starts = starts[np.concatenate([[True], keep])]
        ends = ends[np.concatenate([keep, [True]])]
    return pack(counts_to_string(_runs_to_counts(starts, ends, n)))


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (y0, x0, y1, x1) of the set pixels of an HxW bool mask (end exclusive); zeros if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return (0, 0, 0, 0)
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def encode(mask: np.ndarray) -> str:
    """HxW bool mask -> competition string (fast; same bytes as `reference_encode`)."""
    mask = _check_mask(mask)
    y0, x0, y1, x1 = mask_bbox(mask)
    return encode_cell(mask[y0:y1, x0:x1], (y0, x0, y1, x1), mask.shape)


def area(s: str, height: int, width: int) -> int:
    """Number of set pixels of a competition mask string (no decoding to pixels)."""
    return int(decode_counts(s, height, width)[1::2].sum())
