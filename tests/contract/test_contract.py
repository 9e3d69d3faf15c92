"""The contract every registered architecture and backbone plugin must meet, parametrized over
the registry: a new plugin, built-in or third-party, gets these tests for free."""

from __future__ import annotations

import keras
import keras_tuner
import numpy as np
import pytest

import cnnforge
from cnnforge.conversion.export import to_onnx
from cnnforge.conversion.parity import check_parity
from cnnforge.data.dataset import DataSpec
from cnnforge.deploy.runtime import open_session
from cnnforge.modeling import transfer
from cnnforge.modeling.hypermodel import build_model

ARCHITECTURES = [p.name for p in cnnforge.list_plugins(kind="architecture")]
# Every built-in backbone's contract converts a real keras.applications network (20-40 s on a
# busy 2-core machine): the slow tier. The fast tier checks the transfer path on a small test
# backbone (tests/unit/modeling/test_transfer.py).
BACKBONES = [p.name for p in cnnforge.list_plugins(kind="backbone")]
SPECS = {
    "grayscale 28": DataSpec("test", (28, 28, 1), tuple("abcdefghij")),
    "colour 32": DataSpec("test", (32, 32, 3), ("x", "y", "z")),
}


def test_the_registry_has_the_builtin_and_example_architectures():
    assert {"simple_cnn", "resnet", "depthwise_cnn"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_contract(arch, spec_name):
    spec = SPECS[spec_name]
    model = build_model(cnnforge.get("architecture", arch), spec, keras_tuner.HyperParameters())
    check_contract(model, spec)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_contract(backbone):
    """Weights none, at the smallest size the backbone takes (28x28 grayscale resized to it),
    frozen as a pretrained backbone is: the head trains. (Training a random backbone whole does
    not depend on the backbone: test_transfer checks it on one, and tracing the gradients of
    every backbone would take minutes.)"""
    plugin = cnnforge.get("backbone", backbone)
    hp = keras_tuner.HyperParameters()
    hp.Fixed("image_size", transfer.smallest_size(plugin))
    model = build_model(plugin, SPECS["grayscale 28"], hp)
    model.get_layer(transfer.BACKBONE_LAYER).trainable = False
    check_contract(model, SPECS["grayscale 28"])


def check_contract(model, spec):
    """Raw pixels in, probabilities out; it trains; it exports; parity holds; batch is dynamic."""
    assert model.inputs[0].shape[1:] == spec.input_shape
    assert model.outputs[0].shape[1:] == (spec.num_classes,)

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, *spec.input_shape)).astype("float32")
    y = np.eye(spec.num_classes)[rng.integers(0, spec.num_classes, 8)]  # one-hot: see training.py
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(x, y)
    assert np.isfinite(np.ravel(loss)[0])
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))

    probabilities = model(x, training=False).numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)

    proto = to_onnx(model)
    session = open_session(proto.SerializeToString())
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    assert session.get_inputs()[0].shape[0] == "batch"
    report = check_parity(model, proto.SerializeToString(), x, inputs="random", batch_sizes=(1, 3))
    assert report.passed, report.mismatches
    assert report.batch_axis_dynamic
    keras.backend.clear_session()


def test_simple_cnn_defaults_are_the_tensorflow_cifar10_tutorial_network():
    spec = DataSpec("cifar-like", (32, 32, 3), tuple(str(i) for i in range(10)))
    model = build_model(
        cnnforge.get("architecture", "simple_cnn"), spec, keras_tuner.HyperParameters()
    )
    layers = [type(layer).__name__ for layer in model.layers]
    assert layers == [
        "InputLayer",
        "Rescaling",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "Flatten",
        "Dense",
        "Dense",
    ]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [(c.filters, c.kernel_size, c.padding, c.activation.__name__) for c in convs] == [
        (32, (3, 3), "valid", "relu"),
        (64, (3, 3), "valid", "relu"),
        (64, (3, 3), "valid", "relu"),
    ]
    assert model.layers[-2].units == 64 and model.layers[-1].units == 10
    # The tutorial's model.summary(): 122,570 trainable parameters.
    assert model.count_params() == 122_570
    # The seed's training: Adam at a constant 1e-3, plain cross-entropy.
    assert type(model.optimizer) is keras.optimizers.Adam
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)
    assert isinstance(model.loss, keras.losses.CategoricalCrossentropy)
    assert model.loss.get_config()["label_smoothing"] == 0


def test_a_same_first_block_keeps_the_border_and_later_blocks_stay_valid():
    hp = keras_tuner.HyperParameters()
    hp.Fixed("first_block_padding", "same")
    model = build_model(cnnforge.get("architecture", "simple_cnn"), SPECS["grayscale 28"], hp)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.padding for c in convs] == ["same", "valid", "valid"]
    # 28 -> 28, pool 14 -> 12, pool 6 -> 4 (valid from the start: 26, 13 -> 11, 5 -> 3)
    assert [tuple(c.output.shape[1:3]) for c in convs] == [(28, 28), (12, 12), (4, 4)]
    keras.backend.clear_session()


def test_plugin_returning_a_feature_map_is_refused_with_a_hint():
    @cnnforge.architecture("returns_4d_for_test")
    def returns_4d(hp, inputs, spec):
        return keras.layers.Conv2D(4, 3)(inputs)

    spec = SPECS["grayscale 28"]
    with pytest.raises(cnnforge.CnnforgeError, match="must return a 2-D .* flatten or pool"):
        build_model(
            cnnforge.get("architecture", "returns_4d_for_test"), spec, keras_tuner.HyperParameters()
        )
