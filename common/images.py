"""Load one HPA image ID as an `HxWx4 uint8` array (R, G, B, Y) from a folder or `gs://` prefix.

An image is four greyscale files `{ID}_{red,green,blue,yellow}.{ext}`; red = microtubules,
green = the protein, blue = nucleus, yellow = endoplasmic reticulum. Files come as:

- PNG, 8- or 16-bit (Kaggle `train/`, `test/`);
- TIFF and gzipped TIFF `.tif.gz` (the public HPA's 16-bit downloads);
- JPEG (the HPA website), including JPEG data behind a `.png` name, and 3-channel colour files
  where a greyscale one is expected (the website shows each channel in its own colour).

The format is sniffed from the file's first bytes, never trusted from its name. A colour file
gives the plane of its channel's colour: red -> R, green -> G, blue -> B, yellow -> R.
Yellow is shown as R+G, so R and G carry the same signal; R is taken because it is the plane
HPA's own greyscale exports match (on `57_F11_1_yellow` the R plane differs from the 8-bit PNG
by 0.11 grey levels on average, G by 1.4: JPEG keeps less detail in G for yellow pixels).

Bit depth: `to_uint8` is the one rule, see there. Everything is read through
`common.storage.read_bytes`, so local folders and `gs://` prefixes take the same code path.
"""
from __future__ import annotations

import functools
import gzip
import io
import os
import zlib
from typing import Sequence

import numpy as np

from common import storage

CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")

# Tried in this order when looking for a channel file: the Kaggle PNGs first, then the public
# HPA downloads (`.tif.gz`), then plain TIFF and the website's JPEGs.
EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".tif.gz", ".jpg", ".jpeg")

# Plane of a colour file (R, G, B order) that holds each channel; see the module docstring.
_COLOUR_PLANE = {"red": 0, "green": 1, "blue": 2, "yellow": 0}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_GZIP_MAGIC = b"\x1f\x8b"


class ImageLoadError(ValueError):
    """A channel file that is missing, unreadable or inconsistent; the message names the ID and file."""

    def __init__(self, message: str, image_id: str | None = None, path: str | None = None):
        super().__init__(message)
        self.image_id = image_id
        self.path = path


def is_image_failure(err: BaseException, data_errors: tuple = ()) -> bool:
    """True for what makes ONE image fail while a run goes on: its data is bad (ImageLoadError,
    or a stage's own `data_errors`), a transient I/O error outlasted the retries (common.retry),
    or memory ran out on this image. False for anything else (a bug): that stops the run.
    The one rule of predict, segment and the builder."""
    from common import retry

    return isinstance(err, (ImageLoadError, MemoryError, *data_errors)) or retry.is_transient(err)


def check_image_id(image_id: str) -> str:
    """Return `image_id` if it names a file inside the data folder, else raise ImageLoadError.

    Rejected before touching the disk: empty, absolute, containing `/`, `\\`, `..` or a
    control character.
    """
    if not isinstance(image_id, str) or not image_id.strip():
        raise ImageLoadError(f"invalid image ID {image_id!r}: empty", image_id=image_id)
    bad = None
    if "/" in image_id or "\\" in image_id:
        bad = "contains a path separator"
    elif ".." in image_id:
        bad = "contains '..'"
    elif os.path.isabs(image_id) or image_id.startswith("~"):
        bad = "is an absolute path"
    elif any(ord(c) < 32 or ord(c) == 127 for c in image_id):
        bad = "contains a control character"
    if bad:
        raise ImageLoadError(
            f"invalid image ID {image_id!r}: {bad} (an ID must name a file inside the data folder)",
            image_id=image_id,
        )
    return image_id


def _check_channel(channel: str) -> str:
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}; expected one of {CHANNELS}")
    return channel


def _candidates(image_id: str, channel: str) -> list[str]:
    return [f"{image_id}_{channel}{ext}" for ext in EXTENSIONS]


def _find_files(source: str, image_id: str, channels: Sequence[str]) -> dict[str, str]:
    """`{channel: path}` for the channels that have a file; first extension in EXTENSIONS wins."""
    check_image_id(image_id)
    for channel in channels:
        _check_channel(channel)
    found: dict[str, str] = {}
    if storage.is_gcs(source):
        # One listing per image instead of up to 6 existence checks per channel (each a request).
        bucket, key = storage.split_gcs(source)
        key = key.rstrip("/") + "/" if key else ""
        names = {
            blob.name[len(key):]
            for blob in storage.client().list_blobs(bucket, prefix=f"{key}{image_id}_")
        }
        for channel in channels:
            for name in _candidates(image_id, channel):
                if name in names:
                    found[channel] = storage.join(source, name)
                    break
        return found
    for channel in channels:
        for name in _candidates(image_id, channel):
            path = storage.join(source, name)
            if os.path.isfile(path):
                found[channel] = path
                break
    return found


def _missing_error(source: str, image_id: str, channel: str) -> ImageLoadError:
    tried = ", ".join(_candidates(image_id, channel))
    return ImageLoadError(
        f"image {image_id}: no file for channel {channel!r} in {source} (tried {tried})",
        image_id=image_id,
        path=storage.join(source, f"{image_id}_{channel}{EXTENSIONS[0]}"),
    )


def channel_path(source: str, image_id: str, channel: str) -> str:
    """Path of one channel's file in a folder or `gs://` prefix.

    Extensions are tried in the order of EXTENSIONS: .png, .tif, .tiff, .tif.gz, .jpg, .jpeg.
    Raises ImageLoadError when none exists or when the ID would leave the folder.
    """
    found = _find_files(source, image_id, [channel])
    if channel not in found:
        raise _missing_error(source, image_id, channel)
    return found[channel]


def _channel_from_name(path: str) -> str | None:
    base = os.path.basename(str(path)).lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    for channel in CHANNELS:
        if base.endswith("_" + channel):
            return channel
    return None


def _sniff(data: bytes) -> str:
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data.startswith(_TIFF_MAGICS):
        return "tiff"
    if data.startswith(_GZIP_MAGIC):
        return "gzip"
    return "unknown"


def decode_channel(data: bytes, path: str = "<bytes>", channel: str | None = None) -> np.ndarray:
    """Decode one channel file's bytes to `HxW` in the file's own dtype (uint8, uint16, ...).

    `channel` picks the plane of a colour file; by default it is read from the file name
    (`..._{channel}.ext`). `path` is only used in error messages.
    """
    import cv2  # heavy import kept out of module import time

    if not data:
        raise ImageLoadError(f"{path}: empty file", path=path)
    kind = _sniff(data)
    if kind == "gzip":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise ImageLoadError(f"{path}: corrupt gzip data ({err})", path=path) from err
        kind = _sniff(data)
        if kind not in ("tiff", "png", "jpeg"):
            raise ImageLoadError(f"{path}: gzip file does not hold a TIFF, PNG or JPEG image", path=path)
    if kind == "unknown":
        raise ImageLoadError(
            f"{path}: not a PNG, JPEG or TIFF file (starts with {data[:8]!r})", path=path
        )
    if kind == "tiff":
        import tifffile

        try:
            arr = tifffile.imread(io.BytesIO(data))
        except Exception as err:  # tifffile raises many types (ValueError, KeyError for codecs, ...)
            raise ImageLoadError(f"{path}: unreadable TIFF ({type(err).__name__}: {err})", path=path) from err
        arr = np.asarray(arr)
        if arr.size == 0:
            raise ImageLoadError(f"{path}: unreadable TIFF (no image data)", path=path)
        while arr.ndim > 2 and arr.shape[0] == 1:  # (1, H, W) pages
            arr = arr[0]
        rgb_order = True
    else:
        arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise ImageLoadError(f"{path}: corrupt or truncated {kind.upper()} file", path=path)
        rgb_order = False  # OpenCV gives BGR(A)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = _colour_plane(arr[..., :3], rgb_order, path, channel)
    if arr.ndim != 2:
        raise ImageLoadError(
            f"{path}: expected a greyscale or RGB image, got array of shape {arr.shape}", path=path
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageLoadError(f"{path}: image has no pixels (shape {arr.shape})", path=path)
    return arr


def _colour_plane(arr: np.ndarray, rgb_order: bool, path: str, channel: str | None) -> np.ndarray:
    """The plane of an `HxWx3` colour file that holds `channel` (see module docstring)."""
    # A greyscale image saved as RGB has three equal planes: any one will do.
    if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
        return np.ascontiguousarray(arr[..., 0])
    channel = channel or _channel_from_name(path)
    if channel is None:
        raise ImageLoadError(
            f"{path}: colour image, and the channel (one of {CHANNELS}) is neither given nor in "
            "the file name, so the plane to take is unknown",
            path=path,
        )
    plane = _COLOUR_PLANE[_check_channel(channel)]
    if not rgb_order:
        plane = 2 - plane
    return np.ascontiguousarray(arr[..., plane])


def read_channel_raw(path: str, channel: str | None = None) -> np.ndarray:
    """One channel file (local or `gs://`) -> `HxW` in its own dtype, without bit-depth scaling."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError as err:
        raise ImageLoadError(f"{path}: no such file", path=path) from err
    except OSError as err:
        from common import retry

        if retry.is_transient(err):  # not the file's fault: the caller may try again
            raise
        raise ImageLoadError(f"{path}: cannot read ({err})", path=path) from err
    return decode_channel(data, path, channel)


def load_channel(path: str, channel: str | None = None) -> np.ndarray:
    """One channel file (local or `gs://`) -> `HxW uint8`, 16-bit scaled by `to_uint8`."""
    arr = read_channel_raw(path, channel)
    try:
        return to_uint8(arr)
    except ValueError as err:
        raise ImageLoadError(f"{path}: {err}", path=path) from err


@functools.lru_cache(maxsize=1)
def _pool():
    """Threads shared by all `load_image` calls (created on first use, one per channel)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=len(CHANNELS), thread_name_prefix="load_image")


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale pixel values to uint8 by the project's one rule.

    - uint8: returned unchanged.
    - uint16: `(v + 256) // 257`, i.e. ceil(v / 257): 0 -> 0, 65535 -> 255, each 8-bit level
      covers 257 16-bit levels. It is the rule HPA's own 8-bit exports follow (on
      `383_D2_1_blue` the 16-bit original maps onto the 8-bit PNG with all 4,194,304 pixels
      equal; `v >> 8` or rounding `v / 257` differ in 8-9 % of pixels by one level), so a model
      sees the same numbers whichever form an image comes in. 12-bit data stored in uint16 is
      not stretched: it would need a per-file guess, and HPA stores full-range 16-bit.
    - bool: False -> 0, True -> 255.
    - float: values in [0, 1] -> `round(v * 255)`; NaN or values outside [0, 1] raise ValueError.
    Other dtypes raise ValueError.
    """
    arr = np.asarray(arr)
    if not arr.dtype.isnative:  # e.g. big-endian TIFF data
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        # ceil(v / 257) == (v - (v >> 8) + 255) >> 8 for every uint16 v (checked exhaustively in
        # the tests); it never leaves uint16 and is ~10x faster than a division or a lookup table.
        out = arr >> 8
        np.subtract(arr, out, out=out)
        out += 255
        out >>= 8
        return out.astype(np.uint8)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0):
            raise ValueError(
                f"float image values must be finite and in [0, 1], got range "
                f"[{np.nanmin(arr) if np.isfinite(arr).any() else 'nan'}, "
                f"{np.nanmax(arr) if np.isfinite(arr).any() else 'nan'}]"
            )
        return np.rint(arr * 255.0).astype(np.uint8)
    raise ValueError(f"unsupported pixel type {arr.dtype} (expected uint8, uint16, bool or float in [0, 1])")


def load_image(source: str, image_id: str, channels: Sequence[str] = CHANNELS) -> np.ndarray:
    """Load `image_id` from a folder or `gs://` prefix as `HxWxC uint8`, C = len(channels).

    Channels are stacked in the order given (default R, G, B, Y). Any size, square or not.
    Raises ImageLoadError naming the ID and the file for a missing, unreadable or corrupt
    channel file and for channels of different sizes.
    """
    channels = tuple(channels)
    if not channels:
        raise ValueError("load_image needs at least one channel")
    found = _find_files(source, image_id, channels)
    for channel in channels:
        if channel not in found:
            raise _missing_error(source, image_id, channel)
    # The channel files are read and decoded in parallel: downloads overlap (gs://) and
    # OpenCV / zlib release the GIL while decoding.
    futures = [_pool().submit(load_channel, found[channel], channel) for channel in channels]
    planes: list[np.ndarray] = []
    for channel, future in zip(channels, futures):
        path = found[channel]
        try:
            plane = future.result()
        except ImageLoadError as err:
            for other in futures:
                other.cancel()
            raise ImageLoadError(f"image {image_id}: {err}", image_id=image_id, path=path) from err
        if planes and plane.shape != planes[0].shape:
            raise ImageLoadError(
                f"image {image_id}: {path} is {plane.shape[0]}x{plane.shape[1]} (HxW) but "
                f"{found[channels[0]]} is {planes[0].shape[0]}x{planes[0].shape[1]}; "
                "all channels must have the same size",
                image_id=image_id,
                path=path,
            )
        planes.append(plane)
    return np.stack(planes, axis=-1)


def image_size(source: str, image_id: str, channels: Sequence[str] = CHANNELS) -> tuple[int, int]:
    """`(width, height)` of an image from its first channel file that can be read: a PNG's
    header only (its first 24 bytes, read alone from a local file), any other format decoded.
    Raises ImageLoadError when no channel file gives a size. Cheap, but it does not check the
    image: `load_image` does (every channel, the same size)."""
    found = _find_files(source, image_id, tuple(channels))
    errors = []
    for channel in channels:
        if channel not in found:
            continue
        path = found[channel]
        try:
            if storage.is_gcs(path):
                head = storage.read_bytes(path)
            else:
                with open(path, "rb") as fh:
                    head = fh.read(24)
            if head.startswith(_PNG_MAGIC) and len(head) >= 24 and head[12:16] == b"IHDR":
                width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
                if width > 0 and height > 0:
                    return width, height
            plane = read_channel_raw(path, channel)
            return int(plane.shape[1]), int(plane.shape[0])
        except (ImageLoadError, OSError) as err:
            errors.append(str(err))
    raise ImageLoadError(f"image {image_id}: no channel file gives its size in {source}"
                         + (f" ({'; '.join(errors)})" if errors else ""), image_id=image_id)


def composite_rgb(image: np.ndarray) -> np.ndarray:
    """`HxWx4 uint8` (R, G, B, Y) -> `HxWx3 uint8` for display, the usual HPA composite.

    red = R + Y/2, green = G + Y/2, blue = B, clipped at 255 (yellow is red plus green).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 4:
        raise ValueError(f"composite_rgb expects HxWx4 (R, G, B, Y), got shape {image.shape}")
    image = to_uint8(image)
    half_y = (image[..., 3] >> 1).astype(np.uint16)
    out = np.empty(image.shape[:2] + (3,), dtype=np.uint8)
    np.minimum(image[..., 0] + half_y, 255, out=out[..., 0], casting="unsafe")
    np.minimum(image[..., 1] + half_y, 255, out=out[..., 1], casting="unsafe")
    out[..., 2] = image[..., 2]
    return out
