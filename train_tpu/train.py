"""The training run: strategy -> data -> model (in the strategy's scope) -> fit -> run folder.

Run folder (local or gs://): `config.json`, `preprocess.json` (the Preprocess inference must use),
`history.csv`, `history.png`, `checkpoints/epoch_{E:03d}.keras` (model + optimizer state, one
per finished epoch) and, at the end, `model.keras` (float32, no optimizer: for inference).
"""
from __future__ import annotations

import logging
import math
import re
import sys
import time

from common import config as cfglib
from common import models, run_folder, storage
from common.labels import NUM_CLASSES
from common.preprocess import PREPROCESS_FILE
from common.resume import check_same_settings
from train_tpu import backend as backend_lib
from train_tpu import data, history
from train_tpu import model as modellib
from train_tpu import strategy as strategy_lib

log = logging.getLogger("train_tpu")

CHECKPOINTS = "checkpoints"
_CKPT = re.compile(r"^epoch_(\d{3,})\.keras$")
# Fields that must not change when resuming: they define the model and its data.
RESUME_KEYS = ("backbone", "size", "mode", "data", "val_fold", "batch_size", "bag_cells", "pooling",
               "targets", "targets_fingerprint")
_SUMMARY = ("val_loss", "val_macro_auc", "val_map")


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.keras"


def _checkpoint_epochs(out: str) -> list[int]:
    """The epochs with a checkpoint in a run folder, ascending."""
    folder = storage.join(out, CHECKPOINTS)
    return sorted(int(m.group(1)) for m in map(_CKPT.match, storage.listdir(folder)) if m)


def last_checkpoint(out: str) -> tuple[int, str | None]:
    """`(epoch, path)` of the newest finished-epoch checkpoint in a run folder, or `(0, None)`."""
    epochs = _checkpoint_epochs(out)
    if not epochs:
        return 0, None
    return epochs[-1], storage.join(out, CHECKPOINTS, checkpoint_name(epochs[-1]))


def resolve_precision(precision: str, kind: str) -> str:
    """The Keras dtype policy: bfloat16 on TPU, float16 on GPU, float32 on CPU for "auto"."""
    if precision != "auto":
        return precision
    return {"tpu": "mixed_bfloat16", "gpu": "mixed_float16"}.get(kind, "float32")


def resolve_steps_per_execution(cfg, kind: str, steps: int) -> int:
    """Steps run per host call: many on TPU (each call costs a host round trip), 1 elsewhere."""
    spe = cfg.steps_per_execution or (32 if kind == "tpu" else 1)
    return max(1, min(spe, steps))


def make_schedule(cfg, steps_per_epoch: int):
    """Linear warmup to `learning_rate`, then cosine decay to `min_lr_ratio` of it."""
    import keras

    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, max(total - 1, 0))
    if warmup > 0:
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=cfg.learning_rate * 0.01, decay_steps=max(1, total - warmup),
            alpha=cfg.min_lr_ratio, warmup_target=cfg.learning_rate, warmup_steps=warmup)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.learning_rate, decay_steps=max(1, total), alpha=cfg.min_lr_ratio)


def make_optimizer(cfg, steps_per_epoch: int):
    """AdamW (or plain SGD, whose update shows gradient scale errors, for tests) on the schedule.
    Create inside `strategy.scope()`."""
    import keras

    schedule = make_schedule(cfg, steps_per_epoch)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=schedule)
    return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)


def make_loss(cfg):
    """Multi-label loss on sigmoid probabilities: BCE or focal."""
    import keras

    if cfg.loss == "focal":
        return keras.losses.BinaryFocalCrossentropy(gamma=cfg.focal_gamma,
                                                    label_smoothing=cfg.label_smoothing)
    return keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing)


def resolve_targets(cfg, carried: bool, fingerprint: str):
    """`cfg` with `targets` resolved ("auto" -> what the shards give) and `targets_fingerprint`
    set from the data: "cell_labels" with the table's fingerprint when the cells learn their soft
    targets, else "image_labels" and "". `carried`: the shards hold cell targets
    (`data.shard_targets`); fingerprint: the table's, from their manifest."""
    want = cfg.targets
    if want == "cell_labels" and not carried:
        raise ValueError(f"--targets cell_labels: the shards in {cfg.data} carry no cell targets "
                         "(build them with --cell-labels)")
    use = carried and want != "image_labels"
    return cfg.replace(targets="cell_labels" if use else "image_labels",
                       targets_fingerprint=fingerprint if use else "")


class TileRun:
    """What a tile run (image or cell mode) does where a bag run differs; `run_mode` picks one
    of the two once, and the trainer asks it instead of testing the mode again."""

    bag = 0  # cells per model input: 0, one tile

    def compile_args(self, cfg) -> dict:
        """`model.compile` keywords: the loss and Keras' running multi-label AUC."""
        import keras

        return {"loss": make_loss(cfg),
                "metrics": [keras.metrics.AUC(multi_label=True, num_labels=NUM_CLASSES, name="auc")]}

    def val_masks(self, files, count: int):
        return None  # no padding places: every validation example is real

    def validation_metrics(self, labels, probs, count: int, masks, targets) -> dict:
        """The epoch's `val_*` columns from the model's predictions of the (padded) validation
        batches, of which the first `count` are real."""
        import numpy as np

        probs = np.asarray(probs, np.float32)[:count]
        row = history.validation_metrics(labels, probs)
        if targets is not None:
            row.update(history.target_auc(targets, probs))
        return row


class BagRun(TileRun):
    """A bag run of N = `bag` cells per bag: the dual-head model's losses and metrics
    (`train_tpu.bag_model`)."""

    def __init__(self, bag: int):
        self.bag = bag

    def compile_args(self, cfg) -> dict:
        from train_tpu import bag_model  # imports Keras: only once the backend is chosen

        return bag_model.compile_args(cfg, make_loss(cfg))

    def val_masks(self, files, count: int):
        return data.eval_bag_masks(files, count, self.bag)

    def validation_metrics(self, labels, probs, count: int, masks, targets) -> dict:
        from train_tpu import bag_model

        probs = {k: v[:count] for k, v in probs.items()}
        return bag_model.validation_metrics(labels, probs, masks, targets)


def run_mode(bag: int) -> TileRun:
    """The mode object of a run whose model takes bags of `bag` cells (0: tiles)."""
    return BagRun(bag) if bag else TileRun()


def compile_model(model, cfg, optimizer, steps_per_execution: int = 1, bag: int = 0) -> None:
    """Compile in the strategy's scope. `auc` = Keras' multi-label (macro) AUC over the training
    batches as they stream by; it counts a class with no positive yet as 0, so it reads low on
    data with few classes. Validation uses `history.validation_metrics` (macro over the classes
    present, per-class AUC and AP), computed once per epoch on the whole validation fold.
    With cell targets (`cfg.targets == "cell_labels"`) the loss's y is each cell's soft targets;
    Keras' BCE and focal losses take soft labels as they are. bag: a bag model's N (its
    losses are `BagRun.compile_args`'), 0 for a tile model."""
    model.compile(optimizer=optimizer, steps_per_execution=steps_per_execution,
                  **run_mode(bag).compile_args(cfg))


def current_lr(optimizer) -> float:
    import numpy as np

    return float(np.asarray(optimizer.learning_rate))


def _epoch_end_callback():
    import keras

    class EpochEnd(keras.callbacks.Callback):
        """Validation metrics -> history row -> history.csv/png -> checkpoint, in that order, so a
        checkpoint for epoch E implies the history up to E (rows after the last checkpoint are
        dropped on resume)."""

        def __init__(self, run):
            super().__init__()
            self.run = run

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.time()

        def on_epoch_end(self, epoch, logs=None):
            r = self.run
            logs = logs if logs is not None else {}
            row = {"epoch": epoch + 1}
            row.update({k: float(v) for k, v in logs.items()})
            row["lr"] = current_lr(self.model.optimizer)
            if r.val_count:
                probs = self.model.predict(r.val_ds, steps=r.val_batches, verbose=0)
                row.update(r.mode.validation_metrics(r.val_labels, probs, r.val_count, r.val_masks,
                                                     r.val_targets))
            row["time_s"] = time.time() - self._t0
            # the summary goes to Keras' logs (progress line, History); per-class values only
            # to history.csv, where 38 columns do not flood the console
            logs.update({k: row[k] for k in _SUMMARY if k in row})
            r.rows.append(row)
            history.write_history(storage.join(r.out, history.HISTORY_CSV), r.rows)
            history.plot_history(r.rows, storage.join(r.out, history.HISTORY_PNG),
                                 title=f"{r.cfg.backbone} {r.cfg.mode} {r.model_size}px")
            models.save_model(self.model, storage.join(r.out, CHECKPOINTS, checkpoint_name(epoch + 1)))
            _prune_checkpoints(r.out, r.cfg.keep_checkpoints)
            log.info("epoch %d/%d: loss %.4f  val_loss %.4f  val_macro_auc %.4f  val_map %.4f  "
                     "lr %.2e  %.1fs", epoch + 1, r.cfg.epochs, row.get("loss", math.nan),
                     row.get("val_loss", math.nan), row.get("val_macro_auc", math.nan),
                     row.get("val_map", math.nan), row["lr"], row["time_s"])

    return EpochEnd


def _prune_checkpoints(out: str, keep: int) -> None:
    if keep <= 0:
        return
    for e in _checkpoint_epochs(out)[:-keep]:
        storage.delete(storage.join(out, CHECKPOINTS, checkpoint_name(e)))


class _Run:
    """What the epoch-end callback needs (plain attributes; no logic)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _check_resumable(cfg, out: str) -> None:
    if not run_folder.has_config(out):
        return
    # a config.json written before a field existed had that field's default
    saved = {**cfglib.to_dict(type(cfg)()), **run_folder.read_config(out)}
    if saved["targets"] == "auto":  # a run from before cell targets learnt the image labels
        saved["targets"] = "image_labels"
    check_same_settings(saved, cfglib.to_dict(cfg), keys=RESUME_KEYS,
                        where=f"--resume {out}", what="the run was started with other settings",
                        advice="resume with the same ones or use a new --out")


def train(cfg, resume: bool = False, callbacks=()) -> dict:
    """Train per `cfg` (a TrainConfig) and write the run folder `cfg.out`.

    resume: continue from the newest checkpoint (optimizer state included). Without it, a run
    folder that already holds checkpoints is an error (no silent overwrite).
    callbacks: extra Keras callbacks, run after the trainer's own epoch-end work.
    Returns a summary dict (epochs, steps, replicas, the last history row, paths).
    `cfg.deterministic`: TensorFlow's op determinism (tf.data's order and random draws
    included) and every seed from `cfg.seed`, for this call only.
    """
    if not cfg.deterministic:
        return _train(cfg, resume, callbacks)
    import keras
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    was = tf_config.is_op_determinism_enabled()
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(cfg.seed)  # random ops need a seed under determinism
    try:
        return _train(cfg, resume, callbacks)
    finally:
        if not was:
            tf_config.disable_op_determinism()


def _train(cfg, resume: bool, callbacks) -> dict:
    if not cfg.data or not cfg.out:
        raise ValueError("TrainConfig.data and TrainConfig.out are required (--data, --out)")
    out = cfg.out.rstrip("/")
    # config.json records the backend that ran, not "auto"
    cfg = cfg.replace(backend=backend_lib.select(cfg.backend))
    strategy_lib.configure_cpu_replicas(cfg.cpu_replicas)
    strategy = strategy_lib.get_strategy(cfg.strategy, cfg.tpu)
    kind = strategy_lib.device_kind(strategy)
    replicas = strategy.num_replicas_in_sync
    if cfg.batch_size % replicas:
        raise ValueError(f"--batch-size {cfg.batch_size} is the GLOBAL batch; it must divide "
                         f"evenly over {replicas} replicas")
    policy = resolve_precision(cfg.precision, kind)

    data_spec = data.load_spec(cfg.data)
    spec = data.model_spec(data_spec, cfg.size, cfg.mode,
                           where=storage.join(cfg.data, PREPROCESS_FILE))
    tile_size, model_size, bag = data_spec.size, spec.input_size, data_spec.bag
    cells = cfg.bag_cells or bag  # cells per training bag: the model's N
    if bag and cells > bag:
        raise ValueError(f"--bag-cells {cells}: the dataset's bags hold at most {bag} cells")
    mode = run_mode(cells if bag else 0)
    if bag:
        spec = spec.replace(bag=cells)  # inference scores chunks of the model's N
    split = data.find_split(cfg.data, cfg.val_fold)
    carried = cfg.mode != "image" and data.shard_targets(split.train_files + split.val_files)
    cfg = resolve_targets(cfg, carried, data.cell_labels_fingerprint(cfg.data) if carried else "")
    targets = cfg.targets == "cell_labels"
    steps = cfg.steps_per_epoch or split.train_examples // cfg.batch_size
    if steps < 1:
        raise ValueError(f"{cfg.data}: the training folds hold {split.train_examples} examples, "
                         f"fewer than one global batch of {cfg.batch_size}")
    spe = resolve_steps_per_execution(cfg, kind, steps)
    val_count = data.eval_examples(split.val_examples, cfg.val_steps, cfg.batch_size)
    log.info("data: %d training tiles in %d shards, %d of %d validation tiles (fold %d); "
             "tiles %dpx -> model %dpx; %d steps/epoch of %d; precision %s; cells learn %s",
             split.train_examples, len(split.train_files), val_count, split.val_examples,
             cfg.val_fold, tile_size, model_size, steps, cfg.batch_size, policy,
             "their soft targets (cell labels " + (cfg.targets_fingerprint or "?") + ")" if targets
             else "the image labels")

    start_epoch, ckpt = last_checkpoint(out)
    if ckpt and not resume:
        raise FileExistsError(f"{out} already holds checkpoints (epoch {start_epoch}); pass "
                              f"--resume to continue it, or choose a new --out")
    if resume:
        _check_resumable(cfg, out)
    storage.makedirs(out)
    run_folder.write_config(out, cfg)
    run_folder.write_spec(out, spec)

    train_ds = data.train_dataset(split.train_files, cfg, tile_size, model_size, cfg.batch_size,
                                  steps_per_epoch=steps, start_epoch=start_epoch, bag=bag, cells=cells,
                                  targets=targets)
    val_ds = data.eval_dataset(split.val_files, tile_size, model_size, cfg.batch_size, val_count, bag=bag,
                               cells=cells)
    val_labels = data.eval_labels(split.val_files, val_count)
    val_masks = mode.val_masks(split.val_files, val_count)
    val_targets = data.eval_targets(split.val_files, val_count, mode.bag) if targets else None

    head_bias = None
    if not ckpt and modellib.is_run_source(cfg.weights):
        log.info("starting from the trained run %s (its backbone and head)", cfg.weights)
    elif cfg.prior_bias and not ckpt:
        prior = data.class_prior(cfg.data, split.train_files)
        if prior is None:
            log.info("no class counts in the manifest: the head starts at zero bias")
        else:
            head_bias = modellib.prior_logits(prior)
            log.info("head bias from the training class frequencies (%.3f..%.3f)",
                     prior.min(), prior.max())
    with strategy.scope():
        if ckpt:
            log.info("resuming from %s (epoch %d of %d)", ckpt, start_epoch, cfg.epochs)
            model = models.load_model(ckpt, compile=True)
            optimizer = model.optimizer  # its variables (moments, step count) come from the file
        else:
            import keras

            keras.utils.set_random_seed(cfg.seed)  # the initial weights follow --seed too
            kwargs = dict(weights=cfg.weights, dropout=cfg.dropout, drop_connect_rate=cfg.drop_connect_rate,
                          dtype_policy=policy, bn_momentum=cfg.bn_momentum or None, head_bias=head_bias)
            model = modellib.build(cfg.backbone, model_size, bag=mode.bag, pooling=cfg.pooling, **kwargs)
            optimizer = make_optimizer(cfg, steps)
        compile_model(model, cfg, optimizer, spe, bag=mode.bag)

    rows = [r for r in history.read_history(storage.join(out, history.HISTORY_CSV))
            if r["epoch"] <= start_epoch] if resume else []
    run = _Run(cfg=cfg, out=out, rows=rows, val_ds=val_ds, val_labels=val_labels,
               val_count=val_count, val_batches=-(-val_count // cfg.batch_size),
               model_size=model_size, mode=mode, val_masks=val_masks, val_targets=val_targets)
    if start_epoch < cfg.epochs:
        # shuffle=False: the tf.data pipeline shuffles (seeded per epoch); Keras' default True
        # is ignored for a dataset and only warns
        model.fit(train_ds, epochs=cfg.epochs, initial_epoch=start_epoch, steps_per_epoch=steps,
                  shuffle=False,
                  callbacks=[_epoch_end_callback()(run), *callbacks],
                  verbose=1 if sys.stdout.isatty() else 2)
    else:
        log.info("%s: all %d epochs already done; exporting", out, cfg.epochs)

    export = modellib.export_float32(model, cfg.backbone, model_size, dropout=cfg.dropout)
    log.info("wrote %s", run_folder.write_model(out, export))
    return {"out": out, "epochs": cfg.epochs, "steps_per_epoch": steps, "replicas": replicas,
            "strategy": type(strategy).__name__, "precision": policy, "backend": cfg.backend,
            "train_examples": split.train_examples, "val_examples": val_count,
            "last": rows[-1] if rows else {}}
