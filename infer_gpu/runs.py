"""The trained runs `predict` scores with: a run folder -> its Preprocess and its loaded model.

The folder's format (`model.keras`, `preprocess.json` with the Preprocess it was trained on,
`config.json`) is `common.run_folder`'s. Here predict checks that the model's input fits the
spec and its output has the 19 classes, and fingerprints the weights so that `--resume` can refuse parts scored by other models.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common import run_folder
from common.labels import NUM_CLASSES
from common.preprocess import Preprocess
from common.run_folder import read_spec  # noqa: F401 - part of this module's interface


@dataclass
class RunDir:
    """One trained run: where it is, its Preprocess (`preprocess.json`) and its model.

    model: a Keras model, or any callable `(float32 BxNxNx4 tensor, training=False) -> Bx19`
    usable inside `tf.function` (a bag run, `spec.bag` > 0: `({cells, mask}) -> {cell, image}`,
    `common.mil`). fingerprint: identifies the weights (resume checks it).
    """

    path: str
    spec: Preprocess
    model: object = dataclasses.field(repr=False, default=None)
    fingerprint: str = ""


def load_run(run_dir: str, expect_mode: str | None = None) -> RunDir:
    """Load a run folder (local or gs://, `common.run_folder`): its spec, and its model, checked
    against the spec and the 19 classes. expect_mode: 'cell' (--model, bag runs included: a
    spec with `bag` > 0 or a bag model) or 'image' (--image-model)."""
    from common import storage

    spec = read_spec(run_dir)
    if expect_mode is not None and spec.mode != expect_mode:
        flag = "--model" if expect_mode == "cell" else "--image-model"
        other = "--image-model" if expect_mode == "cell" else "--model"
        raise ValueError(f"{run_folder.spec_path(run_dir)}: mode {spec.mode!r}, but {flag} takes "
                         f"{expect_mode!r}-mode runs; pass this run with {other}")
    folder = run_folder.load(run_dir)  # names model.keras when it is missing
    path = folder.model_file
    data = storage.read_bytes(path)  # read once: fingerprinted, then loaded from these bytes
    fingerprint = storage.fingerprint(data)
    model = run_folder.load_model(folder, data=data)
    del data
    spec = checked_spec(model, spec, path)
    return RunDir(path=run_dir, spec=spec, model=model, fingerprint=fingerprint)


def checked_spec(model, spec: Preprocess, path: str) -> Preprocess:
    """The run's spec once the model is checked against it: input `[B, S, S, 4]` -> `[B, 19]`,
    or for a bag model (`common.mil`) `[B, N, S, S, 4]` + mask -> cell `[B, N, 19]`, image
    `[B, 19]`. A bag model's N fills in a spec that has no `bag` (an older preprocess.json)."""
    from common import mil

    n = spec.input_size
    if mil.is_bag_model(model):
        bag = mil.bag_size(model)
        if spec.mode != "cell":
            raise ValueError(f"{path}: a bag model, but preprocess.json gives mode {spec.mode!r}; "
                             "bag runs are cell-mode runs (--model)")
        if spec.bag and spec.bag != bag:
            raise ValueError(f"{path}: a bag model of {bag} cells but preprocess.json gives bag {spec.bag}")
        shape = next(tuple(t.shape) for t in model.inputs if t.name.split(":")[0] == mil.CELLS)
        if len(shape) != 5 or shape[-1] != 4 or (shape[2], shape[3]) != (n, n):
            raise ValueError(f"{path}: bag model input {shape}, expected [B, {bag}, {n}, {n}, 4] "
                             "(preprocess.json's size)")
        outs = dict(zip(model.output_names, (tuple(t.shape) for t in model.outputs)))
        if outs.get(mil.CELL, ())[1:] != (bag, NUM_CLASSES) or outs.get(mil.IMAGE, ())[1:] != (NUM_CLASSES,):
            raise ValueError(f"{path}: bag model outputs {outs}, expected {mil.CELL} [B, {bag}, "
                             f"{NUM_CLASSES}] and {mil.IMAGE} [B, {NUM_CLASSES}]")
        return spec if spec.bag else spec.replace(bag=bag)
    if spec.bag:
        raise ValueError(f"{path}: preprocess.json gives bag {spec.bag}, but the model is not a bag "
                         f"model (inputs {mil.CELLS!r} and {mil.MASK!r})")
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 4:
        raise ValueError(f"{path}: model input {shape}, expected [B, N, N, 4]")
    if shape[1] is not None and (shape[1], shape[2]) != (n, n):
        raise ValueError(f"{path}: model input {shape[1]}x{shape[2]} but preprocess.json gives {n}x{n}")
    out = tuple(model.output_shape)
    if out[-1] != NUM_CLASSES:
        raise ValueError(f"{path}: model output {out}, expected [B, {NUM_CLASSES}]")
    return spec


def describe(run: RunDir) -> dict:
    """What identifies a run in the resume settings and the report: path, weights, spec."""
    return {"path": run.path, "weights": run.fingerprint, "spec": run.spec.to_json()}
