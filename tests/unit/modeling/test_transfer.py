"""Transfer learning: backbones, their weights, the two training stages, run: backbones, and the
one-line errors for what cannot work. Offline: weights=None or weights files the tests make."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import keras
import keras_tuner
import numpy as np
import pytest

import cnnforge
from cnnforge.conversion.export import export, to_onnx
from cnnforge.conversion.parity import check_parity
from cnnforge.core.errors import CnnforgeError
from cnnforge.data.dataset import DataSpec
from cnnforge.modeling import transfer
from cnnforge.modeling.hypermodel import PluginHyperModel, build_model, default_space
from cnnforge.tuning.search import SearchConfig, search

GRAY_28 = DataSpec("gray", (28, 28, 1), tuple("abcde"))
BUILT_IN = {
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "resnet50",
    "densenet121",
    "convnext_tiny",
}


def small_hp(**values) -> keras_tuner.HyperParameters:
    hp = keras_tuner.HyperParameters()
    for name, value in {"image_size": 32, **values}.items():
        hp.Fixed(name, value)
    return hp


def images(count: int, shape=(28, 28, 1), seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (count, *shape)).astype("float32"), rng.integers(0, 5, count)


def test_built_in_backbones_declare_their_sizes():
    backbones = {p.name: p for p in cnnforge.list_plugins(kind="backbone")}
    assert set(backbones) >= BUILT_IN
    for plugin in backbones.values():
        assert plugin.info["min_size"] <= plugin.info["native_size"]
        assert plugin.description
    mobilenet = backbones["mobilenet_v2"]
    assert transfer.image_sizes(mobilenet) == [128, 160, 192, 224]
    with pytest.raises(CnnforgeError, match="at least 32x32 pixels, got image_size=16.*resizes"):
        transfer.check_image_size(mobilenet, 16)


def with_weights(plugin, weights="pretrained.weights.h5"):
    """``plugin`` bound to a weights file, as ``--weights PATH`` binds it (these test backbones
    and mobilenet_v2 at ``weights=None`` build the same: only what is bound differs)."""
    return dataclasses.replace(plugin, info={**plugin.info, "weights": weights})


def test_a_backbone_without_pretrained_weights_trains_whole():
    """--weights none: a randomly initialised backbone frozen would leave only the head to
    learn (10 % validation, chance, was seen); it trains whole, its batch normalisation in
    training mode, with no second stage."""
    cnnforge.backbone("tiny_bn_for_test", native_size=16, min_size=16)(
        tiny_backbone_with_batch_norm
    )
    hypermodel = PluginHyperModel(cnnforge.get("backbone", "tiny_bn_for_test"), GRAY_28)
    hp = small_hp(image_size=16, fine_tune_layers=6)
    model = hypermodel.build(hp)
    backbone = model.get_layer("backbone")
    assert backbone.trainable and backbone.trainable_weights
    layers = transfer.leaf_layers(backbone)
    weights_of = {id(layer): [w.copy() for w in layer.get_weights()] for layer in layers}
    x, y = images(16)
    history = hypermodel.fit(hp, model, x, y, epochs=1, batch_size=8, verbose=0)
    assert history.epoch == [0]  # no fine-tuning stage after
    learned = [layer for layer in layers if layer.weights]
    for layer in learned:  # every convolution learned; every moving statistic moved
        after = layer.get_weights()
        assert all(
            not np.array_equal(a, b) for a, b in zip(weights_of[id(layer)], after, strict=True)
        )


@pytest.mark.slow
def test_transfer_model_resizes_colours_and_freezes_the_backbone(tmp_path):
    plugin = cnnforge.get("backbone", "mobilenet_v2")
    saved = tmp_path / "mobilenet_v2.weights.h5"  # "pretrained": any weights file binds
    transfer.build_backbone(plugin, (32, 32, 3)).save_weights(saved)
    keras.backend.clear_session()
    model = build_model(with_weights(plugin, str(saved)), GRAY_28, small_hp())
    names = [layer.name for layer in model.layers]
    assert names[:4] == ["images", "resize", "grayscale_to_rgb", "backbone"]
    assert names[-1] == "probabilities" and "avg_pool" in names
    backbone = model.get_layer("backbone")
    assert not backbone.trainable and not backbone.trainable_weights

    x, y = images(8)
    before = backbone.get_weights()
    head_before = model.get_layer("probabilities").get_weights()[0].copy()
    model.train_on_batch(x, np.eye(5)[y])  # one-hot: see training.py
    for old, new in zip(before, backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)  # moving statistics included
    assert not np.array_equal(head_before, model.get_layer("probabilities").get_weights()[0])


def test_the_space_is_read_from_the_hp_calls():
    pretrained = with_weights(cnnforge.get("backbone", "mobilenet_v2"))
    space = {hp.name: hp for hp in default_space(pretrained, GRAY_28)}
    assert space["image_size"].values == [128, 160, 192, 224] and space["image_size"].default == 224
    assert space["pooling"].values == ["avg", "max"]
    for name in (
        "dense_layers",
        "dense_units_0",
        "dropout",
        "fine_tune_layers",
        "fine_tune_lr_factor",
        "fine_tune_epochs",
        "learning_rate",
    ):
        assert name in space
    assert space["fine_tune_layers"].default == 0


def test_random_weights_start_from_the_datas_image_size_pretrained_ones_from_their_own():
    """--weights none: nothing was learned at 224, and 28×28 images upscaled to it cost ~50×
    the FLOPs of 32×32 (MobileNetV2's one epoch on the bundled data: 270 s)."""
    for name in BUILT_IN:
        plugin = cnnforge.get("backbone", name)
        space = {hp.name: hp for hp in default_space(plugin, GRAY_28)}
        assert space["image_size"].default == 32 and 32 in space["image_size"].values, name
        assert (
            transfer.default_image_size(with_weights(plugin), GRAY_28) == plugin.info["native_size"]
        )
    mobilenet = cnnforge.get("backbone", "mobilenet_v2")
    assert transfer.default_image_size(mobilenet, DataSpec("m", (100, 90, 3), tuple("ab"))) == 128
    assert transfer.default_image_size(mobilenet, DataSpec("l", (500, 500, 3), tuple("ab"))) == 224
    assert "image_size 32" in transfer.image_size_note(mobilenet, GRAY_28)
    assert transfer.image_size_note(with_weights(mobilenet), GRAY_28) is None


def tiny_backbone_with_batch_norm(input_shape, weights):
    """Conv-BatchNorm-ReLU x3 with moving statistics far from their initial values."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Rescaling(1 / 255)(inputs)
    for filters in (8, 16, 16):
        x = keras.layers.Conv2D(filters, 3, use_bias=False)(x)
        norm = keras.layers.BatchNormalization()
        x = keras.layers.ReLU()(norm(x))
        norm.moving_mean.assign(np.full(filters, 0.05, "float32"))
        norm.moving_variance.assign(np.full(filters, 0.5, "float32"))
    return keras.Model(inputs, x)


def test_fine_tuning_trains_the_top_layers_with_batchnorm_frozen():
    cnnforge.backbone("tiny_bn_for_test", native_size=16, min_size=16)(
        tiny_backbone_with_batch_norm
    )
    hypermodel = PluginHyperModel(
        with_weights(cnnforge.get("backbone", "tiny_bn_for_test")), GRAY_28
    )
    hp = small_hp(image_size=16, fine_tune_layers=6, fine_tune_epochs=2)
    model = hypermodel.build(hp)
    layers = transfer.leaf_layers(model.get_layer("backbone"))
    assert [type(layer).__name__ for layer in layers[-6:]] == [
        "Conv2D",
        "BatchNormalization",
        "ReLU",
    ] * 2
    weights_of = {id(layer): [w.copy() for w in layer.get_weights()] for layer in layers}

    x, y = images(32)
    history = hypermodel.fit(hp, model, x, y, epochs=1, batch_size=16, verbose=0)
    assert history.epoch == [0, 1, 2] and len(history.history["loss"]) == 3
    assert hypermodel.last_fit["epochs"] == 3

    def changed(layer):
        return any(
            not np.array_equal(a, b)
            for a, b in zip(weights_of[id(layer)], layer.get_weights(), strict=True)
        )

    convolutions = [layer for layer in layers if isinstance(layer, keras.layers.Conv2D)]
    assert [changed(layer) for layer in convolutions] == [False, True, True]
    batch_norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert not any(changed(layer) for layer in batch_norms)  # frozen, in inference mode


@pytest.mark.slow
def test_a_weights_file_loads_and_a_mismatched_one_is_refused(tmp_path):
    # The format keras downloads for --weights imagenet: the bare application, legacy .h5.
    application = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), include_top=False, weights=None
    )
    rng = np.random.default_rng(1)
    application.set_weights([rng.normal(size=w.shape) for w in application.get_weights()])
    weights_file = tmp_path / "mobilenet_v2_no_top.h5"
    application.save(weights_file)

    plugin = transfer.resolve_backbone("mobilenet_v2", str(weights_file))
    backbone = build_model(plugin, GRAY_28, small_hp()).get_layer("backbone")
    for expected, loaded in zip(application.get_weights(), backbone.get_weights(), strict=True):
        np.testing.assert_allclose(loaded, expected)

    with pytest.raises(CnnforgeError, match="does not fit backbone mobilenet_v3_small.*none"):
        transfer.resolve_backbone("mobilenet_v3_small", str(weights_file))
    with pytest.raises(CnnforgeError, match="does not exist"):
        transfer.resolve_backbone("mobilenet_v2", str(tmp_path / "missing.h5"))
    keras.backend.clear_session()


def test_exact_gelu_converts_through_the_erfc_handler():
    inputs = keras.Input((4, 4, 1), name="images")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 12.75, offset=-10)(inputs))
    x = keras.layers.Activation("gelu")(keras.layers.Dense(8, kernel_initializer="ones")(x))
    outputs = keras.layers.Dense(3, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs)
    proto = to_onnx(model)
    ops = {node.op_type for node in proto.graph.node}
    assert "Erf" in ops and "Erfc" not in ops
    pixels = np.linspace(0, 255, 16 * 16, dtype="float32").reshape(16, 4, 4, 1)  # x in -10..10
    report = check_parity(model, proto.SerializeToString(), pixels, inputs="ramp", atol=1e-6)
    assert report.passed, report.mismatches


@pytest.fixture(scope="module")
def transfer_run(finished_run, small_npz, tmp_path_factory):
    """A search whose backbone is the finished simple_cnn run, exported."""
    run_dir = tmp_path_factory.mktemp("transfer") / "run"
    config = SearchConfig(
        data=str(small_npz),
        backbone=f"run:{finished_run.run_dir}",
        run_dir=run_dir,
        max_trials=2,
        epochs=2,
        patience=0,
    )
    result = search(config)
    export(run_dir)
    return result


@pytest.mark.slow
def test_a_cnnforge_run_serves_as_a_frozen_backbone(transfer_run, finished_run):
    run_dir = transfer_run.run_dir
    assert (run_dir / "model.onnx").is_file()
    assert json.loads((run_dir / "parity.json").read_text())["passed"]
    config = json.loads((run_dir / "config.json").read_text())["search"]
    assert config["backbone"] == f"run:{finished_run.run_dir}" and config["arch"] is None

    source = keras.models.load_model(finished_run.run_dir / "best.keras")
    best = keras.models.load_model(run_dir / "best.keras")
    backbone = best.get_layer("backbone")
    assert backbone.layers[-1].name == transfer_run.best_trial.hyperparameters["backbone_layer"]
    trained = {layer.name: layer.get_weights() for layer in source.layers}
    for layer in backbone.layers:
        for kept, original in zip(layer.get_weights(), trained[layer.name], strict=True):
            np.testing.assert_array_equal(kept, original)
    first = transfer_run.trials[0].hyperparameters  # the baseline: cut under the classifier
    assert "image_size" not in first and first["fine_tune_layers"] == 0
    assert first["backbone_layer"] == "dense"


def test_a_run_backbone_can_be_cut_lower(finished_run):
    plugin = transfer.resolve_backbone(f"run:{finished_run.run_dir}")
    assert plugin.info["feature_layers"] == ["dense", "flatten"]
    hp = keras_tuner.HyperParameters()
    hp.Fixed("backbone_layer", "flatten")
    model = build_model(plugin, GRAY_28, hp)
    backbone = model.get_layer("backbone")
    assert backbone.layers[-1].name == "flatten" and backbone.output.shape == (None, 576)


def test_a_run_backbone_refuses_weights_and_wrong_channels(finished_run):
    with pytest.raises(CnnforgeError, match="brings the weights it was trained with"):
        transfer.resolve_backbone(f"run:{finished_run.run_dir}", "none")
    plugin = transfer.resolve_backbone(f"run:{finished_run.run_dir}")
    colour = DataSpec("colour", (32, 32, 3), ("x", "y"))
    with pytest.raises(CnnforgeError, match="takes 1-channel images and colour has 3"):
        build_model(plugin, colour, keras_tuner.HyperParameters())
    with pytest.raises(CnnforgeError, match="no best.keras"):
        transfer.resolve_backbone(f"run:{finished_run.run_dir.parent}")


@pytest.mark.slow  # a CLI process that imports TensorFlow and builds a backbone
def test_imagenet_weights_offline_is_one_line_and_writes_nothing(tmp_path, small_npz):
    code = (
        "import socket, sys\n"
        "def offline(*args, **kwargs):\n"
        "    raise OSError('network is unreachable (test)')\n"
        "socket.getaddrinfo = socket.create_connection = offline\n"
        "from cnnforge.cli import main\n"
        "sys.argv = ['cnnforge', 'search', '--backbone', 'mobilenet_v3_small',\n"
        f"            '--data', {str(small_npz)!r}, '--run-dir', {str(tmp_path / 'run')!r}]\n"
        "main()\n"
    )
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras_home")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "cannot get the ImageNet weights of backbone mobilenet_v3_small" in lines[0]
    assert "--weights PATH" in lines[0] and "--weights none" in lines[0]
    assert not (tmp_path / "run").exists()
    assert not list((tmp_path / "keras_home").rglob("*.h5")), "no partial download kept"
