"""Scoring tiles with models: the device, test-time augmentation, and one compiled function
per tile spec (`ModelGroup`), reused across calls in one process.

`Scorers.build(runs)` groups the runs by TileSpec, so each tile is cut once however many runs
share it; `predict` then feeds each group its tiles in fixed-size batches (`batching`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.labels import NUM_CLASSES
from common.preprocess import TileSpec

MAX_TTA = 8


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


@dataclass
class Scorers:
    """One ModelGroup per distinct TileSpec of the runs.

    specs: the distinct specs (index = spec index used in tiles and scores); roles: `{index:
    'cell'|'image'}`; weights: `{index: number of models}` (each model counts once when groups
    are averaged); groups: `{index: ModelGroup}`.
    """

    specs: tuple
    roles: dict
    weights: dict
    groups: dict

    @classmethod
    def build(cls, runs, tta: int = 1, batch_size: int = 64) -> "Scorers":
        """runs: `runs.RunDir`s (cell and image mode together)."""
        specs: list[TileSpec] = []
        members: dict[int, list] = {}
        for r in runs:
            if r.spec not in specs:
                specs.append(r.spec)
            members.setdefault(specs.index(r.spec), []).append(r.model)
        return cls(specs=tuple(specs),
                   roles={k: s.mode for k, s in enumerate(specs)},
                   weights={k: len(m) for k, m in members.items()},
                   groups={k: model_group(specs[k], members[k], tta=tta, batch_size=batch_size)
                           for k in members})

    @property
    def predictors(self) -> dict:
        """`{spec index: fn(tiles BxNxNx4 uint8) -> Bx19}` for the batcher."""
        return {k: g.predict for k, g in self.groups.items()}
