"""Filters and feature maps: the data per layer (shapes, layer choice, nested models), image
loading with its notes, bad input, and the explain command end to end."""

from __future__ import annotations

import keras
import keras_tuner
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cnnforge
from cnnforge.cli import cli
from cnnforge.core.errors import CnnforgeError
from cnnforge.data.dataset import DataSpec
from cnnforge.modeling.hypermodel import build_model
from cnnforge.modeling.keras_io import load_keras_model
from cnnforge.report.explain import (
    LayerInfo,
    choose_layers,
    explain,
    explain_array,
    feature_maps,
    first_conv_filters,
    load_image,
    representative_layers,
    spatial_layers,
)
from cnnforge.report.plots import most_active_channels

ARCHITECTURES = [p.name for p in cnnforge.list_plugins(kind="architecture")]
GRAY_28 = DataSpec("test", (28, 28, 1), tuple("abcdefghij"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_feature_maps_of_every_architecture_have_each_layers_shape(arch):
    model = build_model(cnnforge.get("architecture", arch), GRAY_28, keras_tuner.HyperParameters())
    image = np.random.default_rng(0).uniform(0, 255, (28, 28, 1)).astype(np.float32)
    explanation = explain_array(model, image, class_names=GRAY_28.class_names)

    conv_layers = [layer for layer in model.layers if "Conv" in type(layer).__name__]
    assert explanation.conv_layers == len(conv_layers) > 0
    assert [e.layer.path for e in explanation.feature_maps] == [c.name for c in conv_layers]
    for entry, layer in zip(explanation.feature_maps, conv_layers, strict=True):
        assert entry.maps.shape == tuple(layer.output.shape[1:]) == entry.layer.output_shape
        assert entry.layer.filters == layer.output.shape[-1]
        assert np.isfinite(entry.maps).all()
    first = explanation.filters
    assert first is not None and first.layer.path == conv_layers[0].name
    kh, kw = conv_layers[0].kernel_size
    assert first.kernels.shape == (conv_layers[0].output.shape[-1], kh, kw, 1)
    name, probability = explanation.prediction
    assert name in GRAY_28.class_names and 0 < probability <= 1


def test_feature_maps_equal_a_direct_submodel_output():
    model = build_model(
        cnnforge.get("architecture", "simple_cnn"), GRAY_28, keras_tuner.HyperParameters()
    )
    image = np.random.default_rng(1).uniform(0, 255, (28, 28, 1)).astype(np.float32)
    maps = feature_maps(model, image, choose_layers(model))
    assert len(maps) == 3  # the tutorial CNN's three conv layers
    for entry in maps:
        direct = keras.Model(model.inputs, model.get_layer(entry.layer.path).output)
        np.testing.assert_allclose(entry.maps, np.asarray(direct([image[None]]))[0], rtol=1e-5)


def _nested_model() -> keras.Model:
    """A backbone wrapped as one layer, as transfer-learning models are built."""
    inner_in = keras.Input((14, 14, 8))
    x = keras.layers.Conv2D(6, 3, name="block1_conv")(inner_in)
    x = keras.layers.Conv2D(4, 3, strides=2, name="block2_conv")(x)
    backbone = keras.Model(inner_in, x, name="backbone")
    inputs = keras.Input((28, 28, 3), name="images")
    y = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="stem")(inputs)
    y = backbone(y)
    y = keras.layers.GlobalAveragePooling2D()(y)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(y), name="nested")


def test_layers_inside_a_nested_model_are_reached_by_path():
    model = _nested_model()
    paths = [info.path for info in spatial_layers(model)]
    assert paths == ["stem", "backbone/block1_conv", "backbone/block2_conv"]
    image = np.random.default_rng(2).uniform(0, 255, (28, 28, 3)).astype(np.float32)
    chosen = choose_layers(model, ["stem", "block2_conv"])  # a unique bare name is enough
    maps = feature_maps(model, image, chosen)
    assert [m.maps.shape for m in maps] == [(14, 14, 8), (5, 5, 4)]
    stem_out = keras.Model(model.inputs, model.get_layer("stem").output)([image[None]])
    expected = model.get_layer("backbone")(stem_out)
    np.testing.assert_allclose(maps[1].maps, np.asarray(expected)[0], rtol=1e-5, atol=1e-6)
    filters = first_conv_filters(model)
    assert filters.kernels.shape == (8, 3, 3, 3) and filters.note == ""  # RGB kernels as they are


def test_an_unknown_layer_lists_the_valid_ones():
    with pytest.raises(CnnforgeError) as caught:
        choose_layers(_nested_model(), ["block2_cnov"])
    message = str(caught.value)
    assert "no layer 'block2_cnov'" in message and "did you mean backbone/block2_conv" in message
    assert "valid layers: stem, backbone/block1_conv, backbone/block2_conv" in message
    assert "\n" not in message


def _stage(count: int, size: int, start: int) -> list[LayerInfo]:
    return [LayerInfo(f"conv{start + i}", "Conv2D", (size, size, 8), (3, 3)) for i in range(count)]


def test_a_deep_model_shows_the_first_conv_and_the_end_of_each_stage():
    convs = _stage(10, 56, 0) + _stage(10, 28, 10) + _stage(10, 14, 20) + _stage(10, 7, 30)
    picked = representative_layers(convs, limit=12)
    assert [c.path for c in picked] == ["conv0", "conv9", "conv19", "conv29", "conv39"]
    assert representative_layers(convs[:5], limit=12) == convs[:5]  # few: all of them
    thinned = representative_layers(
        [c for s in range(20) for c in _stage(2, 100 - s, 2 * s)], limit=6
    )
    assert len(thinned) == 6 and thinned[0].path == "conv0" and thinned[-1].path == "conv39"


def test_most_active_channels_strongest_first():
    maps = np.zeros((2, 2, 4), np.float32)
    maps[..., 2], maps[..., 0] = 5.0, 1.0
    assert most_active_channels(maps, 3) == [2, 0, 1]


def test_an_image_of_another_size_and_mode_is_converted_and_said_so(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(path)
    loaded = load_image(path, (28, 28, 1))
    assert loaded.pixels.shape == (28, 28, 1) and loaded.pixels.dtype == np.float32
    assert loaded.pixels.max() == pytest.approx(200, abs=1)
    assert loaded.notes == [
        "converted photo.png from RGB to L",
        "resized photo.png from 60×40 to 28×28, the model's input size",
    ]
    assert load_image(path, (40, 60, 3)).notes == []


def test_a_file_that_is_not_an_image_is_one_line(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(CnnforgeError, match="cannot decode image .*notes.png"):
        load_image(bad, (28, 28, 1))
    with pytest.raises(CnnforgeError, match="does not exist"):
        load_image(tmp_path / "missing.png", (28, 28, 1))


def test_explain_a_trained_model_on_an_image_file(finished_run, small_npz, tmp_path):
    raw = np.load(small_npz)
    image = tmp_path / "item.png"
    Image.fromarray(raw["x_test"][0]).resize((56, 56)).save(image)
    result = explain(finished_run.run_dir, image, tmp_path / "out.png")
    assert result.figure == tmp_path / "out.png"
    with Image.open(result.figure) as png:
        assert png.width > 800 and png.height > 300
    assert any("resized item.png from 56×56 to 28×28" in n for n in result.explanation.notes)
    assert result.explanation.prediction[0] in raw["class_names"].tolist()  # class names, not ids


def test_explain_reads_an_exif_rotated_photo_as_predict_does(finished_run, small_npz, tmp_path):
    from cnnforge.deploy.predict import Classifier

    upright = np.load(small_npz)["x_test"][0]  # 28×28 grayscale
    turned = np.asarray(Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90))
    assert not np.array_equal(turned, upright)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90° clockwise to view
    path = tmp_path / "phone.png"
    Image.fromarray(turned).save(path, exif=exif)

    explained = explain(finished_run.run_dir, path, tmp_path / "out.png").explanation
    predicted = Classifier(finished_run.run_dir / "model.onnx").pixels(path)
    np.testing.assert_array_equal(explained.image, predicted)
    np.testing.assert_array_equal(explained.image[..., 0], upright.astype(np.float32))
    assert "turned phone.png upright, as its EXIF orientation (6) says" in explained.notes


def test_explain_command(finished_run, small_npz, tmp_path, postscript):
    image = tmp_path / "item.png"
    Image.fromarray(np.load(small_npz)["x_test"][1]).save(image)
    runner = CliRunner()
    model = str(finished_run.best_model)
    first_conv = next(i.path for i in spatial_layers(load_keras_model(model)) if i.is_conv)
    ok = runner.invoke(
        cli, ["explain", model, str(image), "--layers", first_conv, "-o", str(tmp_path / "e.png")]
    )
    assert ok.exit_code == 0, ok.output + ok.stderr
    assert first_conv in ok.output and "predicted:" in ok.output and (tmp_path / "e.png").is_file()
    bad = runner.invoke(cli, ["explain", model, str(image), "--layers", "conv9"])
    assert bad.exit_code == 1
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no layer 'conv9'" in lines[0] and "valid layers:" in lines[0]
    assert "Traceback" not in bad.output + bad.stderr
    (tmp_path / "drawing.eps").write_bytes(postscript)  # Ghostscript's, never opened
    refused = runner.invoke(cli, ["explain", model, str(tmp_path / "drawing.eps")])
    assert refused.exit_code == 1
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "drawing.eps is EPS," in lines[0], refused.stderr
