"""Model scoring for `predict`: run directories, batched TTA scoring, and THE combine rule.

The combine rule (also in `python -m infer_gpu predict --help`), per cell and class, in order:

1. Cell score `c`: the mean sigmoid probability over the `--model` runs and the TTA transforms.
   Image score `i`: the same over the `--image-model` runs, one tile of the whole image.
2. Combined `s = c**a * i**(1 - a)`, `a = --cell-weight` (default 0.5: the geometric mean,
   i.e. the square root of the product). A cell can only score high for a class when both the
   cell and its image show it: the image model sees context that a lone cell lacks, the cell
   model separates the heterogeneous cells of one image. Only cell runs: `s = c`; only image
   runs: every cell inherits `s = i`.
3. Negative (class 18): `s_neg = max(s_neg, prod_k (1 - s_k))` over the 18 other classes, the
   chance that the cell shows none of them if they were independent; never below the model's
   own Negative score.
4. Down-weighting (every class of the cell, after 3): x `--border-weight` (default 0.8) for a
   cell that touches the image border (cut cells, whose masks and annotations agree less), and
   x `--no-nucleus-weight` (default 0.5) for a cell without a nucleus (often debris or a
   fragment). Lower confidence moves them down each class's ranking without dropping them.
5. Every (cell, class) with `s >= --min-score` (default 0.01) becomes a detection: mAP only
   gains from extra detections at low confidence (recall), the floor just bounds the file size.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np

from common.labels import NEGATIVE, NUM_CLASSES
from common.preprocess import PREPROCESS_FILE, TileSpec

MODEL_FILE = "model.keras"
MAX_TTA = 8


@dataclass(frozen=True)
class CombineRule:
    """Parameters of the combine rule (see the module docstring)."""

    cell_weight: float = 0.5  # a in c**a * i**(1-a)
    border_weight: float = 0.8  # factor for cells touching the image border
    no_nucleus_weight: float = 0.5  # factor for cells without a nucleus
    min_score: float = 0.01  # detections below this are not written

    def __post_init__(self):
        for name in ("cell_weight", "border_weight", "no_nucleus_weight", "min_score"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


def combine(cell: np.ndarray | None, image: np.ndarray | None, touches_border, has_nucleus,
            rule: CombineRule = CombineRule()) -> np.ndarray:
    """Final per-cell scores, the documented rule.

    cell: `Kx19` cell-model probabilities or None; image: `(19,)` image-model probabilities or
    None; touches_border, has_nucleus: `(K,)` bools. Returns `Kx19 float32` in [0, 1].
    """
    touches_border = np.asarray(touches_border, dtype=bool).reshape(-1)
    has_nucleus = np.asarray(has_nucleus, dtype=bool).reshape(-1)
    k = len(touches_border)
    if len(has_nucleus) != k:
        raise ValueError(f"{k} border flags but {len(has_nucleus)} nucleus flags")
    if cell is None and image is None:
        raise ValueError("combine needs cell scores, image scores or both")
    if cell is not None:
        cell = np.clip(np.asarray(cell, dtype=np.float64).reshape(-1, NUM_CLASSES), 0.0, 1.0)
        if len(cell) != k:
            raise ValueError(f"{len(cell)} cell score rows for {k} cells")
    if image is not None:
        image = np.clip(np.asarray(image, dtype=np.float64).reshape(NUM_CLASSES), 0.0, 1.0)
    if cell is None:
        s = np.repeat(image[None, :], k, axis=0)
    elif image is None:
        s = cell
    else:
        a = rule.cell_weight
        s = cell ** a * image[None, :] ** (1.0 - a)
    others = np.delete(s, NEGATIVE, axis=1)
    s = s.copy()
    s[:, NEGATIVE] = np.maximum(s[:, NEGATIVE], np.prod(1.0 - others, axis=1))
    weight = np.where(touches_border, rule.border_weight, 1.0) * np.where(has_nucleus, 1.0, rule.no_nucleus_weight)
    return (s * weight[:, None]).astype(np.float32)


def detections(scores: np.ndarray, min_score: float) -> list[list[tuple[int, float]]]:
    """`Kx19` scores -> per cell, `[(label, confidence), ...]` above the floor, best first."""
    out = []
    for row in np.asarray(scores):
        order = np.argsort(-row, kind="stable")
        out.append([(int(c), float(row[c])) for c in order if row[c] >= min_score])
    return out


# ---------------------------------------------------------------------------------------------
# Test-time augmentation: the 8 symmetries of the square, in the order they are added.
TTA_NAMES = ("identity", "flip_lr", "flip_ud", "rot180", "transpose", "rot90", "rot270", "antitranspose")


def dihedral(x, k: int):
    """The k-th symmetry of the square on `BxNxNxC` (NumPy array or tensor), k in 0..7."""
    if isinstance(x, np.ndarray):
        t = lambda a: np.transpose(a, (0, 2, 1, 3))  # noqa: E731
    else:
        import tensorflow as tf

        t = lambda a: tf.transpose(a, (0, 2, 1, 3))  # noqa: E731
    if k == 0:
        return x
    if k == 1:
        return x[:, :, ::-1]
    if k == 2:
        return x[:, ::-1]
    if k == 3:
        return x[:, ::-1, ::-1]
    if k == 4:
        return t(x)
    if k == 5:  # rotate 90 degrees counter-clockwise
        return t(x)[:, ::-1]
    if k == 6:
        return t(x)[:, :, ::-1]
    if k == 7:
        return t(x[:, ::-1, ::-1])
    raise ValueError(f"dihedral transform {k} outside 0-7")


# ---------------------------------------------------------------------------------------------
def setup_device(device: str = "auto") -> str:
    """Choose where TensorFlow scores: 'auto' (a GPU when TF lists one, else the CPU), 'gpu'
    (an error without one) or 'cpu'. Call before any model is loaded. Returns a description."""
    import tensorflow as tf

    if device not in ("auto", "gpu", "cpu"):
        raise ValueError(f"device must be auto, gpu or cpu, got {device!r}")
    gpus = tf.config.list_physical_devices("GPU")
    if device == "gpu" and not gpus:
        raise RuntimeError("--device gpu: TensorFlow lists no GPU on this machine (use --device auto or cpu)")
    if device == "cpu" or not gpus:
        if gpus:
            tf.config.set_visible_devices([], "GPU")
        return "CPU"
    for gpu in gpus:
        try:
            # Grow on demand so that a PyTorch segmentation backend can share the GPU.
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialised by the caller: keep its setting
    return f"{len(gpus)} GPU(s): " + ", ".join(g.name for g in gpus)


@dataclass
class RunDir:
    """One trained run: where it is, its tile spec (`preprocess.json`) and its model.

    model: a Keras model, or any callable `(float32 BxNxNx4 tensor, training=False) -> Bx19`
    usable inside `tf.function`. fingerprint: identifies the weights (resume checks it).
    """

    path: str
    spec: TileSpec
    model: object = dataclasses.field(repr=False, default=None)
    fingerprint: str = ""


def read_spec(run_dir: str) -> TileSpec:
    """The TileSpec a run was trained with (`RUN_DIR/preprocess.json`); errors name the file."""
    from common import storage

    path = storage.join(run_dir, PREPROCESS_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: missing; a run directory needs {MODEL_FILE} and {PREPROCESS_FILE}")
    try:
        return TileSpec.load(path)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a valid tile spec: {err}") from err


def load_run(run_dir: str, expect_mode: str | None = None) -> RunDir:
    """Load `RUN_DIR/model.keras` (local or gs://) with the common model factory's loader."""
    from common import models, storage

    spec = read_spec(run_dir)
    if expect_mode is not None and spec.mode != expect_mode:
        flag = "--model" if expect_mode == "cell" else "--image-model"
        other = "--image-model" if expect_mode == "cell" else "--model"
        raise ValueError(f"{storage.join(run_dir, PREPROCESS_FILE)}: mode {spec.mode!r}, but {flag} takes "
                         f"{expect_mode!r}-mode runs; pass this run with {other}")
    path = storage.join(run_dir, MODEL_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: missing; a run directory needs {MODEL_FILE} and {PREPROCESS_FILE}")
    data = storage.read_bytes(path)  # read once: fingerprinted, then loaded from these bytes
    fingerprint = f"crc32:{zlib.crc32(data) & 0xFFFFFFFF:08x}"
    model = models.load_model(path, data=data)
    del data
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 4:
        raise ValueError(f"{path}: model input {shape}, expected [B, N, N, 4]")
    n = spec.input_size
    if shape[1] is not None and (shape[1], shape[2]) != (n, n):
        raise ValueError(f"{path}: model input {shape[1]}x{shape[2]} but preprocess.json gives {n}x{n}")
    out = tuple(model.output_shape)
    if out[-1] != NUM_CLASSES:
        raise ValueError(f"{path}: model output {out}, expected [B, {NUM_CLASSES}]")
    return RunDir(path=run_dir, spec=spec, model=model, fingerprint=fingerprint)


class ModelGroup:
    """Runs that share one TileSpec, scored together: mean over models and TTA transforms.

    `predict(tiles BxNxNx4 uint8) -> Bx19 float32`, N = spec.size; tiles go through the same
    `resize_tiles(spec.input_size)` and `to_model_input` as in training. Batches are padded to
    `batch_size` so the compiled function sees one shape (one trace; a fixed shape also keeps
    results independent of how many tiles a batch happened to hold).
    """

    def __init__(self, spec: TileSpec, models: list, tta: int = 1, batch_size: int = 64):
        import tensorflow as tf

        from common.preprocess import resize_tiles, to_model_input

        if not 1 <= tta <= MAX_TTA:
            raise ValueError(f"tta must be 1-{MAX_TTA}, got {tta}")
        if not models:
            raise ValueError("a model group needs at least one model")
        self.spec, self.models, self.tta, self.batch_size = spec, list(models), int(tta), int(batch_size)
        n = spec.size
        models_ = self.models

        @tf.function(input_signature=[tf.TensorSpec([None, n, n, 4], tf.uint8)], reduce_retracing=True)
        def _score(tiles):
            # the training-time conversions; uint8 crosses to the device (4x less traffic)
            x = to_model_input(resize_tiles(tiles, spec.input_size))
            total = 0.0
            for model in models_:
                for k in range(self.tta):
                    total += tf.cast(model(dihedral(x, k), training=False), tf.float32)
            return total / float(len(models_) * self.tta)

        self._score = _score

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """`BxNxNx4 uint8` -> `Bx19 float32` probabilities (any B; padded internally)."""
        tiles = np.asarray(tiles)
        n = self.spec.size
        if tiles.ndim != 4 or tiles.shape[1:] != (n, n, 4):
            raise ValueError(f"tiles {tiles.shape} do not match the spec {n}x{n}x4")
        out = np.zeros((len(tiles), NUM_CLASSES), np.float32)
        b = self.batch_size
        for start in range(0, len(tiles), b):
            chunk = tiles[start:start + b]
            m = len(chunk)
            if m < b:
                chunk = np.concatenate([chunk, np.zeros((b - m, n, n, 4), np.uint8)])
            out[start:start + m] = self._score(chunk).numpy()[:m]
        return out


_GROUPS: dict = {}


def model_group(spec: TileSpec, models: list, tta: int = 1, batch_size: int = 64) -> ModelGroup:
    """A ModelGroup, reused when the same models are scored again in this process (its compiled
    function is traced once: repeated `predict` calls in a notebook or benchmark skip tracing)."""
    key = (spec, tuple(id(m) for m in models), int(tta), int(batch_size))
    hit = _GROUPS.get(key)
    if hit is None or any(a is not b for a, b in zip(hit.models, models)):
        if len(_GROUPS) >= 16:
            _GROUPS.clear()
        hit = _GROUPS[key] = ModelGroup(spec, models, tta=tta, batch_size=batch_size)
    return hit
