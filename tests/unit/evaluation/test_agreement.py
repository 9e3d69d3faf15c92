"""One preprocessing everywhere: ``cnnforge predict`` on a test folder's original files and
``cnnforge evaluate`` on the folder score the same, with the same tensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cnnforge
from cnnforge import Preprocessing
from cnnforge.cli import cli
from cnnforge.data.folders import scan_image_folder

CLASSES = ("blue", "red")


def tinted_folder(root: Path) -> Path:
    """train/ and test/ of two classes told apart by tint, in mixed sizes and modes (RGB JPEG,
    RGBA PNG, palette PNG, 16-bit grayscale PNG)."""
    rng = np.random.default_rng(1)
    for split, count in (("train", 24), ("test", 10)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = int(rng.integers(14, 40)), int(rng.integers(14, 40))
                base = rng.integers(0, 120, (height, width, 3)).astype(np.uint8)
                base[..., 2 if c == 0 else 0] += 120
                image = Image.fromarray(base, "RGB")
                kind = i % 4
                if kind == 0:
                    image.save(folder / f"{i}.jpg", quality=85)
                elif kind == 1:
                    image.convert("RGBA").save(folder / f"{i}.png")
                elif kind == 2:
                    image.convert("P").save(folder / f"{i}.png")
                else:
                    gray = np.asarray(image.convert("L"), np.uint16) * 257
                    Image.fromarray(gray).save(folder / f"{i}.png")
    return root


def small_model(input_shape: tuple[int, int, int]):
    import keras

    inputs = keras.Input(input_shape)
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy")
    return model


@pytest.mark.parametrize("policy", ["crop", "pad"])
def test_predict_on_original_files_agrees_with_evaluate(policy, tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    root = tinted_folder(tmp_path / "photos")
    wanted = Preprocessing(size=(20, 24), policy=policy, interpolation="bicubic")
    data = cnnforge.load_dataset(f"dir:{root}", preprocessing=wanted)
    model = small_model(data.spec.input_shape)
    model.fit(data.x_train, data.y_train, epochs=3, batch_size=8, verbose=0)
    model.save(tmp_path / "m.keras")
    onnx_path = tmp_path / "m.onnx"
    cnnforge.export(tmp_path / "m.keras", onnx_path, data=data)

    evaluated = CliRunner().invoke(
        cli, ["evaluate", str(onnx_path), "--data", f"dir:{root}", "--json", str(tmp_path / "e")]
    )
    assert evaluated.exit_code == 0, evaluated.output
    evaluation = json.loads((tmp_path / "e").read_text())

    files = scan_image_folder(root).splits["test"]
    predicted = CliRunner().invoke(
        cli,
        ["predict", str(onnx_path), *(str(f.path) for f in files), "-k", "1"]
        + ["--json", str(tmp_path / "p")],
    )
    assert predicted.exit_code == 0, predicted.output
    labels = [p["top"][0]["label"] for p in json.loads((tmp_path / "p").read_text())]
    accuracy = np.mean([label == CLASSES[f.label] for label, f in zip(labels, files, strict=True)])
    assert evaluation["images"] == len(files) == 20
    assert abs(accuracy - evaluation["accuracy"]) * 100 <= 0.3
    assert evaluation["accuracy"] > 0.5  # the tint is learnt: the agreement is not trivial

    # the tensors themselves: the deployed loader on each file == the training reader's array
    classifier = cnnforge.Classifier(onnx_path)
    assert classifier.preprocessing.policy == policy
    assert classifier.preprocessing.interpolation == "bicubic"
    deployed = np.stack([classifier.pixels(f.path) for f in files])
    trained = data.x_test.astype(np.float32)
    np.testing.assert_array_equal(deployed, trained)
