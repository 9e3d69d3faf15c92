"""Keras' BatchNormalization trained through TensorFlow's fused kernel by cnnforge's trainer:
the same numbers as Keras' own layer, one kernel instead of a dozen unvectorised element-wise
ops, and a saved model that is still plain Keras."""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from cnnforge.modeling import batch_norm, training
from cnnforge.modeling.training import Recipe


def _network(seed: int = 0, **norm: object) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(x)  # the norm takes means off
    x = keras.layers.BatchNormalization(momentum=0.9, **norm)(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))


def _data(count: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, 12, 12, 3)).astype(np.uint8), rng.integers(0, 4, count)


def _train(model: keras.Model, *, fused: bool) -> keras.Model:
    x, y = _data()
    recipe = Recipe(learning_rate=0.01)
    training.compile_model(model, recipe, steps=4, fused_batch_norm=fused)
    data = training.training_data(x, y, recipe, num_classes=4, batch_size=16, seed=0)
    model.fit(data, epochs=1, verbose=0)
    return model


def _assert_trained_alike(fused: keras.Model, plain: keras.Model, untrained: keras.Model) -> None:
    for a, b, start in zip(fused.weights, plain.weights, untrained.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4, err_msg=a.path)
        # every weight and statistic trained: agreeing is not a no-op
        assert np.abs(a.numpy() - start.numpy()).max() > 1e-3, a.path


def _op_types(layer: keras.layers.Layer, training_mode: bool) -> set[str]:
    step = tf.function(lambda x: layer(x, training=training_mode))
    graph = step.get_concrete_function(tf.TensorSpec((None, 6, 6, 8), tf.float32)).graph
    return {op.type for op in graph.get_operations()}


def test_the_trainer_runs_keras_batch_normalization_through_the_fused_kernel():
    model = _network()
    training.compile_model(model, Recipe(), steps=4)
    layer = next(lay for lay in model.layers if isinstance(lay, keras.layers.BatchNormalization))
    assert type(layer) is keras.layers.BatchNormalization  # the user's layer, not a subclass
    assert "FusedBatchNormV3" in _op_types(layer, True)
    assert "FusedBatchNormV3" not in _op_types(layer, False)  # inference: Keras' own graph


def test_fused_training_gives_keras_numbers():
    """Weights, moving statistics and predictions after four steps, fused and not (Adam's
    steps of 0.01 agree to a hundredth: it magnifies the kernels' rounding where a gradient is
    near zero)."""
    fused, plain = _train(_network(), fused=True), _train(_network(), fused=False)
    _assert_trained_alike(fused, plain, _network())
    x, _ = _data(8)
    np.testing.assert_allclose(fused.predict(x, verbose=0), plain.predict(x, verbose=0), atol=1e-5)


def test_the_moving_statistics_are_the_batchs_own_as_keras_keeps_them():
    """Momentum 0 on a batch of 16 values a channel: the moving variance is the population
    variance (the kernel returns the sample variance, 16/15 of it)."""
    layer = keras.layers.BatchNormalization(momentum=0.0)
    batch_norm.fuse(keras.Sequential([keras.Input((2, 2, 3)), layer]))
    x = np.random.default_rng(1).normal(2.0, 3.0, (4, 2, 2, 3)).astype(np.float32)
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy(), x.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), x.var(axis=(0, 1, 2)), rtol=1e-5)


def test_a_fused_model_saves_and_loads_as_plain_keras(tmp_path):
    model = _train(_network(), fused=True)
    path = tmp_path / "model.keras"
    model.save(path)
    with zipfile.ZipFile(path) as saved:
        config = json.loads(saved.read("config.json"))
    norms = [lay for lay in config["config"]["layers"] if "Normalization" in lay["class_name"]]
    assert [(n["module"], n["class_name"]) for n in norms] == [
        ("keras.layers", "BatchNormalization")
    ]
    x, _ = _data(8)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_a_frozen_batch_normalization_keeps_its_statistics():
    model = _network()
    layer = model.layers[3]
    layer.trainable = False
    before = [w.numpy().copy() for w in layer.weights]
    _train(model, fused=True)
    for was, now in zip(before, layer.weights, strict=True):
        np.testing.assert_array_equal(was, now.numpy())


def test_without_gamma_and_beta_the_numbers_still_match():
    norm = {"center": False, "scale": False}
    fused, plain = _train(_network(**norm), fused=True), _train(_network(**norm), fused=False)
    assert "FusedBatchNormV3" in _op_types(fused.layers[3], True)
    _assert_trained_alike(fused, plain, _network(**norm))


class MyNorm(keras.layers.BatchNormalization):
    pass


@pytest.mark.parametrize(
    "layer",
    [MyNorm(), keras.layers.BatchNormalization(epsilon=1e-6), keras.layers.BatchNormalization(-3)],
    ids=["a subclass", "epsilon under cuDNN's least", "not the channels axis"],
)
def test_what_the_kernel_would_not_compute_as_keras_does_is_left_to_keras(layer):
    model = keras.Sequential([keras.Input((6, 6, 8)), layer])
    batch_norm.fuse(model)
    assert "FusedBatchNormV3" not in _op_types(layer, True)
