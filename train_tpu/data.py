"""The input pipeline: a flat chain of named pure functions over `tf.data`.

files -> interleave(TFRecordDataset) -> shuffle/repeat -> parse (common.features) -> resize
(common.preprocess.resize_tiles, only when the model size differs from the stored tiles) ->
augment -> batch(global batch, drop_remainder) -> prefetch. Paths go through `tf.io.gfile`, so
the same code reads a local folder or `gs://` shards. Shapes are static, as TPUs need.

With `targets` (shards built with --cell-labels, `shard_targets`), a cell's y is its soft
targets (`common.features.CELL_TARGETS`) instead of its image's labels; in bag mode the cell
head's y, while the image head keeps the image labels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from common import bags, features, mil
from common import shard_folder as shards_lib
from common.labels import NUM_CLASSES
from common.models import NUM_CHANNELS
from common.preprocess import Preprocess, resize_tiles, to_model_input

log = logging.getLogger("train_tpu")


@dataclass(frozen=True)
class Split:
    """The shard files of one training run and their example counts."""

    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    train_examples: int
    val_examples: int


def _tf():
    import tensorflow as tf

    return tf


def load_spec(data_dir: str) -> Preprocess:
    """How the dataset's tiles were cut, bagged and segmented (`DATA/preprocess.json`)."""
    return shards_lib.read_spec(data_dir)


def model_spec(data_spec: Preprocess, size: int, mode: str, where: str = "") -> Preprocess:
    """The spec inference must use: the dataset's, with `model_size` set when the model's
    input side differs from the stored tiles (size 0 = keep the dataset's)."""
    data_mode = data_spec.role
    if data_mode != mode:
        raise ValueError(f"{where or 'dataset'}: the dataset was built in {data_mode!r} mode, "
                         f"training asked for --mode {mode}")
    if not size or size == data_spec.input_size:
        return data_spec
    return data_spec.replace(tile=data_spec.tile.replace(model_size=0 if size == data_spec.size else size))


def class_prior(data_dir: str, train_files) -> "np.ndarray | None":
    """Per-class frequency of positive labels over the training shards, `float64 [19]`, from
    the manifest's per-shard `class_examples` (no data is read); None when the manifest is
    missing or does not give class counts for every training shard."""
    import numpy as np

    counts = shards_lib.shard_counts(data_dir)
    rows = [counts.get(shards_lib.base_name(f)) for f in train_files]
    if not rows or not all(r is not None and r.class_examples is not None for r in rows):
        return None
    counts = np.sum([np.asarray(r.class_examples, np.float64) for r in rows], axis=0)
    total = float(sum(r.examples for r in rows))
    if counts.shape != (NUM_CLASSES,) or total <= 0:
        return None
    return counts / total


def count_records(files) -> int:
    """Records in TFRecord files, by reading them (when no manifest gives the count)."""
    tf = _tf()
    if not files:
        return 0
    ds = tf.data.TFRecordDataset(list(files), num_parallel_reads=min(8, len(files)))
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1).numpy())


def find_split(data_dir: str, val_fold: int) -> Split:
    """Training files (every fold but `val_fold`) and validation files (`fold{K}-*`)."""
    tf = _tf()
    pattern = data_dir.rstrip("/") + "/" + shards_lib.SHARD_GLOB
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"{pattern}: no shards (expected fold<K>-<i>-of-<n>.tfrec files)")
    folds = sorted({shards_lib.fold_of(f) for f in files})
    val = tuple(f for f in files if shards_lib.fold_of(f) == val_fold)
    train = tuple(f for f in files if shards_lib.fold_of(f) != val_fold)
    if not val:
        raise ValueError(f"{data_dir}: no shards for --val-fold {val_fold}; folds present: {folds}")
    if not train:
        raise ValueError(f"{data_dir}: only fold {val_fold} present, nothing left to train on")
    counts = shards_lib.shard_counts(data_dir)

    def total(group):
        rows = [counts.get(shards_lib.base_name(f)) for f in group]
        if all(r is not None for r in rows):
            return sum(r.examples for r in rows)
        return count_records(group)

    return Split(train, val, total(train), total(val))


def shard_targets(files) -> bool:
    """Whether the shards carry cell targets (built with --cell-labels), from the first record
    of every file; a mix of shards with and without is a ValueError naming one of each."""
    tf = _tf()
    files = list(files)
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        lambda f: tf.data.TFRecordDataset(f).take(1), cycle_length=min(16, max(1, len(files))),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    firsts = [features.has_targets(r.numpy()) for r in ds]
    if len(firsts) != len(files):  # an empty shard would shift the pairing
        firsts = [any(features.has_targets(r.numpy()) for r in tf.data.TFRecordDataset(f).take(1))
                  for f in files]
    with_, without = [f for f, t in zip(files, firsts) if t], [f for f, t in zip(files, firsts) if not t]
    if with_ and without:
        raise ValueError(f"a mix of shards with cell targets (e.g. {with_[0]}, built with --cell-labels) "
                         f"and without (e.g. {without[0]}): train on shards of one build")
    return bool(with_)


def cell_labels_fingerprint(data_dir: str) -> str:
    """The fingerprint of the cell-labels table the shards were built with (manifest.json);
    "" when the folder has no manifest, or one without cell labels."""
    manifest = shards_lib.read_manifest(data_dir)
    return str(((manifest or {}).get("cell_labels") or {}).get("fingerprint", ""))


# ------------------------------------------------------------------ the chain's functions
def list_files(files, shuffle: bool, seed: int):
    """File names as a dataset (reshuffled each pass when training)."""
    tf = _tf()
    ds = tf.data.Dataset.from_tensor_slices(list(files))
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    return ds


def interleave_records(files_ds, cycle_length: int, deterministic: bool):
    """Read several files at once (the throughput of GCS comes from parallel reads)."""
    tf = _tf()
    return files_ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, buffer_size=8 << 20),
        cycle_length=max(1, cycle_length), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def parse_example(serialized, tile_size: int, targets: bool = False):
    """Serialized example -> `(image uint8 [n, n, 4], y float32 [19])`: y the image's labels,
    or with `targets` the cell's soft targets."""
    ex = features.parse(serialized, tile_size=tile_size, targets=targets)
    return ex[features.IMAGE], ex[features.CELL_TARGETS if targets else features.LABELS]


parse_labels = features.parse_labels  # labels only, the PNG is not decoded


def resize(image, labels, size: int):
    """The model's input side: the same TF op inference uses (`common.preprocess.resize_tiles`)."""
    return resize_tiles(image, size), labels


def to_float(image, labels):
    """uint8 -> float32 in [0, 255] (`common.preprocess.to_model_input`)."""
    return to_model_input(image), labels


def random_flip_rotate(image, labels, flip: bool = True, rotate: bool = True):
    """Flips and 90-degree rotations: a cell has no preferred orientation, labels stay valid."""
    tf = _tf()
    if flip:
        image = tf.image.random_flip_left_right(image)
        image = tf.image.random_flip_up_down(image)
    if rotate:
        image = tf.image.rot90(image, k=tf.random.uniform([], 0, 4, dtype=tf.int32))
    return image, labels


def random_scale(image, labels, scale: float):
    """Zoom by a factor in `[1 - scale, 1 + scale]`, then centre-crop or zero-pad back to the
    same side (a mild size change; the cell stays in view)."""
    tf = _tf()
    if scale <= 0:
        return image, labels
    n = image.shape[0]
    factor = tf.random.uniform([], 1.0 - scale, 1.0 + scale)
    m = tf.cast(tf.round(factor * n), tf.int32)
    zoomed = tf.image.resize(image, tf.stack([m, m]), method="bilinear", antialias=True)
    out = tf.image.resize_with_crop_or_pad(zoomed, n, n)
    return tf.ensure_shape(out, image.shape), labels


def random_brightness(image, labels, brightness: float):
    """Multiply each channel by its own gain in `[1 - b, 1 + b]` (stain intensity varies)."""
    tf = _tf()
    if brightness <= 0:
        return image, labels
    gain = tf.random.uniform([1, 1, image.shape[-1]], 1.0 - brightness, 1.0 + brightness)
    return tf.clip_by_value(image * gain, 0.0, 255.0), labels


def augment(image, labels, cfg):
    """All training augmentations on a float32 `[n, n, 4]` tile in [0, 255]."""
    image, labels = random_flip_rotate(image, labels, cfg.flip, cfg.rotate)
    image, labels = random_scale(image, labels, cfg.scale)
    return random_brightness(image, labels, cfg.brightness)


# ------------------------------------------------------------------ bags (`--mode bag`)
# A bag example flows through the same chain as `((cells [N, n, n, 4], mask [N]), labels)`:
# `parse_bag_example` replaces `parse_example`, `per_cell` runs a one-tile step on every cell
# (each cell gets its own augmentation draws), and `bag_targets` shapes the model's dicts.
def parse_bag_example(serialized, tile_size: int, bag: int, cells: int = 0, sample: bool = False,
                      targets: bool = False):
    """Serialized bag -> `((cells uint8 [M, n, n, 4], mask float32 [M]), labels [19])`, padded by
    repeating the real cells (`common.features.parse_bag`). M = `cells` when 0 < cells < bag
    (the run's smaller training bags): the first `cells` stored cells, or with `sample` a random
    choice of them drawn anew each time; else M = `bag`. targets: the second element is
    `(labels [19], cell targets [M, 19])`, the targets of the same cells."""
    ex = features.parse_bag(serialized, tile_size, bag, targets=targets)
    images, mask = ex[features.IMAGE], ex["mask"]
    cell_y = ex[features.CELL_TARGETS] if targets else None
    if 0 < cells < bag:
        tf = _tf()
        real = tf.cast(tf.reduce_sum(mask), tf.int32)
        pick = tf.random.shuffle(tf.range(real)) if sample else tf.range(real)
        # the first `cells` of `pick` fill the smaller bag by the same rule as the record's
        order = tf.gather(pick, bags.tf_fill_order(real, cells))
        images = tf.ensure_shape(tf.gather(images, order), [cells] + images.shape[1:].as_list())
        mask = bags.tf_fill_mask(real, cells)
        if targets:
            cell_y = tf.ensure_shape(tf.gather(cell_y, order), [cells, NUM_CLASSES])
    if targets:
        return (images, mask), (ex[features.LABELS], cell_y)
    return (images, mask), ex[features.LABELS]


def per_cell(step):
    """A one-tile step `(image, labels) -> (image, labels)` -> the same step on every cell of a
    bag; `resize` and `to_float` take a bag's `[N, n, n, 4]` at once, so they need no wrapper."""
    from tensorflow.python.framework import config as tf_config

    # the cells' random draws come from the same ops; iterations run in parallel would take
    # them in a racy order, so a --deterministic run augments its cells one after another
    serial = tf_config.is_op_determinism_enabled()

    def on_bag(x, labels):
        cells, mask = x
        out = _tf().map_fn(lambda c: step(c, labels)[0], cells, parallel_iterations=1 if serial else None)
        return (out, mask), labels
    return on_bag


def bag_resize(x, labels, size: int):
    return (resize_tiles(x[0], size), x[1]), labels


def bag_to_float(x, labels):
    return (to_model_input(x[0]), x[1]), labels


def bag_targets(x, labels):
    """-> the bag model's `({cells, mask}, {image: labels [19], cell: [N, 19]})`: each real
    cell's y is its image's labels, or its soft targets when `labels` is `(labels, cell
    targets [N, 19])`; a padding cell's are `common.bags.PAD_TARGET` (-1), which
    `train_tpu.bag_model.masked_cell_bce` leaves out."""
    tf = _tf()
    cells, mask = x
    if isinstance(labels, tuple):
        labels, per_cell_y = labels
    else:
        per_cell_y = tf.broadcast_to(labels, [mask.shape[0], NUM_CLASSES])
    cell = tf.where(mask[:, None] > 0, per_cell_y, bags.PAD_TARGET)
    return {mil.CELLS: cells, mil.MASK: mask}, {mil.IMAGE: labels, mil.CELL: cell}


# ------------------------------------------------------------------ the two pipelines
def epoch_seed(seed: int, epoch):
    """The shuffle seed of one epoch (0-based): a different order every epoch, the same one
    every time that epoch is run, so a resumed run continues the uninterrupted run's order."""
    tf = _tf()
    return tf.cast(seed, tf.int64) * 100_003 + tf.cast(epoch, tf.int64) + 1


def epoch_records(files, seed: int, shuffle_buffer: int, epoch, count: int):
    """The serialized records of one epoch: `count` of them (steps * global batch), the file
    order and the shuffle buffer seeded by `epoch_seed`, read in a deterministic interleave."""
    s = epoch_seed(seed, epoch)
    graph = _tf().compat.v1.get_default_graph()
    if not _tf().executing_eagerly() and graph.seed == 0:
        # With a global seed of 0 (keras.utils.set_random_seed(0)), TF's get_seed compares this
        # tensor op seed with 0 in Python and fails; 0 is its "no seed" value, so use 1 here.
        graph.seed = 1
    ds = list_files(files, shuffle=True, seed=s).repeat()  # reshuffled (from s) on each pass
    ds = interleave_records(ds, cycle_length=min(16, len(files)), deterministic=True)
    return ds.shuffle(shuffle_buffer, seed=s).take(count)


def train_dataset(files, cfg, tile_size: int, model_size: int, global_batch: int,
                  steps_per_epoch: int = 0, start_epoch: int = 0, bag: int = 0, cells: int = 0,
                  targets: bool = False):
    """The training stream from epoch `start_epoch` (0-based) on: `(float32 [B, s, s, 4],
    float32 [B, 19])`, B = global batch, `steps_per_epoch` batches per epoch.

    Each epoch's records are drawn by `epoch_records` (seeded by the epoch), so a run resumed
    at epoch E sees what the uninterrupted run saw from epoch E on, in the same order; the
    element order is deterministic throughout. (Augmentation draws are random, not replayed.)
    steps_per_epoch 0: one stream seeded by `start_epoch` that repeats the files without end
    (each pass reshuffled), with no per-epoch seeding: the caller bounds it (Keras' steps).
    bag N > 0: bag records, yielding `bag_targets`' dicts of `[B, N, s, s, 4]` cells; with
    0 < cells < N, bags of `cells` drawn at random from each record's stored cells.
    targets: the cells learn their soft targets (`parse_example`, `bag_targets`).
    """
    tf = _tf()
    if steps_per_epoch:
        count = steps_per_epoch * global_batch
        ds = tf.data.Dataset.range(start_epoch, 1 << 40).flat_map(
            lambda e: epoch_records(files, cfg.seed, cfg.shuffle_buffer, e, count))
    else:
        ds = epoch_records(files, cfg.seed, cfg.shuffle_buffer, start_epoch, -1)
    if bag:
        ds = ds.map(lambda s: parse_bag_example(s, tile_size, bag, cells, sample=True, targets=targets),
                    num_parallel_calls=tf.data.AUTOTUNE)
        if model_size != tile_size:
            ds = ds.map(lambda x, y: bag_resize(x, y, model_size), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(bag_to_float, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(per_cell(lambda x, y: augment(x, y, cfg)), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(bag_targets, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda s: parse_example(s, tile_size, targets), num_parallel_calls=tf.data.AUTOTUNE)
        if model_size != tile_size:
            ds = ds.map(lambda x, y: resize(x, y, model_size), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(lambda x, y: augment(x, y, cfg), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(global_batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _val_records(files, count: int):
    """The first `count` validation records in ONE fixed order (parallel reads, deterministic
    interleave), shared by `eval_dataset` and `eval_labels` so predictions and labels align."""
    tf = _tf()
    files = list(files)
    return tf.data.TFRecordDataset(files, num_parallel_reads=min(8, len(files))).take(count)


def eval_examples(count: int, val_steps: int, global_batch: int) -> int:
    """How many validation examples are scored (all, or `val_steps` batches' worth)."""
    return min(count, val_steps * global_batch) if val_steps else count


def eval_dataset(files, tile_size: int, model_size: int, global_batch: int, count: int, bag: int = 0,
                 cells: int = 0):
    """The first `count` validation tiles in file order, zero-padded to whole global batches
    (fixed shapes; the padding's predictions are dropped). Yields `float32 [B, s, s, 4]`, or
    the bag model's `{cells, mask}` for `bag` > 0 (padding bags have an all-zero mask); with
    0 < cells < bag, each bag's first `cells` stored cells."""
    tf = _tf()
    ds = _val_records(files, count)
    if bag:
        ds = ds.map(lambda s: parse_bag_example(s, tile_size, bag, cells), num_parallel_calls=tf.data.AUTOTUNE)
        if model_size != tile_size:
            ds = ds.map(lambda x, y: bag_resize(x, y, model_size), num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.map(lambda x, y: bag_targets(*bag_to_float(x, y))[0], num_parallel_calls=tf.data.AUTOTUNE)
        bag = cells if 0 < cells < bag else bag
        pad = (-count) % global_batch
        if pad:
            empty = {mil.CELLS: tf.zeros([bag, model_size, model_size, NUM_CHANNELS], tf.float32),
                     mil.MASK: tf.zeros([bag], tf.float32)}
            ds = ds.concatenate(tf.data.Dataset.from_tensors(empty).repeat(pad))
        return ds.batch(global_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    ds = ds.map(lambda s: parse_example(s, tile_size), num_parallel_calls=tf.data.AUTOTUNE)
    if model_size != tile_size:
        ds = ds.map(lambda x, y: resize(x, y, model_size), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda x, y: to_float(x, y)[0], num_parallel_calls=tf.data.AUTOTUNE)
    pad = (-count) % global_batch
    if pad:
        zeros = tf.zeros([model_size, model_size, NUM_CHANNELS], tf.float32)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(zeros).repeat(pad))
    ds = ds.batch(global_batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_bag_masks(files, count: int, bag: int):
    """`float32 [count, bag]`: which cells of `eval_dataset`'s bags are real (PNGs not decoded)."""
    import numpy as np

    tf = _tf()
    spec = {features.IMAGE: features.bag_feature_spec()[features.IMAGE]}

    def mask(serialized):
        return bags.tf_fill_mask(tf.shape(tf.io.parse_single_example(serialized, spec)[features.IMAGE])[0], bag)

    parts = [b.numpy() for b in _val_records(files, count).map(mask).batch(4096)]
    return np.concatenate(parts) if parts else np.zeros((0, bag), np.float32)


def eval_labels(files, count: int):
    """`float32 [count, 19]`: the labels of `eval_dataset`'s tiles, in the same order."""
    import numpy as np

    tf = _tf()
    ds = _val_records(files, count).map(parse_labels, num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
    parts = [b.numpy() for b in ds]
    return np.concatenate(parts) if parts else np.zeros((0, NUM_CLASSES), np.float32)


def eval_targets(files, count: int, bag: int = 0):
    """The cell targets of `eval_dataset`'s examples, in the same order, without decoding PNGs:
    `float32 [count, 19]`, or for bags of `bag` cells (the model's N) `[count, bag, 19]`."""
    import numpy as np

    tf = _tf()
    parse = (lambda s: features.parse_bag_targets(s, bag)) if bag else features.parse_targets
    ds = _val_records(files, count).map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
    parts = [b.numpy() for b in ds]
    shape = (0, bag, NUM_CLASSES) if bag else (0, NUM_CLASSES)
    return np.concatenate(parts) if parts else np.zeros(shape, np.float32)
