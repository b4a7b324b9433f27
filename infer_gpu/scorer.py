"""Scoring tiles with models: the device, test-time augmentation, and one compiled function
per tile spec (`ModelGroup`; `BagGroup` for bag runs), reused across calls in one process.

`Scorers.build(runs)` groups the runs by Preprocess, so each tile is cut once however many runs
share it; `predict` then feeds each group its tiles in fixed-size batches (`batching`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.labels import NUM_CLASSES
from common.preprocess import Preprocess

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
    """Runs that share one Preprocess, scored together: mean over models and TTA transforms.

    `predict(tiles BxNxNx4 uint8) -> Bx19 float32`, N = spec.size; tiles go through the same
    `resize_tiles(spec.input_size)` and `to_model_input` as in training. Batches are padded to
    `batch_size` so the compiled function sees one shape (one trace; a fixed shape also keeps
    results independent of how many tiles a batch happened to hold).
    """

    def __init__(self, spec: Preprocess, models: list, tta: int = 1, batch_size: int = 64):
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
        return in_fixed_batches(lambda t: self._score(t).numpy(), (tiles,), self.batch_size, (NUM_CLASSES,))


class BagGroup:
    """Bag runs (`Preprocess.bag` N > 0) that share one Preprocess, scored together; see `bags`.

    `predict((chunks BxNxSxSx4 uint8, mask BxN float32)) -> BxMx(1+N)x19 float32`, M = the
    number of models: per model, row 0 the image head and rows 1.. the cell head, each the mean
    over the TTA transforms (the same transform on every cell of a bag). Tiles go through the
    training-time `resize_tiles`/`to_model_input`; batches are padded to `batch_size` bags
    (empty bags, mask 0) so that the compiled function sees one shape.
    """

    def __init__(self, spec: Preprocess, models: list, tta: int = 1, batch_size: int = 4):
        import tensorflow as tf

        from common import mil
        from common.preprocess import resize_tiles, to_model_input

        if not spec.bag:
            raise ValueError("a bag group needs a Preprocess with bag > 0")
        if not 1 <= tta <= MAX_TTA:
            raise ValueError(f"tta must be 1-{MAX_TTA}, got {tta}")
        if not models:
            raise ValueError("a model group needs at least one model")
        self.spec, self.models, self.tta, self.batch_size = spec, list(models), int(tta), int(batch_size)
        n, bag, side = spec.size, spec.bag, spec.input_size
        models_ = self.models

        @tf.function(input_signature=[tf.TensorSpec([None, bag, n, n, 4], tf.uint8),
                                      tf.TensorSpec([None, bag], tf.float32)], reduce_retracing=True)
        def _score(chunks, mask):
            cells = to_model_input(resize_tiles(tf.reshape(chunks, [-1, n, n, 4]), side))  # B*N cells
            per_model = []
            for model in models_:
                image, cell = 0.0, 0.0
                for k in range(self.tta):
                    x = tf.reshape(dihedral(cells, k), [-1, bag, side, side, 4])
                    out = model({mil.CELLS: x, mil.MASK: mask}, training=False)
                    image += tf.cast(out[mil.IMAGE], tf.float32)
                    cell += tf.cast(out[mil.CELL], tf.float32)
                per_model.append(tf.concat([image[:, None], cell], axis=1) / float(self.tta))
            return tf.stack(per_model, axis=1)

        self._score = _score

    def predict(self, bags) -> np.ndarray:
        """`(chunks BxNxSxSx4 uint8, mask BxN)` -> `BxMx(1+N)x19 float32` (any B)."""
        chunks, mask = np.asarray(bags[0]), np.asarray(bags[1], np.float32)
        n, bag = self.spec.size, self.spec.bag
        if chunks.shape[1:] != (bag, n, n, 4) or mask.shape != chunks.shape[:2]:
            raise ValueError(f"bags {chunks.shape} / mask {mask.shape} do not match the spec: "
                             f"bags of {bag} cells {n}x{n}x4")
        return in_fixed_batches(lambda c, m: self._score(c, m).numpy(), (chunks, mask), self.batch_size,
                                (len(self.models), 1 + bag, NUM_CLASSES))


def in_fixed_batches(fn, arrays: tuple, batch_size: int, item_shape: tuple) -> np.ndarray:
    """`fn(*batch)` over `arrays` (same length B) in batches of exactly `batch_size`, the last
    one padded with zeros and its padding's results dropped: one compiled shape, and results
    that do not depend on what else a batch held. Returns `B x item_shape float32`."""
    total = len(arrays[0])
    out = np.zeros((total,) + tuple(item_shape), np.float32)
    for start in range(0, total, batch_size):
        part = [a[start:start + batch_size] for a in arrays]
        m = len(part[0])
        if m < batch_size:
            part = [np.concatenate([p, np.zeros((batch_size - m,) + p.shape[1:], p.dtype)]) for p in part]
        out[start:start + m] = np.asarray(fn(*part))[:m]
    return out


_GROUPS: dict = {}


def model_group(spec: Preprocess, models: list, tta: int = 1, batch_size: int = 64):
    """A ModelGroup (a BagGroup for a bag spec), reused when the same models are scored again in
    this process (its compiled function is traced once: repeated `predict` calls in a notebook
    or benchmark skip tracing). batch_size: tiles per model call; a bag group takes
    `batch_size // N` bags of N cells (at least one), about as many cells."""
    key = (spec, tuple(id(m) for m in models), int(tta), int(batch_size))
    hit = _GROUPS.get(key)
    if hit is None or any(a is not b for a, b in zip(hit.models, models)):
        if len(_GROUPS) >= 16:
            _GROUPS.clear()
        if spec.bag:
            hit = BagGroup(spec, models, tta=tta, batch_size=max(1, batch_size // spec.bag))
        else:
            hit = ModelGroup(spec, models, tta=tta, batch_size=batch_size)
        _GROUPS[key] = hit
    return hit


def role(spec: Preprocess) -> str:
    """What a spec's runs give the combine rule: 'cell' (a score per cell), 'image' (one
    whole-image score) or 'bag' (both: a bag model's cell head and image head, `bags`)."""
    return spec.role


@dataclass
class Scorers:
    """One ModelGroup (BagGroup for bag runs) per distinct Preprocess of the runs.

    specs: the distinct specs (index = spec index used in tiles and scores); roles: `{index:
    'cell'|'image'|'bag'}` (`role`); weights: `{index: number of models}` (each model counts
    once when groups are averaged); groups: `{index: ModelGroup or BagGroup}`.
    """

    specs: tuple
    roles: dict
    weights: dict
    groups: dict

    @classmethod
    def build(cls, runs, tta: int = 1, batch_size: int = 64) -> "Scorers":
        """runs: `runs.RunDir`s (cell, bag and image runs together)."""
        specs: list[Preprocess] = []  # the first run's of each group
        keys: list[tuple] = []  # Preprocess.scoring: runs equal in it share a group
        members: dict[int, list] = {}
        for r in runs:
            if r.spec.scoring not in keys:
                keys.append(r.spec.scoring)
                specs.append(r.spec)
            members.setdefault(keys.index(r.spec.scoring), []).append(r.model)
        return cls(specs=tuple(specs),
                   roles={k: role(s) for k, s in enumerate(specs)},
                   weights={k: len(m) for k, m in members.items()},
                   groups={k: model_group(specs[k], members[k], tta=tta, batch_size=batch_size)
                           for k in members})

    @property
    def predictors(self) -> dict:
        """`{spec index: group.predict}` for the batcher: tiles `BxNxNx4 uint8` -> `Bx19`, or
        for a bag spec `(chunks, mask)` -> `BxMx(1+N)x19` (`BagGroup.predict`)."""
        return {k: g.predict for k, g in self.groups.items()}

    @property
    def batch_sizes(self) -> dict:
        """`{spec index: items per model call}` (tiles, or bags for a bag spec) for the batcher."""
        return {k: g.batch_size for k, g in self.groups.items()}
