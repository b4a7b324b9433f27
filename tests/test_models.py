"""common.models (the factory, save/load round trips) and train_tpu.model (the 3->4 channel
weight transfer, BatchNorm momentum, prior head bias, float32 export)."""
from __future__ import annotations

import numpy as np
import pytest

from common import models, run_folder
from common.labels import NUM_CLASSES
from train_tpu import model as trainmodel

keras = pytest.importorskip("keras")

SIZE = 32


def _randomise_statistics(model, rng) -> None:
    """Random BatchNorm and input-Normalization statistics, so that a transfer that dropped or
    misplaced them would change the output (fresh layers have mean 0, variance 1)."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2, layer.moving_variance.shape).astype("float32"))
        if isinstance(layer, keras.layers.Normalization) and hasattr(layer, "adapt_mean"):
            n = layer.adapt_mean.shape[0]
            layer.adapt_mean.assign(rng.uniform(0.1, 0.6, n).astype("float32"))
            layer.adapt_variance.assign(rng.uniform(0.01, 0.1, n).astype("float32"))
            layer.finalize_state()


def _source_model(backbone: str, rng):
    """A 3-channel headless Keras EfficientNet with random weights: the stand-in for the
    ImageNet file (nothing can be downloaded here)."""
    bb = models.get_backbone(backbone)
    kwargs = {"include_preprocessing": True} if bb.family == "v2" else {}
    src = getattr(keras.applications, bb.keras_fn)(include_top=False, weights=None,
                                                   input_shape=(SIZE, SIZE, 3), **kwargs)
    _randomise_statistics(src, rng)
    return src


def _features(model):
    return keras.Model(model.input, model.get_layer(models.FEATURES_LAYER).input)


@pytest.mark.parametrize("backbone", ["efficientnet_b0", "efficientnetv2_b0"])
def test_weight_transfer_reproduces_the_3_channel_model_on_rgb(backbone, tmp_path):
    rng = np.random.default_rng(0)
    src = _source_model(backbone, rng)
    path = str(tmp_path / "src.weights.h5")
    src.save_weights(path)
    model = trainmodel.build_model(backbone, SIZE, weights=path, drop_connect_rate=0.0)
    x = rng.uniform(0, 255, (3, SIZE, SIZE, 4)).astype("float32")  # a random yellow channel too
    want = np.asarray(src(x[..., :3], training=False))
    got = np.asarray(_features(model)(x, training=False))
    assert got.shape == want.shape
    assert np.abs(want).max() > 1e-3  # a meaningful comparison, not zeros against zeros
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the yellow channel starts with no influence ...
    stem = model.get_layer("stem_conv").get_weights()[0]
    assert stem.shape[2] == 4 and not stem[:, :, 3].any()
    # ... while a model built without transfer does see it (the check above can fail)
    fresh = models.build_model(backbone, SIZE, drop_connect_rate=0.0)
    y = x.copy()
    y[..., 3] = 0
    f = _features(fresh)
    assert not np.allclose(np.asarray(f(x, training=False)), np.asarray(f(y, training=False)))


def test_keras_imagenet_file_convention_is_corrected(tmp_path):
    """Keras' V1 ImageNet files keep the std in Normalization's variance slot; the 4-channel
    model must normalise as (x/255 - mean) / std, as Keras' own weights="imagenet" model does."""
    src = keras.applications.EfficientNetB0(include_top=False, weights=None,
                                            input_shape=(SIZE, SIZE, 3))
    norm = [l for l in src.layers if isinstance(l, keras.layers.Normalization)][0]
    norm.adapt_mean.assign(models.IMAGENET_MEAN)
    norm.adapt_variance.assign(models.IMAGENET_STD)  # what the downloaded .h5 holds
    path = str(tmp_path / "efficientnetb0_notop.weights.h5")
    src.save_weights(path)
    model = trainmodel.build_model("efficientnet_b0", SIZE, weights=path)
    a, b = trainmodel.input_affine(model, SIZE)
    mean, std = np.array(models.IMAGENET_MEAN), np.array(models.IMAGENET_STD)
    np.testing.assert_allclose(a[:3], 1 / (255 * std), rtol=1e-5)
    np.testing.assert_allclose(b[:3], -mean / std, rtol=1e-5)


def test_build_forward_shapes_and_mixed_precision():
    model = models.build_model("efficientnet_b0", SIZE, dtype_policy="mixed_float16")
    assert model.input.shape[1:] == (SIZE, SIZE, 4)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left alone
    out = np.asarray(model(np.full((2, SIZE, SIZE, 4), 128, np.float32), training=False))
    assert out.shape == (2, NUM_CLASSES) and out.dtype == np.float32
    assert np.isfinite(out).all() and ((out > 0) & (out < 1)).all()
    assert model.get_layer("stem_conv").compute_dtype == "float16"
    assert model.get_layer(models.OUTPUT_LAYER).compute_dtype == "float32"


def test_saved_model_reloads_and_predicts_the_same(tmp_path):
    rng = np.random.default_rng(1)
    model = models.build_model("efficientnet_b0", SIZE, drop_connect_rate=0.0)
    _randomise_statistics(model, rng)  # the V1 Normalization must survive the round trip
    x = rng.uniform(0, 255, (4, SIZE, SIZE, 4)).astype("float32")
    want = model.predict(x, verbose=0)
    run = tmp_path / "run"
    models.save_model(model, str(run / run_folder.MODEL_FILE))
    for path in (str(run), str(run / run_folder.MODEL_FILE)):  # run folder or the file itself
        got = models.load_model(path).predict(x, verbose=0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # plain Keras loads it too (no custom objects needed)
    plain = keras.saving.load_model(str(run / run_folder.MODEL_FILE), compile=False)
    np.testing.assert_allclose(plain.predict(x, verbose=0), want, rtol=1e-5, atol=1e-6)


def spread_head(model, x, rng, features_layer: str = models.FEATURES_LAYER,
                logits_layer: str = models.LOGITS_LAYER) -> None:
    """Give `model` a head whose sigmoid outputs on `x` span most of (0, 1), across the inputs
    and the classes: its kernel reads the standardised features of `x` (an untrained backbone's
    features differ little between inputs), its bias spreads the classes over [-2, 2]. Then an
    export that failed to copy a backbone or head weight would show: a fresh model's outputs
    sit near 0.5 everywhere."""
    feats = np.asarray(keras.Model(model.input, model.get_layer(features_layer).output)(x, training=False),
                       np.float64).reshape(-1, model.get_layer(features_layer).output.shape[-1])
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    layer = model.get_layer(logits_layer)
    kernel = rng.normal(0, 1, layer.kernel.shape) / np.sqrt(feats.shape[1]) / std[:, None]
    bias = np.linspace(-2, 2, layer.kernel.shape[1]) - mean @ kernel
    layer.set_weights([kernel.astype("float32"), bias.astype("float32")])


def assert_spread(outputs) -> None:
    """The reference outputs span a wide range, so a tight comparison with them means something."""
    outputs = np.asarray(outputs, np.float64)
    assert outputs.std() > 0.1 and np.ptp(outputs) > 0.5, (outputs.std(), np.ptp(outputs))
    assert outputs.std(axis=0).mean() > 0.05, "the outputs hardly differ between inputs"


def _export_check_model():
    """A float32 model with random statistics and a spread head, and inputs `x`."""
    rng = np.random.default_rng(2)
    keras.utils.set_random_seed(2)
    model = models.build_model("efficientnet_b0", SIZE, drop_connect_rate=0.0)
    _randomise_statistics(model, rng)
    x = rng.uniform(0, 255, (8, SIZE, SIZE, 4)).astype("float32")
    spread_head(model, x, rng)
    return model, x


def _call(model, x):
    return np.asarray(model(x, training=False), np.float32)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_export_float32_copies_every_weight(policy):
    """The float32 export of a model (float32, or mixed precision holding the same weights)
    computes exactly what the float32 model with those weights computes. The outputs span
    (0, 1), and a model lacking the copied weights misses them by far more than the tolerance.
    (Against the bfloat16 model's own outputs no tight check is possible: with a head this
    sensitive, bfloat16's ~3 digits move them by up to ~0.9.)"""
    ref, x = _export_check_model()
    model = ref
    if policy != "float32":
        model = models.build_model("efficientnet_b0", SIZE, dtype_policy=policy, drop_connect_rate=0.0)
        trainmodel.set_weights(model, ref)
        assert model.get_layer("stem_conv").compute_dtype == "bfloat16"
    export = trainmodel.export_float32(model, "efficientnet_b0", SIZE)
    assert export.get_layer("stem_conv").compute_dtype == "float32"
    want = _call(ref, x)
    assert_spread(want)
    atol = 1e-5
    np.testing.assert_allclose(_call(export, x), want, atol=atol)
    # the negative cases: the same architecture with its own weights is far off ...
    fresh = trainmodel.build_model("efficientnet_b0", SIZE, drop_connect_rate=0.0)
    assert np.abs(_call(fresh, x) - want).max() > 1000 * atol
    # ... and so is one with every weight but the backbone's statistics (the Normalization
    # snapshot and the BatchNorm moving averages must come across too)
    partial = trainmodel.build_model("efficientnet_b0", SIZE, drop_connect_rate=0.0)
    for layer in partial.layers:
        if layer.weights and not isinstance(layer, (keras.layers.BatchNormalization, keras.layers.Normalization)):
            layer.set_weights(ref.get_layer(layer.name).get_weights())
    assert np.abs(_call(partial, x) - want).max() > 1000 * atol


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'.*efficientnet_b0"):
        models.build_model("resnet50", SIZE)
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        trainmodel.build_model("efficientnet_b0", SIZE, weights=str(tmp_path / "nope.h5"))
    bad = tmp_path / "garbage.h5"
    bad.write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="garbage.h5"):
        trainmodel.build_model("efficientnet_b0", SIZE, weights=str(bad))
    with pytest.raises(FileNotFoundError, match="model.keras"):
        models.load_model(str(tmp_path / "empty_run"))


def test_registry_covers_v1_and_v2_and_the_test_backbone():
    efficientnets = {k: bb for k, bb in models.BACKBONES.items() if bb.family != "test"}
    assert [f"efficientnet_b{i}" for i in range(8)] == [k for k in efficientnets if "v2" not in k]
    assert {"efficientnetv2_b0", "efficientnetv2_b3", "efficientnetv2_s", "efficientnetv2_l"} <= set(efficientnets)
    for bb in efficientnets.values():
        assert hasattr(keras.applications, bb.keras_fn)
    assert [k for k, bb in models.BACKBONES.items() if bb.is_test] == [models.TEST_BACKBONE]


def test_the_test_backbone_is_small_normalises_like_the_others_and_has_no_imagenet_weights(tmp_path):
    """A few layers (tests and CI), ImageNet input normalisation, the trainer's names (stem,
    BatchNorm momentum, logits bias), a run of it as --weights; ImageNet weights refused."""
    model = trainmodel.build_model(models.TEST_BACKBONE, 32, bn_momentum=0.9,
                                   head_bias=trainmodel.prior_logits(np.full(NUM_CLASSES, 0.1)))
    assert model.count_params() < 20_000 and model.output.shape[-1] == NUM_CLASSES
    a, b = trainmodel.input_affine(model, 32)
    want_a, want_b = models._default_affine()
    np.testing.assert_allclose(a, want_a, rtol=1e-4)
    np.testing.assert_allclose(b, want_b, rtol=1e-4, atol=1e-4)
    assert {layer.momentum for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)} == {0.9}
    np.testing.assert_allclose(model.get_layer(models.LOGITS_LAYER).bias.numpy(), np.log(0.1 / 0.9), rtol=1e-5)
    with pytest.raises(ValueError, match="test_cnn .*no ImageNet weights"):
        trainmodel.build_model(models.TEST_BACKBONE, 32, weights="imagenet")
    models.save_model(model, str(tmp_path / "run" / "model.keras"))
    again = trainmodel.build_model(models.TEST_BACKBONE, 32, weights=str(tmp_path / "run"))
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 4)).astype(np.float32)
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_bn_momentum_and_prior_head_bias_are_set_and_saved(tmp_path):
    prior = np.linspace(0.01, 0.5, NUM_CLASSES)
    model = trainmodel.build_model("efficientnet_b0", SIZE, dropout=0.0, bn_momentum=0.9,
                                    head_bias=trainmodel.prior_logits(prior))
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) > 40 and {layer.momentum for layer in bns} == {0.9}
    # with a zero kernel the output is the bias alone: the model starts at the class prior
    dense = model.get_layer("logits")
    dense.kernel.assign(np.zeros(dense.kernel.shape, "float32"))
    x = np.random.default_rng(3).uniform(0, 255, (2, SIZE, SIZE, 4)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), np.tile(prior, (2, 1)), rtol=1e-5)
    # the momentum is layer configuration: it survives a save and load
    models.save_model(model, str(tmp_path / run_folder.MODEL_FILE))
    again = models.load_model(str(tmp_path))
    assert {layer.momentum for layer in again.layers
            if isinstance(layer, keras.layers.BatchNormalization)} == {0.9}
    # defaults: Keras' momentum, zero bias
    plain = models.build_model("efficientnet_b0", SIZE)
    assert {layer.momentum for layer in plain.layers
            if isinstance(layer, keras.layers.BatchNormalization)} == {0.99}
    assert not np.any(plain.get_layer("logits").bias.numpy())
    # a class absent from the data gets a low but finite logit
    assert np.isfinite(trainmodel.prior_logits([0.0, 1.0])).all()
    with pytest.raises(ValueError, match="head_bias: expected 19 finite values"):
        trainmodel.build_model("efficientnet_b0", SIZE, head_bias=[0.0, 1.0])
    with pytest.raises(ValueError, match="bn_momentum must be in"):
        trainmodel.build_model("efficientnet_b0", SIZE, bn_momentum=1.0)


@pytest.mark.parametrize("momentum, low, high", [(0.9, 4.0, 5.0), (0.99, 0.5, 1.5)])
def test_bn_momentum_set_after_building_takes_effect_in_training(momentum, low, high):
    """The moving mean after 20 training steps on data of mean 5: 0.9 follows it (5 * (1 -
    0.9^20) = 4.4), Keras' 0.99 still trails far behind (0.9). This is the statistic the
    exported model uses at inference."""
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.BatchNormalization()(inputs)))
    assert trainmodel.set_bn_momentum(model, momentum) == 1
    model.compile("sgd", "mse")
    x = np.full((32, 4), 5.0, np.float32) + np.random.default_rng(0).normal(0, 1, (32, 4)).astype("float32")
    for _ in range(20):
        model.train_on_batch(x, np.zeros((32, 1), np.float32))
    moving = model.layers[1].moving_mean.numpy()
    assert np.all((moving > low) & (moving < high)), moving


def _write_keras2_h5(model, path: str) -> None:
    """`model`'s weights in the legacy Keras 2 HDF5 layout of the files Keras downloads
    (`efficientnetb0_notop.h5`): root attributes `layer_names`, `backend`, `keras_version`
    2.x; one group per layer with a `weight_names` attribute (`{layer}/{weight}:0`) and one
    dataset per weight, in the layer's own order (trainable, then non-trainable)."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([l.name.encode() for l in model.layers])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.4.0"
        for layer in model.layers:
            g = f.create_group(layer.name)
            weights = list(layer.trainable_weights) + list(layer.non_trainable_weights)
            names = [f"{layer.name}/{w.name.split('/')[-1]}:0".encode() for w in weights]
            g.attrs["weight_names"] = np.array(names, dtype="S") if names else np.array([], dtype="S1")
            for name, w in zip(names, weights):
                g.create_dataset(name.decode(), data=np.asarray(w))


def test_legacy_keras2_imagenet_h5_file_loads_and_matches_on_rgb(tmp_path):
    """`--weights efficientnetb0_notop.h5` (the README's offline file): a Keras 2 HDF5 file
    as Keras' download holds it, ImageNet mean and std in the Normalization layer (the std in
    the variance slot, as Keras' files have it). The 4-channel model must give, on RGB input,
    what Keras' own weights="imagenet" model gives: (x/255 - mean) / std into the same network."""
    import h5py

    rng = np.random.default_rng(3)
    src = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    _randomise_statistics(src, rng)
    norm = [l for l in src.layers if isinstance(l, keras.layers.Normalization)][0]
    norm.adapt_mean.assign(models.IMAGENET_MEAN)
    norm.adapt_variance.assign(models.IMAGENET_STD)
    norm.finalize_state()
    path = str(tmp_path / "efficientnetb0_notop.h5")
    _write_keras2_h5(src, path)
    with h5py.File(path) as f:  # the legacy layout, not Keras 3's `.weights.h5`
        assert str(f.attrs["keras_version"]).lstrip("b'").startswith("2.") and "stem_conv" in f
        assert [bytes(n) for n in f["stem_conv"].attrs["weight_names"]] == [b"stem_conv/kernel:0"]
    model = trainmodel.build_model("efficientnet_b0", SIZE, weights=path, drop_connect_rate=0.0)
    x = rng.uniform(0, 255, (3, SIZE, SIZE, 4)).astype("float32")
    mean, std = np.array(models.IMAGENET_MEAN), np.array(models.IMAGENET_STD)
    # src normalises by sqrt(std); feed it the input whose result is (x/255 - mean) / std
    x_src = (255 * (mean + (x[..., :3] / 255 - mean) / np.sqrt(std))).astype("float32")
    want = np.asarray(src(x_src, training=False))
    got = np.asarray(_features(model)(x, training=False))
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
