"""The one preprocessing: cell tiles and whole-image tiles, with their spec saved as JSON.

Images are `HxWx4 uint8` (R, G, B, Y) at full resolution; label maps are `HxW` integers with
0 = background. Bounding boxes are `(y0, x0, y1, x1)`, half-open, in full-resolution pixels.
The same functions cut tiles for the TFRecord builder and for inference; the trainer writes the
spec it trained on into `preprocess.json` and inference reads it back, never retyping it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import cv2
import numpy as np
from common import config as cfglib
from common.segmentation import SegmentationSpec, cell_boxes  # noqa: F401 - cell_boxes: part of this module's interface

PREPROCESS_FILE = "preprocess.json"


@dataclass(frozen=True)
class TileSpec:
    """How a tile is cut. Saved, with the bag size and the segmentation, beside every dataset and
    model as `preprocess.json` (`Preprocess`)."""

    size: int = 224  # output side, pixels
    mode: str = "cell"  # "cell": one tile per cell; "image": the whole image
    mask_outside: bool = True  # cell mode: zero the pixels that are not the cell's
    margin: float = 0.0  # cell mode: widen the box by this fraction of its longer side
    interpolation: str = "area"  # "area" (best for shrinking), "linear" or "nearest"
    model_size: int = 0  # side the model sees; 0 = `size`. Else tiles are cut at `size` and
    # then resized with `resize_tiles` (one TF op, same in training's tf.data and in inference)

    @property
    def input_size(self) -> int:
        """Side of the model's input, pixels."""
        return self.model_size or self.size

    def __post_init__(self):
        if self.mode not in ("cell", "image"):
            raise ValueError(f"TileSpec.mode must be 'cell' or 'image', got {self.mode!r}")
        if self.size < 8:
            raise ValueError(f"TileSpec.size must be >= 8, got {self.size}")
        if self.interpolation not in _INTERP:
            raise ValueError(f"TileSpec.interpolation must be one of {sorted(_INTERP)}")
        if self.margin < 0:
            raise ValueError("TileSpec.margin must be >= 0")
        if self.model_size and self.model_size < 8:
            raise ValueError(f"TileSpec.model_size must be 0 or >= 8, got {self.model_size}")

    def to_json(self) -> str:
        return cfglib.to_json(self)

    @classmethod
    def from_json(cls, text: str) -> "TileSpec":
        return cfglib.from_json(cls, text)

    def save(self, path: str) -> None:
        cfglib.save(self, path)

    @classmethod
    def load(cls, path: str) -> "TileSpec":
        return cfglib.load(cls, path)

    def replace(self, **changes) -> "TileSpec":
        return dataclasses.replace(self, **changes)


# The TileSpec fields that say how a tile is cut (what `Preprocess.tile` holds).
CUT_FIELDS = ("size", "mode", "mask_outside", "margin", "interpolation", "model_size")


@dataclass(frozen=True)
class Preprocess:
    """Everything a dataset's or model's `preprocess.json` records, in its three parts: how a
    tile is cut (`tile`), the bag size (`bag`: 0 = one cell per example; N = an image's cells as
    one bag of N, cell mode only) and how the cells were segmented (`segmentation`; None = not
    recorded: image mode, or a file written before it was recorded).

    Saved FLAT, as it always was: the tile's fields beside `bag` and `segmentation`, so files
    written before this class existed load unchanged (a missing `bag` is 0, a missing
    `segmentation` None) and a saved file is byte-identical to what TileSpec.save wrote.
    """

    tile: TileSpec
    bag: int = 0
    segmentation: SegmentationSpec | None = None

    def __post_init__(self):
        if not isinstance(self.tile, TileSpec):
            raise TypeError(f"Preprocess.tile must be a TileSpec, got {type(self.tile).__name__}")
        if isinstance(self.segmentation, dict):
            object.__setattr__(self, "segmentation", SegmentationSpec.from_dict(self.segmentation))
        if self.segmentation is not None and not isinstance(self.segmentation, SegmentationSpec):
            raise TypeError("Preprocess.segmentation must be a SegmentationSpec or None, "
                            f"got {type(self.segmentation).__name__}")
        if isinstance(self.bag, bool) or not isinstance(self.bag, int) or self.bag < 0:
            raise ValueError(f"Preprocess.bag must be an int >= 0, got {self.bag!r}")
        if self.bag and self.tile.mode != "cell":
            raise ValueError(f"Preprocess.bag {self.bag} needs tile.mode 'cell' (bags are of cells), "
                             f"got tile.mode {self.tile.mode!r}")

    @property
    def input_size(self) -> int:
        """Side of the model's input, pixels (`tile.input_size`)."""
        return self.tile.input_size

    @property
    def size(self) -> int:
        """Side of the cut tiles, pixels (`tile.size`)."""
        return self.tile.size

    @property
    def mode(self) -> str:
        """The tile's mode, "cell" or "image" (`tile.mode`; a bag run's is "cell")."""
        return self.tile.mode

    @property
    def role(self) -> str:
        """What an example is: "bag" for a bag run (`bag` > 0), else `mode`."""
        return "bag" if self.bag else self.tile.mode

    @property
    def scoring(self) -> tuple:
        """`(tile, bag)`: what decides how a run's examples are cut and fed to its model. Runs
        equal in it score in one group (`infer_gpu.scorer.Scorers`), whatever their
        segmentation (which decides the cells, checked once for all runs by predict)."""
        return self.tile, self.bag

    def replace(self, **changes) -> "Preprocess":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The flat dict of preprocess.json: the tile's fields, `bag`, `segmentation`."""
        tile = cfglib.to_dict(self.tile)
        return {**{k: tile[k] for k in CUT_FIELDS}, "bag": self.bag,
                "segmentation": None if self.segmentation is None else self.segmentation.to_dict()}

    @classmethod
    def from_dict(cls, data) -> "Preprocess":
        data = dict(data)
        known = (*CUT_FIELDS, "bag", "segmentation")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"Preprocess: unknown keys {unknown}; known: {sorted(known)}")
        bag = data.pop("bag", 0)
        seg = data.pop("segmentation", None)
        tile = cfglib.from_dict(TileSpec, data)
        return cls(tile=tile, bag=int(bag or 0),
                   segmentation=None if seg is None else SegmentationSpec.from_dict(seg))

    def to_json(self) -> str:
        return cfglib.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Preprocess":
        return cls.from_dict(json.loads(text))

    def save(self, path: str) -> None:
        from common import storage

        storage.write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str) -> "Preprocess":
        from common import storage

        return cls.from_json(storage.read_text(path))


_INTERP = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


def _resize(tile: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    if tile.shape[0] == size and tile.shape[1] == size:
        return np.ascontiguousarray(tile)
    flag = _INTERP[interpolation]
    if flag == cv2.INTER_AREA and tile.shape[0] < size:
        flag = cv2.INTER_LINEAR  # INTER_AREA is for shrinking; enlarging uses bilinear
    out = cv2.resize(tile, (size, size), interpolation=flag)
    if out.ndim == 2:
        out = out[..., None]
    return out


def pad_to_square(tile: np.ndarray) -> np.ndarray:
    """Zero-pad `hxwxC` to `sxsxC`, s = max(h, w), content centred."""
    h, w = tile.shape[:2]
    s = max(h, w)
    if h == w:
        return tile
    top, left = (s - h) // 2, (s - w) // 2
    out = np.zeros((s, s) + tile.shape[2:], dtype=tile.dtype)
    out[top:top + h, left:left + w] = tile
    return out


def image_tile(image: np.ndarray, spec: TileSpec) -> np.ndarray:
    """The whole-image resize: `HxWx4` -> padded to square -> `NxNx4 uint8`, N = spec.size."""
    return _resize(pad_to_square(image), spec.size, spec.interpolation)


def expand_box(bbox, shape, margin: float) -> tuple[int, int, int, int]:
    """Widen `(y0, x0, y1, x1)` by `margin` x its longer side, clipped to the frame."""
    y0, x0, y1, x1 = (int(v) for v in bbox)
    if margin <= 0:
        return y0, x0, y1, x1
    m = int(round(margin * max(y1 - y0, x1 - x0)))
    return max(0, y0 - m), max(0, x0 - m), min(shape[0], y1 + m), min(shape[1], x1 + m)


def cell_tile(image: np.ndarray, cell_mask: np.ndarray | None, bbox, spec: TileSpec) -> np.ndarray:
    """THE cell-tile function: crop `bbox` from the full image, optionally zero what is not
    the cell, pad to square, resize to `spec.size`.

    image: `HxWx4 uint8`, full resolution. cell_mask: boolean mask of the cell, either the
    full `HxW` frame or just the `bbox` crop (after `expand_box`), or None to keep everything.
    Returns `NxNx4 uint8`.
    """
    y0, x0, y1, x1 = expand_box(bbox, image.shape, spec.margin)
    crop = image[y0:y1, x0:x1]
    if crop.size == 0:
        raise ValueError(f"empty cell box {tuple(bbox)} in a {image.shape[:2]} image")
    if spec.mask_outside and cell_mask is not None:
        if cell_mask.shape[:2] == image.shape[:2]:
            m = cell_mask[y0:y1, x0:x1]
        elif cell_mask.shape[:2] == crop.shape[:2]:
            m = cell_mask
        else:
            raise ValueError(f"cell mask {cell_mask.shape} fits neither the frame nor the box")
        crop = crop * m.astype(bool)[..., None].astype(crop.dtype)
    return _resize(pad_to_square(crop), spec.size, spec.interpolation)


def cell_tiles(image: np.ndarray, label_map: np.ndarray, spec: TileSpec, cell_ids=None, boxes=None):
    """Every cell's tile from one image.

    boxes: the cells' `(y0, x0, y1, x1)` when the caller has them already (e.g. from
    `Segmentation.cell_info`): a `{cell_id: box}` mapping, or a sequence in `cell_ids` order;
    None finds them here (`cell_boxes`).
    Returns `(tiles Kx N x N x 4 uint8, ids (K,) int64, boxes (K, 4) int64)`, cells in id order
    (or in `cell_ids` order). Only the box crop of the label map is ever touched per cell.
    """
    if label_map.shape[:2] != image.shape[:2]:
        raise ValueError(f"label map {label_map.shape} does not match image {image.shape[:2]}")
    if boxes is None:
        boxes = cell_boxes(label_map)
    elif not isinstance(boxes, dict):
        if cell_ids is None or len(boxes) != len(cell_ids):
            raise ValueError("boxes as a sequence need cell_ids of the same length")
        boxes = dict(zip((int(i) for i in cell_ids), boxes))
    ids = sorted(boxes) if cell_ids is None else [int(i) for i in cell_ids]
    tiles = np.zeros((len(ids), spec.size, spec.size, image.shape[2]), dtype=np.uint8)
    out_boxes = np.zeros((len(ids), 4), dtype=np.int64)
    for k, cid in enumerate(ids):
        box = tuple(int(v) for v in boxes[cid])
        y0, x0, y1, x1 = expand_box(box, image.shape, spec.margin)
        mask = label_map[y0:y1, x0:x1] == cid
        tiles[k] = cell_tile(image, mask, box, spec)
        out_boxes[k] = box
    return tiles, np.asarray(ids, dtype=np.int64), out_boxes


def resize_tiles(tiles, size: int):
    """`[B, n, n, 4]` or `[n, n, 4]` uint8 tiles -> same rank at `size` px, uint8.

    Bilinear with antialiasing, in TensorFlow, so the trainer's tf.data graph and inference's
    eager call run the identical op. A no-op when the size already matches.
    """
    import tensorflow as tf

    tiles = tf.convert_to_tensor(tiles)
    if tiles.shape[-2] == size and tiles.shape[-3] == size:
        return tiles
    out = tf.image.resize(tiles, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def to_model_input(tiles):
    """uint8 tiles -> float32 in [0, 255]: Keras' EfficientNets rescale inside the model.

    Works on NumPy arrays and tensors alike, so training and inference share it.
    """
    if isinstance(tiles, np.ndarray):
        return tiles.astype(np.float32)
    import tensorflow as tf

    return tf.cast(tiles, tf.float32)
