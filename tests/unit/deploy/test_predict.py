"""The deployment API and `cnnforge predict`: real images written with Pillow, real sessions, and
proof that neither TensorFlow nor Keras is needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from cnnforge.cli import cli
from cnnforge.core.errors import CnnforgeError, CnnforgeWarning
from cnnforge.data.dataset import load_dataset
from cnnforge.deploy.predict import Classifier, classify
from cnnforge.deploy.runtime import open_session, predict


@pytest.fixture(scope="module")
def test_images(small_npz, tmp_path_factory):
    """Six test images as files: native 28×28 grayscale PNGs, an upscaled one, an RGB PNG."""
    dataset = load_dataset(str(small_npz))
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(4):
        path = folder / f"test{i}.png"
        Image.fromarray(dataset.x_test[i, :, :, 0]).save(path)
        paths.append(path)
    Image.fromarray(dataset.x_test[4, :, :, 0]).resize((84, 84), Image.NEAREST).save(
        folder / "big.png"
    )
    Image.fromarray(dataset.x_test[5, :, :, 0]).convert("RGB").save(folder / "rgb.png")
    return paths + [folder / "big.png", folder / "rgb.png"], dataset.x_test[:6], dataset


def test_top_k_labels_match_onnxruntime_on_the_raw_pixels(variants, test_images):
    paths, pixels, dataset = test_images
    model = variants["fp32"].onnx_path
    expected = predict(open_session(model), pixels.astype(np.float32))
    predictions = Classifier(model).predict(paths, top_k=3)
    assert [p.image for p in predictions] == [str(p) for p in paths]
    for index, (prediction, row) in enumerate(zip(predictions, expected, strict=True)):
        best = np.argsort(-row)[:3]
        labels = tuple(dataset.spec.class_names[i] for i in best)
        # the upscaled copy (NEAREST ×3, then bilinear back) has other pixels: its near-tied
        # runners-up may trade places, so only its first label is compared exactly
        compared = 1 if paths[index].name == "big.png" else 3
        assert prediction.labels[:compared] == labels[:compared]
        assert list(prediction.probabilities) == sorted(prediction.probabilities, reverse=True)
        # ... and its probabilities stay close to the original's
        np.testing.assert_allclose(prediction.probabilities, row[best], atol=0.05)
    np.testing.assert_allclose(
        [p.probabilities[0] for p in predictions[:4]], expected[:4].max(axis=1), rtol=1e-5
    )


def test_top_k_larger_than_the_classes_is_every_class(variants, test_images):
    (prediction,) = classify(variants["fp32"].onnx_path, test_images[0][:1], top_k=50)
    assert len(prediction.labels) == 10
    assert sum(prediction.probabilities) == pytest.approx(1.0, abs=1e-5)


def test_predict_honours_nchw_and_int8_variants(variants, test_images):
    paths = test_images[0]
    reference = Classifier(variants["fp32"].onnx_path).probabilities(paths)
    nchw = Classifier(variants["nchw"].onnx_path)
    assert nchw.layout == "NCHW" and (nchw.height, nchw.width, nchw.channels) == (28, 28, 1)
    np.testing.assert_allclose(nchw.probabilities(paths), reference, atol=1e-5)
    int8 = Classifier(variants["int8"].onnx_path)
    assert int8.precision == "int8"
    assert np.abs(int8.probabilities(paths) - reference).max() < 0.3


def test_arrays_and_pillow_images_are_accepted(variants, test_images):
    paths, pixels, _ = test_images
    classifier = Classifier(variants["fp32"].onnx_path)
    from_files = classifier.probabilities(paths[:2])
    from_arrays = classifier.probabilities([pixels[0], pixels[1, :, :, 0]])
    with Image.open(paths[0]) as first, Image.open(paths[1]) as second:
        from_pillow = classifier.probabilities([first, second])
    np.testing.assert_allclose(from_arrays, from_files, rtol=1e-6)
    np.testing.assert_allclose(from_pillow, from_files, rtol=1e-6)
    with pytest.raises(CnnforgeError, match="must be uint8"):
        classifier.probabilities([pixels[0].astype(np.float64)])


def test_undecodable_or_missing_image_is_one_clear_error(variants, tmp_path, test_images):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    classifier = Classifier(variants["fp32"].onnx_path)
    with pytest.raises(CnnforgeError, match=r"cannot decode image .*broken.png .*give a PNG"):
        classifier.predict([test_images[0][0], bad])
    with pytest.raises(CnnforgeError, match="missing.png does not exist"):
        classifier.predict([tmp_path / "missing.png"])
    with pytest.raises(CnnforgeError, match="no images given"):
        classifier.predict([])


def test_model_without_metadata_falls_back_to_the_graph_and_says_so(
    variants, tmp_path, test_images
):
    proto = onnx.load(variants["nchw"].onnx_path)
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, bare)
    with pytest.warns(CnnforgeWarning, match=r"no cnnforge metadata .*NCHW input 28×28×1.*indices"):
        classifier = Classifier(bare)
    assert classifier.class_names == tuple(str(i) for i in range(10))
    with_metadata = Classifier(variants["nchw"].onnx_path)
    (prediction,) = classifier.predict(test_images[0][:1], top_k=1)
    (named,) = with_metadata.predict(test_images[0][:1], top_k=1)
    assert named.labels[0] == with_metadata.class_names[int(prediction.labels[0])]


def test_predict_command_prints_top_k_and_writes_json(variants, test_images, tmp_path):
    paths = [str(p) for p in test_images[0][:2]]
    out = tmp_path / "labels.json"
    result = CliRunner().invoke(
        cli, ["predict", str(variants["fp32"].onnx_path), *paths, "-k", "2", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert [entry["image"] for entry in written] == paths
    assert all(len(entry["top"]) == 2 for entry in written)
    for entry in written:
        assert entry["top"][0]["label"] in result.output
        assert f"{entry['top'][0]['probability']:.4f}" in result.output


def test_predict_command_on_a_bad_image_is_one_line(variants, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("a text file")
    result = CliRunner().invoke(cli, ["predict", str(variants["fp32"].onnx_path), str(bad)])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: cannot decode image")


def test_predict_command_warns_in_one_line_without_metadata(variants, tmp_path, test_images):
    proto = onnx.load(variants["fp32"].onnx_path)
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "bare.onnx")
    result = CliRunner().invoke(
        cli, ["predict", str(tmp_path / "bare.onnx"), str(test_images[0][0])]
    )
    assert result.exit_code == 0
    assert result.stderr.startswith("warning: ") and "no cnnforge metadata" in result.stderr


BLOCK_TENSORFLOW = """
import importlib.abc, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf2onnx", "keras_tuner"):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, NoTensorFlow())
"""


def test_prediction_needs_neither_tensorflow_nor_keras(variants, test_images, tmp_path):
    """As on a deployment machine: importing TensorFlow, Keras or tf2onnx fails outright."""
    model, images = str(variants["int8"].onnx_path), [str(p) for p in test_images[0][:2]]
    code = BLOCK_TENSORFLOW + (
        "from cnnforge.deploy.predict import Classifier\n"
        f"predictions = Classifier({model!r}).predict({images!r}, top_k=3)\n"
        "assert len(predictions) == 2 and len(predictions[0].labels) == 3\n"
        "from click.testing import CliRunner\n"
        "from cnnforge.cli import cli\n"
        f"result = CliRunner().invoke(cli, ['predict', {model!r}, *{images!r}])\n"
        "assert result.exit_code == 0, result.output + str(result.exception)\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(tmp_path)
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _legacy_model(tmp_path, metadata: dict, name: str) -> Path:
    import tiny_onnx

    entries = {  # as the export stamps them: strings as they are, the rest as JSON
        f"cnnforge.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()
    }
    return tiny_onnx.save(
        tiny_onnx.conv_classifier(layout="NHWC", metadata=entries), tmp_path / name
    )


@pytest.mark.parametrize(
    "metadata, pixel_range",
    [
        # exported before the pixel range was recorded once: a copy inside the preprocessing
        ({"pixel_range": [0, 1], "preprocessing": {"pixel_range": [0, 255]}}, (0, 1)),
        ({"pixel_range": [0, 255], "preprocessing": {"pixel_range": [0, 255]}}, (0, 255)),
        ({"pixel_range": [0, 255], "preprocessing": {}}, (0, 255)),  # as exported now
        ({}, (0, 255)),  # before any pixel range
    ],
)
def test_models_exported_before_are_read_by_predict_and_evaluate_alike(
    metadata, pixel_range, tmp_path
):
    """The model's ``cnnforge.pixel_range`` is the one range: predict and evaluate scale the
    recorded (padded) pixels to it, whatever copy an older export left inside the preprocessing."""
    from cnnforge.core.preprocessing import Preprocessing
    from cnnforge.evaluation.evaluate import evaluate

    recorded = Preprocessing(size=(16, 16), policy="pad", interpolation="nearest", color_mode="RGB")
    if "preprocessing" in metadata:
        metadata = {
            **metadata,
            "preprocessing": {**recorded.to_json(), **metadata["preprocessing"]},
        }
    model = _legacy_model(tmp_path, {"input_layout": "NHWC", **metadata}, "old.onnx")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (8, 12, 20, 3), dtype=np.uint8)
    y = np.arange(8) % 4
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CnnforgeWarning)
        classifier = Classifier(model)
    shape = (16, 16, 3)
    expected = Preprocessing.of_model(metadata, shape).apply(Image.fromarray(x[0])) * (
        pixel_range[1] / 255
    )
    np.testing.assert_allclose(classifier.pixels(x[0]), expected, rtol=1e-6)
    probabilities = classifier.probabilities(list(x))
    direct = predict(open_session(model), np.stack([classifier.pixels(i) for i in x]))
    np.testing.assert_allclose(probabilities, direct, rtol=1e-6)
    result = evaluate(model, str(tmp_path / "d.npz"))
    predicted = probabilities.argmax(axis=1)
    assert result.accuracy == pytest.approx(float(np.mean(predicted == y)))
    assert np.array(result.confusion).sum() == 8


def test_top_and_batch_are_the_one_top_k_and_batch_predict_and_serve_use(tmp_path):
    import serving

    classifier = Classifier(serving.model(tmp_path / "nchw.onnx", layout="NCHW"))
    rows = np.array([[0.1, 0.4, 0.4, 0.1] + [0.0] * 6, [0.0] * 9 + [1.0]], np.float32)
    first, second = classifier.top(["a.png", "b.png"], rows, 2)
    assert first.labels == ("class1", "class2")  # a tie keeps the class order
    assert second.top == [("class9", 1.0), ("class0", 0.0)]
    assert len(classifier.top(["a"], rows[:1], 99)[0].labels) == 10
    with pytest.raises(CnnforgeError, match="top_k"):
        classifier.top(["a"], rows[:1], 0)
    pixels = [np.full((28, 28, 1), v, np.float32) for v in (0.0, 1.0)]
    batch = classifier.batch(pixels)
    assert batch.shape == (2, 1, 28, 28) and batch[1].min() == 1.0  # stacked, in NCHW
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    (prediction,) = classifier.predict([image], top_k=3)
    expected = classifier.top([prediction.image], classifier.probabilities([image]), 3)
    assert [prediction] == expected


@pytest.mark.parametrize("fixed", [1, 4])
def test_a_model_with_a_fixed_batch_size_predicts_any_number_of_images(tmp_path, fixed):
    """Three images through a batch-1 model (three calls) or a batch-4 one (one padded call)
    give the dynamic-batch model's answer, one row per image."""
    import serving

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (28, 28), np.uint8) for _ in range(3)]
    dynamic = Classifier(serving.model(tmp_path / "dynamic.onnx")).probabilities(images)
    classifier = Classifier(serving.model(tmp_path / "fixed.onnx", batch=fixed))
    assert classifier.fixed_batch == fixed
    np.testing.assert_allclose(classifier.probabilities(images), dynamic, rtol=1e-5, atol=1e-6)
    assert [p.labels for p in classifier.predict(images, top_k=2)] == [
        p.labels for p in Classifier(tmp_path / "dynamic.onnx").predict(images, top_k=2)
    ]
